"""The MMD floor: the support constraint's MMD between two independent sample sets of ONE behaviour model, the
value a perfect actor (one that samples exactly as the behaviour model does) would get. Prints a table.

    python benchmarks/mmd_floor.py                                  # synthetic random-policy data, about 10 minutes on 2 cores
    python benchmarks/mmd_floor.py --data halfcheetah=PATH.hdf5     # a D4RL-layout file for one domain
    python benchmarks/mmd_floor.py --small                          # a tiny version (the test suite runs it)

For each domain shape (halfcheetah: obs 17, act 6; hopper: 11, 3; walker2d: 17, 6) the script's VAE is trained
as bear-train.py trains it (its loss, Adam at --vae-lr, batch 256) on random-policy data: standard-normal states
and actions uniform in [-1, 1], as in the *-random datasets, or on the file given with --data. Then, at --states
states of the data, two independent sets of n raw (pre-tanh) samples each are drawn from it, and bear-train.py's
own mmd() (the biased estimator, with its sqrt(MMD^2 + 1e-6)) is taken between them, --draws times per state.
The table gives its mean over states and draws and its 5th to 95th percentile over states; beside it, the value
that the biased estimator's expectation predicts for two sets from one distribution, sqrt((2/n)(1 - E k) +
1e-6), with E k the kernel's mean over the cross pairs; the MMD of an actor collapsed onto the behaviour
model's mean raw action (n copies of it), which shows whether an actor can get under epsilon by narrowing
instead of imitating; and the threshold epsilon. A floor above epsilon means
that the dual step raises alpha to its clamp whatever the actor does.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from speed import load_bear  # this folder is on the path when a benchmark is run as a script

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = {"halfcheetah": (17, 6), "hopper": (11, 3), "walker2d": (17, 6)}
SAMPLES = (4, 5, 10)


def random_policy_data(obs_dim: int, act_dim: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, obs_dim)).astype(np.float32), rng.uniform(-1, 1, (n, act_dim)).astype(np.float32)


def behaviour_model(bear, cfg, obs: np.ndarray, act: np.ndarray, steps: int, seed: int):
    torch.manual_seed(seed)
    vae = bear.VAE(obs.shape[1], act.shape[1], cfg.vae_hidden)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr, fused=True)  # as the script's eager update
    s_all, a_all = torch.from_numpy(obs), torch.from_numpy(act)
    for _ in range(steps):
        idx = torch.randint(len(s_all), (min(256, len(s_all)),))
        loss = vae.loss(s_all[idx], a_all[idx], cfg.vae_kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return vae.requires_grad_(False)


def floor(bear, vae, states: torch.Tensor, centre: torch.Tensor, kernel: str, sigma: float, n: int,
          draws: int) -> dict:
    values, cross, collapsed = [], [], []
    for _ in range(draws):
        x, y = vae.sample_raw(states, n), vae.sample_raw(states, n)  # two independent sets, [P, n, A] each
        values.append(bear.mmd(x, y, bear.KERNELS[kernel], sigma))  # [P]
        cross.append(bear.KERNELS[kernel](x, y, sigma).mean((1, 2)))
        collapsed.append(bear.mmd(x, centre.expand_as(x), bear.KERNELS[kernel], sigma))
    per_state = torch.stack(values).mean(0).numpy()
    mean_k = float(torch.stack(cross).mean())
    return {"mean": float(per_state.mean()), "p5": float(np.percentile(per_state, 5)),
            "p95": float(np.percentile(per_state, 95)),
            "predicted": float(np.sqrt(2 / n * (1 - mean_k) + bear.MMD_JITTER)), "mean_k": mean_k,
            "collapsed": float(torch.stack(collapsed).mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", default=[], metavar="DOMAIN=PATH",
                   help="a D4RL-layout HDF5 file for one domain instead of synthetic random-policy data")
    p.add_argument("--vae-steps", type=int, default=2000, help="updates of the behaviour model per domain")
    p.add_argument("--states", type=int, default=1024, help="states at which the two sample sets are drawn")
    p.add_argument("--draws", type=int, default=8, help="independent pairs of sample sets per state")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--small", action="store_true", help="tiny networks, few steps and states: seconds")
    args = p.parse_args()
    bear = load_bear()
    torch.set_num_threads(args.threads)
    cfg = bear.Config(vae_hidden=16) if args.small else bear.Config()
    steps, states, draws = (20, 32, 2) if args.small else (args.vae_steps, args.states, args.draws)
    files = dict(item.split("=", 1) for item in args.data)
    unknown = sorted(set(files) - set(DOMAINS))
    if unknown:
        p.error(f"--data names {', '.join(unknown)}; the domains are {', '.join(DOMAINS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; behaviour model: VAE {cfg.vae_hidden} wide, "
          f"{steps} updates; {states} states x {draws} draws; sigma {cfg.mmd_sigma:g}, epsilon {cfg.epsilon:g}")
    print("\n| data | kernel | n | floor MMD, mean | 5-95 % over states | sqrt((2/n)(1 - E k)) | E k | "
          "an actor collapsed to the mean | epsilon | floor against epsilon |\n|---|---|---|---|---|---|---|---|---|---|")
    for domain, (obs_dim, act_dim) in DOMAINS.items():
        if domain in files:
            data = bear.read_d4rl(Path(files[domain]), domain)
            obs, act, name = data["observations"], data["actions"], f"{domain}: {Path(files[domain]).name}"
        else:
            obs, act = random_policy_data(obs_dim, act_dim, 200_000 if not args.small else 1000, seed=0)
            name = f"{domain}-shaped random-policy"
        vae = behaviour_model(bear, cfg, obs, act, steps, seed=0)
        rows = torch.from_numpy(obs[np.random.default_rng(1).choice(len(obs), min(states, len(obs)), replace=False)])
        default_kernel = "gaussian" if domain == "halfcheetah" else "laplacian"
        torch.manual_seed(3)
        centre = vae.sample_raw(rows, 64).mean(1, keepdim=True)  # [P, 1, A]: the behaviour model's mean raw action
        for kernel in ("laplacian", "gaussian"):
            for n in SAMPLES:
                torch.manual_seed(2)
                f = floor(bear, vae, rows, centre, kernel, cfg.mmd_sigma, n, draws)
                mark = " (the default)" if kernel == default_kernel and n == cfg.mmd_samples else ""
                verdict = f"{f['mean'] / cfg.epsilon:.2f}x: " + ("ABOVE: alpha is pinned" if f["mean"] > cfg.epsilon
                                                                 else "below")
                print(f"| {name} | {kernel}{mark} | {n} | {f['mean']:.4f} | {f['p5']:.4f}-{f['p95']:.4f} | "
                      f"{f['predicted']:.4f} | {f['mean_k']:.4f} | {f['collapsed']:.4f} | {cfg.epsilon:g} | "
                      f"{verdict} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
