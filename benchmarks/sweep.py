"""Sweep benchmark: Ray's start-up time, and the wall time of a sweep of 4 short runs against the same 4 runs one
after another, with the same total threads (the sweep: --cpus-per-run=1, so 2 runs of 1 thread at a time on 2
cores; one after another: each run with --threads=<cores>).

    python benchmarks/sweep.py                 # about 4 minutes on 2 cores
    python benchmarks/sweep.py --steps=1000    # longer runs: start-up costs weigh less
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bear-train.py"
sys.path.insert(0, str(ROOT / "tests"))


def timed(cmd, env=None) -> float:
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500, help="gradient steps of each run (default hyperparameters)")
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--small", action="store_true", help="8-wide networks and 2 runs (the test suite's smoke test)")
    args = p.parse_args()
    if args.small:
        args.runs = 2
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cores} usable cores; {args.runs} runs of {args.steps} steps, default networks, warm-up 0, "
          "one evaluation of 2 episodes at the end\n")
    print("| figure | value | how |\n|---|---|---|")

    probe = ("import time; t = time.perf_counter(); import ray; t1 = time.perf_counter(); "
             "ray.init(include_dashboard=False, log_to_driver=False); t2 = time.perf_counter(); ray.shutdown(); "
             "print(t1 - t, t2 - t1, time.perf_counter() - t2)")
    local = dict(os.environ, RAY_ADDRESS="", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # as the sweep starts it: on 127.0.0.1
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=local)
    imported, started, stopped = map(float, out.stdout.split())
    print(f"| Ray start-up, local instance (s) | {started:.1f} | ray.init() of a new local instance; import ray "
          f"{imported:.1f} s, ray.shutdown() {stopped:.1f} s |", flush=True)

    from conftest import write_d4rl_file

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "walker2d_bench.hdf5"
        write_d4rl_file(data, n=20_000)
        common = [f"--dataset={data}", f"--max-steps={args.steps}", f"--eval-every={args.steps}", "--eval-episodes=2",
                  "--warmup-steps=0", "--gpu=-1"] + (["--actor-hidden=8", "--critic-hidden=8", "--vae-hidden=8",
                                                      "--batch-size=8", "--eval-candidates=4"] if args.small else [])
        env = dict(os.environ, RAY_ADDRESS="")
        one_by_one = sum(timed([sys.executable, str(SCRIPT), *common, f"--seed={seed}", f"--threads={cores}",
                                f"--log-dir={tmp}/alone"], env) for seed in range(args.runs))
        swept = timed([sys.executable, str(SCRIPT), *common, f"--seed=0-{args.runs - 1}", "--cpus-per-run=1",
                       f"--log-dir={tmp}/sweep"], env)
    print(f"| {args.runs} runs one after another (s) | {one_by_one:.0f} | each with --threads={cores} |")
    print(f"| the same {args.runs} runs as one sweep (s) | {swept:.0f} | --cpus-per-run=1: {cores} runs of 1 thread "
          "at a time; includes Ray's start-up and the data check |")
    print(f"| sweep speed-up | {one_by_one / swept:.2f}x | same total threads |")


if __name__ == "__main__":
    main()
