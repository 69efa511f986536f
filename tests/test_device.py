"""--gpu=N, correct before it meets a GPU: checkpoints load onto the CPU, random states per training device, the current
device, data prepared before CUDA is touched, a crash's own exit code, and one process per run folder. No GPU here:
torch.cuda is replaced by a small fake that records what it is asked, where a test needs CUDA to be there."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import launch
from conftest import SCRIPT, run_main, write_d4rl_file

TINY = ["--actor-hidden=16", "--critic-hidden=16", "--vae-hidden=16", "--batch-size=16", "--warmup-steps=10",
        "--log-every=10", "--eval-episodes=1", "--eval-candidates=4", "--gpu=-1", "--eval-workers=0"]


class FakeCuda:
    """torch.cuda as a machine with `count` GPUs would answer: each device's random state is 16 bytes of its index."""

    def __init__(self, count):
        self.count, self.current, self.restored, self.calls = count, 0, {}, []

    def install(self, monkeypatch):
        for name in ("is_available", "device_count", "set_device", "get_rng_state", "set_rng_state", "current_device"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def is_available(self):
        self.calls.append("is_available")
        return self.count > 0

    def device_count(self):
        self.calls.append("device_count")
        return self.count

    def _index(self, device):
        index = torch.device(device).index if not isinstance(device, int) else device
        assert index is not None and index < self.count, f"no CUDA device {device} among {self.count}"
        return index

    def set_device(self, device):
        self.current = self._index(device)

    def current_device(self):
        return self.current

    def get_rng_state(self, device="cuda"):
        return torch.full((16,), self._index(device), dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        assert state.dtype == torch.uint8 and state.device.type == "cpu"  # torch's own check
        self.restored[self._index(device)] = int(state[0])


def small_checkpoint(bear, tmp_path, device=torch.device("cpu")):
    cfg = bear.Config(actor_hidden=8, critic_hidden=8, vae_hidden=8)
    torch.manual_seed(0)
    agent = bear.BEAR(cfg, 3, 2, "laplacian", torch.device("cpu"))
    path = tmp_path / "checkpoint-000000010.pt"
    bear.atomic_write(path, lambda f: torch.save({"step": 10, "agent": agent.state_dict(), "rng": bear.rng_states(device)}, f))
    return path


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def test_a_checkpoint_loads_onto_the_cpu_whatever_the_device_and_its_random_states_restore(bear, tmp_path):
    path = small_checkpoint(bear, tmp_path)
    saved = bear.load_checkpoint(path)
    assert all(t.device.type == "cpu" for t in tensors(saved))
    torch.manual_seed(123)
    assert bear.set_rng_states(saved["rng"], torch.device("cpu"))
    first = torch.rand(3)
    bear.set_rng_states(bear.load_checkpoint(path)["rng"], torch.device("cpu"))
    assert torch.equal(torch.rand(3), first)  # the stream continues where it was saved
    # what a load onto the training device did on a GPU (reproduced with the meta device): the states leave the CPU
    # and torch refuses them
    moved = torch.load(path, map_location="meta", weights_only=False)
    with pytest.raises(TypeError, match="RNG state must be a torch.ByteTensor"):
        bear.set_rng_states(moved["rng"], torch.device("cpu"))


def test_a_resume_loads_its_checkpoint_through_load_checkpoint(bear, tmp_path, monkeypatch):
    """train's resume goes through load_checkpoint (onto the CPU), not a torch.load onto the training device."""
    data = tmp_path / "walker2d_d.hdf5"
    write_d4rl_file(data, n=400)
    args = [f"--dataset={data}", f"--log-dir={tmp_path}", "--eval-every=20", *TINY]
    assert bear.main(args + ["--max-steps=20"]) == 0
    loaded, real = [], bear.load_checkpoint
    monkeypatch.setattr(bear, "load_checkpoint", lambda path: loaded.append(path.name) or real(path))
    assert bear.main(args + ["--max-steps=30", "--resume"]) == 0
    assert loaded == ["checkpoint-000000020.pt"]


def test_only_the_training_devices_cuda_state_is_saved_and_it_is_restored_into_the_training_device(bear, monkeypatch):
    eight = FakeCuda(4)  # an 8-GPU box would do the same; four simulated visible GPUs
    eight.install(monkeypatch)
    states = bear.rng_states(torch.device("cuda", 3))
    assert int(states["cuda"][0]) == 3 and states["cuda"].shape == (16,)  # device 3's state, and only it
    one = FakeCuda(1)  # the resume sees one GPU (CUDA_VISIBLE_DEVICES from SLURM or Ray)
    one.install(monkeypatch)
    assert bear.set_rng_states(states, torch.device("cuda", 0))
    assert one.restored == {0: 3}  # the training device gets the training device's stream
    two = FakeCuda(2)  # or another --gpu: still the stream of the device that trained
    two.install(monkeypatch)
    assert bear.set_rng_states(states, torch.device("cuda", 1))
    assert two.restored == {1: 3}


def test_resuming_on_another_device_type_restarts_the_streams_once_and_records_it(bear, tmp_path, monkeypatch,
                                                                                   capsys):
    cpu_states = bear.rng_states(torch.device("cpu"))
    fake = FakeCuda(1)
    fake.install(monkeypatch)
    assert not bear.set_rng_states(cpu_states, torch.device("cuda", 0)) and fake.restored == {}
    monkeypatch.undo()
    data = tmp_path / "walker2d_x.hdf5"
    write_d4rl_file(data, n=400)
    args = [f"--dataset={data}", f"--log-dir={tmp_path}", "--eval-every=20", *TINY]
    assert run_main(bear, args + ["--max-steps=20"], capsys)[0] == 0
    folder = tmp_path / "walker2d_x__seed0"
    ckpt = folder / "checkpoint-000000020.pt"
    saved = torch.load(ckpt, weights_only=False)  # made as a GPU run makes it
    saved["rng"] |= {"device_type": "cuda", "cuda": torch.zeros(16, dtype=torch.uint8)}
    bear.save_checkpoint(folder, saved)  # with its manifest, as the GPU run writes it
    code, _, err = run_main(bear, args + ["--max-steps=40", "--resume"], capsys)
    assert code == 0, err
    assert err.count("the random streams restart") == 1
    restarts = json.loads((folder / "results.json").read_text())["rng_restarts"]
    assert restarts == [{"step": 20, "saved_on": "cuda", "resumed_on": "cpu"}]


def test_the_training_device_is_made_the_current_cuda_device(bear, monkeypatch):
    fake = FakeCuda(4)
    fake.install(monkeypatch)
    assert bear.pick_device(3) == torch.device("cuda", 3)
    assert fake.current == 3  # not 0: nothing opens a context on a GPU that another job owns
    with pytest.raises(bear.UserError, match="this machine has 4 CUDA device"):
        bear.pick_device(4)


def test_data_are_prepared_before_cuda_is_first_touched(bear, tmp_path, monkeypatch):
    fake = FakeCuda(0)  # CUDA absent: training falls back to the CPU, after saying so
    fake.install(monkeypatch)
    order = []
    real_regenerate = bear.regenerate_random

    def regenerate(*args, **kwargs):
        order.append(f"regeneration starts, CUDA asked {len(fake.calls)} times")
        real_regenerate(*args, **kwargs)
        order.append("regeneration done")

    monkeypatch.setattr(bear, "regenerate_random", regenerate)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    args = ["--dataset=hopper-random-v2", "--offline", "--regen-steps=2000", "--regen-workers=2", "--max-steps=10",
            "--eval-every=10", f"--log-dir={tmp_path}", *TINY[:-2], "--gpu=0", "--eval-workers=0"]
    assert bear.main(args) == 0
    assert order == ["regeneration starts, CUDA asked 0 times", "regeneration done"]
    assert fake.calls  # and CUDA was asked afterwards (--gpu=0)


def test_an_unexpected_error_gets_its_own_exit_code_one_line_and_its_traceback_in_the_run_folder(bear, tmp_path,
                                                                                                  monkeypatch, capsys):
    data = tmp_path / "walker2d_e.hdf5"
    write_d4rl_file(data, n=400)
    real = bear.BEAR._update

    def broken(self, batch, warmup):
        if int(self.step) == 15:
            raise RuntimeError("a fault in the update")
        return real(self, batch, warmup)

    monkeypatch.setattr(bear.BEAR, "_update", broken)
    code, _, err = run_main(bear, [f"--dataset={data}", f"--log-dir={tmp_path}", "--max-steps=40", "--eval-every=10",
                                   "--checkpoint-every=10", *TINY], capsys)
    assert code == 70, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    folder = tmp_path / "walker2d_e__seed0"
    assert lines == [f"bear-train.py: crashed: RuntimeError: a fault in the update (traceback in {folder / 'error.log'})"]
    assert "Traceback" not in err
    log = (folder / "error.log").read_text()
    assert "Traceback (most recent call last)" in log and "RuntimeError: a fault in the update" in log
    assert (folder / "checkpoint-000000010.pt").exists() and not (folder / "results.json").exists()


# ---------------------------------------------------------------------------------------------- one process per run
def start(args, **kwargs):
    return launch.Popen([sys.executable, str(SCRIPT), *args], stdout=launch.PIPE, stderr=launch.PIPE,
                            text=True, **kwargs)


def test_a_second_process_on_a_run_folder_stops_naming_the_holder_and_a_killed_holder_never_blocks(tmp_path):
    data = tmp_path / "walker2d_l.hdf5"
    write_d4rl_file(data, n=400)
    args = [f"--dataset={data}", f"--log-dir={tmp_path}", "--max-steps=100000", "--eval-every=50",
            "--checkpoint-every=50", "--resume", *TINY]
    first = start(args)
    folder = tmp_path / "walker2d_l__seed0"
    deadline = time.time() + 120
    while not (folder / "checkpoint-000000050.pt").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    second = launch.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"bear-train.py: error: {folder} is in use: process {first.pid} is training {folder}; wait for it to end, "
        "or stop it first"]
    assert first.poll() is None  # the holder trains on, untouched
    first.kill()  # SIGKILL: its lock file stays, its flock goes with it
    first.wait()
    assert (folder / ".lock").exists()
    third = launch.run([sys.executable, str(SCRIPT), *args[:2], "--max-steps=100", *args[3:]], capture_output=True,
                           text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert "resuming" in third.stdout
    assert not (folder / ".lock").exists()  # nothing left behind


def test_two_new_runs_started_together_get_folders_of_their_own(tmp_path):
    data = tmp_path / "walker2d_t.hdf5"
    write_d4rl_file(data, n=400)
    args = [f"--dataset={data}", f"--log-dir={tmp_path}", "--max-steps=20", "--eval-every=20", *TINY]
    procs = [start(args) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["walker2d_t__seed0", "walker2d_t__seed0-2"]
    for name in ("walker2d_t__seed0", "walker2d_t__seed0-2"):
        assert json.loads((tmp_path / name / "results.json").read_text())["steps"] == 20
