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
    args = argparse.Namespace(threads=2, k=k, batch=batch, compile=0, batched=0, tiny=0, warmup=1, device="cpu")
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
        speed.Server("bear", threads=0)  # torch refuses 0 threads


SPEED_PARTS = ["update", "d3rlpy", "flops", "scaling", "script", "eval", "data", "regen", "evalpool", "device"]


@pytest.mark.parametrize("part", SPEED_PARTS)
def test_every_part_of_the_speed_benchmark_runs_at_a_tiny_size(part, tmp_path):
    """benchmarks/speed.py --small --parts <part>: every row printed, with a value (on this CPU; the device part is
    the GPU machine's command, here on the CPU)."""
    import subprocess
    import sys

    env = dict(os.environ, D3RLPY_PYTHON=os.environ.get("D3RLPY_PYTHON", str(tmp_path / "no-d3rlpy")))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--small", "--parts", part],
                         capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ") and "figure" not in line]
    assert rows, out.stdout
    for name, value, how in rows:
        assert value.strip() and name.strip(), rows
    expected = {"update": 1, "d3rlpy": 2, "flops": 7, "scaling": 2, "script": 1, "eval": 1, "data": 1, "regen": 3,
                "evalpool": 5, "device": 9}[part]
    assert len(rows) == expected, out.stdout
