"""Data preparation at scale: regeneration on every core and the same file whatever the workers, a progress bar,
SIGINT/SIGTERM during regeneration or download, file modes under the umask, one copy under concurrency, --offline."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest

import launch
from conftest import SCRIPT, run_main, write_d4rl_file
from test_download import Server

TRAIN = ["--gpu=-1", "--max-steps=20", "--warmup-steps=10", "--eval-every=20", "--eval-episodes=1", "--log-every=10",
         "--actor-hidden=32", "--critic-hidden=32", "--vae-hidden=32", "--batch-size=32", "--eval-candidates=4",
         "--eval-workers=0"]  # evaluation in the training process (the pool's own log is in the umask test)


def env_for(cache, **extra):
    # port 9 (discard) refuses connections here: a download attempt fails at once, nothing leaves the machine
    return dict(os.environ, D4RL_DATASET_DIR=str(cache), BEAR_D4RL_BASE_URL="http://127.0.0.1:9/offline_rl", **extra)


def start(args, cache, cwd, **popen):
    return launch.Popen([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env_for(cache), text=True,
                            stdout=launch.PIPE, stderr=launch.PIPE, **popen)


def children(pid):
    """Process ids whose parent is pid."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def message_lines(stderr):
    """stderr without the progress bars' refreshes (tqdm separates them with carriage returns)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]


# ---------------------------------------------------------------------------------------------- the recipe
def read_all(path, keys):
    with h5py.File(path) as f:
        return {k: f[k][()] for k in keys}, json.loads(f.attrs["recipe"])


def test_the_file_is_the_same_for_1_2_and_3_workers(bear, tmp_path):
    spec = bear.resolve_dataset("hopper-random-v2")
    chunks = bear.regen_chunks(6000)
    assert len(chunks) == 6 and sum(c[0] for c in chunks) == 6000
    files = {}
    for workers in (1, 2, 3):
        bear.regenerate_random(spec, 6000, tmp_path / f"w{workers}.hdf5", workers)
        files[workers] = read_all(tmp_path / f"w{workers}.hdf5", bear.KEYS)
    for workers in (2, 3):
        for key in bear.KEYS:
            np.testing.assert_array_equal(files[1][0][key], files[workers][0][key], err_msg=f"{workers} workers, {key}")
    arrays, recipe = files[1]
    assert len(arrays["rewards"]) == 6000 and arrays["terminals"].sum() > 50
    import gymnasium
    import mujoco

    assert recipe["recipe_version"] == bear.REGEN_RECIPE and recipe["chunks"] == 6 and recipe["environment"] == "Hopper-v4"
    assert (recipe["gymnasium"], recipe["mujoco"]) == (gymnasium.__version__, mujoco.__version__)
    assert "10007" in recipe["chunk_seeds"]
    # chunks are seeded by their index: the first chunk alone reproduces the file's first rows
    first = bear._random_rollout("Hopper-v4", *chunks[0])
    n = len(first["rewards"])
    assert n >= 1000 and (first["terminals"][-1] or first["timeouts"][-1])  # it ends on an episode boundary
    np.testing.assert_array_equal(first["observations"], arrays["observations"][:n])


# The recipe, pinned: 2 500 steps of hopper-random in 2 chunks reproduce these arrays exactly (sha256 of
# observations, actions, rewards, terminals and timeouts, in that order). A change to the recipe fails here until
# REGEN_RECIPE is bumped (so that cached files of the old recipe are made again) and the digest is updated with it.
PINNED_RECIPE = (2, "0b9f8e94df935112d0a18c4f4f402029eba2a11291683811fc77a4cf42b3f00c")


def test_the_recipe_is_pinned_by_a_digest(bear, tmp_path):
    import hashlib

    assert bear.regen_chunks(2500) == [(1250, 0, True), (1250, 10_007, False)]
    bear.regenerate_random(bear.resolve_dataset("hopper-random-v2"), 2500, tmp_path / "pinned.hdf5", workers=1)
    arrays, _ = read_all(tmp_path / "pinned.hdf5", bear.KEYS)
    digest = hashlib.sha256(b"".join(arrays[k].tobytes() for k in bear.KEYS)).hexdigest()
    assert (bear.REGEN_RECIPE, digest) == PINNED_RECIPE, \
        "the regeneration recipe changed: bump REGEN_RECIPE and pin the new digest together"


def test_every_usable_core_by_default_and_a_cap(bear, tmp_path, monkeypatch, capsys):
    """In this process (main): the worker count is what is checked, not the process boundary; this process's own
    affinity is narrowed for the second run and put back."""
    cores = os.sched_getaffinity(0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BEAR_D4RL_BASE_URL", "http://127.0.0.1:9/offline_rl")
    args = ["--dataset=hopper-random-v2", "--offline", "--regen-steps=3000", *TRAIN]

    def run(cache, *extra):
        monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / cache))
        code, out, err = run_main(bear, [*args, *extra], capsys)
        assert code == 0, err
        return out, err

    out, _ = run("a")
    assert f"in 3 chunks on {min(len(cores), 3)} worker(s)" in out
    os.sched_setaffinity(0, {min(cores)})
    try:
        out, _ = run("b")
    finally:
        os.sched_setaffinity(0, cores)
    assert "in 3 chunks on 1 worker(s)" in out  # the affinity, not the machine's core count
    out, err = run("c", "--regen-workers=1")
    assert "on 1 worker(s)" in out
    # the progress bar counts environment steps
    assert "regenerating bear-regenerated_hopper_random-v2_Hopper-v4_3000steps.hdf5" in err
    assert "3.00k/3.00k" in err and "step/s" in err


# ---------------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 75)])
@pytest.mark.parametrize("target", ["group", "main"])
def test_a_signal_during_regeneration_stops_everything_and_keeps_nothing(tmp_path, signum, code, target):
    cache = tmp_path / "cache"
    args = ["--dataset=walker2d-random-v2", "--offline", "--regen-steps=200000", "--regen-workers=2", *TRAIN]
    proc = start(args, cache, tmp_path, start_new_session=True)
    deadline = time.time() + 120
    while len(children(proc.pid)) < 2:  # both workers are running
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    workers = children(proc.pid)
    time.sleep(1.0)
    t = time.time()
    if target == "group":  # Ctrl-C in a terminal, or a scheduler that signals the whole job
        os.killpg(proc.pid, signum)
    else:  # kill PID
        os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=30)
    assert time.time() - t < 5
    assert proc.returncode == code
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"bear-train.py: stopped by {signal.Signals(signum).name} while "
                                                   "regenerating") and "nothing partial was kept" in lines[0], err
    time.sleep(0.5)
    assert not [w for w in workers if alive(w)]
    assert not cache.exists() or list(cache.iterdir()) == []  # no partial file, no temporary file, no lock
    assert not (tmp_path / "runs").exists()


def test_the_same_command_after_an_interrupt_works(tmp_path):
    cache = tmp_path / "cache"
    args = ["--dataset=hopper-random-v2", "--offline", "--regen-steps=60000", *TRAIN]
    proc = start(args, cache, tmp_path)
    while "regenerating" not in (line := proc.stdout.readline()):
        assert line, proc.communicate()
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    out = launch.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env_for(cache), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["bear-regenerated_hopper_random-v2_Hopper-v4_60000steps.hdf5"]


class StallingServer(Server):
    """Sends the first half of the file, then holds the connection open without sending more."""

    def __init__(self, body):
        super().__init__()
        self.release = threading.Event()
        handler = self.httpd.RequestHandlerClass
        server = self

        def do_GET(h):
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            server.release.wait(60)

        handler.do_GET = do_GET


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 75)])
def test_a_signal_during_a_download_keeps_the_part_for_the_next_run(tmp_path, signum, code):
    src = tmp_path / "src.hdf5"
    write_d4rl_file(src, n=20000)
    server = StallingServer(src.read_bytes())
    cache = tmp_path / "cache"
    try:
        proc = launch.Popen([sys.executable, str(SCRIPT), "--dataset=walker2d-medium-v2", *TRAIN], cwd=tmp_path,
                                env=dict(env_for(cache), BEAR_D4RL_BASE_URL=server.url), text=True,
                                stdout=launch.PIPE, stderr=launch.PIPE)
        part = cache / "walker2d_medium-v2.hdf5.part"
        deadline = time.time() + 120
        while not (part.exists() and part.stat().st_size > 0):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)
        t = time.time()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
        assert time.time() - t < 5
    finally:
        server.release.set()
        server.httpd.shutdown()
    assert proc.returncode == code
    lines = message_lines(err)
    assert len(lines) == 1 and "while downloading walker2d_medium-v2.hdf5" in lines[0] and "resumes" in lines[0], err
    assert sorted(p.name for p in cache.iterdir()) == ["walker2d_medium-v2.hdf5.part"]  # never the file a run loads


# ---------------------------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_gets_the_mode_of_the_umask(tmp_path, umask):
    cache = tmp_path / "cache"
    out = launch.run([sys.executable, str(SCRIPT), "--dataset=hopper-random-v2", "--offline", "--regen-steps=3000",
                          *TRAIN, "--eval-workers=1"], cwd=tmp_path, env=env_for(cache), capture_output=True, text=True,
                         timeout=300, umask=umask)
    assert out.returncode == 0, out.stderr
    out = launch.run([sys.executable, str(SCRIPT), f"--summarize={tmp_path / 'runs'}"], cwd=tmp_path,
                         env=env_for(cache), capture_output=True, text=True, timeout=300, umask=umask)
    assert out.returncode == 0, out.stderr
    files = [p for p in [*cache.rglob("*"), *(tmp_path / "runs").rglob("*")] if p.is_file()]
    names = {p.name.split(".")[0] for p in files}
    assert {"bear-regenerated_hopper_random-v2_Hopper-v4_3000steps", "config", "metrics", "results", "curves",
            "events", "summary", "summary_hopper-random-v2", "eval-workers", "policy-final"} <= names and any(p.suffix == ".pt" for p in files)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


# ---------------------------------------------------------------------------------------------- one copy
def test_two_runs_needing_the_same_missing_dataset_make_it_once(tmp_path):
    cache = tmp_path / "cache"
    args = ["--dataset=hopper-random-v2", "--offline", "--regen-steps=20000", *TRAIN]
    procs = [start(args + [f"--seed={seed}"], cache, tmp_path) for seed in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    stdout = "".join(out for out, _ in outs)
    assert stdout.count("regenerating 20000 random steps") == 1
    assert sum("regenerating" in err for _, err in outs) == 1  # only one process showed a regeneration bar
    assert stdout.count("waiting for process") <= 1
    results = [json.loads((tmp_path / "runs" / f"hopper-random-v2__seed{s}" / "results.json").read_text()) for s in (0, 1)]
    assert results[0]["dataset_file"] == results[1]["dataset_file"] and {r["dataset_source"] for r in results} == {"regenerated"}
    assert sorted(p.name for p in cache.iterdir()) == ["bear-regenerated_hopper_random-v2_Hopper-v4_20000steps.hdf5"]


HOLD = """
import importlib.util, sys, time
from pathlib import Path
s = importlib.util.spec_from_file_location("b", sys.argv[1]); m = importlib.util.module_from_spec(s); s.loader.exec_module(m)
with m.dataset_lock(Path(sys.argv[2])):
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def hold_lock(path, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(SCRIPT), str(path), str(seconds)], stdout=launch.PIPE,
                            text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_the_lock_waits_for_its_holder_and_a_killed_holder_never_blocks(bear, tmp_path, capsys):
    path = tmp_path / "walker2d_random-v2.hdf5"
    holder = hold_lock(path, 2)
    t = time.time()
    with bear.dataset_lock(path):
        waited = time.time() - t  # it had to wait for the holder's 2 s
    holder.wait()
    assert waited > 1.5
    assert capsys.readouterr().out.count(f"waiting for process {holder.pid}, which is preparing {path.name}") == 1
    assert list(tmp_path.iterdir()) == []  # the lock file goes with its holder

    holder = hold_lock(path, 600)
    holder.kill()  # SIGKILL: no chance to clean up; its lock file stays behind
    holder.wait()
    assert (tmp_path / "walker2d_random-v2.hdf5.lock").exists()
    t = time.time()
    with bear.dataset_lock(path):
        assert time.time() - t < 2
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- offline
def test_offline_never_touches_the_network(bear, tmp_path, monkeypatch, capsys):
    """In this process (main): what is checked is which requests reach the server, not the process boundary."""
    server = Server()
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(cache))
    monkeypatch.setenv("BEAR_D4RL_BASE_URL", server.url)
    try:
        def run(args, offline_env=""):
            monkeypatch.setenv("BEAR_OFFLINE", offline_env)
            return run_main(bear, [*args, *TRAIN], capsys)

        code, _, err = run(["--dataset=hopper-medium-v2", "--offline"])
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"place it at {cache / 'hopper_medium-v2.hdf5'}" in err and "offline" in err
        code, out, err = run(["--dataset=hopper-random-v2", "--regen-steps=3000"], offline_env="1")
        assert code == 0, err
        assert "regenerating 3000 random steps" in out
        write_d4rl_file(cache / "walker2d_random-v2.hdf5", n=500)
        code, _, err = run(["--dataset=walker2d-random-v2", "--offline"])
        assert code == 0, err
        assert json.loads((tmp_path / "runs" / "walker2d-random-v2__seed0" / "results.json").read_text())["dataset_source"] == "cache"
        assert server.requests == []
        # without --offline a missing file is asked for, as before
        code, _, _ = run(["--dataset=hopper-medium-v2"])
        assert code == 2 and server.requests == [("/offline_rl/gym_mujoco_v2/hopper_medium-v2.hdf5", None)]
    finally:
        server.httpd.shutdown()
