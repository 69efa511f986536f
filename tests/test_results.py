"""What a run shows: TensorBoard events, the curves PNG, and --summarize seed tables across runs. The two runs train
once, in this process, for the whole module; only the exit codes are taken from bear-train.py's own process."""
import csv
import json
import shutil
import subprocess
import sys

import pytest

import launch
from conftest import SCRIPT, TINY_NETS, run_main, write_d4rl_file

SMALL = ["--actor-hidden=32", "--critic-hidden=32", "--vae-hidden=64", "--batch-size=64", "--warmup-steps=20",
         "--log-every=20", "--eval-episodes=2", "--eval-candidates=10", "--gpu=-1", "--max-steps=80",
         "--eval-every=40", "--eval-workers=0"]  # evaluation in the training process: the pool is test_evalpool's


def run(*args, cwd):
    return launch.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_seeds(bear, tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("results")
    write_d4rl_file(root / "hopper_tiny.hdf5", n=1000, obs_dim=11, act_dim=3)
    threads = torch.get_num_threads()
    try:
        for seed in (0, 1):
            assert bear.main([f"--dataset={root / 'hopper_tiny.hdf5'}", f"--seed={seed}", f"--log-dir={root / 'runs'}",
                              *SMALL]) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def test_each_run_has_tensorboard_events_and_a_curves_png(two_seeds):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for seed in (0, 1):
        folder = two_seeds / "runs" / f"hopper_tiny__seed{seed}"
        png = (folder / "curves.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
        events = EventAccumulator(str(folder)).Reload()
        tags = events.Tags()
        for tag in ("losses/critic_loss", "losses/actor_loss", "losses/vae_loss", "losses/alpha_loss", "charts/alpha", "charts/alpha_at_clamp",
                    "charts/mmd", "charts/q_mean", "charts/steps_per_second", "eval/eval_normalized_score",
                    "eval/eval_return", *(f"charts/q_vs_return/{k}" for k in ("q_data", "q_data_min", "q_data_max",
                                                                               "return_data", "q_gap", "q_ratio"))):
            assert tag in tags["scalars"], tag
        assert [e.step for e in events.Scalars("eval/eval_normalized_score")] == [40, 80]
        assert [e.step for e in events.Scalars("charts/q_vs_return/q_data")] == [20, 40, 60, 80]
        assert any("hyperparameters" in t for t in tags["tensors"])


def test_q_on_the_data_is_logged_against_the_probe_sets_return(bear, two_seeds):
    import csv

    import numpy as np

    folder = two_seeds / "runs" / "hopper_tiny__seed0"
    config = json.loads((folder / "config.json").read_text())
    data = bear.to_transitions(bear.read_d4rl(two_seeds / "hopper_tiny.hdf5", "hopper"), config["gamma"])
    probe = bear.probe_rows(data["returns_complete"], config["probe_size"])
    assert config["probe_pairs"] == len(probe) > 100
    assert config["probe_return"] == pytest.approx(float(data["returns"][probe].mean()))
    assert config["q_bound"] == pytest.approx(float(data["rewards"].max()) / (1 - config["gamma"]))
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for row in rows:
        q, lo, hi, ret = (float(row[k]) for k in ("q_data", "q_data_min", "q_data_max", "return_data"))
        assert lo <= q <= hi and ret == pytest.approx(config["probe_return"])
        assert float(row["q_gap"]) == pytest.approx(q - ret) and float(row["q_ratio"]) == pytest.approx(q / ret)
    assert len({row["q_data"] for row in rows}) == 4  # the critics change between rows
    # the last row's Q, recomputed from the run's final critics on the probe pairs
    agent_state = torch_load_newest(folder)["agent"]
    critics = bear.QEnsemble(11, 3, 32, 2)
    critics.load_state_dict(agent_state["critics"])
    stats = bear.q_vs_return(critics, *(torch_tensor(data[k][probe]) for k in ("observations", "actions")),
                             config["probe_return"])
    assert float(rows[-1]["q_data"]) == pytest.approx(stats["q_data"], rel=1e-6)
    assert float(rows[-1]["q_data_min"]) == pytest.approx(stats["q_data_min"], rel=1e-6)
    assert np.isfinite(stats["q_data_max"])


def torch_load_newest(folder):
    import torch

    return torch.load(sorted(folder.glob("checkpoint-*.pt"))[-1], weights_only=False)


def torch_tensor(x):
    import torch

    return torch.as_tensor(x)


def test_summarize_gives_mean_and_std_over_seeds_and_marks_unfinished_and_regenerated(bear, two_seeds, capsys):
    runs = two_seeds / "runs"
    code, out, err = run_main(bear, [f"--summarize={runs}"], capsys)
    assert code == 0, err
    finals = [json.loads((runs / f"hopper_tiny__seed{s}" / "results.json").read_text())["final_normalized_score"]
              for s in (0, 1)]
    mean, std = sum(finals) / 2, abs(finals[0] - finals[1]) / 2  # numpy's std (ddof 0) of two numbers
    row = next(line for line in out.splitlines() if line.startswith("| hopper_tiny |"))
    assert f"| 2 | 80 | {mean:.1f} ± {std:.1f} |" in row
    assert (runs / "summary.md").read_text().startswith("| dataset |")
    assert (runs / "summary_hopper_tiny.png").read_bytes().startswith(b"\x89PNG")

    # an unfinished run (no results.json) and one on regenerated data are marked
    copy = runs / "hopper_tiny__seed2"
    shutil.copytree(runs / "hopper_tiny__seed0", copy)
    (copy / "results.json").unlink()
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"seed": 2, "dataset_source": "regenerated"}))
    code, out, err = run_main(bear, [f"--summarize={runs}"], capsys)
    row = next(line for line in out.splitlines() if line.startswith("| hopper_tiny |"))
    assert code == 0 and "| 3 |" in row and "1 unfinished" in row and "REGENERATED" in row


def test_summarize_of_an_empty_folder_is_a_one_line_error(tmp_path):
    out = run(f"--summarize={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "no runs" in out.stderr


def test_wandb_flag_without_the_package_is_a_one_line_error(tmp_path):
    pytest.importorskip("torch")
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    out = run("--wandb", "--gpu=-1", cwd=tmp_path)
    assert out.returncode == 2 and "pip install wandb" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_summarize_skips_a_run_that_has_not_trained_yet_with_a_note(bear, two_seeds, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(two_seeds / "runs" / "hopper_tiny__seed0", runs / "hopper_tiny__seed0")
    (runs / "hopper_tiny__seed1").mkdir()  # started, stopped before its first row: config.json, no metrics.csv
    shutil.copy(two_seeds / "runs" / "hopper_tiny__seed1" / "config.json", runs / "hopper_tiny__seed1")
    code, out, err = run_main(bear, [f"--summarize={runs}"], capsys)
    assert code == 0, err
    assert "| hopper_tiny | 1 | 80 |" in out
    assert err.strip().splitlines() == [f"skipped {runs / 'hopper_tiny__seed1'} (no metrics.csv: it has not "
                                               "trained yet, or is not a run folder)"]
    shutil.rmtree(runs / "hopper_tiny__seed0")
    out = run(f"--summarize={runs}", cwd=tmp_path)  # the real command's exit code and stderr
    assert out.returncode == 2 and "no runs with an evaluation" in out.stderr and "Traceback" not in out.stderr


def test_curves_png_is_redrawn_at_the_end_only_when_rows_came_after_the_last_drawing(bear, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(bear, "plot_curves", lambda rows, path, *a: (drawn.append([r["step"] for r in rows]),
                                                                    path.write_bytes(b"png")))
    row = {k: 1.0 for k in bear.METRICS}
    for run in ("evaluated_last", "trained_after", "png_removed"):
        (tmp_path / run).mkdir()
        logger = bear.Logger(tmp_path / run, bear.Config(), None, "t")
        logger.write(20, {**row, "step": 20, "eval_return": 1.0, "eval_normalized_score": 1.0}, 1.0)  # drawn: the first evaluation
        if run == "trained_after":
            logger.write(40, {**row, "step": 40}, 1.0)
        if run == "png_removed":
            (tmp_path / run / "curves.png").unlink()
        logger.close()
    # the end draws again only what the last drawing missed, or a curves.png that is gone
    assert drawn == [["20"], ["20"], ["20", "40"], ["20"], ["20"]]


@pytest.mark.parametrize("epsilon, pinned", [(0.001, True), (2.0, False)])
def test_a_run_whose_epsilon_is_below_the_mmds_floor_says_once_that_alpha_is_pinned(bear, tmp_path, capsys, epsilon,
                                                                                     pinned):
    """No MMD is below sqrt(1e-6) = 0.001 (the jitter), none above sqrt(2 + 1e-6) < 2. Log alpha starts at its clamp,
    so the warm-up interval is pinned too: the line waits for a whole interval after warm-up, and comes once."""
    write_d4rl_file(tmp_path / "hopper_tiny.hdf5", n=500, obs_dim=11, act_dim=3)
    runs = tmp_path / "runs"
    code, out, err = run_main(bear, [f"--dataset={tmp_path / 'hopper_tiny.hdf5'}", f"--log-dir={runs}", *TINY_NETS,
                                     f"--epsilon={epsilon}", "--log-alpha-init=0.05", "--log-alpha-max=0.05",
                                     "--warmup-steps=10", "--log-every=10", "--max-steps=40", "--eval-every=40",
                                     "--eval-episodes=1", "--eval-candidates=2", "--probe-size=8", "--gpu=-1",
                                     "--eval-workers=0", "--threads=1"], capsys)
    assert code == 0, err
    lines = [line for line in (out + err).splitlines() if "is pinned" in line]
    run_dir = runs / "hopper_tiny__seed0"
    results = json.loads((run_dir / "results.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        shares = [float(row["alpha_at_clamp"]) for row in csv.DictReader(f)]
    summary = bear.summarize(runs)
    if pinned:
        assert len(lines) == 1, lines
        assert lines[0].startswith("note: α is pinned at e^0.05: the MMD (") and "cannot reach ε (0.001); the actor " \
            "ignores Q (steps 11-20)" in lines[0] and all(f in lines[0] for f in ("--epsilon", "--mmd-samples", "--kernel"))
        assert shares == [1, 1, 1, 1]
        assert results["alpha_pinned"]["step"] == 20 and results["alpha_pinned"]["epsilon"] == 0.001
        assert results["alpha_pinned"]["mmd"] > 0.001
        assert "ALPHA PINNED in 1 of 1" in summary
    else:
        assert lines == [] and results["alpha_pinned"] is None and max(shares) < 1
        assert "PINNED" not in summary


def test_summarize_counts_alpha_as_pinned_only_for_a_whole_interval_after_warm_up(bear):
    rows = [{"step": "10", "alpha_at_clamp": "1"}, {"step": "20", "alpha_at_clamp": "0.9"}]
    assert bear.pinned_step(rows, 10) is None  # pinned in warm-up only, then not for a whole interval
    assert bear.pinned_step(rows + [{"step": "30", "alpha_at_clamp": "1"}], 10) == 30
    assert bear.pinned_step([{"step": "10", "alpha_at_clamp": ""}], 0) is None  # a run from before the column


def fake_run(folder, seed, scores, **setting):
    """A finished run folder as summarize reads it: config.json and metrics.csv with one evaluation per score."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed, "dataset": "hopper_b.hdf5", "dataset_name": "hopper_b",
                                                    "dataset_source": "d4rl", **setting}))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["step", "eval_normalized_score", "q_data"])
        writer.writeheader()
        writer.writerows({"step": 100 * (i + 1), "eval_normalized_score": s, "q_data": 1.0} for i, s in enumerate(scores))
    (folder / "results.json").write_text(json.dumps({"steps": 100 * len(scores)}))


def test_a_grid_and_a_plain_sweep_in_one_folder_are_grouped_by_their_configs_and_ranked_by_final_iqm(bear, tmp_path,
                                                                                                      capsys):
    # a plain sweep (the default epsilon 0.05) and a grid over epsilon, in one --log-dir; the grid's epsilon=0.05
    # runs and the plain sweep's are one setting. epsilon=0.1 has the best *best* score but the worst final one.
    # One folder's name lies about its setting: the grouping comes from config.json.
    fake_run(tmp_path / "hopper_b__seed0", 0, [10, 30])
    fake_run(tmp_path / "hopper_b__seed1", 1, [10, 32])
    fake_run(tmp_path / "grid" / "hopper_b__epsilon=0.05__seed2", 2, [10, 34], epsilon=0.05)
    fake_run(tmp_path / "grid" / "hopper_b__epsilon=0.1__seed0", 0, [90, 20], epsilon=0.1)
    fake_run(tmp_path / "grid" / "hopper_b__epsilon=0.1__seed1", 1, [90, 22], epsilon=0.1)
    fake_run(tmp_path / "grid" / "hopper_b__epsilon=0.025__seed0", 0, [10, 25], epsilon=0.025)
    fake_run(tmp_path / "grid" / "hopper_b__epsilon=0.1__seed9", 1, [10, 26], epsilon=0.025)  # its name is wrong
    code, out, err = run_main(bear, [f"--summarize={tmp_path}"], capsys)
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| hopper_b |")]
    assert [row.split(" | ")[1:4] for row in rows] == [
        ["epsilon=0.05", "**1 (best)**", "3"], ["epsilon=0.025", "2", "2"], ["epsilon=0.1", "3", "2"]]
    assert "| 32.0 ± 1.6 | 32.0 ± 1.6 | 32.0 [30.0, 34.0] |" in rows[0]  # 3 seeds: IQM cuts none
    assert "hopper_b: epsilon=0.05 ranks first, final IQM 32.0. It was chosen on the same runs' evaluation returns, " \
           "so that score is optimistic" in out
    assert (tmp_path / "summary_hopper_b.png").read_bytes().startswith(b"\x89PNG")
