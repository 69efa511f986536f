"""benchmarks/speed.py measures what it says: its counted arithmetic is the arithmetic the update executes, and its
A B machinery (long-lived worker processes timing blocks on request) answers with real timings."""
import argparse
import importlib.util
import os

import pytest

from conftest import ROOT


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


# every part, in groups that share one driver (and, for update, d3rlpy and flops, its timing servers)
SPEED_PARTS = {"update d3rlpy flops": 8, "scaling": 2, "script eval data": 4, "regen": 3, "evalpool": 7, "device": 9,
               "bf16": 6}  # rows expected: update 1, d3rlpy 1 more (skipped without its venv), flops 6 more, ...


@pytest.mark.parametrize("parts", list(SPEED_PARTS))
def test_every_part_of_the_speed_benchmark_runs_at_a_tiny_size(parts, tmp_path):
    """benchmarks/speed.py --small --parts <parts>: every row printed, with a value (on this CPU; the device part is
    the GPU machine's command, here on the CPU)."""
    import subprocess
    import sys

    env = dict(os.environ, D3RLPY_PYTHON=os.environ.get("D3RLPY_PYTHON", str(tmp_path / "no-d3rlpy")))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--small", "--parts", *parts.split()],
                         capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ") and "figure" not in line]
    assert rows, out.stdout
    for name, value, how in rows:
        assert value.strip() and name.strip(), rows
    if "d3rlpy" in parts and not os.path.exists(env["D3RLPY_PYTHON"]):
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


def run_benchmark(cmd, tmp_path, **env):
    import subprocess

    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=dict(os.environ, **env))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def table(stdout):
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| figure", "| dataset"))]


def test_the_sweep_benchmark_runs_at_a_tiny_size(tmp_path):
    import sys

    rows = table(run_benchmark([sys.executable, str(ROOT / "benchmarks" / "sweep.py"), "--small", "--steps=10"],
                               tmp_path, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled"))
    assert [r[0] for r in rows] == ["Ray start-up, local instance (s)", "2 runs one after another (s)",
                                    "the same 2 runs as one sweep (s)", "sweep speed-up"]
    assert all(float(r[1].rstrip("x")) > 0 for r in rows)


def test_the_minari_benchmark_runs_at_a_tiny_size(tmp_path):
    import sys

    rows = table(run_benchmark([sys.executable, str(ROOT / "benchmarks" / "minari_local.py"), "--small"], tmp_path,
                               HF_HUB_OFFLINE="1"))
    assert [r[0] for r in rows] == ["local/walker2d/random-v0", "local/pointmaze/umaze-random-v0"]
    assert all(r[3] == "10" and r[6] == "None" for r in rows)


def test_the_learning_check_runs_at_a_tiny_size(tmp_path):
    from conftest import write_d4rl_file

    write_d4rl_file(tmp_path / "cache" / "walker2d_random-v2.hdf5", n=500)  # a cached file: nothing regenerated
    out = run_benchmark(["bash", str(ROOT / "benchmarks" / "learning_check.sh")], tmp_path, STEPS="10", WARMUP="5",
                        THREADS="1", OUT=str(tmp_path / "out"), D4RL_DATASET_DIR=str(tmp_path / "cache"),
                        BEAR_D4RL_BASE_URL="http://127.0.0.1:9/offline_rl")
    assert "| walker2d-random-v2 | 3 | 10 |" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == [
        f"walker2d-random-v2__seed{s}" for s in range(3)]


def test_the_d3rlpy_actor_gradient_check_runs(tmp_path):
    """Needs d3rlpy 2.8.1 in its own venv (README, Performance); skipped where there is none."""
    python = os.environ.get("D3RLPY_PYTHON", str(ROOT / ".venv-d3rlpy" / "bin" / "python"))
    if not os.path.exists(python):
        pytest.skip(f"no d3rlpy interpreter at {python}")
    out = run_benchmark([python, str(ROOT / "benchmarks" / "d3rlpy_actor_gradient.py")], tmp_path)
    assert "Q term alone" in out or "q term" in out.lower(), out
