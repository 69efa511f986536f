"""D4RL names, files and the q-learning transitions, on HDF5 files written by the tests (spec section 3)."""
import csv
import os
import sys

import numpy as np
import pytest

import launch
from conftest import SCRIPT, TINY_NETS, write_d4rl_file

BASE = "http://rail.eecs.berkeley.edu/datasets/offline_rl"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BEAR_D4RL_BASE_URL", raising=False)
    return tmp_path / "cache"


@pytest.mark.parametrize("name, url, size", [
    ("walker2d-random-v2", "gym_mujoco_v2/walker2d_random-v2.hdf5", 216_109_364),
    ("walker2d-medium-replay-v2", "gym_mujoco_v2/walker2d_medium_replay-v2.hdf5", 86_323_963),
    ("halfcheetah-medium-expert-v2", "gym_mujoco_v2/halfcheetah_medium_expert-v2.hdf5", 474_567_252),
    ("ant-full-replay-v2", "gym_mujoco_v2/ant_full_replay-v2.hdf5", 449_390_167),
    ("hopper-expert-v1", "gym_mujoco_v1/hopper_expert-v1.hdf5", None),
    ("hopper-random-v0", "gym_mujoco/hopper_random.hdf5", None),
    ("walker2d-medium-replay-v0", "gym_mujoco/walker_mixed.hdf5", None),
    ("halfcheetah-medium-replay-v0", "gym_mujoco/halfcheetah_mixed.hdf5", None),
    ("walker2d-medium-expert-v0", "gym_mujoco/walker2d_medium_expert.hdf5", None),
])
def test_names_map_to_d4rl_file_names_urls_and_cache_paths(bear, cache_dir, name, url, size):
    spec = bear.resolve_dataset(name)
    assert spec.url == f"{BASE}/{url}"
    assert spec.path == cache_dir / url.split("/")[-1]  # d4rl caches a file under its URL's last part
    assert spec.size == size


def test_cache_folder_defaults_to_d4rls(bear, monkeypatch, tmp_path):
    monkeypatch.delenv("D4RL_DATASET_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert bear.resolve_dataset("hopper-medium-v2").path == tmp_path / ".d4rl" / "datasets" / "hopper_medium-v2.hdf5"


def test_unknown_name_suggests_the_closest(bear):
    with pytest.raises(bear.UserError, match="did you mean walker2d-medium-v2"):
        bear.resolve_dataset("walker2d-meduim-v2")
    with pytest.raises(bear.UserError, match="unknown dataset"):
        bear.resolve_dataset("hopper-full-replay-v0")  # full-replay exists only in v2


def test_transitions_skip_timeouts_keep_terminals_and_drop_the_last_row(bear, tmp_path):
    path = tmp_path / "walker2d_test.hdf5"
    arrays = write_d4rl_file(path, n=500, episode_len=50, column_rewards=True)  # rewards stored as (N, 1)
    data = bear.to_transitions(bear.read_d4rl(path, "walker2d"))
    timeouts, terminals = arrays["timeouts"], arrays["terminals"]
    expected = [i for i in range(499) if not timeouts[i]]
    assert len(data["observations"]) == len(expected) == 499 - timeouts[:499].sum()
    obs = arrays["observations"]
    np.testing.assert_array_equal(data["observations"], obs[expected])
    np.testing.assert_array_equal(data["next_observations"], obs[np.array(expected) + 1])
    np.testing.assert_array_equal(data["actions"], arrays["actions"][expected])
    np.testing.assert_array_equal(data["rewards"], arrays["rewards"][expected, 0])
    assert data["rewards"].shape == (len(expected),)
    np.testing.assert_array_equal(data["terminals"], terminals[expected].astype(np.float32))
    assert data["terminals"].sum() == terminals[:499].sum() == 4  # every termination is kept (the 5th is the last row)
    # no transition crosses a timeout into the next episode
    assert not set(np.flatnonzero(timeouts)) & set(expected)


def test_terminals_stored_as_column(bear, tmp_path):
    """(N, 1) terminals and timeouts give the transitions of the (N,) ones, and are read as flags, not rows."""
    path = tmp_path / "hopper_col.hdf5"
    arrays = write_d4rl_file(path, n=100, obs_dim=11, act_dim=3, episode_len=10)
    write_d4rl_file(tmp_path / "hopper_col2.hdf5", n=100, obs_dim=11, act_dim=3, episode_len=10,
                    terminals=arrays["terminals"][:, None], timeouts=arrays["timeouts"][:, None])
    a, b = bear.to_transitions(bear.read_d4rl(path, "hopper")), bear.to_transitions(bear.read_d4rl(tmp_path / "hopper_col2.hdf5", "hopper"))
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # 10 episodes of 10 rows: 5 end in a timeout (dropped rows), 5 in a termination; the last row is dropped too
    assert len(b["rewards"]) == 99 - 5 and b["terminals"].shape == (94,) and b["terminals"].sum() == 4
    np.testing.assert_array_equal(b["terminals"], arrays["terminals"][np.flatnonzero(~arrays["timeouts"][:99])])


@pytest.mark.parametrize("change, message", [
    ({"rewards": None}, "lacks the key"),
    ({"actions": np.zeros((99, 6), np.float32)}, "inconsistent length"),
    ({"observations": np.zeros((100, 11), np.float32)}, r"observations have shape \(100, 11\)"),
    ({"actions": np.zeros((100, 3), np.float32)}, r"actions have shape \(100, 3\)"),
])
def test_structural_checks_name_the_problem(bear, tmp_path, change, message):
    path = tmp_path / "walker2d_bad.hdf5"
    write_d4rl_file(path, n=100, **change)
    with pytest.raises(bear.UserError, match=message):
        bear.read_d4rl(path, "walker2d")


def test_non_finite_values_name_the_key_and_first_row(bear, tmp_path):
    obs = np.zeros((100, 17), np.float32)
    obs[42, 3], obs[70, 0] = np.nan, np.inf
    path = tmp_path / "walker2d_nan.hdf5"
    write_d4rl_file(path, n=100, observations=obs)
    with pytest.raises(bear.UserError, match="observations has a non-finite value in row 42"):
        bear.read_d4rl(path, "walker2d")


def test_a_file_that_is_not_hdf5(bear, tmp_path):
    path = tmp_path / "walker2d_random-v2.hdf5"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(bear.UserError, match="not a readable HDF5 file"):
        bear.read_d4rl(path, "walker2d")


def test_path_dataset_infers_env_from_file_name(bear, tmp_path):
    path = tmp_path / "my_halfcheetah_data.hdf5"
    write_d4rl_file(path, n=50)
    spec = bear.resolve_dataset(str(path))
    assert (spec.env, spec.url, spec.path) == ("halfcheetah", "", path)
    other = tmp_path / "data.hdf5"
    write_d4rl_file(other, n=50, obs_dim=11, act_dim=3)
    with pytest.raises(bear.UserError, match="pass --env"):
        bear.resolve_dataset(str(other))
    assert bear.resolve_dataset(str(other), "hopper").env == "hopper"
    with pytest.raises(bear.UserError, match="does not exist"):
        bear.resolve_dataset(str(tmp_path / "missing.hdf5"))


def test_replay_buffer_samples_on_the_device(bear, tmp_path):
    """Every sampled transition is one row of the data: its action, reward, next state and done are its state's."""
    import torch

    obs = np.random.default_rng(0).normal(size=(300, 17)).astype(np.float32)
    obs[:, 0] = np.arange(300)  # a row's number, to find it again
    path = tmp_path / "walker2d_b.hdf5"
    write_d4rl_file(path, n=300, observations=obs)
    data = bear.to_transitions(bear.read_d4rl(path, "walker2d"))
    buffer = bear.ReplayBuffer(data, torch.device("cpu"))
    torch.manual_seed(0)
    s, a, r, s2, d = buffer.sample(256)
    assert s.shape == (256, 17) and a.shape == (256, 6) and r.shape == (256,) and s2.shape == (256, 17) and d.shape == (256,)
    assert s.dtype == a.dtype == r.dtype == d.dtype == torch.float32
    row_of = {int(v): i for i, v in enumerate(data["observations"][:, 0])}
    rows = [row_of[int(v)] for v in s[:, 0]]
    assert len(set(rows)) > 100  # uniform with replacement over the data
    np.testing.assert_array_equal(s.numpy(), data["observations"][rows])
    np.testing.assert_array_equal(a.numpy(), data["actions"][rows])
    np.testing.assert_array_equal(r.numpy(), data["rewards"][rows])
    np.testing.assert_array_equal(s2.numpy(), data["next_observations"][rows])
    np.testing.assert_array_equal(d.numpy(), data["terminals"][rows])
    assert d.sum() > 0 and (d == 0).sum() > 0  # both kinds were drawn, so a done from another row would show


def test_regeneration_follows_d4rls_random_recipe(bear, tmp_path):
    spec = bear.resolve_dataset("hopper-random-v2")
    dest = tmp_path / "regen.hdf5"
    bear.regenerate_random(spec, 3000, dest, workers=2)
    import h5py

    with h5py.File(dest) as f:
        lengths = {k: len(f[k]) for k in bear.KEYS}
        terminals, timeouts = f["terminals"][()], f["timeouts"][()]
        actions, obs, next_obs = f["actions"][()], f["observations"][()], f["next_observations"][()]
    assert set(lengths.values()) == {3000}
    assert terminals.sum() > 10  # random hoppers fall within tens of steps
    assert not (terminals & timeouts).any()
    assert np.abs(actions).max() <= 1 and actions.std() > 0.5  # uniform on [-1, 1]
    # within an episode the next row continues the trajectory
    same_episode = ~(terminals | timeouts)[:-1]
    np.testing.assert_array_equal(obs[1:][same_episode], next_obs[:-1][same_episode])
    # the first chunk ran on to the end of its episode, so no episode is cut where the chunks meet
    boundary = np.flatnonzero(terminals | timeouts)
    first = bear._random_rollout("Hopper-v4", *bear.regen_chunks(3000)[0])
    assert len(first["rewards"]) - 1 in boundary
    episode_lengths = np.diff(np.concatenate([[-1], boundary]))
    assert episode_lengths.max() <= 1000
    bear.read_d4rl(dest, "hopper")
    assert bear.regenerated_path(spec, 1_000_000).name == "bear-regenerated_hopper_random-v2_Hopper-v4.hdf5"


def test_a_regeneration_chunk_can_end_on_an_episode_boundary(bear):
    part = bear._random_rollout("Hopper-v4", 100, 0, True)
    assert len(part["rewards"]) >= 100
    assert part["terminals"][-1] or part["timeouts"][-1]
    cut = bear._random_rollout("Hopper-v4", 100, 0, False)
    assert len(cut["rewards"]) == 100


def test_monte_carlo_returns_follow_terminals_timeouts_and_the_end_of_the_file(bear, tmp_path):
    """Three episodes, gamma 0.5: rows 0-2 end in a termination, rows 3-10 in a timeout (row 10), rows 11-13 are cut
    by the end of the file. Every value below was worked out by hand."""
    n = 14
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    terminals[2], timeouts[10] = True, True
    rewards = np.array([1, 2, 3, 1, 1, 1, 1, 1, 1, 1, 1, 7, 8, 9], np.float32)
    path = tmp_path / "hopper_returns.hdf5"
    write_d4rl_file(path, n=n, obs_dim=11, act_dim=3, rewards=rewards, terminals=terminals, timeouts=timeouts)
    data = bear.to_transitions(bear.read_d4rl(path, "hopper"), gamma=0.5)
    # transitions: rows 0..12 but the timed-out row 10 (row 13 is the last row)
    # episode 1: G2 = 3, G1 = 2 + 3/2, G0 = 1 + 3.5/2
    # episode 2 (rewards 1): G10 = 1, G9 = 1.5, ..., G3 = 2 - 0.5^7; the timed-out row's reward counts in G9
    # episode 3: G12 = 8 + 9/2 = 12.5, G11 = 7 + 12.5/2 = 13.25
    expected = [2.75, 3.5, 3.0, 1.9921875, 1.984375, 1.96875, 1.9375, 1.875, 1.75, 1.5, 13.25, 12.5]
    assert data["returns"].tolist() == expected
    # complete: terminated episodes, and rows whose unseen rest after a truncation weighs gamma^h < 1 %: rows 3 and 4
    # of episode 2 (0.5^8 and 0.5^7); rows 5.. (0.5^6 = 1.6 %) and the cut episode are not
    assert data["returns_complete"].tolist() == [True] * 5 + [False] * 7


def test_monte_carlo_returns_of_minari_episodes(bear, tmp_path, monkeypatch):
    from conftest import write_minari_dataset

    root = tmp_path / "minari"
    made = write_minari_dataset(root, "test/hopper/returns-v0", "Hopper-v5", [(6, "term"), (500, "trunc")])
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    data = bear.load_data(bear.resolve_dataset("test/hopper/returns-v0"), offline=True, gamma=0.9).transitions
    expected = []
    for _, _, rewards, _, _ in made:  # sum_j gamma^j r_(i+j) to the episode's end, written out
        expected += [sum(0.9 ** j * r for j, r in enumerate(rewards[i:])) for i in range(len(rewards))]
    np.testing.assert_allclose(data["returns"], expected, rtol=1e-5)
    # the terminated episode is complete; the truncated one only where 0.9^h < 1 % (h > 43 steps before its end)
    assert data["returns_complete"].tolist() == [True] * 6 + [True] * (500 - 43) + [False] * 43


def test_the_probe_set_is_fixed_and_holds_only_complete_returns(bear):
    complete = np.random.default_rng(3).random(10_000) < 0.7
    np.random.seed(1)
    first = bear.probe_rows(complete, 4096)
    np.random.seed(2)  # the global stream (seeded from --seed) plays no part
    assert np.array_equal(first, bear.probe_rows(complete, 4096))
    assert len(first) == 4096 and complete[first].all() and len(set(first)) == 4096
    assert np.array_equal(bear.probe_rows(complete[:100], 4096), np.flatnonzero(complete[:100]))  # small data: all
    assert bear.q_bound(np.array([1.0, 3.48]), 0.99) == pytest.approx(348)
    assert bear.q_bound(np.array([-2.0, -1.0]), 0.99) == -1.0  # negative rewards: stopping at once is best


def test_a_halfcheetah_run_shows_mujocos_settotalmass_warning_once_and_other_warnings_still(bear, tmp_path, capsys):
    """MuJoCo 4 warns at every compile of gymnasium's half_cheetah.xml: regeneration's workers and each evaluation
    make one. The run's whole output carries it once."""
    env = os.environ | {"D4RL_DATASET_DIR": str(tmp_path / "d4rl")}
    out = launch.run([sys.executable, str(SCRIPT), "--dataset=halfcheetah-random-v2", "--offline", "--regen-steps=3000",
                      "--regen-workers=2", f"--log-dir={tmp_path / 'runs'}", *TINY_NETS, "--max-steps=60",
                      "--warmup-steps=30", "--eval-every=20", "--eval-episodes=2", "--eval-workers=0", "--gpu=-1",
                      "--threads=1", "--probe-size=64"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert text.count("settotalmass") == 1, text
    with open(tmp_path / "runs" / "halfcheetah-random-v2__seed0" / "metrics.csv") as f:
        assert sum(bool(row["eval_return"]) for row in csv.DictReader(f)) >= 3  # each evaluation made an environment
    bear.mujoco_warning("a warning of another kind")  # shown, once, beside the one above
    bear.mujoco_warning("a warning of another kind")
    assert capsys.readouterr().err.count("WARNING: a warning of another kind") == 1
