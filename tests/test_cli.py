"""The reference command end to end, by name, on small files placed in a temporary D4RL cache; and bad input."""
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest

import launch
from conftest import SCRIPT, TINY_NETS, run_main, write_d4rl_file

SHORT = ["--max-steps=30", "--warmup-steps=10", "--eval-every=15", "--eval-episodes=2"]  # the default networks


def run(args, cwd, cache, timeout=600, launcher=launch):
    env = dict(os.environ, D4RL_DATASET_DIR=str(cache), BEAR_D4RL_BASE_URL="http://127.0.0.1:9/offline_rl")
    # port 9 (discard) refuses connections here: any download attempt fails at once, nothing leaves the machine
    return launcher.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def test_reference_command_on_a_cached_file(bear, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cached = cache / "walker2d_random-v2.hdf5"
    write_d4rl_file(cached, n=2000)
    before = digest(cached)
    # six evaluations, on one thread so that they are the same everywhere: their best is not their last
    out = run(["--dataset=walker2d-random-v2", "--seed=0", "--gpu=0", *SHORT, "--eval-every=5", "--threads=1"],
              tmp_path, cache, launcher=subprocess)  # the real command line, start-up included
    assert out.returncode == 0, out.stderr
    assert digest(cached) == before  # the cached file is read, never touched
    run_dir = tmp_path / "runs" / "walker2d-random-v2__seed0"
    results = json.loads((run_dir / "results.json").read_text())
    assert math.isfinite(results["final_normalized_score"]) and math.isfinite(results["best_normalized_score"])
    scores = [float(row.split(",")[-1]) for row in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert results["final_normalized_score"] == pytest.approx(scores[-1], rel=1e-8)  # the last evaluation's
    assert results["best_normalized_score"] == pytest.approx(max(scores), rel=1e-8)  # the best evaluation's
    assert max(scores) > scores[-1]  # so the line above tells "best" from "last"
    returns = [float(row.split(",")[-2]) for row in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert results["final_return"] == pytest.approx(returns[-1], rel=1e-8)
    assert results["best_return"] == pytest.approx(max(returns), rel=1e-8)
    assert scores[-1] == pytest.approx(100 * (returns[-1] - 1.629008) / (4592.3 - 1.629008), rel=1e-6)  # D4RL's constants
    assert results["steps"] == 30 and results["dataset_source"] == "cache" and results["device"] == "cpu"
    assert "bytes, D4RL publishes 216109364" in results["dataset_notes"][0]  # the small file's size is recorded
    assert results["comparable_with_published"] is False
    assert results["wall_clock_seconds"] > 0 and results["train_steps_per_second"] > 0
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == ["step", "vae_loss", "critic_loss", "actor_loss", "alpha_loss", "alpha", "alpha_at_clamp",
                                  "mmd", "q_mean", "q_data", "q_data_min", "q_data_max", "return_data", "q_gap", "q_ratio",
                                  "eval_return", "eval_normalized_score"]
    assert [r.split(",")[0] for r in rows[1:]] == ["5", "10", "15", "20", "25", "30"] and all(r.split(",")[-1] for r in rows[1:])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["max_steps"] == 30 and config["kernel_used"] == "laplacian" and config["env_id"] == "Walker2d-v4"
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert "CUDA is not available" in out.stderr or "cuda" in results["device"]
    assert "Traceback" not in out.stderr

    # the same command again never overwrites the first run (main() in this process)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(cache))
    monkeypatch.setenv("BEAR_D4RL_BASE_URL", "http://127.0.0.1:9/offline_rl")
    code, _, err = run_main(bear, ["--dataset=walker2d-random-v2", "--seed=0", "--gpu=-1", "--max-steps=20",
                                   "--eval-every=20", "--eval-episodes=1", "--log-every=10", *TINY_NETS], capsys)
    assert code == 0, err
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert json.loads((run_dir.with_name(run_dir.name + "-2") / "results.json").read_text())["steps"] == 20


def test_offline_random_dataset_is_regenerated_once_and_marked(bear, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)  # main() in this process
    monkeypatch.setenv("D4RL_DATASET_DIR", str(cache))
    monkeypatch.setenv("BEAR_D4RL_BASE_URL", "http://127.0.0.1:9/offline_rl")
    args = ["--dataset=hopper-random-v2", "--seed=1", "--gpu=-1", "--max-steps=40", "--warmup-steps=20",
            "--eval-every=40", "--eval-episodes=1", "--regen-steps=4000", "--log-every=20", *TINY_NETS]
    code, out, err = run_main(bear, args, capsys)
    assert code == 0, err
    assert "REGENERATED" in err and "NOT comparable with published tables" in err
    assert "regenerating 4000 random steps" in out
    files = sorted(p.name for p in cache.iterdir())
    assert files == ["bear-regenerated_hopper_random-v2_Hopper-v4_4000steps.hdf5"]  # never D4RL's own file name
    results = json.loads((tmp_path / "runs" / "hopper-random-v2__seed1" / "results.json").read_text())
    assert results["dataset_source"] == "regenerated" and results["comparable_with_published"] is False
    assert math.isfinite(results["final_normalized_score"])
    code, out, err = run_main(bear, args, capsys)
    assert code == 0, err
    assert "regenerating" not in out  # reused


def test_offline_non_random_dataset_fails_with_url_and_path(tmp_path):
    out = run(["--dataset=hopper-medium-v2", "--gpu=-1"], tmp_path, tmp_path / "cache")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert "http://127.0.0.1:9/offline_rl/gym_mujoco_v2/hopper_medium-v2.hdf5" in lines[0]
    assert str(tmp_path / "cache" / "hopper_medium-v2.hdf5") in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--max-steps=-5"], "--max-steps=-5 must be a positive whole number"),
    (["--batch-size=0"], "--batch-size=0 must be a positive whole number"),
    (["--dataset=walker2d-randm-v2"], "did you mean walker2d-random-v2?"),
    (["--kernel=rbf"], "--kernel=rbf is unknown"),
    (["--gamma=1.5"], "--gamma=1.5 is out of range"),
    (["--max-steps=ten"], "invalid int value: 'ten'"),
    (["--no-such-flag=1"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_exit_2(bear, tmp_path, monkeypatch, capsys, args, message):
    """main() in this process; test_bad_input_through_the_command_line checks the same through a real process."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BEAR_D4RL_BASE_URL", "http://127.0.0.1:9/offline_rl")
    code, _, err = run_main(bear, args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("args, message", [
    (["--max-steps=ten"], "invalid int value: 'ten'"),  # refused by the parser
    (["--gamma=1.5"], "--gamma=1.5 is out of range"),  # refused by validate(), as a UserError
])
def test_bad_input_through_the_command_line_is_one_line_exit_2(tmp_path, args, message):
    out = run(args, tmp_path, tmp_path / "cache")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.fixture(scope="module")
def help_text(tmp_path_factory):
    """`bear-train.py --help`, once, through the real command line."""
    folder = tmp_path_factory.mktemp("help")
    out = run(["--help"], folder, folder / "cache")
    assert out.returncode == 0
    return out.stdout


def test_help_lists_every_hyperparameter_with_its_meaning(help_text, bear):
    import dataclasses

    for f in dataclasses.fields(bear.Config):
        assert f"--{f.name.replace('_', '-')}" in help_text
    assert "transitions per gradient step" in help_text


def test_flags_accept_both_spellings(bear):
    [a] = bear.parse_args(["--max-steps=1e4", "--batch-size", "64", "--max_steps", "2_000", "--compile"])
    assert (a.max_steps, a.batch_size, a.compile) == (2000, 64, True)


def test_importing_runs_nothing(tmp_path):
    code = f"import importlib.util as u; s = u.spec_from_file_location('m', r'{SCRIPT}'); m = u.module_from_spec(s); " \
           "s.loader.exec_module(m); print('imported', m.Config().max_steps)"
    out = subprocess.run([sys.executable, "-c", code, "--dataset=nonsense"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "imported 1000000\n"
    assert list(tmp_path.iterdir()) == []


def _bad_files(tmp_path):
    import numpy as np

    cases = {}
    (tmp_path / "walker2d_text.hdf5").write_text("not hdf5")
    cases["not_hdf5"] = ("walker2d_text.hdf5", "is not a readable HDF5 file")
    write_d4rl_file(tmp_path / "walker2d_nokeys.hdf5", n=50, timeouts=None)
    cases["missing_keys"] = ("walker2d_nokeys.hdf5", "lacks the key(s) timeouts")
    write_d4rl_file(tmp_path / "walker2d_short.hdf5", n=50, rewards=np.zeros(49, np.float32))
    cases["lengths"] = ("walker2d_short.hdf5", "inconsistent length")
    acts = np.zeros((50, 6), np.float32)
    acts[7, 2] = np.nan
    write_d4rl_file(tmp_path / "walker2d_nan.hdf5", n=50, actions=acts)
    cases["nan"] = ("walker2d_nan.hdf5", "actions has a non-finite value in row 7")
    write_d4rl_file(tmp_path / "hopper_wide.hdf5", n=50, obs_dim=17)
    cases["dims"] = ("hopper_wide.hdf5", "observations have shape (50, 17), hopper needs (N, 11)")
    cases["missing"] = ("walker2d_missing.hdf5", "does not exist")
    return cases


@pytest.mark.parametrize("case", ["not_hdf5", "missing_keys", "lengths", "nan", "dims", "missing", "log_file",
                                  "log_unwritable"])
def test_bad_files_and_folders_are_one_line_exit_2_and_change_nothing(bear, tmp_path, monkeypatch, capsys, case):
    data = tmp_path / "data"
    data.mkdir()
    cases = _bad_files(data)
    if case in cases:
        args, message = [f"--dataset={data / cases[case][0]}"], cases[case][1]
    else:
        write_d4rl_file(data / "walker2d_ok.hdf5", n=50)
        args = [f"--dataset={data / 'walker2d_ok.hdf5'}"]
        if case == "log_file":
            (tmp_path / "afile").write_text("keep me")
            args.append(f"--log-dir={tmp_path / 'afile'}")
            message = "is a file, not a folder"
        else:
            args.append("--log-dir=/proc/bear-runs")  # even root cannot create folders there
            message = "is not writable"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.chdir(tmp_path)  # main() in this process
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BEAR_D4RL_BASE_URL", "http://127.0.0.1:9/offline_rl")
    code, _, err = run_main(bear, args + ["--gpu=-1"], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "runs").exists()


def test_help_is_grouped_as_config_is(bear, help_text):
    """Every flag in exactly one --help group; the groups are Config's sections, in Config's order, and each field
    sits under the section() above it."""
    import dataclasses

    assert bear.SECTIONS[:5] == ["run", "BEAR", "networks and optimisers", "evaluation and logging", "data"]
    assert bear.SECTIONS[5].startswith("after training") and bear.SECTIONS[6].startswith("sweep")
    assert len(bear.SECTIONS) == 7
    parser_groups = {}
    real = bear.OneLineParser.parse_args
    bear.OneLineParser.parse_args = lambda self, argv=None: parser_groups.update(
        {g.title: [a.dest for a in g._group_actions] for g in self._action_groups}) or real(self, argv)
    try:
        bear.parse_args([])
    finally:
        bear.OneLineParser.parse_args = real
    fields = [f.name for f in dataclasses.fields(bear.Config)]
    grouped = [dest for title in bear.SECTIONS for dest in parser_groups[title]]
    assert sorted(grouped) == sorted(fields) and len(grouped) == len(set(grouped))  # each in exactly one group
    assert grouped == fields  # in Config's order, section by section
    assert parser_groups["BEAR"][0] == "gamma" and parser_groups["data"] == ["regen_steps", "regen_workers", "offline"]
    positions = [help_text.index(f"\n{title}:\n") for title in bear.SECTIONS]
    assert positions == sorted(positions)
