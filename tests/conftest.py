"""Shared test helpers: load bear-train.py by path (its name has a hyphen) and write small D4RL-layout files."""
import importlib.util
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bear-train.py"


def load_script():
    if "bear_train" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bear_train", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bear_train"] = module  # before exec: dataclasses and worker processes look it up by name
        spec.loader.exec_module(module)
    return sys.modules["bear_train"]


@pytest.fixture(scope="session")
def bear():
    return load_script()


def write_d4rl_file(path, n=2000, obs_dim=17, act_dim=6, episode_len=50, seed=0, column_rewards=False, **override):
    """A small file in D4RL's v2 layout: episodes of `episode_len` rows, odd episodes end in a termination,
    even ones in a timeout. Returns the arrays written."""
    rng = np.random.default_rng(seed)
    terminals = np.zeros(n, bool)
    timeouts = np.zeros(n, bool)
    ends = np.arange(episode_len - 1, n, episode_len)
    terminals[ends[1::2]] = True
    timeouts[ends[0::2]] = True
    arrays = {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
        "rewards": rng.normal(size=(n, 1) if column_rewards else n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
    }
    arrays.update(override)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is not None:
                f.create_dataset(key, data=value, compression="gzip")
        f.create_dataset("next_observations", data=np.roll(arrays["observations"], -1, axis=0))
    return arrays
