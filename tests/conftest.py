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


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A run in the test's own process sets torch's thread count (--threads, evaluation): put it back afterwards."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_main(bear, args, capsys):
    """bear-train.py's main(args) in this process: (exit code, stdout, stderr). For tests where the process boundary
    is not what they check; exit codes, signals, locks and the real command line are checked in subprocesses."""
    capsys.readouterr()
    try:
        code = bear.main([str(a) for a in args])
    except SystemExit as e:  # argparse's errors and --help
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


TINY_NETS = ["--actor-hidden=16", "--critic-hidden=16", "--vae-hidden=16", "--batch-size=16"]


def random_transitions(n, obs_dim=17, act_dim=6, terminal_rate=0.05, action_bound=1.0, seed=0):
    """Training transitions of random numbers, in to_transitions' layout (for tests that need no episodes)."""
    rng = np.random.default_rng(seed)
    return {"observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
            "actions": rng.uniform(-action_bound, action_bound, (n, act_dim)).astype(np.float32),
            "rewards": rng.normal(size=n).astype(np.float32),
            "next_observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
            "terminals": (rng.random(n) < terminal_rate).astype(np.float32)}


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


def write_minari_dataset(root, dataset_id, env_id, episodes, ref=(0.0, 100.0), seed=0):
    """A small Minari dataset under root (MINARI_DATASETS_PATH), made with minari itself. episodes: a list of
    (steps, "term" or "trunc"). Observations are synthetic so that tests can tell rows apart: in episode e, step t,
    every element of a Box observation is 1000 e + t (a Dict observation: every key's elements). Returns the
    episodes' (observations, actions, rewards, terminations, truncations)."""
    import os

    before = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)  # where minari writes; put back below
    try:
        return _write_minari(dataset_id, env_id, episodes, ref, seed)
    finally:
        if before is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = before


def _write_minari(dataset_id, env_id, episodes, ref, seed):
    import warnings

    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "Maze" in env_id or "Adroit" in env_id:
            import gymnasium_robotics

            gym.register_envs(gymnasium_robotics)
        env = gym.make(env_id)
    space, act_space = env.observation_space, env.action_space

    def observation(value):
        if isinstance(space, gym.spaces.Dict):
            return {k: np.full(s.shape, value, s.dtype) for k, s in space.spaces.items()}
        return np.full(space.shape, value, space.dtype)

    buffers, made = [], []
    for e, (steps, end) in enumerate(episodes):
        obs = [observation(1000 * e + t) for t in range(steps + 1)]
        if isinstance(space, gym.spaces.Dict):
            obs = {k: np.stack([o[k] for o in obs]) for k in space.spaces}
        else:
            obs = np.stack(obs)
        actions = rng.uniform(act_space.low, act_space.high, (steps, *act_space.shape)).astype(act_space.dtype)
        rewards = rng.normal(size=steps)
        terminations = [end == "term" and t == steps - 1 for t in range(steps)]
        truncations = [end == "trunc" and t == steps - 1 for t in range(steps)]
        buffers.append(EpisodeBuffer(id=e, observations=obs, actions=actions, rewards=list(rewards),
                                     terminations=terminations, truncations=truncations, infos={}))
        made.append((obs, actions, rewards, terminations, truncations))
    kwargs = dict(ref_min_score=ref[0], ref_max_score=ref[1]) if ref else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(dataset_id, buffers, env=env_id, algorithm_name="test", author="tests",
                                           author_email="tests", code_permalink="tests", description="test data",
                                           data_format="hdf5", **kwargs)
    return made
