"""After training: the final and best policies kept in every run folder, --evaluate, the torch-only policy file."""
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import launch
from conftest import write_d4rl_file

TINY = ["--actor-hidden=16", "--critic-hidden=16", "--vae-hidden=16", "--batch-size=32", "--warmup-steps=100",
        "--log-every=25", "--eval-episodes=2", "--eval-candidates=4", "--probe-size=64", "--gpu=-1",
        "--eval-workers=0", "--threads=1", "--max-steps=400", "--eval-every=100", "--checkpoint-every=100"]


@pytest.fixture(scope="module")
def run(bear, tmp_path_factory):
    """A finished tiny run, trained in this process."""
    root = tmp_path_factory.mktemp("policy")
    write_d4rl_file(root / "walker2d_tiny.hdf5", n=1500)
    assert bear.main([f"--dataset={root / 'walker2d_tiny.hdf5'}", f"--log-dir={root / 'runs'}", *TINY]) == 0
    return root / "runs" / "walker2d_tiny__seed0"


@pytest.fixture
def folder(run, tmp_path):
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    return copy


def one_line(text):
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip() and not re.search(r"\d%\|", line)]
    assert len(lines) == 1, text
    return lines[0]


def evaluations(folder):
    """(step, return, score) of every evaluation row of metrics.csv."""
    import csv

    with open(folder / "metrics.csv") as f:
        return [(int(r["step"]), float(r["eval_return"]), float(r["eval_normalized_score"]))
                for r in csv.DictReader(f) if r["eval_return"]]


def test_every_run_keeps_its_final_and_best_policy_with_what_acting_needs(bear, run):
    results = json.loads((run / "results.json").read_text())
    evals = evaluations(run)
    best = max(evals, key=lambda e: e[2])  # the first of equal bests, as max() takes it
    checkpoint = torch.load(run / "checkpoint-000000400.pt", weights_only=True)["agent"]
    for which, (step, ret, score) in (("final", evals[-1]), ("best", best)):
        saved = torch.load(run / f"policy-{which}.pt", weights_only=True)
        assert (saved["policy"], saved["step"], saved["env_id"]) == (which, step, "Walker2d-v4")
        assert f"{saved['return']:.9g}" == f"{ret:.9g}" and f"{saved['normalized_score']:.9g}" == f"{score:.9g}"
        assert saved["settings"] == {"state_dim": 17, "action_dim": 6, "actor_hidden": 16, "critic_hidden": 16,
                                     "num_critics": 2, "eval_candidates": 4, "eval_episodes": 2, "precision": "fp32",
                                     "seed": 0}
        assert saved["target"] == {"env_id": "Walker2d-v4", "score_range": tuple(bear.ENVS["walker2d"][3:5]),
                                   "action_range": None, "minari_data": ""}
    final = torch.load(run / "policy-final.pt", weights_only=True)
    assert final["return"] == results["final_return"]
    for name in ("actor", "critics"):  # the weights of the last evaluation: the final checkpoint's
        for key, value in checkpoint[name].items():
            assert torch.equal(final[name][key], value)
    assert torch.load(run / "policy-best.pt", weights_only=True)["return"] == results["best_return"]


def test_evaluate_with_the_runs_seed_and_episodes_gives_its_last_evaluation_exactly(bear, folder, capsys):
    results = json.loads((folder / "results.json").read_text())
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}
    for which, expected in (("final", results["final_return"]), ("best", results["best_return"])):
        assert bear.main([f"--evaluate={folder}", f"--policy={which}", "--eval-episodes=2"]) == 0
        line = one_line(capsys.readouterr().out)
        written = json.loads((folder / f"evaluation-{which}-2ep-seed0.json").read_text())
        assert written["return_mean"] == expected  # exactly: block 0 is the run's own evaluation
        assert len(written["returns"]) == len(written["lengths"]) == 2 and written["seed"] == 0
        assert line.startswith(f"{which} policy of {folder} (step {written['step']}): return {expected:.1f} ± "
                               f"{written['return_std']:.1f}, normalised score ")
        assert line.endswith(f"over 2 episodes, seed 0 ({folder / f'evaluation-{which}-2ep-seed0.json'})")
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if not k.startswith("evaluation-")} == before  # training's files untouched


def test_evaluate_defaults_to_100_episodes_and_the_runs_seed(bear):
    cfg = bear.parse_args(["--evaluate=runs/x"])[0]
    assert (cfg.eval_episodes, cfg.seed, cfg.policy) == (100, None, "final")
    cfg = bear.parse_args(["--evaluate=runs/x", "--eval-episodes", "7", "--seed=3"])[0]
    assert (cfg.eval_episodes, cfg.seed) == (7, 3)
    assert bear.parse_args([])[0].eval_episodes == 10  # training's own default is unchanged


def test_evaluate_plays_blocks_on_every_worker_and_block_0_is_the_runs_evaluation(bear, folder, monkeypatch):
    monkeypatch.setattr(bear, "usable_cpus", lambda: 2)
    assert bear.main([f"--evaluate={folder}", "--eval-episodes=5"]) == 0  # blocks of 2, 2 and 1 episodes
    five = json.loads((folder / "evaluation-final-5ep-seed0.json").read_text())
    assert five["workers"] == 2 and five["episodes"] == 5 and five["block_size"] == 2
    assert all(1 <= n <= 1000 for n in five["lengths"])
    assert bear.main([f"--evaluate={folder}", "--eval-episodes=2", "--eval-workers=0"]) == 0
    two = json.loads((folder / "evaluation-final-2ep-seed0.json").read_text())
    assert five["returns"][:2] == two["returns"]
    assert len(set(five["returns"])) == 5  # the other blocks play other episodes, not block 0 again
    assert bear.main([f"--evaluate={folder}", "--eval-episodes=2", "--seed=1"]) == 0
    assert json.loads((folder / "evaluation-final-2ep-seed1.json").read_text())["returns"] != two["returns"]


def test_evaluate_bad_input_is_one_line_and_exit_2(bear, folder, tmp_path, capsys):
    def refused(args, expected):
        assert bear.main(args) == 2
        line = one_line(capsys.readouterr().err)
        assert line.startswith("bear-train.py: error: ") and expected in line, line

    refused([f"--evaluate={tmp_path / 'nowhere'}"], "nowhere: no such folder; pass a run folder")
    (tmp_path / "empty").mkdir()
    refused([f"--evaluate={tmp_path / 'empty'}"], "holds no policy-final.pt: it is not a run folder, or its run has")
    refused([f"--evaluate={folder}", "--policy=worst"], "--policy=worst is unknown; use final or best")
    refused([f"--evaluate={folder}", "--seed=0-2"], "--evaluate takes one run folder and one --seed")
    refused([f"--dataset={folder}", "--video"], "--video records an evaluation: use it with --evaluate=RUN_DIR")
    policy = folder / "policy-final.pt"
    saved = torch.load(policy, weights_only=True)
    torch.save(saved | {"env_id": "Hopper-v4", "target": saved["target"] | {"env_id": "Hopper-v4"}}, policy)
    refused([f"--evaluate={folder}"], "is a policy for Hopper-v4, but")  # copied in from another run
    (folder / "config.json").unlink()
    refused([f"--evaluate={folder}"], "acts on 17 observations and 6 actions, but Hopper-v4 has (11,) and (3,)")
    policy.write_bytes(policy.read_bytes()[:500])
    refused([f"--evaluate={folder}"], "policy-final.pt is damaged (")
    assert not list(folder.glob("evaluation-*"))


def test_a_policy_file_crafted_to_run_code_is_refused_and_its_code_does_not_run(bear, folder, tmp_path, capsys):
    marker = tmp_path / "the-code-ran"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    saved = torch.load(folder / "policy-best.pt", weights_only=True)
    torch.save(saved | {"trap": RunsCode()}, folder / "policy-best.pt")
    assert bear.main([f"--evaluate={folder}", "--policy=best", "--eval-episodes=2"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "policy-best.pt was not loaded: it asks to run code when it is unpickled (posix.system)" in line
    assert not marker.exists()


def only_torch(tmp_path):
    """A folder holding torch and what torch itself requires, and nothing else: numpy, gymnasium and the script
    are not on a Python path made of it and the standard library."""
    site = Path(torch.__file__).parents[1]
    path = tmp_path / "only-torch"
    path.mkdir()
    names, todo, seen = {"torch", "torchgen", "functorch"}, ["torch"], set()
    while todo:  # torch's requirements, and theirs
        for requirement in importlib.metadata.requires(todo.pop()) or []:
            name = re.split(r"[ ;<>=!~\[]", requirement)[0]
            if "extra ==" not in requirement and name not in seen:
                seen.add(name)
                todo.append(name)
                dist = importlib.metadata.distribution(name)
                names |= set((dist.read_text("top_level.txt") or "").split()) or {name.replace("-", "_").lower()}
    for name in names:
        for found in (site / name, site / f"{name}.py"):
            if found.exists():
                (path / found.name).symlink_to(found)
    return path


ACT = """
import sys
sys.path = [p for p in sys.path if "site-packages" not in p and "dist-packages" not in p] + [sys.argv[1]]
for hidden in ("numpy", "gymnasium", "bear_train"):
    try:
        __import__(hidden)
        sys.exit(f"{hidden} is importable")
    except ModuleNotFoundError:
        pass
import io, torch
torch.set_num_threads(1)  # as the test's own actions are computed: a float sum split across threads can differ
saved = torch.load(sys.argv[2], weights_only=True)
policy = torch.export.load(io.BytesIO(saved["program"])).module()
obs = torch.load(sys.argv[3], weights_only=True)
generator = torch.Generator().manual_seed(7)
noise = torch.randn(len(obs), saved["settings"]["eval_candidates"], saved["settings"]["action_dim"], generator=generator)
torch.save(policy(obs, noise), sys.argv[4])
assert "numpy" not in sys.modules and "gymnasium" not in sys.modules
"""


@pytest.mark.parametrize("batch", [1, 10])
def test_the_policy_file_acts_with_only_torch_as_the_script_does(bear, run, tmp_path, batch):
    obs = torch.randn(batch, 17, generator=torch.Generator().manual_seed(batch))
    torch.save(obs, tmp_path / "obs.pt")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", ACT, str(only_torch(tmp_path)), str(run / "policy-final.pt"),
                          str(tmp_path / "obs.pt"), str(tmp_path / "actions.pt")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    saved = torch.load(run / "policy-final.pt", weights_only=True)
    actor = bear.Actor(17, 6, 16)
    critics = bear.QEnsemble(17, 6, 16, 2)
    actor.load_state_dict(saved["actor"])
    critics.load_state_dict(saved["critics"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        expected = bear.select_action(actor, critics, obs, 4, torch.Generator().manual_seed(7))
    torch.set_num_threads(threads)
    assert torch.equal(torch.load(tmp_path / "actions.pt", weights_only=True), expected)


def test_the_summary_reports_the_iqm_with_stratified_bootstrap_intervals(bear):
    scores = np.array([3.0, 9.0, 1.0, 4.0, 7.0, 5.0, 2.0, 8.0])  # sorted 1..9 without 6; the middle half: 3, 4, 5, 7
    assert bear.iqm(scores) == pytest.approx(np.mean([3.0, 4.0, 5.0, 7.0]))
    assert bear.iqm(np.array([1.0, 2.0, 10.0])) == pytest.approx(13 / 3)  # 3 seeds: nothing is trimmed, as rliable's
    # with 5 seeds int(1.25) = 1 seed is cut from each end, as scipy.stats.trim_mean(x, 0.25) does
    assert bear.iqm(np.array([0.0, 1.0, 2.0, 3.0, 100.0])) == pytest.approx(2.0)
    lo, hi = bear.iqm_interval(scores, reps=2000)
    boot = np.random.default_rng(0).choice(scores, (2000, len(scores)))  # by hand: percentiles of resampled IQMs
    by_hand = np.percentile([bear.iqm(b) for b in boot], [2.5, 97.5])
    assert (lo, hi) == pytest.approx(tuple(by_hand))
    assert lo < bear.iqm(scores) < hi


@pytest.mark.parametrize("mujoco_gl", [None, ""])  # empty, as shells and CI files export it: MuJoCo reads it as unset
def test_video_writes_an_mp4_of_the_first_episode_that_reads_back_frame_for_frame(bear, folder, monkeypatch, mujoco_gl):
    import imageio.v3 as iio

    for name in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "DISPLAY"):  # mujoco sets PYOPENGL_PLATFORM to match: put back
        monkeypatch.delenv(name, raising=False)
    if mujoco_gl is not None:
        monkeypatch.setenv("MUJOCO_GL", mujoco_gl)
    assert bear.main([f"--evaluate={folder}", "--eval-episodes=2", "--video"]) == 0
    assert os.environ["MUJOCO_GL"] == "egl"  # chosen: no display here
    written = json.loads((folder / "evaluation-final-2ep-seed0.json").read_text())
    path = folder / "videos" / f"final-step{written['step']}-seed0-episode0.mp4"
    assert written["videos"] == [str(path)] and sorted(p.name for p in (folder / "videos").iterdir()) == [path.name]
    frames = [frame.shape for frame in iio.imiter(path, plugin="FFMPEG")]
    assert len(frames) == written["lengths"][0] + 1  # the first observation, then one frame a step
    assert set(frames) == {(480, 480, 3)}


def test_video_without_a_working_gl_backend_is_one_line_naming_mujoco_gl_and_exit_2(run, tmp_path):
    from conftest import SCRIPT

    env = {k: v for k, v in os.environ.items() if k != "PYOPENGL_PLATFORM"} | {"MUJOCO_GL": "osmesa"}  # no libosmesa6
    out = launch.run([sys.executable, str(SCRIPT), f"--evaluate={run}", "--eval-episodes=2", "--video"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    line = one_line(out.stderr)
    assert line.startswith("bear-train.py: error: MuJoCo cannot render off-screen with MUJOCO_GL=osmesa (")
    assert "apt-get install libosmesa6 (Debian/Ubuntu)" in line
    assert not (run / "videos").exists()


def test_best_is_the_first_of_equal_bests_and_final_is_every_evaluation(bear):
    """Run.write_evaluation's choice, on its own: which evaluations rewrite which policy file."""
    from types import SimpleNamespace

    written = []
    run = SimpleNamespace(state={"evals": []}, target=bear.EvalTarget("Walker2d-v4", (0.0, 100.0)),
                          policies=SimpleNamespace(exported=lambda snap: b"",
                                                    write=lambda which, snap, step, ret, score, program: written.append((which, step))),
                          tqdm=SimpleNamespace(write=lambda line: None), bar=SimpleNamespace(set_postfix=lambda **k: None))
    values = {"alpha": 1.0, "mmd": 0.1, "critic_loss": 1.0}
    for step, ret in ((1, 5.0), (2, 7.0), (3, 7.0), (4, 6.0), (5, 8.0)):
        bear.Run.write_evaluation(run, step, dict(values), np.array([ret]), {})
    assert [s for w, s in written if w == "final"] == [1, 2, 3, 4, 5]
    assert [s for w, s in written if w == "best"] == [1, 2, 5]  # step 3 ties step 2: the first is kept
