"""Datasets x seeds as a sweep on Ray: a run killed and retried, a stopped driver continued to four runs and the
table, a second driver refused while each run trains on the GPU Ray gives it, a run that crashes, a bad pair, and
single runs that never import Ray. The sweeps share one Ray instance started for this module (the
`--ray-address` path; a sweep without it starts a local instance of its own)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import launch
from conftest import SCRIPT, TINY_NETS, run_main, write_d4rl_file

SMALL = ["--actor-hidden=32", "--critic-hidden=32", "--vae-hidden=64", "--batch-size=64", "--warmup-steps=100",
         "--log-every=25", "--eval-episodes=1", "--eval-candidates=10", "--gpu=-1"]


# The test cluster listens on 127.0.0.1 only (Ray's single-node mode) and, being private to this machine, without
# token authentication; the sweep drivers connect to it with the same settings.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def ray_address():
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # 2 GPUs that this machine does not have: Ray hands them out all the same, which shows its CUDA_VISIBLE_DEVICES
    out = subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=2",
                          "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                         capture_output=True, text=True, timeout=180, env=dict(os.environ, **RAY_ENV))
    assert out.returncode == 0, out.stderr
    yield f"127.0.0.1:{port}"
    subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_d4rl_file(folder / "walker2d_a.hdf5", n=3000)
    write_d4rl_file(folder / "hopper_b.hdf5", n=3000, obs_dim=11, act_dim=3, seed=1)
    return folder


def sweep_command(address, log_dir, datasets, seeds, steps=200, every=100, *extra):
    return [sys.executable, str(SCRIPT), f"--dataset={','.join(map(str, datasets))}", f"--seed={seeds}",
            f"--log-dir={log_dir}", f"--max-steps={steps}", f"--eval-every={every}", f"--checkpoint-every={every}",
            f"--ray-address={address}",
            *SMALL, *extra]


ENV = dict(os.environ, D4RL_DATASET_DIR="/nonexistent", **RAY_ENV)


def run(cmd, timeout=900):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def folders(log_dir):
    return sorted(p.name for p in log_dir.iterdir() if p.is_dir() and p.name != "sweep-logs")


def training_pid(log_dir, seed):
    """The training process of one run of the sweep, found by its command line."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(SCRIPT).encode() in cmdline and f"--log-dir={log_dir}".encode() in cmdline \
                    and f"--seed={seed}".encode() in cmdline and b"--resume" in cmdline:
                return int(entry)
    return None


def test_a_killed_run_is_retried_and_ends_as_if_never_killed(bear, ray_address, data, tmp_path, capsys):
    log_dir = tmp_path / "sweep"
    dataset = data / "walker2d_a.hdf5"
    proc = subprocess.Popen(sweep_command(ray_address, log_dir, [dataset], "0,1", 400), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while not (log_dir / "walker2d_a__seed1" / "checkpoint-000000100.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    pid = training_pid(log_dir, 1)
    os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    assert "walker2d_a__seed1 ended with signal SIGKILL; retry 1 of 3" in out
    alone = tmp_path / "alone"  # the same run uninterrupted, in the test's process
    code, _, err = run_main(bear, [f"--dataset={dataset}", "--seed=1", f"--log-dir={alone}", "--max-steps=400",
                                   "--eval-every=100", "--checkpoint-every=100", "--threads=1", *SMALL], capsys)
    assert code == 0, err
    a, b = log_dir / "walker2d_a__seed1", alone / "walker2d_a__seed1"
    assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()
    state_a = torch.load(sorted(a.glob("checkpoint-*.pt"))[-1], weights_only=False)["agent"]
    state_b = torch.load(sorted(b.glob("checkpoint-*.pt"))[-1], weights_only=False)["agent"]
    for net in ("vae", "actor", "critics", "target_critics"):
        for key in state_a[net]:
            assert torch.equal(state_a[net][key], state_b[net][key]), f"{net}.{key}"
    assert torch.equal(state_a["log_alpha"], state_b["log_alpha"])
    assert "resuming" in (log_dir / "sweep-logs" / "walker2d_a__seed1.log").read_text()


GRID_FOLDERS = [f"walker2d_a__kernel={k},epsilon={e}__seed{s}" for k in ("gaussian", "laplacian") for e in (0.05, 0.1)
                for s in (0, 1)]


def test_a_stopped_grid_continues_with_the_same_command_and_ends_with_its_eight_runs_ranked(ray_address, data, tmp_path):
    # a 2 x 2 grid (two kernels, two epsilons) x 2 seeds: 8 runs, two at a time on 2 CPUs
    cmd = [*sweep_command(ray_address, tmp_path, [data / "walker2d_a.hdf5"], "0-1", 300, 100),
           "--epsilon=0.05,0.1", "--kernel=laplacian,gaussian"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=ENV)
    deadline = time.time() + 600
    # stop once two have finished and a third has a checkpoint
    while not (sum((tmp_path / n / "results.json").exists() for n in folders(tmp_path)) >= 2
               and any((tmp_path / n / "checkpoint-000000100.pt").exists() and not (tmp_path / n / "results.json").exists()
                       for n in folders(tmp_path))):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out + err
    assert "sweep: 8 runs = 1 dataset(s) × kernel laplacian, gaussian × epsilon 0.05, 0.1 × 2 seed(s)" in out
    assert "Traceback" not in err
    assert "stopped by SIGINT during a sweep" in err
    finished = {n: (tmp_path / n / "results.json").stat().st_mtime_ns for n in folders(tmp_path)
                if (tmp_path / n / "results.json").exists()}
    assert 2 <= len(finished) < 8
    unfinished = [n for n in GRID_FOLDERS if n not in finished]
    assert all(list((tmp_path / n).glob("checkpoint-*.pt")) for n in unfinished if (tmp_path / n).exists()), \
        {n: sorted(p.name for p in (tmp_path / n).iterdir()) for n in unfinished if (tmp_path / n).exists()}
    again = run(cmd)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"({len(finished)} already finished" in again.stdout
    assert folders(tmp_path) == sorted(GRID_FOLDERS)
    for name, mtime in finished.items():  # not run again
        assert (tmp_path / name / "results.json").stat().st_mtime_ns == mtime
        assert (tmp_path / "sweep-logs" / f"{name}.log").read_text().count("=== started") == 1
    finals = {}
    for name in GRID_FOLDERS:  # each folder holds the setting its name says, and the rest as the command gave it
        config = json.loads((tmp_path / name / "config.json").read_text())
        kernel, epsilon = name.split("__")[1].replace("kernel=", "").replace("epsilon=", "").split(",")
        assert (config["kernel"], config["epsilon"], config["run_name"]) == (kernel, float(epsilon), name)
        assert (config["max_steps"], config["critic_hidden"], config["mmd_samples"]) == (300, 32, 4)
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["steps"] == 300
        finals.setdefault(name.split("__")[1].replace(",", ", "), []).append(results["final_normalized_score"])
    for name in unfinished:  # stopped, then continued from its checkpoint or started afresh: each trained once
        log = (tmp_path / "sweep-logs" / f"{name}.log").read_text()
        assert log.count("=== started") == (2 if "resuming" in log else 1), log
    assert sum("resuming" in (tmp_path / "sweep-logs" / f"{n}.log").read_text() for n in unfinished) >= 1
    # a run can write its results just before the Ctrl-C and never be reported by the first driver: the second
    # counts it as already finished and reports only the rest
    printed = [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("finished ")]
    printed_again = [line.split()[1].rstrip(":") for line in again.stdout.splitlines() if line.startswith("finished ")]
    assert set(printed) <= set(finished) and len(printed) == len(set(printed)), out
    assert sorted(printed_again) == sorted(unfinished), again.stdout
    # the table: one row per setting, ordered by final IQM (of two seeds, their mean), the first marked
    rows = [line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| walker2d_a |")]
    labels = [row.split(" | ")[1] for row in rows]
    assert sorted(labels) == sorted(finals)
    assert [row.split(" | ")[2] for row in rows] == ["**1 (best)**", "2", "3", "4"]
    means = [sum(finals[label]) / 2 for label in labels]
    assert means == sorted(means, reverse=True)
    for label, row in zip(labels, rows):
        assert f"| 2 | 300 | {sum(finals[label]) / 2:.1f} ± " in row and row in again.stdout
    assert f"walker2d_a: {labels[0]} ranks first" in again.stdout and "optimistic" in again.stdout
    assert (tmp_path / "summary_walker2d_a.png").exists()


def test_a_bad_pair_fails_alone_with_its_reason(ray_address, data, tmp_path):
    # the good pair is a Minari dataset: ids with slashes work in sweeps too
    from conftest import write_minari_dataset

    write_minari_dataset(tmp_path / "minari", "test/hopper/tiny-v0", "Hopper-v5", [(150, "term"), (100, "trunc")])
    bad = data / "walker2d_missing.hdf5"
    # seed 1's folder holds a run started with other settings: that run refuses to resume (exit 2, at run time)
    (tmp_path / "runs" / "test_hopper_tiny-v0__seed1").mkdir(parents=True)
    (tmp_path / "runs" / "test_hopper_tiny-v0__seed1" / "config.json").write_text('{"batch_size": 999}')
    out = subprocess.run(sweep_command(ray_address, tmp_path / "runs", ["test/hopper/tiny-v0", bad], "0-1"),
                         capture_output=True, text=True, timeout=900,
                         env=dict(ENV, MINARI_DATASETS_PATH=str(tmp_path / "minari")))
    assert out.returncode == 1, out.stdout + out.stderr
    results = json.loads((tmp_path / "runs" / "test_hopper_tiny-v0__seed0" / "results.json").read_text())
    assert results["steps"] == 200 and results["dataset_source"] == "minari"
    assert f"FAILED {bad} seed 0: dataset file {bad} does not exist" in out.stderr
    assert f"FAILED {bad} seed 1: dataset file {bad} does not exist" in out.stderr
    assert "FAILED test_hopper_tiny-v0__seed1: bad input: bear-train.py: error: --resume:" in out.stderr
    assert "test_hopper_tiny-v0__seed1 ended with" not in out.stdout  # not retried
    assert (tmp_path / "runs" / "sweep-logs" / "test_hopper_tiny-v0__seed1.log").read_text().count("=== started") == 1
    assert "| test/hopper/tiny-v0 | 1 | 200 |" in out.stdout
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--seed=3-1"], "'3-1' is not a seed list"),
    (["--seed=0,x"], "'0,x' is not a seed list"),
    (["--seed=0,0-2"], "lists a seed twice"),
    (["--dataset=walker2d-random-v2,,hopper-random-v2"], "is not a dataset list"),
])
def test_malformed_lists_are_one_line_exit_2(tmp_path, args, message):
    out = launch.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and message in out.stderr


def test_lists_make_one_config_per_pair(bear):
    cfgs = bear.parse_args(["--dataset=a.hdf5,b.hdf5", "--seed=0,2,5-7", "--batch-size=32"])
    assert [(c.dataset, c.seed) for c in cfgs] == [(d, s) for d in ("a.hdf5", "b.hdf5") for s in (0, 2, 5, 6, 7)]
    assert {c.batch_size for c in cfgs} == {32}
    [one] = bear.parse_args(["--seed=3"])
    assert one.seed == 3 and one.dataset == "walker2d-random-v2"


def test_a_single_run_does_not_import_ray(data, tmp_path):
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('m', r'{SCRIPT}'); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            f"code = m.main(['--dataset={data / 'walker2d_a.hdf5'}', '--seed=0', '--log-dir={tmp_path}', '--max-steps=20', "
            f"'--eval-every=20', '--eval-episodes=1', '--gpu=-1', *{TINY_NETS}]); print('exit', code, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "exit 0 False", out.stderr


def test_a_sweep_started_twice_on_one_log_folder_trains_each_run_once_each_on_the_gpu_ray_gives_it(ray_address, data,
                                                                                                   tmp_path):
    # --gpu=0 and the default --gpus-per-run (1 when the cluster has GPUs): Ray sets CUDA_VISIBLE_DEVICES for each
    # task and the run uses cuda:0, the first device it sees; without CUDA here it says so and trains on the CPU
    cmd = [*sweep_command(ray_address, tmp_path, [data / "walker2d_a.hdf5"], "0-1", 600, 100), "--gpu=0"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while not (tmp_path / "walker2d_a__seed0" / "metrics.csv").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    second = run(cmd)
    assert second.returncode == 2, second.stdout + second.stderr
    assert second.stderr.strip().splitlines() == [
        f"bear-train.py: error: --log-dir={tmp_path} is in use: process {first.pid} is running a sweep in {tmp_path}; "
        "wait for that sweep to end (the same command then continues what is unfinished)"]
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, out + err
    given = set()
    for seed in (0, 1):
        log = (tmp_path / "sweep-logs" / f"walker2d_a__seed{seed}.log").read_text()
        assert log.count("=== started") == 1
        assert json.loads((tmp_path / f"walker2d_a__seed{seed}" / "results.json").read_text())["steps"] == 600
        given |= {gpu for gpu in ("0", "1") if f"CUDA_VISIBLE_DEVICES={gpu}\n" in log}
        assert json.loads((tmp_path / f"walker2d_a__seed{seed}" / "config.json").read_text())["gpu"] == 0
        assert "CUDA is not available here: training on the CPU" in log or "cuda" in log
    assert given == {"0", "1"}  # the two runs ran side by side, each on a GPU of its own
    assert not (tmp_path / ".sweep.lock").exists()


def test_a_run_that_crashes_is_retried_once_then_reported(bear, ray_address, data, tmp_path, capsys):
    # seed 1's first 100 steps, as a sweep's run would have made them (its settings), in the test's process
    code, _, err = run_main(bear, [f"--dataset={data / 'walker2d_a.hdf5'}", "--seed=1", f"--log-dir={tmp_path}",
                                   "--max-steps=100", "--eval-every=100", "--checkpoint-every=100", "--threads=1",
                                   *SMALL], capsys)
    assert code == 0, err
    metrics = tmp_path / "walker2d_a__seed1" / "metrics.csv"  # a run folder gone wrong in a way nobody plans for
    metrics.unlink()
    metrics.mkdir()  # (a damaged checkpoint is not a crash: the run falls back, tests/test_damage.py)
    out = run(sweep_command(ray_address, tmp_path, [data / "walker2d_a.hdf5"], "0-1", 200, 100))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "walker2d_a__seed1 crashed (bear-train.py: crashed: " in out.stdout and "retrying it once" in out.stdout
    assert "FAILED walker2d_a__seed1: crashed twice: bear-train.py: crashed: " in out.stderr
    log = (tmp_path / "sweep-logs" / "walker2d_a__seed1.log").read_text()
    assert log.count("=== started") == 2  # the attempt and its one retry
    assert "Traceback" not in log  # the tracebacks are in the run folder
    assert "Traceback (most recent call last)" in (tmp_path / "walker2d_a__seed1" / "error.log").read_text()
    assert json.loads((tmp_path / "walker2d_a__seed0" / "results.json").read_text())["steps"] == 200


def test_a_runs_cpus_hold_its_training_threads_and_its_evaluation_workers(bear):
    assert bear.run_cpus(bear.Config(cpus_per_run=1), 0) == (1, 0)  # one core: evaluation in the training process
    assert bear.run_cpus(bear.Config(cpus_per_run=4), 0) == (3, 1)  # a CPU run trains on 3, evaluates on 1
    assert bear.run_cpus(bear.Config(cpus_per_run=4), 1) == (1, 3)  # a GPU run trains on 1, evaluates on 3
    assert bear.run_cpus(bear.Config(cpus_per_run=4, eval_workers=2), 0.5) == (2, 2)
    with pytest.raises(bear.UserError, match="cannot hold a training thread and 4 evaluation worker"):
        bear.run_cpus(bear.Config(cpus_per_run=4, eval_workers=4), 0)
    args = bear.run_command(bear.Config(), -1, 3, 1)
    assert "--threads=3" in args and "--eval-workers=1" in args


@pytest.mark.parametrize("args, message", [
    (["--epsilon=0.05,x"], "argument --epsilon: 'x' in '0.05,x' is not a float"),
    (["--epsilon=0.05,0.05"], "argument --epsilon: '0.05,0.05' lists a value twice"),
    (["--mmd-samples=4,5.5"], "'5.5' in '4,5.5' is not an int"),
    (["--log-dir=a,b"], "a sweep cannot vary --log-dir"),
    (["--ray-address=a,b"], "a sweep cannot vary --ray-address"),
    (["--cpus-per-run=1,2"], "a sweep cannot vary --cpus-per-run"),
    (["--resume=1,2"], "argument --resume"),
    (["--seed=0-1", "--epsilon=0.05,-1", "--log-dir=grid"], "--epsilon=-1.0 is out of range"),
])
def test_bad_grid_lists_are_one_line_exit_2_and_write_nothing(tmp_path, args, message):
    out = launch.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path,
                     timeout=60)  # a list checked too late starts the sweep: TimeoutExpired, not a hang
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_grid_is_the_product_of_its_lists(bear):
    cfgs = bear.parse_args(["--dataset=a.hdf5,b.hdf5", "--seed=0-1", "--epsilon=0.025,0.05,0.1",
                            "--kernel=laplacian,gaussian"])
    assert len(cfgs) == 24
    assert {(c.dataset, c.epsilon, c.kernel, c.seed) for c in cfgs} == {
        (d, e, k, s) for d in ("a.hdf5", "b.hdf5") for e in (0.025, 0.05, 0.1) for k in ("laplacian", "gaussian")
        for s in (0, 1)}
    assert bear.run_folder_name("hopper-random-v2", 0, bear.grid_label(cfgs[0], ["epsilon", "kernel"])) == \
        "hopper-random-v2__epsilon=0.025,kernel=laplacian__seed0"
    assert bear.run_folder_name("hopper-random-v2", 0) == "hopper-random-v2__seed0"
