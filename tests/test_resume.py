"""A run never wastes compute: checkpoints, exact resume after SIGKILL or SIGTERM, determinism, divergence."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import launch
from conftest import SCRIPT, run_main, write_d4rl_file

SMALL = ["--actor-hidden=32", "--critic-hidden=32", "--vae-hidden=64", "--batch-size=64", "--warmup-steps=100",
         "--log-every=25", "--eval-episodes=1", "--eval-candidates=10", "--gpu=-1",
         "--eval-workers=0"]  # in the training process, which then cannot run ahead (tests/test_evalpool.py: the pool)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "walker2d_small.hdf5"
    write_d4rl_file(path, n=3000)
    return path


def command(dataset, log_dir, *extra, steps=400, every=100, seed=0):
    return [sys.executable, str(SCRIPT), f"--dataset={dataset}", f"--log-dir={log_dir}", f"--seed={seed}",
            f"--max-steps={steps}", f"--eval-every={every}", f"--checkpoint-every={every}", *SMALL, *extra]


def run(cmd):
    out = launch.run(cmd, capture_output=True, text=True, timeout=600)
    return out


def run_dir(log_dir, seed=0):
    return log_dir / f"walker2d_small__seed{seed}"


def wait_for(path, proc, timeout=300):
    t = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout
        time.sleep(0.005)


def final_parameters(folder):
    ckpts = sorted(folder.glob("checkpoint-*.pt"))
    state = torch.load(ckpts[-1], weights_only=False)
    return state["step"], state["agent"]


def same_parameters(a, b):
    for name in ("vae", "actor", "critics", "target_critics"):
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key} differs"
    assert torch.equal(a["log_alpha"], b["log_alpha"])


def scores(folder):
    results = json.loads((folder / "results.json").read_text())
    return {k: results[k] for k in ("final_normalized_score", "best_normalized_score", "final_return", "best_return",
                                    "steps")}


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("reference")
    out = run(command(dataset, log_dir))
    assert out.returncode == 0, out.stderr
    return run_dir(log_dir)


def test_sigkill_then_resume_is_bitwise_identical(dataset, reference, tmp_path):
    cmd = command(dataset, tmp_path)
    proc = launch.Popen(cmd, stdout=launch.DEVNULL, stderr=launch.DEVNULL)
    wait_for(run_dir(tmp_path) / "checkpoint-000000200.pt", proc)
    time.sleep(0.3)  # somewhere between two evaluations, possibly mid-write of metrics or a checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir(tmp_path) / "results.json").exists()  # it really was cut short
    kept = torch.load(run_dir(tmp_path) / "policy-final.pt", weights_only=True)["step"]
    lines = (run_dir(tmp_path) / "metrics.csv").read_text().split("\n")[1:-1]  # whole rows (a cut last one dropped)
    evaluated = [int(line.split(",")[0]) for line in lines if line.split(",")[-2]]  # eval_return
    assert kept == evaluated[-1]  # the policy of the newest evaluation that is in, no later
    out = run(cmd + ["--resume"])
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stdout
    for name in ("policy-final.pt", "policy-best.pt"):  # the same files, byte for byte, as an uninterrupted run's
        assert (run_dir(tmp_path) / name).read_bytes() == (reference / name).read_bytes()
    assert (run_dir(tmp_path) / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert scores(run_dir(tmp_path)) == scores(reference)
    step_a, params_a = final_parameters(reference)
    step_b, params_b = final_parameters(run_dir(tmp_path))
    assert step_a == step_b == 400
    same_parameters(params_a, params_b)
    assert len(list(run_dir(tmp_path).glob("checkpoint-*.pt"))) == 2  # the newest two are kept


def test_sigterm_saves_exits_75_and_resumes_exactly(dataset, reference, tmp_path):
    cmd = command(dataset, tmp_path)
    proc = launch.Popen(cmd, stdout=launch.PIPE, stderr=launch.PIPE, text=True)
    wait_for(run_dir(tmp_path) / "checkpoint-000000100.pt", proc)
    time.sleep(0.2)
    before = {p.name: p.stat().st_mtime_ns for p in run_dir(tmp_path).glob("checkpoint-*.pt")}
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "--resume" in err
    stopped = int(re.search(r"stopped by signal at step (\d+); checkpoint saved", err)[1])
    saved = run_dir(tmp_path) / f"checkpoint-{stopped:09d}.pt"  # written by the signal, not an earlier one
    assert saved.stat().st_mtime_ns != before.get(saved.name)
    state = torch.load(saved, weights_only=False)
    assert state["step"] == stopped and "pending" in state["state"]  # the signal's own checkpoint
    assert stopped > 100 and stopped == max(int(p.stem.split("-")[1]) for p in run_dir(tmp_path).glob("checkpoint-*.pt"))
    out = run(cmd + ["--resume"])
    assert out.returncode == 0, out.stderr
    assert (run_dir(tmp_path) / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert scores(run_dir(tmp_path)) == scores(reference)
    same_parameters(final_parameters(reference)[1], final_parameters(run_dir(tmp_path))[1])


def test_a_checkpoint_of_the_previous_release_resumes_and_finishes(dataset, reference, tmp_path):
    """Its state lacks what this release added to it; a user who upgrades mid-run must not crash at the end."""
    folder = tmp_path / reference.name
    shutil.copytree(reference, folder)
    (folder / "results.json").unlink()
    (folder / "checkpoint-000000400.pt").unlink()
    path = folder / "checkpoint-000000300.pt"
    saved = torch.load(path, weights_only=False)
    for key in ("eval_wait_seconds", "rng_restarts", "resume_changes", "determinism"):  # not in 90fa8b2's
        del saved["state"][key]
    numpy_state = saved["rng"]["numpy"]  # pickled as numpy's own tuple, and no manifest, before this release
    saved["rng"]["numpy"] = (numpy_state["kind"], numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["gauss"])
    torch.save(saved, path)
    path.with_suffix(".json").unlink()
    out = run(command(dataset, tmp_path, "--resume"))
    assert out.returncode == 0, out.stderr
    assert (folder / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert scores(folder) == scores(reference)


def test_same_seed_same_metrics_other_seed_differs(bear, dataset, reference, tmp_path, capsys):
    out = run(command(dataset, tmp_path))  # a process of its own, as the reference's: the same bytes
    assert out.returncode == 0, out.stderr
    assert (run_dir(tmp_path) / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    code, _, err = run_main(bear, command(dataset, tmp_path, seed=1, steps=100)[2:], capsys)  # here: only its seed matters
    assert code == 0, err
    first = (reference / "metrics.csv").read_text().splitlines()[1]
    other = (run_dir(tmp_path, seed=1) / "metrics.csv").read_text().splitlines()[1]
    assert first.split(",")[0] == other.split(",")[0] == "25" and first != other


def test_resume_without_checkpoint_starts_fresh_and_resume_refuses_other_settings(bear, dataset, tmp_path, capsys):
    code, out, err = run_main(bear, command(dataset, tmp_path, "--resume", steps=50, every=50)[2:], capsys)
    assert code == 0, err
    assert "resuming" not in out
    code, _, err = run_main(bear, command(dataset, tmp_path, "--resume", "--batch-size=32", steps=50, every=50)[2:],
                            capsys)
    assert code == 2 and "was started with --batch-size=64" in err
    assert len(err.strip().splitlines()) == 1


def test_non_finite_loss_stops_naming_term_and_step_and_keeps_the_checkpoint(bear, tmp_path, capsys):
    path = tmp_path / "walker2d_poison.hdf5"
    write_d4rl_file(path, n=500)
    code, _, err = run_main(bear, command(path, tmp_path / "runs", steps=50, every=50)[2:], capsys)
    assert code == 0, err
    folder = tmp_path / "runs" / "walker2d_poison__seed0"
    ckpt = folder / "checkpoint-000000050.pt"
    before = ckpt.read_bytes()
    write_d4rl_file(path, n=500, rewards=np.full(500, 1e38, np.float32))  # (Q - y)^2 overflows float32
    code, _, err = run_main(bear, command(path, tmp_path / "runs", "--resume", steps=100, every=50)[2:], capsys)
    assert code == 1
    assert "critic_loss became non-finite at step 51" in err and "Traceback" not in err
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in folder.glob("checkpoint-*.pt")) == [ckpt.name]
    assert json.loads((folder / "results.json").read_text())["steps"] == 50  # the finished 50-step run's, untouched


def test_the_first_step_with_the_q_term_is_warmup_steps_plus_one(bear, dataset, tmp_path, monkeypatch):
    """train() hands the update warm-up = True for steps 1..warmup_steps, and False from warmup_steps + 1 on, also
    across a resume."""
    flags = []
    real = bear.BEAR._update
    monkeypatch.setattr(bear.BEAR, "_update", lambda self, batch, warmup: flags.append(warmup) or real(self, batch, warmup))
    args = [f"--dataset={dataset}", f"--log-dir={tmp_path}", "--warmup-steps=7", "--eval-every=5",
            "--checkpoint-every=5", "--log-every=5", "--actor-hidden=8", "--critic-hidden=8", "--vae-hidden=8",
            "--batch-size=8", "--eval-episodes=1", "--eval-candidates=4", "--gpu=-1", "--eval-workers=0"]
    assert bear.main(args + ["--max-steps=5"]) == 0
    assert bear.main(args + ["--max-steps=12", "--resume"]) == 0  # steps 6-12 from the checkpoint of step 5
    assert flags == [True] * 7 + [False] * 5
