"""Minari datasets by id: transitions from episodes, evaluation in the dataset's own environment with its reference
scores (or raw returns), dictionary observations, scaled actions, missing and bad data, ids against paths. Each test
makes its own small Minari dataset in a temporary MINARI_DATASETS_PATH; nothing is downloaded."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import launch
from conftest import SCRIPT, run_main, write_minari_dataset

SHORT = ["--max-steps=60", "--warmup-steps=30", "--eval-every=30", "--eval-episodes=2", "--log-every=30",
         "--actor-hidden=32", "--critic-hidden=32", "--vae-hidden=32", "--batch-size=32", "--eval-candidates=4",
         "--gpu=-1", "--eval-workers=0"]  # evaluation in the training process: the pool is test_evalpool's


def run(args, cwd, root, **extra):
    env = dict(os.environ, MINARI_DATASETS_PATH=str(root), HF_HUB_OFFLINE="1", **extra)
    return launch.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def run_here(bear, args, cwd, root, monkeypatch, capsys):
    """bear-train.py's main(args) in this process, as `run` would start it: (exit code, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return run_main(bear, args, capsys)


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_dataset_by_id_end_to_end(bear, tmp_path, monkeypatch, capsys):
    root = tmp_path / "minari"
    write_minari_dataset(root, "mujoco/halfcheetah/tiny-v0", "HalfCheetah-v5", [(120, "trunc"), (80, "trunc")],
                         ref=(-300.0, 1200.0))
    code, _, err = run_here(bear, ["--dataset=mujoco/halfcheetah/tiny-v0", *SHORT], tmp_path, root, monkeypatch, capsys)
    assert code == 0, err
    folder = tmp_path / "runs" / "mujoco_halfcheetah_tiny-v0__seed0"
    results = json.loads((folder / "results.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert results["dataset_source"] == "minari" and results["env_id"] == "HalfCheetah-v5"
    assert config["kernel_used"] == "gaussian"  # auto: gaussian for halfcheetah, as for D4RL's
    assert results["comparable_with_published"] is False
    for which in ("final", "best"):
        ret, score = results[f"{which}_return"], results[f"{which}_normalized_score"]
        assert math.isfinite(score) and score == pytest.approx(100 * (ret + 300.0) / 1500.0)
    # resume and the seed table work on an id with slashes
    code, out, err = run_here(bear, ["--dataset=mujoco/halfcheetah/tiny-v0", *SHORT, "--max-steps=90", "--resume"],
                              tmp_path, root, monkeypatch, capsys)
    assert code == 0 and "resuming" in out, err
    table = run([f"--summarize={tmp_path / 'runs'}"], tmp_path, root)  # and the real command line
    assert table.returncode == 0 and "| mujoco/halfcheetah/tiny-v0 | 1 | 90 |" in table.stdout
    assert "Minari data: not comparable with D4RL tables" in table.stdout
    assert (tmp_path / "runs" / "summary_mujoco_halfcheetah_tiny-v0.png").stat().st_size > 1000


def test_transitions_at_termination_and_truncation(bear, tmp_path, monkeypatch):
    root = tmp_path / "minari"
    made = write_minari_dataset(root, "test/walker2d/bounds-v0", "Walker2d-v5", [(5, "term"), (4, "trunc")])
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    loaded = bear.load_data(bear.resolve_dataset("test/walker2d/bounds-v0"), offline=True)
    data = loaded.transitions
    # by hand: episode 0 has observations 0..5 and steps 0..4, episode 1 observations 1000..1004 and steps 0..3
    first = [0, 1, 2, 3, 4, 1000, 1001, 1002, 1003]
    np.testing.assert_array_equal(data["observations"][:, 0], first)
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 3, 4, 5, 1001, 1002, 1003, 1004])
    np.testing.assert_array_equal(data["terminals"], [0, 0, 0, 0, 1, 0, 0, 0, 0])  # a truncation is not a termination
    np.testing.assert_allclose(data["actions"], np.concatenate([made[0][1], made[1][1]]))
    np.testing.assert_allclose(data["rewards"], np.concatenate([made[0][2], made[1][2]]), rtol=1e-6)
    assert data["observations"].shape == (9, 17) and data["observations"].dtype == np.float32
    assert loaded.target.env_id == "Walker2d-v5" and loaded.target.score_range == (0.0, 100.0)


def test_missing_and_bad_data_are_one_line_and_change_nothing(tmp_path):
    root = tmp_path / "minari"
    out = run(["--dataset=test/walker2d/missing-v0", "--offline", *SHORT], tmp_path, root)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "`minari download test/walker2d/missing-v0`" in out.stderr and str(root / "test/walker2d/missing-v0") in out.stderr
    assert not root.exists() and not (tmp_path / "runs").exists()
    # without --offline but with no network (huggingface_hub's offline mode answers at once): the same advice
    out = run(["--dataset=test/walker2d/missing-v0", *SHORT], tmp_path, root)
    assert out.returncode == 2 and "could not download Minari dataset test/walker2d/missing-v0" in out.stderr
    assert "`minari download test/walker2d/missing-v0`" in out.stderr and "Traceback" not in out.stderr
    assert not root.exists() and not (tmp_path / "runs").exists()  # no folders left behind either

    write_minari_dataset(root, "test/walker2d/bad-v0", "Walker2d-v5", [(20, "term")])
    data_file = root / "test/walker2d/bad-v0/data/main_data.hdf5"
    data_file.write_bytes(data_file.read_bytes()[:200])  # a cut copy
    before = snapshot(root)
    out = run(["--dataset=test/walker2d/bad-v0", *SHORT], tmp_path, root)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "is not a readable Minari dataset" in out.stderr and "Traceback" not in out.stderr
    assert snapshot(root) == before and not (tmp_path / "runs").exists()


def test_without_reference_scores_raw_returns_and_no_normalised_score(bear, tmp_path, monkeypatch, capsys):
    root = tmp_path / "minari"
    write_minari_dataset(root, "test/hopper/noref-v0", "Hopper-v5", [(40, "term"), (30, "term")], ref=None)
    code, _, err = run_here(bear, ["--dataset=test/hopper/noref-v0", *SHORT], tmp_path, root, monkeypatch, capsys)
    assert code == 0, err
    folder = tmp_path / "runs" / "test_hopper_noref-v0__seed0"
    results = json.loads((folder / "results.json").read_text())
    assert results["final_normalized_score"] is None and results["best_normalized_score"] is None
    assert math.isfinite(results["final_return"]) and math.isfinite(results["best_return"])
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert rows[-1].endswith(",") and rows[-1].split(",")[-2] != ""  # a return, no normalised score
    code, table, _ = run_here(bear, [f"--summarize={tmp_path / 'runs'}"], tmp_path, root, monkeypatch, capsys)
    assert code == 0 and "RAW RETURNS" in table


def test_dictionary_observations_are_flattened_alike_in_data_and_evaluation(bear, tmp_path, monkeypatch, capsys):
    root = tmp_path / "minari"
    write_minari_dataset(root, "test/pointmaze/dict-v0", "PointMaze_UMaze-v3", [(30, "trunc"), (25, "term")])
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    loaded = bear.load_data(bear.resolve_dataset("test/pointmaze/dict-v0"), offline=True)
    # keys in the space's order: achieved_goal (2), desired_goal (2), observation (4)
    assert loaded.transitions["observations"].shape == (55, 8)
    env = loaded.target.make()
    obs, _ = env.reset(seed=0)
    flat = loaded.target.observe(obs)
    expected = np.concatenate([obs["achieved_goal"], obs["desired_goal"], obs["observation"]]).astype(np.float32)
    np.testing.assert_array_equal(flat, expected)
    code, _, err = run_here(bear, ["--dataset=test/pointmaze/dict-v0", *SHORT], tmp_path, root, monkeypatch, capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "runs" / "test_pointmaze_dict-v0__seed0" / "results.json").read_text())
    assert results["env_id"] == "PointMaze_UMaze-v3" and math.isfinite(results["final_return"])


def test_actions_are_scaled_to_unit_range_and_back(bear, tmp_path, monkeypatch):
    root = tmp_path / "minari"
    made = write_minari_dataset(root, "test/pendulum/scaled-v0", "Pendulum-v1", [(20, "trunc")])
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    loaded = bear.load_data(bear.resolve_dataset("test/pendulum/scaled-v0"), offline=True)
    np.testing.assert_allclose(loaded.transitions["actions"], made[0][1] / 2, rtol=1e-6)  # Box(-2, 2) -> [-1, 1]
    np.testing.assert_allclose(loaded.target.to_env(np.array([-1.0, 0.5], np.float32)), [-2.0, 1.0])


def test_a_missing_environment_package_is_named_before_training(tmp_path):
    root = tmp_path / "minari"
    write_minari_dataset(root, "test/walker2d/nopkg-v0", "Walker2d-v5", [(20, "term")])
    meta = root / "test/walker2d/nopkg-v0/data/metadata.json"
    text = meta.read_text().replace("gymnasium.envs.mujoco.walker2d_v5:Walker2dEnv",
                                    "gymnasium_robotics_absent.envs:Walker2dEnv")
    meta.write_text(text)
    out = run(["--dataset=test/walker2d/nopkg-v0", *SHORT], tmp_path, root)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "pip install gymnasium-robotics==1.4.2" in out.stderr and not (tmp_path / "runs").exists()


def test_an_existing_file_is_a_path_and_otherwise_an_id_is_minari(bear, tmp_path, monkeypatch):
    from conftest import write_d4rl_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "root"))
    spec = bear.resolve_dataset("mujoco/walker2d/medium-v0")
    assert spec.kind == "minari" and spec.path == tmp_path / "root" / "mujoco/walker2d/medium-v0"
    write_d4rl_file(tmp_path / "mujoco" / "walker2d" / "medium-v0", n=50)
    spec = bear.resolve_dataset("mujoco/walker2d/medium-v0", "walker2d")
    assert spec.kind == "" and spec.url == "" and spec.env == "walker2d"  # a file of that name wins
    assert bear.resolve_dataset("walker2d-medium-v2").url  # a D4RL name stays D4RL
    with pytest.raises(bear.UserError, match="does not exist"):
        bear.resolve_dataset("data/walker2d.hdf5")


def test_evaluation_acts_in_the_environments_own_action_range(bear, tmp_path, monkeypatch):
    """Pendulum's actions lie in [-2, 2]: the policy acts in [-1, 1] and evaluation scales its actions back (to_env)
    before they reach the environment."""
    import torch

    root = tmp_path / "minari"
    write_minari_dataset(root, "test/pendulum/acting-v0", "Pendulum-v1", [(30, "trunc")])
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    loaded = bear.load_data(bear.resolve_dataset("test/pendulum/acting-v0"), offline=True)
    received = []
    make = type(loaded.target).make

    def recording_make(target):
        env = make(target)
        step = env.step
        env.step = lambda action: received.append(np.array(action)) or step(action)
        return env

    monkeypatch.setattr(type(loaded.target), "make", recording_make)
    cfg = bear.Config(actor_hidden=8, critic_hidden=8, vae_hidden=8, eval_episodes=2, eval_candidates=4)
    agent = bear.BEAR(cfg, 3, 1, "laplacian", torch.device("cpu"))
    with torch.no_grad():  # a policy that always acts at the top of its range: tanh(8) = 0.99999977
        agent.actor.mu.weight.zero_()
        agent.actor.mu.bias.fill_(8.0)
        agent.actor.log_std.bias.fill_(-20.0)
    returns = bear.Evaluator(loaded.target, cfg, 3, 1)(bear.eval_snapshot(agent), 10)
    assert len(returns) == 2 and len(received) == 2 * 200  # Pendulum's 200-step episodes
    np.testing.assert_allclose(np.concatenate(received), 2.0, rtol=1e-5)  # the environment's top, not the policy's 1
