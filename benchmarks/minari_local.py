"""Minari end to end without a network: make small Minari datasets here from uniform random actions, then train
bear-train.py on them by id, shortened. Minari's servers cannot be reached from every machine; this checks the whole
path (local Minari root, episodes to transitions, the dataset's evaluation environment) on data made on the spot.

    python benchmarks/minari_local.py                 # about 5 minutes on 2 cores
    python benchmarks/minari_local.py --steps=2000 --data-steps=20000

The datasets carry no reference scores (a random policy's returns are not a reference anyone published), so the
runs report raw returns and their normalised scores are none.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"local/walker2d/random-v0": "Walker2d-v5", "local/pointmaze/umaze-random-v0": "PointMaze_UMaze-v3"}


def make_random_dataset(dataset_id: str, env_id: str, steps: int, seed: int = 0) -> None:
    import gymnasium as gym
    import gymnasium_robotics
    import minari
    from minari.data_collector import EpisodeBuffer

    gym.register_envs(gymnasium_robotics)
    env = gym.make(env_id)
    env.action_space.seed(seed)
    buffers, done_steps, episode = [], 0, 0
    while done_steps < steps:
        obs, _ = env.reset(seed=seed + episode)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        while True:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
            done_steps += 1
            if terminated or truncated:
                break
        if isinstance(observations[0], dict):
            observations = {k: np.stack([o[k] for o in observations]) for k in observations[0]}
        else:
            observations = np.stack(observations)
        buffers.append(EpisodeBuffer(id=episode, observations=observations, actions=np.stack(actions), rewards=rewards,
                                     terminations=terminations, truncations=truncations, infos={}))
        episode += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(dataset_id, buffers, env=env_id, algorithm_name="uniform random actions",
                                           author="bear-train", author_email="none", code_permalink="none",
                                           description=f"{steps} uniform random steps", data_format="hdf5")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-steps", type=int, default=20_000, help="environment steps of each dataset")
    p.add_argument("--steps", type=int, default=2_000, help="gradient steps of each run")
    p.add_argument("--small", action="store_true", help="8-wide networks, 300 data steps, 10 gradient steps (the test "
                                                         "suite's smoke test)")
    args = p.parse_args()
    small = ["--actor-hidden=8", "--critic-hidden=8", "--vae-hidden=8", "--batch-size=8", "--eval-candidates=4",
             "--eval-episodes=2"] if args.small else []
    if args.small:
        args.data_steps, args.steps = 300, 10
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(tmp) / "minari")
        print("| dataset | evaluation env | transitions | steps | final return | best return | normalised | steps/s |")
        print("|---|---|---|---|---|---|---|---|")
        for dataset_id, env_id in DATASETS.items():
            make_random_dataset(dataset_id, env_id, args.data_steps)
            out = subprocess.run([sys.executable, str(ROOT / "bear-train.py"), f"--dataset={dataset_id}", "--offline",
                                  f"--max-steps={args.steps}", f"--warmup-steps={args.steps // 2}",
                                  f"--eval-every={args.steps // 2}", "--gpu=-1", f"--log-dir={tmp}/runs", *small],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{dataset_id} failed:\n{out.stderr[-2000:]}")
            folder = Path(tmp) / "runs" / f"{dataset_id.replace('/', '_')}__seed0"
            r = json.loads((folder / "results.json").read_text())
            transitions = next(line for line in out.stdout.splitlines() if "transitions" in line).split(":")[1].split(",")[0]
            print(f"| {dataset_id} | {r['env_id']} | {transitions.strip().split()[0]} | {r['steps']} | "
                  f"{r['final_return']:.1f} | {r['best_return']:.1f} | {r['final_normalized_score']} | "
                  f"{r['train_steps_per_second']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
