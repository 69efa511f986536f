"""Evaluation off the critical path: a pool of worker processes gives the same returns as evaluating in the training
process, in step order whatever order the workers finish in, with bounded pending work, exact resume with evaluations
in flight, signals that stop the workers at once, and a crashed worker retried once.

Some tests run a copy of bear-train.py with a few lines appended that slow down or break chosen evaluations; the
workers run that same copy (they are started from the file of the training process)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import launch
from conftest import SCRIPT, write_d4rl_file
from test_prepare import alive, children

TINY = ["--actor-hidden=16", "--critic-hidden=16", "--vae-hidden=16", "--batch-size=16", "--warmup-steps=20",
        "--log-every=10", "--eval-episodes=2", "--eval-candidates=4", "--gpu=-1", "--threads=1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "hopper_pool.hdf5"
    write_d4rl_file(path, n=1000, obs_dim=11, act_dim=3, episode_len=100)
    return path


def patched(tmp_path, body, more=""):
    """A copy of the script whose Evaluator first runs `body` (with `step`, `os` and `time` in scope), and with the
    code `more` added (before the main guard, so that it runs in the training process too)."""
    copy = tmp_path / "bear-train.py"
    script, main = SCRIPT.read_text().split('\nif __name__ == "__main__":')
    copy.write_text(script + f"""

_evaluate = Evaluator.__call__


def _patched(self, snapshot, step):
    import os, time
{chr(10).join('    ' + line for line in body.strip().splitlines())}
    return _evaluate(self, snapshot, step)


Evaluator.__call__ = _patched
{more}
""" + '\nif __name__ == "__main__":' + main)
    return copy


def command(script, dataset, log_dir, *extra, steps=60, every=10):
    return [sys.executable, str(script), f"--dataset={dataset}", f"--log-dir={log_dir}", f"--max-steps={steps}",
            f"--eval-every={every}", f"--checkpoint-every={every}", *TINY, *extra]


def run(cmd, timeout=600):
    return launch.run(cmd, capture_output=True, text=True, timeout=timeout)


def folder(log_dir):
    return log_dir / "hopper_pool__seed0"


def scores(log_dir):
    results = json.loads((folder(log_dir) / "results.json").read_text())
    return {k: results[k] for k in ("final_normalized_score", "best_normalized_score", "final_return", "best_return")}


@pytest.fixture(scope="module")
def in_process(dataset, tmp_path_factory):
    """The reference: every evaluation in the training process (--eval-workers=0)."""
    log_dir = tmp_path_factory.mktemp("inline")
    out = run(command(SCRIPT, dataset, log_dir, "--eval-workers=0"))
    assert out.returncode == 0, out.stderr
    assert "evaluation: in the training process" in out.stdout
    return log_dir


def test_the_pool_gives_the_returns_of_evaluating_in_the_training_process(bear, dataset, in_process, tmp_path):
    out = run(command(SCRIPT, dataset, tmp_path, "--eval-workers=1"))
    assert out.returncode == 0, out.stderr
    assert "evaluation: 1 worker process(es), 1 thread(s) each" in out.stdout
    csv = (folder(tmp_path) / "metrics.csv").read_text()
    assert csv == (folder(in_process) / "metrics.csv").read_text()  # bitwise, eval columns included
    assert sum(1 for row in csv.splitlines()[1:] if row.split(",")[-2]) == 6  # an evaluation every 10 steps
    assert scores(tmp_path) == scores(in_process)
    results = json.loads((folder(tmp_path) / "results.json").read_text())
    assert results["eval_workers"] == 1 and results["eval_wait_seconds"] >= 0 and results["final_eval_wait_seconds"] >= 0
    # the same, in-process: one Evaluator given one snapshot, twice, gives the same returns bit for bit
    data = bear.to_transitions(bear.read_d4rl(dataset, "hopper"))
    cfg = bear.Config(**{k: v for k, v in json.loads((folder(tmp_path) / "config.json").read_text()).items()
                         if k in bear.Config.__dataclass_fields__})
    agent_state = torch.load(sorted(folder(tmp_path).glob("checkpoint-*.pt"))[-1], weights_only=False)["agent"]
    evaluator = bear.Evaluator(bear.EvalTarget("Hopper-v4", None), cfg, 11, 3)
    snapshot = {name: agent_state[name] for name in ("actor", "critics")}
    torch.set_num_threads(1)
    first, again = evaluator(snapshot, 60), evaluator(snapshot, 60)
    assert np.array_equal(first, again) and len(first) == 2 and len(data["rewards"]) > 0
    ret = json.loads((folder(tmp_path) / "results.json").read_text())["final_return"]
    assert float(first.mean()) == ret  # the run's final return: the snapshot, the step and the seed decide it


def test_rows_are_written_in_step_order_whatever_order_the_workers_finish_in(dataset, in_process, tmp_path):
    # step 10's evaluation takes 3 s on one worker while the other worker returns 20, 30 and 40 first
    script = patched(tmp_path, "if step == 10: time.sleep(3)")
    out = run(command(script, dataset, tmp_path / "runs", "--eval-workers=2"))
    assert out.returncode == 0, out.stderr
    assert (folder(tmp_path / "runs") / "metrics.csv").read_text() == (folder(in_process) / "metrics.csv").read_text()
    printed = [int(line.split()[1]) for line in out.stdout.replace("\r", "\n").splitlines() if line.startswith("step ")]
    assert printed == [10, 20, 30, 40, 50, 60]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder(tmp_path / "runs"))).Reload()
    assert [e.step for e in events.Scalars("eval/eval_return")] == [10, 20, 30, 40, 50, 60]


def test_training_waits_when_the_pool_falls_behind_and_says_how_long(dataset, tmp_path):
    record = tmp_path / "pending.txt"  # the training process notes how many evaluations are outstanding
    script = patched(tmp_path, "time.sleep(0.5)", more=f"""
_submit = EvalPool.submit


def _recording_submit(self, step, snapshot, stop):
    _submit(self, step, snapshot, stop)
    with open({str(record)!r}, "a") as f:
        f.write(f"{{step}} {{self.pending()}}\\n")


EvalPool.submit = _recording_submit
""")  # evaluations far slower than training
    out = run(command(script, dataset, tmp_path / "runs", "--eval-workers=1", steps=80, every=5))
    assert out.returncode == 0, out.stderr
    pending = [int(line.split()[1]) for line in record.read_text().splitlines()]
    assert len(pending) == 16 and max(pending) == 2  # never more than 2 per worker: training waited instead
    results = json.loads((folder(tmp_path / "runs") / "results.json").read_text())
    assert results["eval_wait_seconds"] > 3, results  # 8 s of evaluations behind a few seconds of training
    assert results["final_eval_wait_seconds"] < 3  # at most 2 left for the end
    rows = (folder(tmp_path / "runs") / "metrics.csv").read_text().splitlines()[1:]
    assert sum(1 for row in rows if row.split(",")[-2]) == 16  # the final evaluation was waited for


def test_a_row_is_written_as_soon_as_its_evaluation_is_back_not_at_the_next_evaluation(dataset, tmp_path):
    record = tmp_path / "written.txt"  # each evaluation's step, and how many updates had run when its row was written
    script = patched(tmp_path, "", more=f"""
_update, _updates = BEAR.update, [0]


def _slow_update(self, *args, **kwargs):
    time.sleep(0.07)  # 50 steps take 3.5 s, several times one tiny evaluation
    _updates[0] += 1
    return _update(self, *args, **kwargs)


_write = Run.write_evaluation


def _recording_write(self, step, values, returns, *rest):
    with open({str(record)!r}, "a") as f:
        f.write(f"{{step}} {{_updates[0]}}\\n")
    return _write(self, step, values, returns, *rest)


BEAR.update, Run.write_evaluation = _slow_update, _recording_write
""")
    out = run(command(script, dataset, tmp_path / "runs", "--eval-workers=1", steps=150, every=50))
    assert out.returncode == 0, out.stderr
    written = [tuple(map(int, line.split())) for line in record.read_text().splitlines()]
    assert [step for step, _ in written] == [50, 100, 150]
    for step, updates in written[:2]:  # its checkpoint too: written once the row is
        assert step <= updates < step + 50, written


def descendants(pid):
    """The living processes below pid."""
    found, todo = [], [pid]
    while todo:
        below = [child for child in children(todo.pop()) if alive(child)]
        found += below
        todo += below
    return found


def wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)


def test_sigkill_with_evaluations_in_flight_then_resume_ends_as_an_uninterrupted_run(dataset, in_process, tmp_path):
    script = patched(tmp_path, "time.sleep(0.7)")
    cmd = command(script, dataset, tmp_path / "runs", "--eval-workers=1")
    proc = launch.Popen(cmd, stdout=launch.DEVNULL, stderr=launch.DEVNULL)
    wait_for(folder(tmp_path / "runs") / "checkpoint-000000020.pt", proc)
    workers = descendants(proc.pid)
    proc.kill()
    proc.wait()
    time.sleep(1)
    assert workers and not [w for w in workers if alive(w)]  # the workers died with it
    rows = (folder(tmp_path / "runs") / "metrics.csv").read_text().splitlines()
    assert len(rows) - 1 < 6  # cut short, with later rows still waiting
    out = run(cmd + ["--resume"])
    assert out.returncode == 0, out.stderr
    assert (folder(tmp_path / "runs") / "metrics.csv").read_bytes() == (folder(in_process) / "metrics.csv").read_bytes()
    assert scores(tmp_path / "runs") == scores(in_process)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 75)])
def test_a_signal_stops_the_workers_at_once_and_resume_redoes_the_pending_evaluations(dataset, in_process, tmp_path,
                                                                                      signum, code):
    started = tmp_path / "evaluating-20"  # step 20 on is still being evaluated when the signal comes
    script = patched(tmp_path, f"""
if step == 20:
    open({str(started)!r}, "w").close()
time.sleep(30 if step >= 20 else 0)
""")
    cmd = command(script, dataset, tmp_path / "runs", "--eval-workers=1")
    proc = launch.Popen(cmd, stdout=launch.PIPE, stderr=launch.PIPE, text=True, start_new_session=True)
    wait_for(started, proc)
    time.sleep(0.5)
    workers = descendants(proc.pid)
    t = time.time()
    os.killpg(proc.pid, signum)  # Ctrl-C or a scheduler: the whole group
    out, err = proc.communicate(timeout=60)
    assert time.time() - t < 12  # not after the 30 s evaluations (a policy file being written is finished first)
    assert proc.returncode == code
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("stopped by signal at step") and "Traceback" not in err, err
    time.sleep(0.5)
    assert workers and not [w for w in workers if alive(w)]
    stopped_at = int(lines[0].split()[5].rstrip(";"))
    saved = torch.load(folder(tmp_path / "runs") / f"checkpoint-{stopped_at:09d}.pt", weights_only=False)
    pending = [item["step"] for item in saved["state"]["pending"] if "snapshot" in item]
    assert 20 in pending  # the checkpoint holds the evaluation that was still running (and any queued after it)
    (tmp_path / "fast").mkdir()
    fast = patched(tmp_path / "fast", "pass")
    out = run([sys.executable, str(fast), *cmd[2:], "--resume"])
    assert out.returncode == 0, out.stderr
    assert (folder(tmp_path / "runs") / "metrics.csv").read_bytes() == (folder(in_process) / "metrics.csv").read_bytes()
    assert scores(tmp_path / "runs") == scores(in_process)


def test_a_crashed_worker_is_named_and_retried_once_in_a_fresh_worker(dataset, in_process, tmp_path):
    marker = tmp_path / "crashed-once"
    script = patched(tmp_path, f"""
if step == 30 and not os.path.exists({str(marker)!r}):
    open({str(marker)!r}, "w").close()
    os._exit(3)
""")
    out = run(command(script, dataset, tmp_path / "runs", "--eval-workers=1"))
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.replace("\r", "\n").splitlines() if "WARNING" in line]
    assert lines == ["WARNING: an evaluation worker failed at step 30 (exit code 3); retrying it once in a fresh worker"]
    assert (folder(tmp_path / "runs") / "metrics.csv").read_bytes() == (folder(in_process) / "metrics.csv").read_bytes()


def test_a_worker_that_crashes_again_stops_the_run_with_the_crash_code(dataset, tmp_path):
    script = patched(tmp_path, "if step == 30: raise ValueError('a broken evaluation')")
    out = run(command(script, dataset, tmp_path / "runs", "--eval-workers=1"))
    assert out.returncode == 70, out.stderr
    lines = [line for line in out.stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert lines[0] == ("WARNING: an evaluation worker failed at step 30 (ValueError: a broken evaluation); retrying it "
                        "once in a fresh worker")
    assert lines[1].startswith("bear-train.py: crashed: EvalFailed: the evaluation of step 30 failed twice "
                               "(ValueError: a broken evaluation;") and len(lines) == 2
    assert "Traceback" not in out.stderr
    log = (folder(tmp_path / "runs") / "eval-workers.log").read_text() + \
        (folder(tmp_path / "runs") / "error.log").read_text()
    assert "EvalFailed" in log


def test_the_default_pool_size_is_the_usable_cores_minus_trainings(bear, monkeypatch):
    monkeypatch.setattr(bear, "usable_cpus", lambda: 16)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    torch.set_num_threads(4)
    try:
        assert bear.eval_workers(bear.Config(), cpu) == 12  # 16 cores, 4 training threads
        assert bear.eval_workers(bear.Config(), gpu) == 15  # a GPU run trains on one core
        torch.set_num_threads(16)
        assert bear.eval_workers(bear.Config(), cpu) == 1  # at least one
        assert bear.eval_workers(bear.Config(eval_workers=0), cpu) == 0
    finally:
        torch.set_num_threads(2)
