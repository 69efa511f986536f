"""benchmarks/speed.py measures what it says: its counted arithmetic is the arithmetic the update executes, and its
A B machinery (long-lived worker processes timing blocks on request) answers with real timings. Every part of every
benchmark runs at a tiny size.

The tiny benchmark commands spend most of their time starting processes, on one core: they run in the background two
at a time from the module's first test on, in the order of their tests, and each test waits for its own command and
checks its output. Their figures mean nothing at these sizes, so sharing the cores costs no check."""
import argparse
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, write_d4rl_file


# every part, in groups that share one driver (and, for update, d3rlpy and flops, its timing servers); the evalpool
# part with two of its four variants, which differ only in pool_run's flags and cores (checked for all four below)
SPEED_PARTS = {"update d3rlpy flops": 8, "scaling": 2, "script eval data": 4, "regen": 3,
               "evalpool --pool-variants off pool": 3, "device": 9,
               "bf16": 6, "compile": 14}  # rows expected: update 1, d3rlpy 1 more (skipped without its venv), flops 6 more, ...


def learning_check(folder):
    write_d4rl_file(folder / "cache" / "walker2d_random-v2.hdf5", n=500)  # a cached file: nothing regenerated
    return ["bash", str(ROOT / "benchmarks" / "learning_check.sh")], dict(
        STEPS="10", WARMUP="5", THREADS="1", OUT=str(folder / "out"), D4RL_DATASET_DIR=str(folder / "cache"),
        BEAR_D4RL_BASE_URL="http://127.0.0.1:9/offline_rl")


def d3rlpy_python(folder):
    return os.environ.get("D3RLPY_PYTHON", str(folder / "no-d3rlpy"))


COMMANDS = {  # name: folder -> (command, environment added); run in that folder
    **{f"speed {parts}": lambda folder, parts=parts: (
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--small", "--parts", *parts.split()],
        {"D3RLPY_PYTHON": d3rlpy_python(folder)}) for parts in SPEED_PARTS},
    "sweep": lambda folder: ([sys.executable, str(ROOT / "benchmarks" / "sweep.py"), "--small", "--steps=10"],
                             {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}),
    "minari": lambda folder: ([sys.executable, str(ROOT / "benchmarks" / "minari_local.py"), "--small"],
                              {"HF_HUB_OFFLINE": "1"}),
    "learning check": learning_check,
}


class Background:
    """The commands of the selected tests, run `slots` at a time in the order given; result(name) waits for one."""

    def __init__(self, names, folders, slots=2):
        self.todo, self.lock, self.procs, self.closed = list(names), threading.Lock(), [], False
        self.folders, self.results = folders, {}
        self.done = {name: threading.Event() for name in names}
        for _ in range(slots):
            threading.Thread(target=self.work, daemon=True).start()

    def work(self):
        while True:
            with self.lock:
                if not self.todo:
                    return
                name = self.todo.pop(0)
            try:
                cmd, env = COMMANDS[name](self.folders[name])
                with self.lock:
                    if self.closed:  # the module ended first: nothing starts beside the next modules' tests
                        raise RuntimeError(f"{name}: not started, the module ended first")
                    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            cwd=self.folders[name], env=dict(os.environ, **env),
                                            start_new_session=True)  # a group of its own, its servers and runs in it
                    self.procs.append(proc)
                try:
                    out, err = proc.communicate(timeout=900)
                except subprocess.TimeoutExpired:
                    self.stop(proc)
                    raise
                self.results[name] = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
            except BaseException as e:  # the test that waits for it raises it
                self.results[name] = e
            finally:
                self.done[name].set()

    def result(self, name):
        """The finished command: its folder and its subprocess.CompletedProcess, checked to have exited 0."""
        self.done[name].wait()
        out = self.results[name]
        if isinstance(out, BaseException):
            raise out
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        return self.folders[name], out

    @staticmethod
    def stop(proc):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def close(self):
        with self.lock:
            self.todo.clear()
            self.closed = True
        for proc in self.procs:
            if proc.poll() is None:
                self.stop(proc)


FIRST = ("speed device", "speed compile")  # the longest, started first
COMMAND_OF_TEST = {"test_the_sweep_benchmark_runs_at_a_tiny_size": "sweep",
                   "test_the_minari_benchmark_runs_at_a_tiny_size": "minari",
                   "test_the_learning_check_runs_at_a_tiny_size": "learning check"}


def command_of(item):
    if item.originalname == "test_every_part_of_the_speed_benchmark_runs_at_a_tiny_size":
        return f"speed {item.callspec.params['parts']}"
    return COMMAND_OF_TEST.get(item.originalname)


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """The commands of this module's selected tests, started with its first test, whichever that is, so that they
    run while the first tests do."""
    wanted = {command_of(item) for item in request.session.items if item.module is request.module}
    # in the order of the tests, but the device and compile parts, the longest, first: started in its turn, the
    # device part ran while its test waited, up to 58 s (a fresh-clone run, 2026-12-04), the compile part 113 s
    names = sorted((name for name in COMMANDS if name in wanted), key=lambda name: name not in FIRST)
    runner = Background(names, {name: tmp_path_factory.mktemp(name.replace(" ", "_")) for name in names})
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def speed(bear):
    spec = importlib.util.spec_from_file_location("speed_benchmark", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.load_bear = lambda: bear  # the same module object as the other tests use
    return module


@pytest.mark.parametrize("k, batch", [(2, 256), (5, 64)])
def test_counted_arithmetic_equals_the_executed_matmuls(speed, k, batch):
    args = argparse.Namespace(threads=2, k=k, batch=batch, compile=0, batched=0, tiny=0, warmup=1, device="cpu",
                              precision="fp32")
    run = speed.bear_stepper(args)
    counted = sum(2 * m * i * o * count for m, i, o, count in speed.gemm_shapes(k=k, batch=batch))
    executed = speed.executed_matmul_flops(lambda: run(1))
    assert executed == counted


def test_servers_time_blocks_on_request(speed):
    servers = [speed.Server("bear", warmup=1, batch=32), speed.Server("matmuls", batch=32)]
    try:
        for server in servers:
            rates = [server.steps_per_s(2) for _ in range(2)]
            assert all(0 < rate < 1e6 for rate in rates)
    finally:
        for server in servers:
            server.close()
    assert all(server.proc.returncode == 0 for server in servers)


def test_a_failing_server_reports_its_error(speed):
    with pytest.raises(RuntimeError, match="bear worker failed"):
        speed.Server("bear", threads=0).ready()  # torch refuses 0 threads


@pytest.mark.parametrize("parts", list(SPEED_PARTS))
def test_every_part_of_the_speed_benchmark_runs_at_a_tiny_size(parts, background):
    """benchmarks/speed.py --small --parts <parts>: every row printed, with a value (on this CPU; the device part is
    the GPU machine's command, here on the CPU)."""
    folder, out = background.result(f"speed {parts}")
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ") and "figure" not in line]
    assert rows, out.stdout
    for name, value, how in rows:
        assert value.strip() and name.strip(), rows
    if "d3rlpy" in parts and not os.path.exists(d3rlpy_python(folder)):
        assert any("d3rlpy 2.8.1 BEAR" in name and value.strip() == "skipped" for name, value, _ in rows), rows
    assert len(rows) == SPEED_PARTS[parts], out.stdout


def test_the_evalpool_part_alternates_chosen_variants_over_rounds(speed, monkeypatch, capsys):
    """--pool-variants off pool --pool-rounds 2: the variants run A B, then B A, and each figure is a median over the
    rounds, each ratio the median of the per-round ratios (the runs themselves are the [evalpool] smoke test's)."""
    calls, walls = [], {("off", 0): 10.0, ("pool", 0): 12.0, ("off", 1): 20.0, ("pool", 1): 30.0}

    def pool_run(path, tmp, tiny, run_name, steps, extra, train_core, worker_core):
        name, r = run_name.rsplit("-", 1)
        calls.append((name, int(r)))
        return {"wall_clock_seconds": walls[name, int(r)], "train_steps_per_second": 1.0, "eval_wait_seconds": 0.5,
                "final_eval_wait_seconds": 0.25}

    monkeypatch.setattr(speed, "pool_run", pool_run)
    args = argparse.Namespace(pool_variants=["pool", "off"], pool_rounds=2, pool_steps=10)
    speed.evalpool_part(args, 1)
    assert calls == [("off", 0), ("pool", 0), ("pool", 1), ("off", 1)]  # the order rotates each round
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")]
    assert [r[0] for r in rows] == ["10 steps, evaluation only at the end (off) (wall s)",
                                    "10 steps, evaluation every 5 steps, pool (wall s)",
                                    "evaluation in the pool, wall time over evaluation off"]
    assert [r[1] for r in rows] == ["15", "21", "1.350x"]  # medians of 10, 20 and 12, 30; of the ratios 1.2 and 1.5
    assert all("median of 2 runs" in r[2] and "waited for evaluations 0.8 s" in r[2] for r in rows[:2])
    assert rows[2][2].endswith("per round: 1.200, 1.500")


def test_the_evalpool_parts_four_variants_run_with_their_own_flags_and_cores(speed, monkeypatch, capsys):
    """Each variant's bear-train.py flags and cores as pool_run receives them, and the figure and the ratio of each
    (the smoke test above runs off and pool for real; shared and inline are the same pool_run with these flags)."""
    calls = {}

    def pool_run(path, tmp, tiny, run_name, steps, extra, train_core, worker_core):
        calls[run_name] = (steps, extra, train_core, worker_core)
        return {"wall_clock_seconds": {"off-0": 10.0, "pool-0": 11.0, "shared-0": 13.0, "inline-0": 12.0}[run_name],
                "train_steps_per_second": 1.0, "eval_wait_seconds": 0.0, "final_eval_wait_seconds": 0.0}

    monkeypatch.setattr(speed, "pool_run", pool_run)
    monkeypatch.setattr(speed.os, "sched_getaffinity", lambda pid: {3, 5, 7})
    speed.evalpool_part(argparse.Namespace(pool_variants=list(speed.POOL_VARIANTS), pool_rounds=1, pool_steps=10), 1)
    assert calls == {"off-0": (10, ["--eval-every=10", "--eval-workers=1"], 3, 7),
                     "pool-0": (10, ["--eval-every=5", "--eval-workers=1"], 3, 7),
                     "shared-0": (10, ["--eval-every=5", "--eval-workers=1"], 3, 3),
                     "inline-0": (10, ["--eval-every=5", "--eval-workers=0"], 3, 7)}
    rows = {r[0]: r[1:] for r in ([c.strip() for c in line.split("|")[1:-1]]
                                  for line in capsys.readouterr().out.splitlines() if line.startswith("| "))}
    assert {name: value for name, (value, _) in rows.items()} == {
        "10 steps, evaluation only at the end (off) (wall s)": "10",
        "10 steps, evaluation every 5 steps, pool (wall s)": "11",
        "10 steps, evaluation every 5 steps, pool on the training core (wall s)": "13",
        "10 steps, evaluation every 5 steps, in process (wall s)": "12",
        "evaluation in the pool, wall time over evaluation off": "1.100x",
        "the pool without a spare core, over evaluation off": "1.300x",
        "evaluation in the training process, wall time over evaluation off": "1.200x"}
    assert "no worker" in rows["10 steps, evaluation every 5 steps, in process (wall s)"][1]
    assert "the worker on core 3" in rows["10 steps, evaluation every 5 steps, pool on the training core (wall s)"][1]


def run_benchmark(cmd, tmp_path, **env):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=dict(os.environ, **env))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def table(stdout):
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| figure", "| dataset"))]


def test_the_sweep_benchmark_runs_at_a_tiny_size(background):
    rows = table(background.result("sweep")[1].stdout)
    assert [r[0] for r in rows] == ["Ray start-up, local instance (s)", "2 runs one after another (s)",
                                    "the same 2 runs as one sweep (s)", "sweep speed-up"]
    assert all(float(r[1].rstrip("x")) > 0 for r in rows)


def test_the_minari_benchmark_runs_at_a_tiny_size(background):
    rows = table(background.result("minari")[1].stdout)
    assert [r[0] for r in rows] == ["local/walker2d/random-v0", "local/pointmaze/umaze-random-v0"]
    assert all(r[3] == "10" and r[6] == "None" for r in rows)


def test_the_learning_check_runs_at_a_tiny_size(background):
    folder, out = background.result("learning check")
    assert "| walker2d-random-v2 | 3 | 10 |" in out.stdout
    assert sorted(p.name for p in (folder / "out").iterdir() if p.is_dir()) == [
        f"walker2d-random-v2__seed{s}" for s in range(3)]


def test_the_d3rlpy_actor_gradient_check_runs(tmp_path):
    """Needs d3rlpy 2.8.1 in its own venv (README, Performance); skipped where there is none."""
    python = os.environ.get("D3RLPY_PYTHON", str(ROOT / ".venv-d3rlpy" / "bin" / "python"))
    if not os.path.exists(python):
        pytest.skip(f"no d3rlpy interpreter at {python}")
    out = run_benchmark([python, str(ROOT / "benchmarks" / "d3rlpy_actor_gradient.py")], tmp_path)
    assert "Q term alone" in out or "q term" in out.lower(), out


def test_the_mmd_floor_benchmark_runs_at_a_tiny_size(tmp_path):
    write_d4rl_file(tmp_path / "hopper_tiny.hdf5", n=300, obs_dim=11, act_dim=3)
    out = run_benchmark([sys.executable, str(ROOT / "benchmarks" / "mmd_floor.py"), "--small",
                         f"--data=hopper={tmp_path / 'hopper_tiny.hdf5'}"], tmp_path)
    rows = [r for r in table(out) if r[0] != "data"]
    assert [(r[0], r[1].split()[0], r[2]) for r in rows] == [
        (data, kernel, n) for data in ("halfcheetah-shaped random-policy", "hopper: hopper_tiny.hdf5",
                                       "walker2d-shaped random-policy")
        for kernel in ("laplacian", "gaussian") for n in ("4", "5", "10")]
    assert [r[1] for r in rows].count("gaussian (the default)") == 1  # halfcheetah's, n = 4
    for r in rows:
        measured, predicted, epsilon = float(r[3]), float(r[5]), float(r[8])
        assert 0 < measured and 0.7 * predicted < measured < 1.1 * predicted, r  # the biased estimator's expectation
        assert r[9].endswith("ABOVE: alpha is pinned" if measured > epsilon else "below"), r
