"""BEAR (Bootstrapping Error Accumulation Reduction, Kumar et al. 2019) on D4RL MuJoCo data, in one file.

    python bear-train.py --dataset=walker2d-random-v2 --seed=0 --gpu=0
    python bear-train.py --dataset=walker2d-random-v2,hopper-random-v2 --seed=0-4 --gpu=0   # a sweep on Ray
    python bear-train.py --dataset=mujoco/walker2d/medium-v0                                # a Minari dataset

Reads top to bottom in the order of the paper: the hyperparameters, the networks, the BEAR equations, the BEAR
update, evaluation (and its pool of workers, and the critics' Q against the data's returns), the training loop
`train`. Then a banner, and the plumbing: errors and signals, the datasets (D4RL files, Minari datasets, data
preparation at scale), run bookkeeping (logs, checkpoints, plots, locks), seed tables, the sweep on Ray, the command
line and main. Importing it runs nothing.

After training, every run folder keeps policy-final.pt and policy-best.pt (they load with torch alone), and
    python bear-train.py --evaluate=runs/walker2d-random-v2__seed0 --policy=best --video
plays one on 100 episodes. Documentation: README.md, then docs/ (one page per topic: runs.md for what a run writes,
resume and exit codes; evaluation.md, data.md, sweeps.md, gpu-and-precision.md, ...).
"""
import argparse
import contextlib
import csv
import dataclasses
import difflib
import http.client
import itertools
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.adam import adam as adam_function


SECTIONS = []  # Config's sections in order: --help groups its flags under them


def section(title: str) -> None:
    SECTIONS.append(title)


def hp(default, help):
    return field(default=default, metadata={"help": help, "section": SECTIONS[-1]})


# ============================================================================================== hyperparameters
@dataclass
class Config:
    section("run")
    dataset: str = hp("walker2d-random-v2", "D4RL MuJoCo name (v0/v1/v2), path to an HDF5 file in D4RL's layout, or "
                                            "Minari id (mujoco/walker2d/medium-v0); several, comma-separated, make a sweep")
    env: str = hp("", "for a dataset path: walker2d | hopper | halfcheetah | ant (empty = from the file name)")
    seed: int = hp(0, "seeds python, numpy, torch and the evaluation environments; a list (0,2,5-7) or range (0-4) "
                      "makes a sweep")
    gpu: int = hp(0, "CUDA device index; -1 = CPU (falls back to the CPU with a warning when CUDA is absent)")
    max_steps: int = hp(1_000_000, "gradient steps")
    warmup_steps: int = hp(40_000, "first steps in which the actor minimises only the MMD constraint")
    batch_size: int = hp(256, "transitions per gradient step, sampled uniformly with replacement")
    threads: int = hp(0, "torch CPU threads; 0 = torch's default")
    precision: str = hp("fp32", "matrix multiplies in fp32, or bf16 (bf16 inputs, float32 accumulation; the equations, "
                                "weights and optimiser states stay float32): fast on AMX/AVX512-BF16 CPUs and GPUs")
    compile: bool = hp(False, "torch.compile the update into one graph per phase: faster on the CPU, above all in bf16, "
                              "after about 30 s of compiling a phase (docs/gpu-and-precision.md)")
    run_name: str = hp("", "name of the run folder; empty = <dataset>__seed<seed>")
    resume: bool = hp(False, "continue the run in its folder from the newest checkpoint")
    checkpoint_every: int = hp(5_000, "steps between checkpoints; also at the end and on SIGTERM/SIGINT")
    summarize: str = hp("", "print seed tables and curves for the runs under this folder, then exit")
    section("BEAR")
    gamma: float = hp(0.99, "discount")
    tau: float = hp(0.005, "Polyak rate of the target critics")
    num_critics: int = hp(2, "K, members of the Q ensemble")
    lam: float = hp(0.75, "lambda: target = lam*min_k + (1-lam)*max_k over the target ensemble")
    num_target_samples: int = hp(10, "actions drawn from the actor per next state; the target takes their max")
    actor_q: str = hp("min", "actor's Q term: 'min' (min_k Q_k) or 'mean_var' (mean_k Q_k - var_penalty*var_k Q_k)")
    var_penalty: float = hp(0.0, "tau_var of the 'mean_var' actor rule")
    kernel: str = hp("auto", "MMD kernel: laplacian | gaussian | auto (gaussian for halfcheetah, else laplacian)")
    mmd_sigma: float = hp(20.0, "kernel bandwidth sigma (not squared)")
    mmd_samples: int = hp(4, "n, samples from the behaviour model and the actor per state for the MMD")
    epsilon: float = hp(0.05, "MMD threshold of the support constraint")
    log_alpha_init: float = hp(0.0, "initial log alpha of the Lagrange dual variable")
    log_alpha_min: float = hp(-5.0, "log alpha is clamped to [log_alpha_min, log_alpha_max] after every update")
    log_alpha_max: float = hp(10.0, "upper clamp of log alpha (alpha <= e^10)")
    section("networks and optimisers")
    actor_hidden: int = hp(256, "width of the actor's two hidden layers")
    critic_hidden: int = hp(256, "width of each critic's two hidden layers")
    vae_hidden: int = hp(750, "width of the behaviour VAE's encoder and decoder hidden layers; latent = 2*|A|")
    vae_kl_weight: float = hp(0.5, "weight of the KL term in the VAE loss")
    actor_lr: float = hp(1e-4, "Adam learning rate of the actor")
    critic_lr: float = hp(3e-4, "Adam learning rate of the critics")
    vae_lr: float = hp(3e-4, "Adam learning rate of the behaviour VAE")
    alpha_lr: float = hp(1e-3, "Adam learning rate of log alpha")
    section("evaluation and logging")
    eval_every: int = hp(1_000, "evaluate every this many steps, and at the end (the reference schedule)")
    eval_episodes: int = hp(10, "episodes per evaluation, run side by side")
    eval_candidates: int = hp(100, "actions sampled per state at evaluation; the highest ensemble-mean Q is taken")
    eval_workers: int = hp(-1, "evaluation worker processes, which evaluate while training goes on; 0 = in the "
                               "training process, which waits; -1 = the cores this process may use minus training's "
                               "(its --threads on the CPU, one core on a GPU), at least 1")
    eval_threads: int = hp(1, "torch threads of each evaluation worker")
    log_every: int = hp(1_000, "steps per metrics.csv row (means over the interval)")
    probe_size: int = hp(4096, "data pairs whose critics' Q is logged at every row against the pairs' discounted "
                               "Monte-Carlo return in the data; 0 = none")
    log_dir: str = hp("runs", "folder that holds one folder per run")
    wandb: bool = hp(False, "also log to Weights & Biases (needs the wandb package)")
    section("data")
    regen_steps: int = hp(1_000_000, "environment steps when a random dataset must be regenerated offline")
    regen_workers: int = hp(0, "processes that regenerate a random dataset; 0 = every core this process may use")
    offline: bool = hp(False, "never touch the network: a cached file, a regenerated random dataset, or an error "
                              "saying where to put the file (also BEAR_OFFLINE=1)")
    section("after training (--evaluate a run folder's policy)")
    evaluate: str = hp("", "evaluate the policy a run folder keeps (policy-final.pt or policy-best.pt) on "
                           "--eval-episodes episodes (default 100 here) with --seed (default the run's), on the "
                           "evaluation workers; writes evaluation-<policy>-<N>ep-seed<seed>.json there, then exits")
    policy: str = hp("final", "the policy --evaluate takes: final (the last evaluation's) or best (the best one's)")
    video: bool = hp(False, "with --evaluate: MP4s of the first episodes in RUN_DIR/videos/, rendered off-screen by "
                            "MuJoCo (MUJOCO_GL: egl without a display)")
    video_episodes: int = hp(1, "episodes --video records, the first ones of the evaluation")
    section("sweep (several datasets or seeds: each pair one run, as a Ray task)")
    ray_address: str = hp("", "Ray cluster to run a sweep on (auto, ray://host:10001); empty = RAY_ADDRESS, else a "
                              "local Ray instance")
    cpus_per_run: float = hp(1.0, "CPUs Ray reserves for each run of a sweep: its torch threads and its evaluation "
                                  "workers together (a CPU run: one worker, a GPU run: one thread; 1 = evaluate in "
                                  "the training process)")
    gpus_per_run: float = hp(-1.0, "GPUs for each run of a sweep (0.25 packs four runs on a GPU); -1 = 1 when the "
                                   "Ray cluster has GPUs and --gpu is not -1, else 0")
    max_retries: int = hp(3, "a sweep's run whose process or node dies, or that is preempted, is retried this often")


GRID_SECTIONS = ("BEAR", "networks and optimisers")  # a sweep takes a comma list for any of their flags
GRID = [f.name for f in dataclasses.fields(Config) if f.metadata["section"] in GRID_SECTIONS]

# Constants of the algorithm (spec section 1), not meant to be tuned.
VAE_LOG_STD_RANGE = (-4.0, 15.0)
VAE_LATENT_CLIP = 0.5  # z ~ N(0, I) clipped element-wise when sampling the behaviour model
ACTOR_LOG_STD_RANGE = (-20.0, 2.0)
MMD_JITTER = 1e-6  # MMD = sqrt(MMD^2 + 1e-6)


# ============================================================================================== networks
def mlp_trunk(inp: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True))


def state_first_layer(s: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[s, x] @ w + b, with w [S + X, H]. One x per state (x [B, X] -> [B, H]): one matrix multiply on the
    concatenation. n samples per state (x [B, n, X] -> [B, n, H]): the state part s @ w[:S] is computed once per
    state and shared by the n samples."""
    if x.dim() == 2:
        return torch.addmm(b, torch.cat([s, x], -1), w)
    state_dim = s.shape[-1]
    return (x @ w[state_dim:]).add_(torch.addmm(b, s, w[:state_dim])[:, None])


class StateFirstLayer(nn.Module):
    """Linear([s, x]) as state_first_layer: the n samples of a state share its state part."""

    def __init__(self, state_dim: int, other_dim: int, out: int):
        super().__init__()
        self.linear = nn.Linear(state_dim + other_dim, out)  # initialised exactly like the concatenated layer

    def forward(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # x [B, X] -> [B, H]; [B, n, X] -> [B, n, H]
        return state_first_layer(s, x, self.linear.weight.t(), self.linear.bias)


class VAE(nn.Module):
    """Behaviour model G: a conditional VAE whose decoder output is the raw (pre-tanh) action."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int):
        super().__init__()
        self.latent_dim = 2 * action_dim
        self.encoder = mlp_trunk(state_dim + action_dim, hidden)
        self.mean = nn.Linear(hidden, self.latent_dim)
        self.log_std = nn.Linear(hidden, self.latent_dim)
        self.dec_in = StateFirstLayer(state_dim, self.latent_dim, hidden)
        self.decoder = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, action_dim))

    def decode_raw(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # z [B, L] -> [B, A]; [B, n, L] -> [B, n, A]
        return self.decoder(self.dec_in(s, z)).to(self.dec_in.linear.weight.dtype)

    def sample_raw(self, s: torch.Tensor, n: int) -> torch.Tensor:  # [B, n, A] raw actions of the behaviour model
        z = torch.randn(s.shape[0], n, self.latent_dim, device=s.device).clamp(-VAE_LATENT_CLIP, VAE_LATENT_CLIP)
        return self.decode_raw(s, z)

    def loss(self, s: torch.Tensor, a: torch.Tensor, kl_weight: float) -> torch.Tensor:
        h = self.encoder(torch.cat([s, a], -1))
        dtype = self.mean.weight.dtype  # the weights' (float32), also where the matrix multiplies ran in bf16
        mean, log_std = self.mean(h).to(dtype), self.log_std(h).to(dtype).clamp(*VAE_LOG_STD_RANGE)
        std = log_std.exp()
        z = mean + std * torch.randn_like(std)  # [B, L]
        recon = torch.tanh(self.decode_raw(s, z))  # [B, A]
        kl = -0.5 * (1 + 2 * log_std - mean.pow(2) - std.pow(2)).mean()
        return F.mse_loss(recon, a) + kl_weight * kl


class Actor(nn.Module):
    """pi: tanh-squashed Gaussian. Samples are returned pre-tanh (u); the action is tanh(u)."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int):
        super().__init__()
        self.trunk = mlp_trunk(state_dim, hidden)
        self.mu = nn.Linear(hidden, action_dim)
        self.log_std = nn.Linear(hidden, action_dim)

    def sample(self, s: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(s.shape[0], n, self.mu.out_features, device=s.device, generator=generator)  # [B, n, A]
        return self.reparameterised(s, eps)

    def reparameterised(self, s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:  # eps [B, n, A] ~ N(0, I)
        h = self.trunk(s)
        dtype = self.mu.weight.dtype
        mu, std = self.mu(h).to(dtype), self.log_std(h).to(dtype).clamp(*ACTOR_LOG_STD_RANGE).exp()  # [B, A]
        return mu[:, None] + std[:, None] * eps  # [B, n, A] pre-tanh


class QEnsemble(nn.Module):
    """K critics (s, a) -> 256 -> 256 -> 1, their weights stacked as [K, in, out]. With n actions per state
    ([B, n, A]) the state part of the first layer is computed once per state. The members run one after another
    as plain 2-D matrix multiplies: on the CPU that beat one batched bmm at K=2 and K=10 (benchmarks/speed.py).
    On a GPU each member is its own kernel launches (unmeasured)."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int, k: int):
        super().__init__()
        self.state_dim = state_dim
        shapes = [(state_dim + action_dim, hidden), (hidden, hidden), (hidden, 1)]
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(k, i, o)) for i, o in shapes])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(k, o)) for _, o in shapes])
        for w, b in zip(self.weights, self.biases):  # nn.Linear's default init, member by member
            bound = 1 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:  # a [B, A] -> [K, B]; [B, n, A] -> [K, B, n]
        q = []
        for w1, w2, w3, b1, b2, b3 in zip(*self.weights, *self.biases):
            h = state_first_layer(s, a, w1, b1).relu_()  # [B, H] or [B, n, H]
            h = torch.addmm(b2, h.view(-1, h.shape[-1]), w2).relu_()  # [B*n, H]
            q.append(torch.addmm(b3, h, w3).view(a.shape[:-1]))
        return torch.stack(q).to(self.weights[0].dtype)


# ---------------------------------------------------------------------------------------------- bf16 matrix multiplies
# --precision=bf16: the networks' matrix multiplies (addmm, matmul, linear) take bf16 inputs and accumulate in
# float32 (torch.autocast); every network hands its outputs back in its weights' dtype, float32 (the .to(dtype)
# calls above, no-ops without autocast). So the equations that cancel or exponentiate (the kernels and the MMD,
# the target's min/max mix, the KL, the dual step), the losses, the master weights, the optimisers' states and
# the Polyak average stay float32.
BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16"}  # a CPU multiplies bf16 fast only with one of these


def matmul_precision(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


CPUINFO = "/proc/cpuinfo"


def cpu_flags() -> set[str]:
    try:
        with open(CPUINFO) as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def bf16_slow(device: torch.device) -> str:
    """Why bf16 matrix multiplies would be slow on `device` ('' when they are fast)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return "" if major >= 8 else f"compute capability {major}.{minor}: no bf16 tensor cores"
    return "" if cpu_flags() & BF16_CPU_FLAGS else "this CPU reports neither AMX-BF16 nor AVX512-BF16: its bf16 " \
        "matrix multiplies run on a slow generic path, much slower than float32 (benchmarks/speed.py --parts bf16)"


BF16_MEASURED = {  # bf16's update over fp32's, benchmarks/speed.py --parts bf16 on 2 cores (docs/gpu-and-precision.md)
    "amx_bf16": "1.22x on an AMX host", "avx512_bf16": "1.53x on an AVX512-BF16 host without AMX"}


def bf16_hint(precision: str, device: torch.device) -> str:
    """For an fp32 run on a CPU with fast bf16: the one line that says --precision=bf16 is there ('' otherwise),
    with the speed-up measured on this CPU's class, not a promise."""
    found = sorted(cpu_flags() & BF16_CPU_FLAGS) if device.type == "cpu" and precision == "fp32" else []
    return (f"note: this CPU reports {' and '.join(found)}: --precision=bf16 is available here; it learned the same "
            f"as fp32 in a 3-seed comparison, and its update ran {BF16_MEASURED[found[0]]} (measure this one: "
            "python benchmarks/speed.py --parts bf16)") if found else ""


# ============================================================================================== BEAR equations
# The kernels use torch.cdist: one operation forward and backward instead of a broadcast [B, n, m, A] difference,
# which made the MMD's forward and backward about 40 % faster on the CPU.
def laplacian_kernel(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """k(x, y) = exp(-||x - y||_1 / (2 sigma)) for all pairs: x [B, n, A], y [B, m, A] -> [B, n, m]."""
    return torch.exp(-torch.cdist(x, y, p=1) / (2 * sigma))


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """k(x, y) = exp(-||x - y||_2^2 / (2 sigma)) for all pairs: x [B, n, A], y [B, m, A] -> [B, n, m]."""
    return torch.exp(-torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").pow(2) / (2 * sigma))


KERNELS = {"laplacian": laplacian_kernel, "gaussian": gaussian_kernel}


def mmd(x: torch.Tensor, y: torch.Tensor, kernel, sigma: float) -> torch.Tensor:
    """MMD(s) = sqrt(mean k(x,x') + mean k(y,y') - 2 mean k(x,y) + 1e-6), means over all n x n pairs. -> [B]"""
    mmd2 = kernel(x, x, sigma).mean((1, 2)) + kernel(y, y, sigma).mean((1, 2)) - 2 * kernel(x, y, sigma).mean((1, 2))
    return torch.sqrt(mmd2 + MMD_JITTER)


def critic_target(q_next: torch.Tensor, reward: torch.Tensor, done: torch.Tensor, lam: float, gamma: float) -> torch.Tensor:
    """q_next [K, B, N_t]: y = r + gamma (1 - d) max_j [lam min_k Q_k + (1 - lam) max_k Q_k]. -> [B]"""
    mixed = lam * q_next.min(0).values + (1 - lam) * q_next.max(0).values  # [B, N_t]
    return reward + gamma * (1 - done) * mixed.max(1).values


def actor_q_term(q: torch.Tensor, rule: str, var_penalty: float) -> torch.Tensor:
    """q [K, B] -> Q_hat [B]: min_k Q_k, or mean_k Q_k - tau_var var_k Q_k."""
    if rule == "min":
        return q.min(0).values
    return q.mean(0) - var_penalty * q.var(0, unbiased=False)


def dual_loss(log_alpha: torch.Tensor, mmd_value: torch.Tensor, epsilon: float) -> torch.Tensor:
    """-alpha (mean_B MMD - eps), on the actor's MMD detached: alpha grows while MMD > eps, shrinks below."""
    return -(log_alpha.exp() * (mmd_value.detach().mean() - epsilon))


# ============================================================================================== the BEAR update
METRICS = ["vae_loss", "critic_loss", "actor_loss", "alpha_loss", "alpha", "alpha_at_clamp", "mmd", "q_mean"]
# alpha_at_clamp: the share of the interval's steps that ended with log alpha at log_alpha_max (docs/differences.md)
LOSSES = METRICS[:4]


def adam_with_state(params, lr: float) -> torch.optim.Adam:
    """torch's Adam with its state made at once, as its first step would make it (zero moments, step 0 as a
    float32 tensor): a compiled step then finds every tensor it updates in place."""
    opt = torch.optim.Adam(params, lr=lr, fused=True)
    for p in opt.param_groups[0]["params"]:
        opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
    return opt


class BEAR:
    def __init__(self, cfg: Config, state_dim: int, action_dim: int, kernel: str, device: torch.device):
        self.cfg, self.device = cfg, device
        self.kernel = KERNELS[kernel]
        self.vae = VAE(state_dim, action_dim, cfg.vae_hidden).to(device)
        self.actor = Actor(state_dim, action_dim, cfg.actor_hidden).to(device)
        self.critics = QEnsemble(state_dim, action_dim, cfg.critic_hidden, cfg.num_critics).to(device)
        self.target_critics = QEnsemble(state_dim, action_dim, cfg.critic_hidden, cfg.num_critics).to(device)
        self.target_critics.load_state_dict(self.critics.state_dict())
        self.target_critics.requires_grad_(False)
        self.polyak_pairs = (list(self.target_critics.parameters()), list(self.critics.parameters()))
        self.log_alpha = torch.tensor(cfg.log_alpha_init, device=device, requires_grad=True)
        # torch's Adam objects hold the moments and the checkpoints' format; adam_step() applies them (below)
        self.vae_opt = adam_with_state(self.vae.parameters(), cfg.vae_lr)
        self.actor_opt = adam_with_state(self.actor.parameters(), cfg.actor_lr)
        self.critic_opt = adam_with_state(self.critics.parameters(), cfg.critic_lr)
        self.alpha_opt = adam_with_state([self.log_alpha], cfg.alpha_lr)
        # Device-side bookkeeping, read back once per logging interval: no host sync inside update().
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.metric_sum = torch.zeros(len(METRICS), device=device)
        self.first_nonfinite = torch.full((len(LOSSES),), -1, dtype=torch.long, device=device)
        self.step_fn = compiled_update(self) if cfg.compile else self._update

    def update(self, batch, warmup: bool) -> None:
        with matmul_precision(self.cfg.precision, self.device):
            self.step_fn(batch, warmup)

    def _update(self, batch, warmup: bool) -> None:
        cfg = self.cfg
        s, a, r, s2, d = batch  # [B, S], [B, A], [B], [B, S], [B]

        # 1. behaviour model: MSE(tanh(dec(s, z)), a) + 0.5 KL
        vae_loss = self.vae.loss(s, a, cfg.vae_kl_weight)
        self.adam_step(self.vae_opt, vae_loss)

        # 2. critic target from N_t actions of the current actor at s'
        with torch.no_grad():
            a2 = torch.tanh(self.actor.sample(s2, cfg.num_target_samples))  # [B, N_t, A]
            y = critic_target(self.target_critics(s2, a2), r, d, cfg.lam, cfg.gamma)  # [B]

        # 3. critics: sum_k mean_B (Q_k(s, a) - y)^2
        q = self.critics(s, a)  # [K, B]
        critic_loss = (q - y).pow(2).mean(1).sum()
        self.adam_step(self.critic_opt, critic_loss)

        # 4. actor: alpha (MMD - eps), plus -Q_hat after warm-up; n samples for the MMD and one more for Q
        u = self.actor.sample(s, cfg.mmd_samples + 1)  # [B, n+1, A] pre-tanh
        with torch.no_grad():
            x = self.vae.sample_raw(s, cfg.mmd_samples)  # [B, n, A] pre-tanh
        mmd_value = mmd(x, u[:, :-1], self.kernel, cfg.mmd_sigma)  # [B]
        alpha = self.log_alpha.detach().exp()
        actor_loss = (alpha * (mmd_value - cfg.epsilon)).mean()
        if not warmup:  # a Python bool from the step counter, not a tensor value
            q_pi = self.critics(s, torch.tanh(u[:, -1]))  # [K, B]; the gradient goes to the actor's parameters only
            actor_loss = actor_loss - actor_q_term(q_pi, cfg.actor_q, cfg.var_penalty).mean()
        self.adam_step(self.actor_opt, actor_loss)

        # 5. dual step on log alpha with the actor's MMD (detached), then the clamp
        alpha_loss = self.dual_step(mmd_value)

        with torch.no_grad():
            # 6. Polyak-average the target critics
            torch._foreach_lerp_(*self.polyak_pairs, cfg.tau)

            self.step += 1
            losses = torch.stack([vae_loss, critic_loss, actor_loss, alpha_loss]).detach()
            at_clamp = (self.log_alpha >= cfg.log_alpha_max).to(self.log_alpha.dtype)
            self.metric_sum += torch.cat([losses, torch.stack([self.log_alpha.exp(), at_clamp, mmd_value.mean(),
                                                               q.mean()]).detach()])
            bad = ~torch.isfinite(losses) & (self.first_nonfinite < 0)
            self.first_nonfinite.copy_(torch.where(bad, self.step, self.first_nonfinite))

    def dual_step(self, mmd_value: torch.Tensor) -> torch.Tensor:
        alpha_loss = dual_loss(self.log_alpha, mmd_value, self.cfg.epsilon)
        self.adam_step(self.alpha_opt, alpha_loss)
        with torch.no_grad():
            self.log_alpha.clamp_(self.cfg.log_alpha_min, self.cfg.log_alpha_max)
        return alpha_loss

    def adam_step(self, opt: torch.optim.Adam, loss: torch.Tensor) -> None:
        """One Adam step on opt's parameters, whose gradient is that of loss alone (torch.autograd.grad: no .grad
        fields, no toggles). torch's own Adam as a function, on the optimiser's state: fused, one kernel, eager;
        foreach and capturable (step counts as tensors) under --compile, which traces it into the step's graph."""
        group, params = opt.param_groups[0], opt.param_groups[0]["params"]
        grads = list(torch.autograd.grad(loss, params))
        states = [opt.state[p] for p in params]
        compiled = torch.compiler.is_compiling()
        with torch.no_grad():
            adam_function(params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], [],
                          [st["step"] for st in states], foreach=compiled, fused=not compiled, capturable=compiled,
                          amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                          weight_decay=0.0, eps=group["eps"], maximize=False)

    @torch.no_grad()
    def act(self, s: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Evaluation action: of n candidates from pi, the one with the highest ensemble-mean Q. s [E, S] -> [E, A]"""
        return select_action(self.actor, self.critics, s, self.cfg.eval_candidates, generator)

    def modules(self) -> dict:
        return {"vae": self.vae, "actor": self.actor, "critics": self.critics, "target_critics": self.target_critics,
                "vae_opt": self.vae_opt, "actor_opt": self.actor_opt, "critic_opt": self.critic_opt,
                "alpha_opt": self.alpha_opt}

    def state_dict(self) -> dict:
        state = {name: m.state_dict() for name, m in self.modules().items()}
        state.update(log_alpha=self.log_alpha.detach().clone(), step=self.step.clone(), metric_sum=self.metric_sum.clone(),
                     first_nonfinite=self.first_nonfinite.clone())
        return state

    def load_state_dict(self, state: dict) -> None:
        for name, m in self.modules().items():
            m.load_state_dict(state[name])
        with torch.no_grad():
            for name in ("log_alpha", "step", "metric_sum", "first_nonfinite"):
                getattr(self, name).copy_(state[name])
        if self.cfg.compile:
            mark_static(self)  # the optimisers' loaded states are new tensors


# ---------------------------------------------------------------------------------------------- the compiled step
# --compile: the update as one graph per phase (warm-up, then with the Q term) with no graph break. Each loss's
# gradient is torch.autograd.grad, which dynamo traces, and Adam is torch's function on the optimisers' state
# (BEAR.adam_step). On CUDA the graph is captured whole as a CUDA graph: no host sync, capturable Adam, and every
# tensor the step updates in place at a fixed address.
def compile_mode(device: torch.device) -> str | None:
    """--compile's mode: on CUDA the step captured whole as a CUDA graph (reduce-overhead), else inductor's default."""
    return "reduce-overhead" if device.type == "cuda" else None


def compiled_update(agent: BEAR):
    """agent._update compiled, drawing the eager update's random numbers (inductor's fallback_random)."""
    import torch._inductor.config as inductor_config

    torch._dynamo.config.trace_autograd_ops = True
    inductor_config.fallback_random = True
    mark_static(agent)
    return torch.compile(agent._update, mode=compile_mode(agent.device))


def mark_static(agent: BEAR) -> None:
    """Every tensor the compiled step updates in place, at a fixed address: a CUDA graph (reduce-overhead) then
    captures the step whole instead of skipping it for mutated inputs (tests/test_compile.py)."""
    states = [t for opt in (agent.vae_opt, agent.actor_opt, agent.critic_opt, agent.alpha_opt)
              for state in opt.state.values() for t in state.values()]
    for t in [*states, *agent.target_critics.parameters(), agent.log_alpha, agent.step, agent.metric_sum,
              agent.first_nonfinite]:
        torch._dynamo.mark_static_address(t)


# ============================================================================================== evaluation
def normalized_score(ret: float, score_range: tuple[float, float] | None) -> float | None:
    """100 (R - min) / (max - min) with D4RL's constants or a Minari dataset's reference returns; None without them."""
    if score_range is None:
        return None
    lo, hi = score_range
    return 100 * (ret - lo) / (hi - lo)


def select_action(actor: "Actor", critics: "QEnsemble", s: torch.Tensor, candidates: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Of `candidates` actions from pi per state, the one with the highest ensemble-mean Q. s [E, S] -> [E, A]"""
    return highest_q(critics, s, torch.tanh(actor.sample(s, candidates, generator)))


def highest_q(critics: "QEnsemble", s: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """actions [E, n, A] -> [E, A]: per state, the candidate with the highest ensemble-mean Q."""
    best = critics(s, actions).mean(0).argmax(1)  # [E]
    return actions[torch.arange(s.shape[0], device=s.device), best]  # shape[0], not len(): export keeps B symbolic


class Policy(nn.Module):
    """The evaluation rule as one module, for the torch-only policy files: obs [B, S] and standard-normal draws
    noise [B, n, A] -> the actions [B, A] that select_action takes for the same draws."""

    def __init__(self, actor: "Actor", critics: "QEnsemble"):
        super().__init__()
        self.actor, self.critics = actor, critics

    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return highest_q(self.critics, obs, torch.tanh(self.actor.reparameterised(obs, noise)))


def eval_snapshot(agent: "BEAR") -> dict:
    """What an evaluation needs, copied to the CPU: the actor's and the critics' weights (0.9 MB at the default
    sizes). Training goes on while it is evaluated."""
    return {name: {k: v.detach().to("cpu", copy=True) for k, v in getattr(agent, name).state_dict().items()}
            for name in ("actor", "critics")}


class Evaluator:
    """Evaluates snapshots on the CPU: `eval_episodes` environments stepped side by side and restarted from the same
    seeds every time, with their candidates scored in one forward pass per step. An evaluation depends only on the
    snapshot, the step and the seed: nothing to carry across a resume, the same in a worker as in the training
    process (with the same torch threads)."""

    def __init__(self, target: "EvalTarget", cfg: Config, state_dim: int, action_dim: int, render: int = 0):
        self.target, self.cfg = target, cfg
        with torch.random.fork_rng(devices=[]):  # their initial weights are overwritten: leave training's stream be
            self.actor = Actor(state_dim, action_dim, cfg.actor_hidden).requires_grad_(False)
            self.critics = QEnsemble(state_dim, action_dim, cfg.critic_hidden, cfg.num_critics).requires_grad_(False)
        self.envs = [target.make(render_mode="rgb_array") if i < render else target.make() for i in range(cfg.eval_episodes)]
        self.seeds = [10_000 + 1_000 * cfg.seed + i for i in range(cfg.eval_episodes)]
        self.lengths, self.sink = None, None  # sink(i, frame): the frames of the rendered episodes, as they come

    def __call__(self, snapshot: dict, step: int, block: int = 0, count: int | None = None) -> np.ndarray:
        with torch.no_grad():
            self.actor.load_state_dict(snapshot["actor"])
            self.critics.load_state_dict(snapshot["critics"])
        with torch.inference_mode():  # no autograd bookkeeping at all, for 1 000 forward passes
            return self.episodes(step, block, count)

    def episodes(self, step: int, block: int = 0, count: int | None = None) -> np.ndarray:
        """The returns of eval_episodes episodes (the step's evaluation); the episode lengths go to self.lengths.
        --evaluate asks for more in blocks of eval_episodes: block b plays the next `count` episode seeds, with a
        random stream of its own; block 0 is the training run's evaluation of that step, exactly."""
        envs = self.envs[:count]
        seeds = [s + block * len(self.envs) for s in self.seeds[:len(envs)]]
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step if block == 0 else
                                                  int(np.random.SeedSequence([self.cfg.seed, step, block]).generate_state(1)[0]))
        obs = np.stack([self.target.observe(env.reset(seed=s)[0]) for env, s in zip(envs, seeds)])
        obs = obs.astype(np.float32)  # [E, S]: the networks' dtype, rounded once per step as torch would
        returns, lengths, active = np.zeros(len(envs)), np.zeros(len(envs), np.int64), np.ones(len(envs), bool)
        rendered = [i for i, env in enumerate(envs) if env.render_mode and self.sink]
        for i in rendered:
            self.sink(i, envs[i].render())
        while active.any():
            live = np.flatnonzero(active)
            with matmul_precision(self.cfg.precision, torch.device("cpu")):  # as in training
                actions = select_action(self.actor, self.critics, torch.from_numpy(obs[live]), self.cfg.eval_candidates,
                                        generator).numpy()
            for i, action in zip(live, actions):
                next_obs, reward, terminated, truncated, _ = envs[i].step(self.target.to_env(action))
                obs[i] = self.target.observe(next_obs)
                returns[i] += reward
                lengths[i] += 1
                active[i] = not (terminated or truncated)
                if i in rendered:
                    self.sink(i, envs[i].render())
        self.lengths = lengths
        return returns


# ---------------------------------------------------------------------------------------------- evaluation pool
# Evaluation off the critical path: at an evaluation step the training loop hands eval_snapshot() to a pool of
# worker processes and trains on. Each worker is this file run by a fresh interpreter (safe to start after CUDA,
# unlike fork) that keeps its Evaluator for the whole run. Results are used in step order (the training loop keeps
# later rows until an earlier evaluation is back). With --eval-workers=0 the same Evaluator runs in the training
# process, synchronously.
EVAL_WORKER_BOOT = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('bear_train_eval', "
                    "sys.argv[1]); module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module; "
                    "spec.loader.exec_module(module); module.eval_worker(*map(int, sys.argv[2:]))")
PENDING_PER_WORKER = 2  # evaluations outstanding per worker (one running, one queued) before training waits
POLL_EVERY = 0.1  # seconds: while an evaluation is out, training looks for it at most this often (about 20 us a look)


def eval_worker(jobs_fd: int, results_fd: int, parent: int) -> None:
    """Body of a worker process: its Evaluator is built once from the first message; then every (step, snapshot)
    is answered with (step, returns, error text). Ends when the training process closes the pipe or dies."""
    import traceback
    from multiprocessing.connection import Connection

    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C reaches the whole group: the training process stops us
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(Exception):  # Linux: killed with the training process, however that one ends
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        return
    jobs, results = Connection(jobs_fd, writable=False), Connection(results_fd, readable=False)
    target, cfg, dims, threads = pickle.loads(jobs.recv_bytes())  # plain dicts: the classes pickle under the parent's module name
    torch.set_num_threads(threads)
    try:
        evaluator, error = Evaluator(EvalTarget(**target), Config(**cfg), *dims), ""
    except Exception:
        evaluator, error = None, traceback.format_exc()
    results.send_bytes(pickle.dumps(("ready",)))
    while True:
        try:
            key, snapshot, *job = pickle.loads(jobs.recv_bytes())  # job: {step, block, count} of --evaluate
        except EOFError:
            return
        try:
            returns = evaluator(snapshot, **({"step": key} | (job[0] if job else {}))) if evaluator else None
            message = (key, returns, "", evaluator.lengths) if evaluator else (key, None, error)
        except Exception:
            message = (key, None, traceback.format_exc())
        results.send_bytes(pickle.dumps(message))


class EvalFailed(Exception):
    pass


@dataclass
class EvalWorker:
    proc: object  # subprocess.Popen
    jobs: object  # multiprocessing.connection.Connection, to the worker
    results: object  # and from it
    ready: bool = False
    job: tuple | None = None  # (step, snapshot) it is evaluating


class EvalPool:
    """`workers` evaluation processes (0: evaluate in this process, synchronously). submit() hands over a snapshot
    and returns at once, unless PENDING_PER_WORKER * workers evaluations are outstanding: then training waits (the
    time is counted in `waited`). A worker that dies or raises is replaced and its evaluation retried once; a
    second failure raises EvalFailed."""

    def __init__(self, workers: int, setup: tuple, log: Path):
        self.setup, self.log, self.n = setup, log, workers
        self.inline = Evaluator(*setup[:2], *setup[2]) if workers == 0 else None
        self.workers = [self._start() for _ in range(workers)]
        self.queue, self.done, self.attempts, self.waited, self.polled = [], {}, {}, 0.0, 0.0
        self.lengths = {}  # the episodes' lengths of each evaluation that is back

    def _start(self) -> EvalWorker:
        import subprocess
        from multiprocessing.connection import Connection

        jobs_r, jobs_w = os.pipe()
        results_r, results_w = os.pipe()
        with open(self.log, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-c", EVAL_WORKER_BOOT, str(Path(__file__).resolve()), str(jobs_r),
                                     str(results_w), str(os.getpid())], pass_fds=(jobs_r, results_w),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(jobs_r)
        os.close(results_w)
        worker = EvalWorker(proc, Connection(jobs_w, readable=False), Connection(results_r, writable=False))
        target, cfg, dims, threads = self.setup
        worker.jobs.send_bytes(pickle.dumps((dataclasses.asdict(target), dataclasses.asdict(cfg), dims, threads)))
        return worker

    def pending(self) -> int:
        return len(self.queue) + sum(w.job is not None for w in self.workers)

    def submit(self, step: int, snapshot: dict, stop: list, job: dict | None = None) -> None:
        t = time.time()
        if self.inline:
            self.done[step] = self.inline(snapshot, **({"step": step} | (job or {})))
            self.lengths[step] = self.inline.lengths
        else:
            self.queue.append((step, snapshot) + ((job,) if job else ()))
            self.poll(0)
            while self.pending() > PENDING_PER_WORKER * self.n and not stop:
                self.poll(0.2)
        self.waited += time.time() - t

    def result(self, step: int, wait: bool = False, stop: list = ()) -> np.ndarray | None:
        """The returns of step's evaluation once it is back (popped), else None; wait=True waits for it."""
        t = time.time()
        if step not in self.done and not wait and t - self.polled > POLL_EVERY:
            self.poll(0)  # a look without waiting: the row and its checkpoint follow as soon as it is back
        while step not in self.done and wait and not stop:
            self.poll(0.2)
        self.waited += time.time() - t if wait else 0.0
        return self.done.pop(step, None)

    def poll(self, timeout: float) -> None:
        """Collects what the workers have sent (waiting up to `timeout` for something), and hands queued snapshots
        to idle workers."""
        from multiprocessing.connection import wait

        self.polled = time.time()
        for worker in self.workers:
            if worker.ready and worker.job is None and self.queue:
                worker.job = self.queue.pop(0)
                try:
                    worker.jobs.send_bytes(pickle.dumps(worker.job))
                except OSError:  # it died: its results pipe says so below
                    pass
        if not self.workers:
            return
        for conn in wait([w.results for w in self.workers], timeout):
            worker = next(w for w in self.workers if w.results is conn)
            try:
                message = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                worker.proc.wait()
                self._failed(worker, f"exit code {worker.proc.returncode}")
                continue
            if message == ("ready",):
                worker.ready = True
            elif message[2]:
                worker.proc.kill()
                worker.proc.wait()
                self._failed(worker, message[2].strip().splitlines()[-1])
            else:
                self.done[message[0]], self.lengths[message[0]] = message[1], message[3]
                worker.job = None
        if any(w.ready and w.job is None for w in self.workers) and self.queue:
            self.poll(0)

    def _failed(self, worker: EvalWorker, why: str) -> None:
        worker.jobs.close()
        worker.results.close()
        self.workers.remove(worker)
        step = worker.job[0] if worker.job else None
        self.attempts[step] = self.attempts.get(step, 0) + 1
        where = f"step {step}" if step is not None else "start-up"
        if self.attempts[step] > 1:
            raise EvalFailed(f"the evaluation of {where} failed twice ({why}; the workers' output is in {self.log})")
        warn(f"an evaluation worker failed at {where} ({why}); retrying it once in a fresh worker")
        if worker.job:
            self.queue.insert(0, worker.job)
        self.workers.append(self._start())

    def close(self) -> None:
        for worker in self.workers:
            worker.jobs.close()
            worker.results.close()
            if worker.proc.poll() is None:
                worker.proc.kill()
            worker.proc.wait()
        self.workers = []


def eval_workers(cfg: Config, device: torch.device) -> int:
    """--eval-workers, or by default the cores this process may use minus what training uses (its torch threads on
    the CPU, one core on a GPU), at least 1."""
    if cfg.eval_workers >= 0:
        return cfg.eval_workers
    return max(1, usable_cpus() - (torch.get_num_threads() if device.type == "cpu" else 1))


# ---------------------------------------------------------------------------------------------- Q against the data
# The bootstrapping error BEAR is named after, seen while a run goes: the critics' Q on a fixed probe set of the
# data's own (s, a) pairs against those pairs' discounted Monte-Carlo return in the data. The probe is drawn once
# from the pairs whose return is complete (discounted_returns), with its own fixed seed: the same in every run on a
# dataset, at every row and across a resume.
PROBE_SEED = 0
PROBE_FIELDS = ["q_data", "q_data_min", "q_data_max", "return_data", "q_gap", "q_ratio"]


def probe_rows(complete: np.ndarray, size: int) -> np.ndarray:
    rows = np.flatnonzero(complete)
    if len(rows) > size:
        rows = np.sort(np.random.default_rng(PROBE_SEED).choice(rows, size, replace=False))
    return rows


def q_bound(rewards: np.ndarray, gamma: float) -> float | None:
    """The largest Q any policy can have on data whose rewards are at most r_max: r_max / (1 - gamma) (r_max itself
    when it is negative: then ending at once is best). None for gamma = 1."""
    r_max = float(rewards.max())
    return r_max if r_max < 0 else r_max / (1 - gamma) if gamma < 1 else None


@torch.no_grad()
def q_vs_return(critics: nn.Module, s: torch.Tensor, a: torch.Tensor, data_return: float) -> dict:
    """Critics on the probe pairs: the ensemble's mean Q, and the means of its min and max, against the pairs' mean
    Monte-Carlo return; the gap, and the ratio."""
    q = critics(s, a)  # [K, P]
    q_mean, q_min, q_max = torch.stack([q.mean(), q.min(0).values.mean(), q.max(0).values.mean()]).tolist()
    return {"q_data": q_mean, "q_data_min": q_min, "q_data_max": q_max, "return_data": data_return,
            "q_gap": q_mean - data_return} | ({"q_ratio": q_mean / data_return} if data_return else {})


# ============================================================================================== the training loop
def train(cfg: Config) -> dict:
    validate(cfg)
    spec = resolve_dataset(cfg.dataset, cfg.env)
    run_dir, resuming = prepare_run_dir(cfg, spec.name)
    t_load = time.time()
    loaded = load_data(spec, is_offline(cfg), cfg.regen_steps, cfg.regen_workers, cfg.gamma)
    device = pick_device(cfg.gpu)  # after the data: no CUDA before regeneration forks its workers
    if cfg.precision == "bf16" and device.type == "cuda" and (why := bf16_slow(device)):
        raise UserError(f"--precision=bf16 needs a GPU with bf16 tensor cores (compute capability 8.0 or newer); "
                        f"{device} has {why.split(':')[0]}: use --precision=fp32")
    with claimed(run_dir, resuming) as run_dir, Run(cfg, spec, loaded, device, run_dir, resuming, t_load) as run:
        agent, buffer = run.agent, run.buffer
        for step in range(run.start + 1, cfg.max_steps + 1):
            agent.update(buffer.sample(cfg.batch_size), step <= cfg.warmup_steps)
            if step % cfg.log_every == 0 or run.is_eval(step):
                run.log(step)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                run.keep_checkpoint(step)
            run.flush()
            if run.stop:
                run.stop_at(step)
            run.progress(step)
        return run.results()


# ##############################################################################################################
# PLUMBING. Everything below serves the algorithm above: the datasets (D4RL files, Minari, preparation at scale),
# run bookkeeping (errors and signals, logs, checkpoints, plots, locks), seed tables, the sweep on Ray, the command
# line and main. A reader of the paper can stop here.
# ##############################################################################################################
# ============================================================================================== errors and signals
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_CRASHED, EXIT_DISK_FULL, EXIT_PREEMPTED, EXIT_INTERRUPTED = 2, 1, 70, 74, 75, 130


class UserError(Exception):
    """Bad input: reported as one line, exit code 2, no traceback."""


class Diverged(Exception):
    pass


class DiskFull(Exception):
    """A write that found no space (ENOSPC, or a quota): what was being written and the disk it is on."""

    def __init__(self, path: Path):
        mount = Path(path).absolute().parent
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        folder, kept = Path(path).parent, ""
        if (folder / "config.json").exists() or Path(path).name == "config.json":  # a run folder: what --resume finds
            whole = [c for c in checkpoints(folder) if manifest_path(c).exists()]
            kept = (f"; the newest checkpoint (step {int(whole[-1].stem.split('-')[1])}) is whole" if whole
                    else "; no checkpoint yet: --resume starts from step 0")
        super().__init__(f"no space left on the disk mounted at {mount} while writing {path}; nothing written before "
                         f"is lost{kept}: free space there, then continue with the same command plus --resume")


def is_disk_full(error: BaseException) -> bool:
    import errno

    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


class Stop(Exception):
    def __init__(self, code: int):
        self.code = code


class Interrupted(BaseException):
    """SIGINT or SIGTERM outside the training loop; `what` says what was stopped and what was kept. A
    BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows it."""

    def __init__(self, signum: int, what: str = ""):
        super().__init__(signum)
        self.signum, self.what = signum, what

    @property
    def code(self) -> int:
        return EXIT_PREEMPTED if self.signum == signal.SIGTERM else EXIT_INTERRUPTED


def raise_interrupted(signum: int) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def on_signals(action):
    """Inside the block, SIGINT and SIGTERM call action(signum): raise_interrupted stops whatever runs (loading,
    downloading, regenerating); the training loop instead notes the signal and stops at the end of its step."""
    previous = {sig: signal.signal(sig, lambda signum, frame: action(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def first_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def warn(message: str, loud: bool = False) -> None:
    bar = "!" * 100
    text = f"{bar}\n!!! WARNING: {message}\n{bar}" if loud else f"WARNING: {message}"
    if "tqdm" in sys.modules:  # on its own line, not in a progress bar's
        sys.modules["tqdm"].tqdm.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)


# ============================================================================================== D4RL data
D4RL_BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
BASE_URL_ENV = "BEAR_D4RL_BASE_URL"  # override (e.g. a local mirror); tests serve files from 127.0.0.1
ENVS = {  # env: (gymnasium id, obs dim, act dim, normalisation min, max)
    "halfcheetah": ("HalfCheetah-v4", 17, 6, -280.178953, 12135.0),
    "hopper": ("Hopper-v4", 11, 3, -20.272305, 3234.3),
    "walker2d": ("Walker2d-v4", 17, 6, 1.629008, 4592.3),
    "ant": ("Ant-v4", 27, 8, -325.6, 3879.7),
}
KINDS = ["random", "medium", "expert", "medium-replay", "medium-expert", "full-replay"]
V2_SIZES = {  # published byte sizes of the v2 files
    "walker2d": [216109364, 232254996, 230567195, 86323963, 462197079, 285115514],
    "hopper": [152525345, 152756557, 152427435, 75854457, 304537315, 187998921],
    "halfcheetah": [237338037, 237727262, 237464597, 59448533, 474567252, 291381762],
    "ant": [384466831, 376239825, 373231677, 136482252, 748335217, 449390167],
}
KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
ALL_NAMES = [f"{e}-{k}-v{v}" for e in ENVS for k in KINDS for v in (0, 1, 2) if v == 2 or k != "full-replay"]


@dataclass
class DatasetSpec:
    name: str  # D4RL name, or the file's stem for a path
    env: str  # walker2d, hopper, ...
    path: Path  # where the file is (or will be)
    url: str = ""  # D4RL's URL; empty for a user's path
    size: int | None = None  # published byte size, when known
    kind: str = ""  # random, medium, ...; "minari" for a Minari id


def d4rl_dir() -> Path:
    return Path(os.environ.get("D4RL_DATASET_DIR") or Path.home() / ".d4rl" / "datasets")


def resolve_dataset(dataset: str, env_override: str = "") -> DatasetSpec:
    """A D4RL name -> its file name, URL and cache path (D4RL names the cached file after the URL's last part)."""
    if dataset in ALL_NAMES:
        env, kind, version = re.fullmatch(r"([a-z0-9]+)-(.+)-v(\d)", dataset).groups()
        version = int(version)
        if version == 2:
            rel = f"gym_mujoco_v2/{env}_{kind.replace('-', '_')}-v2.hdf5"
        elif version == 1:
            rel = f"gym_mujoco_v1/{env}_{kind.replace('-', '_')}-v1.hdf5"
        else:
            stem = {"medium-replay": f"{'walker' if env == 'walker2d' else env}_mixed"}.get(kind, f"{env}_{kind.replace('-', '_')}")
            rel = f"gym_mujoco/{stem}.hdf5"
        base = os.environ.get(BASE_URL_ENV) or D4RL_BASE_URL
        size = V2_SIZES[env][KINDS.index(kind)] if version == 2 else None
        return DatasetSpec(dataset, env, d4rl_dir() / rel.split("/")[-1], f"{base.rstrip('/')}/{rel}", size, kind)
    path = Path(dataset).expanduser()
    if MINARI_ID.fullmatch(dataset) and not path.is_file():  # an existing file is a file, whatever its name
        return DatasetSpec(dataset, "", minari_dir() / dataset, kind="minari")
    if dataset.endswith((".hdf5", ".h5")) or os.sep in dataset:
        if not path.is_file():
            raise UserError(f"dataset file {path} does not exist; give an existing HDF5 file or a D4RL name such as walker2d-random-v2")
        env = env_override or next((e for e in sorted(ENVS, key=len, reverse=True) if e in path.name.lower()), "")
        if env not in ENVS:
            raise UserError(f"cannot tell the environment of {path.name}; pass --env=walker2d (or hopper, halfcheetah, ant)")
        return DatasetSpec(path.stem, env, path)
    close = difflib.get_close_matches(dataset, ALL_NAMES, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}?" if close else "expected <env>-<dataset>-v2 such as walker2d-random-v2, a path " \
        "to an HDF5 file, or a Minari id such as mujoco/walker2d/medium-v0"
    raise UserError(f"unknown dataset '{dataset}': {hint}")


def download(url: str, dest: Path, expected_size: int | None, env: str, attempts: int = 3) -> dict[str, np.ndarray]:
    """Download into dest.part, resuming a cut transfer with an HTTP Range request; check the size and the
    structure of the new file, and only then rename it over dest. Returns the file's arrays."""
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                if have and response.status != 206:  # the server ignored the Range request: start over
                    have = 0
                total = int(response.headers.get("Content-Length", 0)) + have or expected_size
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
                if total and part.stat().st_size < total:
                    raise http.client.IncompleteRead(b"", total - part.stat().st_size)
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the partial file is already complete (or longer than the file)
                break
            raise
        except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
            if attempt == attempts - 1:
                raise OSError(f"transfer cut {attempts} times ({e!r}); run again to resume it") from e
            warn(f"download of {url} was cut ({e!r}); resuming from byte {part.stat().st_size if part.exists() else 0}")
    got = part.stat().st_size
    if expected_size is not None and got != expected_size:
        part.unlink()
        raise OSError(f"got {got} bytes, D4RL publishes {expected_size}")
    try:
        data = read_d4rl(part, env)
    except UserError as e:
        part.unlink()
        raise OSError(f"the downloaded file fails its checks: {e}") from None
    os.replace(part, dest)
    return data


def read_d4rl(path: Path, env: str) -> dict[str, np.ndarray]:
    """Reads a D4RL-layout file once and checks its structure; raises UserError naming the first problem."""
    import h5py

    obs_dim, act_dim = ENVS[env][1:3]
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"{path} is not a readable HDF5 file; delete it so that it is downloaded again, or replace it")
    with f:
        missing = [k for k in KEYS if k not in f]
        if missing:
            raise UserError(f"{path} lacks the key(s) {', '.join(missing)} of D4RL's layout; replace the file")
        lengths = {k: f[k].shape[0] if f[k].ndim else 0 for k in KEYS}
        if len(set(lengths.values())) != 1:
            raise UserError(f"{path} has arrays of inconsistent length ({lengths}); replace the file")
        for key, dim in (("observations", obs_dim), ("actions", act_dim)):
            if f[key].ndim != 2 or f[key].shape[1] != dim:
                raise UserError(f"{path}: {key} have shape {f[key].shape}, {env} needs (N, {dim}); check --dataset/--env")
        if lengths["observations"] < 2:
            raise UserError(f"{path} holds fewer than 2 rows; replace the file")
        data = {k: f[k][()] for k in KEYS}
    for key in ("observations", "actions", "rewards"):
        bad = ~np.isfinite(data[key].reshape(len(data[key]), -1)).all(axis=1)
        if bad.any():
            raise UserError(f"{path}: {key} has a non-finite value in row {int(np.argmax(bad))}; replace the file")
    return data


def to_transitions(data: dict[str, np.ndarray], gamma: float = 0.99) -> dict[str, np.ndarray]:
    """D4RL's q-learning transitions: next state = observations[i+1], done = terminals[i]; rows that time out
    (their successor starts the next episode) and the last row are dropped. Each transition also gets the data's
    discounted Monte-Carlo return, over the file's rows (a timed-out row's reward included)."""
    n = len(data["observations"])
    timeouts = data["timeouts"].reshape(n).astype(bool)
    terminals = data["terminals"].reshape(n).astype(bool)
    keep = np.flatnonzero(~timeouts[:-1])  # [M] indices i in 0..N-2 whose successor is in the same episode
    ends = terminals | timeouts
    ends[-1] = True  # the file's last episode is cut by the end of the file
    returns, complete = discounted_returns(data["rewards"].reshape(n), terminals, ends, gamma)
    return {
        "observations": data["observations"][keep].astype(np.float32, copy=False),
        "actions": data["actions"][keep].astype(np.float32, copy=False),
        "rewards": data["rewards"].reshape(n)[keep].astype(np.float32, copy=False),
        "next_observations": data["observations"][keep + 1].astype(np.float32, copy=False),
        "terminals": terminals[keep].astype(np.float32),
        "returns": returns[keep], "returns_complete": complete[keep],
    }


MC_TAIL = 0.01  # a return cut by a truncation counts as complete once the unseen rest weighs gamma^h < 1 %


def discounted_returns(rewards: np.ndarray, terminal: np.ndarray, end: np.ndarray, gamma: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Rows in time order; an episode ends at a row with `end`, terminated there (`terminal`: nothing follows) or
    truncated (a time limit, the end of the data: what follows is unseen). G_i = r_i + gamma G_(i+1) within an
    episode. Returns (G [N] float64, complete [N]): complete unless the episode was truncated h steps after row i
    with gamma^h >= MC_TAIL, where G_i misses a part of the return that weighs too much to ignore."""
    r, term, stop = np.asarray(rewards, np.float64).tolist(), np.asarray(terminal).tolist(), np.asarray(end).tolist()
    returns, complete = [0.0] * len(r), [False] * len(r)
    g, unseen, terminated = 0.0, 1.0, True
    for i in range(len(r) - 1, -1, -1):
        if stop[i]:
            g, unseen, terminated = 0.0, 1.0, bool(term[i])
        g = r[i] + gamma * g
        unseen *= gamma  # weight of the unseen rest in G_i: gamma^(steps from i past the truncation)
        returns[i], complete[i] = g, terminated or unseen < MC_TAIL
    return np.array(returns), np.array(complete, bool)


MUJOCO_WARNINGS_SHOWN: set[str] = set()


def mujoco_warning(message: str) -> None:
    """MuJoCo's warnings, each shown once per process: MuJoCo 4 warns at every compile of gymnasium's
    half_cheetah.xml that settotalmass is deprecated, 42 times in a HalfCheetah run. Forked workers inherit what
    was shown."""
    if message not in MUJOCO_WARNINGS_SHOWN:
        MUJOCO_WARNINGS_SHOWN.add(message)
        print(f"WARNING: {message} (MuJoCo; shown once)", file=sys.stderr, flush=True)


def make_env(env_id: str, **kwargs):
    import gymnasium as gym
    import mujoco

    mujoco.set_mju_user_warning(mujoco_warning)
    with warnings.catch_warnings():  # gymnasium calls every *-v4 env out of date; v4 is deliberate (docs/differences.md)
        warnings.simplefilter("ignore", DeprecationWarning)
        return gym.make(env_id, **kwargs)


def regenerated_path(spec: DatasetSpec, steps: int) -> Path:
    """A name D4RL never uses, so the regenerated file cannot be mistaken for the published one."""
    suffix = "" if steps == 1_000_000 else f"_{steps}steps"
    return d4rl_dir() / f"bear-regenerated_{spec.path.stem}_{ENVS[spec.env][0]}{suffix}.hdf5"


# ============================================================================================== Minari datasets
# `--dataset=mujoco/walker2d/medium-v0` (any Minari id, `namespace/.../name-vN`): the episodes become the same
# transitions dict as D4RL's files, and evaluation uses the dataset's own evaluation environment and reference scores.
MINARI_ID = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)+-v\d+")
ROBOTICS_PIN = "gymnasium-robotics==1.4.2"


def minari_dir() -> Path:
    """Minari's own local root, read without creating it (minari's helper would)."""
    return Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")


@dataclass
class EvalTarget:
    """What evaluation needs: the environment, the map between its observations and actions and the data's, and the
    reference returns of the normalised score (None: raw returns only). Plain data, so that evaluation workers
    can be sent it and make their own environments."""
    env_id: str
    score_range: tuple[float, float] | None
    obs_space: object = None  # a Dict space: its observations are flattened as in the data
    action_range: tuple[np.ndarray, np.ndarray] | None = None  # the env's (low, high) when they are not [-1, 1]
    minari_data: str = ""  # a Minari dataset's data folder: its own evaluation environment is made from it

    def make(self, render_mode: str | None = None):
        kwargs = {"render_mode": render_mode} if render_mode else {}
        if self.minari_data:
            import minari

            return quietly(minari.MinariDataset(self.minari_data).recover_environment, eval_env=True, **kwargs)
        return make_env(self.env_id, **kwargs)

    def observe(self, obs) -> np.ndarray:
        return flatten_obs(self.obs_space, obs)[0] if self.obs_space is not None else obs

    def to_env(self, action: np.ndarray) -> np.ndarray:
        if self.action_range is None:
            return action
        low, high = self.action_range
        return (low + (action + 1) / 2 * (high - low)).astype(action.dtype)


def flatten_obs(space, obs) -> np.ndarray:
    """Dict observations -> [n, sum of sizes], the keys in the space's order, for one observation or a batch of n."""
    import gymnasium

    if not isinstance(space, gymnasium.spaces.Dict):
        return np.asarray(obs, np.float32).reshape(-1, int(np.prod(space.shape)))
    parts = [flatten_obs(sub, obs[key]) for key, sub in space.spaces.items()]
    return np.concatenate(parts, axis=1)


def load_minari(spec: DatasetSpec, offline: bool, gamma: float = 0.99) -> tuple[dict[str, np.ndarray], EvalTarget, list[str]]:
    """The dataset from the local Minari root, downloaded through minari (under dataset_lock) when it is missing."""
    folder = spec.path
    fetch = f"`minari download {spec.name}` (it goes to {folder})"
    if not (folder / "data").is_dir():
        if offline:
            raise UserError(f"Minari dataset {spec.name} is not in {minari_dir()} and --offline forbids downloading it: "
                            f"fetch it with {fetch}, or point MINARI_DATASETS_PATH at the root that holds it")
        new_folders = [p for p in [folder, *folder.parents] if not p.exists()]  # deepest first
        try:
            with dataset_lock(folder):
                if not (folder / "data").is_dir():
                    _download_minari(spec, folder, fetch)
        except BaseException:
            for p in new_folders:  # a failed download leaves no empty folders behind
                if p.is_dir() and not any(p.iterdir()):
                    p.rmdir()
            raise
    try:
        import minari

        dataset = minari.MinariDataset(folder / "data")
        data = minari_transitions(dataset, gamma)
        target = minari_eval_target(dataset, folder / "data")
    except UserError:
        raise
    except Exception as e:  # minari and h5py raise many kinds on bad metadata or data
        raise UserError(f"{folder} is not a readable Minari dataset ({first_line(e)}); "
                        f"delete it and fetch it again with {fetch}") from None
    notes = ["Minari dataset: other environments, policies and reference scores than D4RL's; not comparable with "
             "D4RL tables"]
    return data, target, notes


def _download_minari(spec: DatasetSpec, folder: Path, fetch: str) -> None:
    import shutil

    import minari

    existed = folder.exists()
    try:
        minari.download_dataset(spec.name)  # minari's own progress bars
    except BaseException as e:
        if not existed:  # nothing partial is left where a later run would look
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(e, Interrupted):
            e.what = f"while downloading Minari dataset {spec.name}: nothing partial was kept"
            raise
        if not isinstance(e, Exception):
            raise
        raise UserError(f"could not download Minari dataset {spec.name} ({first_line(e)}); "
                        f"fetch it with {fetch}") from None


def quietly(make, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make(**kwargs)


def minari_transitions(dataset, gamma: float = 0.99) -> dict[str, np.ndarray]:
    """Episodes -> transitions. Minari stores T+1 observations for T steps, so the next state is the next
    observation of the same episode, the last step's included; done is the termination flag (a truncation only
    ends the episode). Actions are scaled to [-1, 1] from the dataset's action space. Each transition also gets
    its episode's discounted Monte-Carlo return (an episode that ends without a termination is truncated)."""
    import gymnasium

    obs_space, act_space = dataset.observation_space, dataset.action_space
    if not isinstance(act_space, gymnasium.spaces.Box):
        raise UserError(f"{dataset.id} has {type(act_space).__name__} actions; BEAR needs continuous (Box) actions")
    parts = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals", "returns",
                             "returns_complete")}
    for episode in dataset.iterate_episodes():
        steps = len(episode.rewards)
        obs = flatten_obs(obs_space, episode.observations)  # [T+1, S]
        if len(obs) != steps + 1:
            raise UserError(f"{dataset.id}: episode {episode.id} has {len(obs)} observations for {steps} steps (Minari "
                            "stores one more); the dataset is damaged: fetch it again")
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(episode.actions, np.float32).reshape(steps, -1))
        parts["rewards"].append(np.asarray(episode.rewards, np.float32))
        parts["terminals"].append(np.asarray(episode.terminations, np.float32))
        end = np.zeros(steps, bool)
        end[-1:] = True
        returns, complete = discounted_returns(parts["rewards"][-1], parts["terminals"][-1] > 0, end, gamma)
        parts["returns"].append(returns)
        parts["returns_complete"].append(complete)
    if not parts["rewards"] or sum(map(len, parts["rewards"])) == 0:
        raise UserError(f"{dataset.id} holds no steps")
    data = {k: np.concatenate(v) for k, v in parts.items()}
    if (bounds := action_bounds(act_space)) is not None:
        low, high = bounds
        data["actions"] = 2 * (data["actions"] - low) / (high - low) - 1
    for key in ("observations", "actions", "rewards", "next_observations"):
        bad = ~np.isfinite(data[key].reshape(len(data[key]), -1)).all(axis=1)
        if bad.any():
            raise UserError(f"{dataset.id}: {key} has a non-finite value in transition {int(np.argmax(bad))}; fetch it again")
    return data


def minari_eval_target(dataset, folder: Path) -> EvalTarget:
    """The dataset's evaluation environment (recover_environment(eval_env=True)), made once now so that a missing
    package stops the run before training, and the reference scores from its metadata when it has them."""
    import gymnasium

    try:
        # minari warns about its requirements here; a failure below says what is missing
        env = quietly(dataset.recover_environment, eval_env=True)
        env_id = env.spec.id if env.spec else "?"
        env.close()
    except (ImportError, gymnasium.error.Error, ValueError) as e:
        hint = f"pip install {ROBOTICS_PIN}" if "robotics" in str(e) or "Maze" in str(e) or "Adroit" in str(e) \
            else "install the package that provides it"
        raise UserError(f"the evaluation environment of {dataset.id} cannot be made ({type(e).__name__}: {e}); "
                        f"{hint}") from None
    metadata = dataset.storage.metadata
    lo, hi = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    return EvalTarget(env_id, (float(lo), float(hi)) if lo is not None and hi is not None else None,
                      dataset.observation_space if isinstance(dataset.observation_space, gymnasium.spaces.Dict) else None,
                      action_bounds(dataset.action_space), str(folder))


def action_bounds(space) -> tuple[np.ndarray, np.ndarray] | None:
    """(low, high) of a Box action space that is not already [-1, 1]; None when it is."""
    low, high = space.low.astype(np.float32), space.high.astype(np.float32)
    return None if (low == -1).all() and (high == 1).all() else (low, high)


# ============================================================================================== data preparation at scale
# Regeneration of a random dataset on every core the process may use, with a progress bar; one process at a time
# prepares a file (dataset_lock); SIGINT/SIGTERM stop it at once and keep nothing partial (on_signals, below).
REGEN_RECIPE = 2  # bumped whenever the recipe changes the file; a cached file of another recipe is made again
REGEN_MAX_CHUNKS = 32  # the steps are cut into this many chunks (fewer for small datasets), whatever the workers
REGEN_SEED_STRIDE = 10_007  # chunk c seeds its environment and action space with 10_007 * c
OFFLINE_ENV = "BEAR_OFFLINE"  # =1: as --offline


def is_offline(cfg) -> bool:
    return cfg.offline or os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def regen_chunks(steps: int) -> list[tuple[int, int, bool]]:
    """The recipe's chunks, (target steps, seed, run on to the end of the episode), from `steps` alone: at least
    1 000 steps (one longest episode) a chunk; every chunk but the last ends on an episode boundary."""
    n = max(1, min(REGEN_MAX_CHUNKS, steps // 1000))
    share = steps // n
    return [(share if c < n - 1 else steps - share * c, REGEN_SEED_STRIDE * c, c < n - 1) for c in range(n)]


def _random_rollout(env_id: str, steps: int, seed: int, finish_episode: bool, progress=None) -> dict[str, np.ndarray]:
    """One chunk: uniform random actions, episodes capped by the env's 1000-step limit. With finish_episode it
    runs past `steps` to the end of its episode, so that the next chunk starts a new episode as a reset would.
    progress(n) is told every 1 000 steps."""
    env = make_env(env_id)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    cap = steps + (env.spec.max_episode_steps or 1000) * finish_episode
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    out = {"observations": np.empty((cap, obs_dim), np.float32), "actions": np.empty((cap, act_dim), np.float32),
           "next_observations": np.empty((cap, obs_dim), np.float32), "rewards": np.empty(cap, np.float32),
           "terminals": np.zeros(cap, bool), "timeouts": np.zeros(cap, bool)}
    i, episode_over = 0, False
    while i < steps or (finish_episode and not episode_over):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        out["observations"][i], out["actions"][i], out["next_observations"][i] = obs, action, next_obs
        out["rewards"][i], out["terminals"][i], out["timeouts"][i] = reward, terminated, truncated and not terminated
        episode_over = terminated or truncated
        obs = env.reset()[0] if episode_over else next_obs
        i += 1
        if progress and i % 1000 == 0:
            progress(1000)
    if progress:
        progress(i % 1000)
    env.close()
    return {k: v[:i] for k, v in out.items()}


def _regen_worker(env_id: str, jobs, results, counter, parent: int) -> None:
    """A worker process: takes chunks until it gets None. Ctrl-C reaches the whole process group: the workers
    ignore it and the main process stops them; a worker whose main process is gone stops by itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def progress(n: int) -> None:
        with counter.get_lock():
            counter.value += n
        if os.getppid() != parent:
            os._exit(1)

    while (job := jobs.get()) is not None:
        chunk, steps, seed, finish = job
        results.put((chunk, _random_rollout(env_id, steps, seed, finish, progress)))


def usable_cpus() -> int:
    """The cores this process may run on (its CPU affinity, which a scheduler or taskset may restrict)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def regenerate_random(spec: DatasetSpec, steps: int, dest: Path, workers: int = 0) -> None:
    """D4RL's recipe for *-random-*: uniform random actions for `steps` steps, in regen_chunks(steps) chunks
    spread over `workers` processes (0: every usable core). The file is the same for any number of workers."""
    import multiprocessing
    import queue

    import gymnasium
    import h5py
    import mujoco
    from tqdm import tqdm

    env_id, chunks = ENVS[spec.env][0], regen_chunks(steps)
    workers = max(1, min(workers or usable_cpus(), len(chunks)))
    print(f"regenerating {steps} random steps in {len(chunks)} chunks on {workers} worker(s) ...", flush=True)
    bar = tqdm(total=steps, unit="step", unit_scale=True, desc=f"regenerating {dest.name}", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    parts, procs = {}, []
    try:
        if workers == 1:
            for c, job in enumerate(chunks):
                parts[c] = _random_rollout(env_id, *job, progress=lambda n: bar.update(min(n, steps - bar.n)))
        else:
            make_env(env_id).close()  # MuJoCo's warnings about the model, once here and not in every worker
            ctx = multiprocessing.get_context("fork")
            jobs, results, counter = ctx.SimpleQueue(), ctx.Queue(), ctx.Value("q", 0)
            for c, job in enumerate(chunks):
                jobs.put((c, *job))
            for _ in range(workers):
                jobs.put(None)
            procs = [ctx.Process(target=_regen_worker, args=(env_id, jobs, results, counter, os.getpid()), daemon=True)
                     for _ in range(workers)]
            for p in procs:
                p.start()
            while len(parts) < len(chunks):
                try:
                    c, part = results.get(timeout=0.25)
                    parts[c] = part
                except queue.Empty:
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise OSError(f"a regeneration worker died (exit code {dead[0]})") from None
                bar.update(min(counter.value, steps) - bar.n)
        bar.update(steps - bar.n)
    finally:
        for p in procs:  # on success they have exited; on an error or a signal they are stopped here
            if p.is_alive():
                p.terminate()
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        bar.close()
    recipe = {"recipe_version": REGEN_RECIPE, "policy": "uniform random actions (action_space.sample())",
              "environment": env_id, "steps": steps, "chunks": len(chunks), "chunk_steps": [j[0] for j in chunks],
              "chunk_seeds": f"{REGEN_SEED_STRIDE} * chunk index (env.reset and action_space)",
              "chunk_ends": "every chunk but the last runs on to the end of its episode; the whole is cut at `steps`",
              "gymnasium": gymnasium.__version__, "mujoco": mujoco.__version__}

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            for key in parts[0]:
                f.create_dataset(key, data=np.concatenate([parts[c][key] for c in range(len(chunks))])[:steps],
                                 compression="gzip", compression_opts=1)
            f.attrs["source"] = f"regenerated by bear-train.py: uniform random actions in gymnasium {env_id}"
            f.attrs["recipe"] = json.dumps(recipe)

    atomic_write(dest, write, path_only=True)


def regenerated_recipe(path: Path) -> int | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs.get("recipe", "{}")).get("recipe_version")
    except (OSError, ValueError):
        return None


def dataset_lock(path: Path):
    """Only one process prepares `path` (a download, a regeneration); the others wait for it."""
    return file_lock(path.with_name(path.name + ".lock"), f"preparing {path.name}", wait=True)


def find_dataset(spec: DatasetSpec, regen_steps: int = 1_000_000, offline: bool = False, regen_workers: int = 0
                 ) -> tuple[dict[str, np.ndarray], Path, str, str, list[str]]:
    """Returns (arrays, file, env, source, notes); source is one of cache, download, file, regenerated.
    A missing file is fetched under dataset_lock, by one process at a time. A cached file that fails its checks is
    never loaded: it is downloaded again, and replaced only by a new file that passes them; offline, the error
    names it. Offline, the network is never touched."""
    if not spec.url:
        return read_d4rl(spec.path, spec.env), spec.path, spec.env, "file", []
    found, _ = _from_cache(spec, regen_steps, offline)
    if found is None:
        with dataset_lock(spec.path):  # the first process fetches; the others wait, then find its file
            found, bad_cache = _from_cache(spec, regen_steps, offline)
            found = found or _fetch(spec, regen_steps, offline, regen_workers, bad_cache)
    return found


def _from_cache(spec: DatasetSpec, regen_steps: int, offline: bool):
    """(the loaded dataset or None, the cached file's check failure or None)."""
    if spec.path.exists():
        try:
            data = read_d4rl(spec.path, spec.env)
        except UserError as e:
            if offline:
                raise UserError(f"{e}; offline, it is not downloaded again: place a good copy from {spec.url} at {spec.path}")
            return None, e
        notes = []
        size = spec.path.stat().st_size
        if spec.size is not None and size != spec.size:
            notes.append(f"{spec.path} is {size} bytes, D4RL publishes {spec.size}: scores may not match published ones")
            warn(notes[-1])
        return (data, spec.path, spec.env, "cache", notes), None
    if offline and spec.kind == "random":
        regen = regenerated_path(spec, regen_steps)
        if regen.exists() and regenerated_recipe(regen) == REGEN_RECIPE:
            return _regenerated(spec, regen, "offline (--offline)"), None
    return None, None


def _regenerated(spec: DatasetSpec, regen: Path, reason: str):
    notes = [f"{reason}: training on {regen.name}, REGENERATED by D4RL's random recipe in gymnasium "
             f"{ENVS[spec.env][0]}: scores are NOT comparable with published tables"]
    warn(notes[-1], loud=True)
    return read_d4rl(regen, spec.env), regen, spec.env, "regenerated", notes


def _fetch(spec: DatasetSpec, regen_steps: int, offline: bool, regen_workers: int, bad_cache: UserError | None):
    reason = "offline (--offline)"
    if not offline:
        if bad_cache:
            warn(f"the cached file fails its checks ({bad_cache}); downloading it again")
        try:
            return download(spec.url, spec.path, spec.size, spec.env), spec.path, spec.env, "download", []
        except Interrupted as e:
            e.what = f"while downloading {spec.path.name}: the part downloaded is kept as {spec.path.name}.part, " \
                     "and the same command resumes the download"
            raise
        except (OSError, urllib.error.URLError) as e:
            reason = f"could not download {spec.url} ({getattr(e, 'reason', e)})"
        if bad_cache:
            raise UserError(f"{bad_cache}; downloading it again failed ({reason}): place a good copy from {spec.url} "
                            f"at {spec.path}")
    if spec.kind != "random":
        raise UserError(f"{reason}: download {spec.url} by hand and place it at {spec.path}")
    regen = regenerated_path(spec, regen_steps)
    if regen.exists():
        if regenerated_recipe(regen) == REGEN_RECIPE:
            return _regenerated(spec, regen, reason)
        warn(f"{regen.name} was made by another recipe or cannot be read; regenerating it")
    t0 = time.time()
    try:
        regenerate_random(spec, regen_steps, regen, regen_workers)
    except Interrupted as e:
        e.what = f"while regenerating {regen.name}: its workers were stopped and nothing partial was kept; the same " \
                 "command starts it again"
        raise
    print(f"regenerated {regen} in {time.time() - t0:.0f} s", flush=True)
    return _regenerated(spec, regen, reason)


# ============================================================================================== training data
# Where every source meets: D4RL names and files, and Minari ids, become one transitions dict on the device.
@dataclass
class LoadedData:
    transitions: dict[str, np.ndarray]
    target: EvalTarget
    file: Path
    source: str  # cache, download, file, regenerated, minari
    notes: list[str]
    kernel_env: str  # the ENVS key the kernel choice goes by ("" when none matches)


def load_data(spec: DatasetSpec, offline: bool, regen_steps: int = 1_000_000, regen_workers: int = 0,
              gamma: float = 0.99) -> LoadedData:
    """The transitions (with the data's discounted returns under gamma) and the evaluation target of a D4RL name
    or file, or of a Minari id."""
    if spec.kind == "minari":
        data, target, notes = load_minari(spec, offline, gamma)
        env = next((e for e in sorted(ENVS, key=len, reverse=True) if e in target.env_id.lower()), "")
        return LoadedData(data, target, spec.path, "minari", notes, env)
    arrays, path, env, source, notes = find_dataset(spec, regen_steps, offline, regen_workers)
    env_id = ENVS[env][0]
    target = EvalTarget(env_id, ENVS[env][3:5])
    return LoadedData(to_transitions(arrays, gamma), target, path, source, notes, env)


class ReplayBuffer:
    """All transitions on the training device, filled once; sampling never leaves the device."""

    def __init__(self, data: dict[str, np.ndarray], device: torch.device):
        self.obs = torch.as_tensor(data["observations"], device=device)  # [N, S]
        self.act = torch.as_tensor(data["actions"], device=device)  # [N, A]
        self.rew = torch.as_tensor(data["rewards"], device=device)  # [N]
        self.next_obs = torch.as_tensor(data["next_observations"], device=device)  # [N, S]
        self.done = torch.as_tensor(data["terminals"], device=device)  # [N]
        self.size = len(self.obs)

    def sample(self, batch_size: int):
        idx = torch.randint(self.size, (batch_size,), device=self.obs.device)
        return self.obs[idx], self.act[idx], self.rew[idx], self.next_obs[idx], self.done[idx]


# ============================================================================================== run bookkeeping
class Run:
    """One run around the training loop: its data on the device, the agent, the log, the evaluation pool and the
    bookkeeping, from a fresh start or from the newest checkpoint. Rows wait in `queue`, in step order, until their
    evaluation is back; a checkpoint of step t (the training state as it was at t, kept in memory) waits until the
    rows up to t are written, so that it never claims an evaluation it does not hold."""

    def __init__(self, cfg: Config, spec: DatasetSpec, loaded: LoadedData, device: torch.device, run_dir: Path,
                 resuming: bool, t_load: float):
        self.cfg, self.device, self.run_dir, self.loaded, self.dataset_name = cfg, device, run_dir, loaded, spec.name
        data, self.target = loaded.transitions, loaded.target
        name = spec.name if loaded.source == "minari" else loaded.file.name
        print(f"{name}: {len(data['observations'])} transitions, {int(data['terminals'].sum())} terminal "
              f"({loaded.source}); found and loaded in {time.time() - t_load:.1f} s; device {device}", flush=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        probe = probe_rows(data["returns_complete"], cfg.probe_size)
        self.probe_return = float(data["returns"][probe].mean()) if len(probe) else None
        self.q_bound = q_bound(data["rewards"], cfg.gamma)
        self.buffer = ReplayBuffer(data, device)
        self.probe = [x[torch.as_tensor(probe, device=device)] for x in (self.buffer.obs, self.buffer.act)]
        dims = self.buffer.obs.shape[1], self.buffer.act.shape[1]
        kernel = cfg.kernel if cfg.kernel != "auto" else "gaussian" if loaded.kernel_env == "halfcheetah" else "laplacian"
        self.agent = BEAR(cfg, *dims, kernel, device)
        self.state = {"evals": [], "elapsed": 0.0, "train_seconds": 0.0, "trained_steps": 0, "last_log": 0,
                      "csv_offset": None, "eval_wait_seconds": 0.0, "rng_restarts": [],
                      "resume_changes": [], "alpha_pinned": None}
        self.queue, self.stop, self.start = [], [], 0
        found = newest_intact_checkpoint(run_dir) if resuming else None
        if found:
            self.resume(*found)
        else:
            write_json(run_dir / "config.json", dataclasses.asdict(cfg) | {
                "dataset_name": spec.name, "env_id": self.target.env_id, "kernel_used": kernel,
                "dataset_file": str(loaded.file), "dataset_source": loaded.source, "dataset_notes": loaded.notes,
                "device": str(device), "probe_pairs": len(probe), "probe_return": self.probe_return,
                "q_bound": self.q_bound})
        self.logger = Logger(run_dir, cfg, self.state["csv_offset"], f"BEAR {spec.name} seed {cfg.seed}", self.q_bound)
        self.precision_note = bf16_slow(device) if cfg.precision == "bf16" else ""
        if self.precision_note:
            warn(f"--precision=bf16 on {device}: {self.precision_note}; training goes on in bf16 (results.json says so)")
        if hint := bf16_hint(cfg.precision, device):
            print(hint, flush=True)
        workers = eval_workers(cfg, device)
        print(f"evaluation: {f'{workers} worker process(es), {cfg.eval_threads} thread(s) each' if workers else 'in the training process'}"
              f" ({usable_cpus()} usable cores, training on {device} with {torch.get_num_threads()} thread(s))", flush=True)
        self.check_determinism(workers, found[1]["state"].get("determinism") if found else None)
        self.pool = EvalPool(workers, (self.target, cfg, dims, cfg.eval_threads), run_dir / "eval-workers.log")
        self.policies = PolicyFiles(run_dir, cfg, self.target, spec.name, dims)
        for item in self.queue:  # evaluations a signal interrupted: done again, from their snapshots
            if "snapshot" in item:
                self.pool.submit(item["step"], item["snapshot"], self.stop)
        from tqdm import tqdm

        self.tqdm = tqdm
        self.bar = tqdm(total=cfg.max_steps, initial=self.start, unit="step", dynamic_ncols=True,
                        mininterval=1 if sys.stderr.isatty() else 30)
        self.t_start = self.t_interval = time.time()
        self.elapsed_before = self.state["elapsed"]

    def resume(self, path: Path, saved: dict) -> None:
        self.agent.load_state_dict(saved["agent"])
        self.state = self.state | saved["state"]  # a key added since the checkpoint was written keeps its start value
        self.queue = self.state.pop("pending", [])
        self.start = saved["step"]
        if not set_rng_states(saved["rng"], self.device):
            saved_on = saved["rng"].get("device_type", "cpu")
            warn(f"{path.name} was saved on {saved_on}, this run resumes on {self.device}: the random streams "
                 "restart here, so the run is no longer bitwise reproducible (results.json records it)")
            torch.manual_seed(int(np.random.SeedSequence([self.cfg.seed, self.start]).generate_state(1)[0]))
            self.state["rng_restarts"].append({"step": self.start, "saved_on": saved_on, "resumed_on": str(self.device)})
        print(f"resuming {self.run_dir} from {path.name} (step {self.start})", flush=True)

    def check_determinism(self, workers: int, saved: dict | None) -> None:
        """The settings a resume may change that still change the numbers: the CPU threads of training and of
        evaluation (their float sums split otherwise) and --compile. A change is said once and recorded."""
        now = {"threads": torch.get_num_threads() if self.device.type == "cpu" else None,
               "eval_threads": self.cfg.eval_threads if workers else torch.get_num_threads(), "compile": self.cfg.compile}
        changed = {k: (saved[k], v) for k, v in now.items() if saved and k in saved and saved[k] != v}
        if changed:
            said = ", ".join(f"{DETERMINISM[k]} {was} -> {v}" for k, (was, v) in changed.items())
            warn(f"--resume with other settings than the run had ({said}): from step {self.start} on the run is no "
                 "longer bitwise the same as an uninterrupted one (results.json records it)")
            self.state["resume_changes"].append({"step": self.start} | {k: list(v) for k, v in changed.items()})
        self.state["determinism"] = now

    def __enter__(self):
        self.signals = on_signals(self.stop.append)  # a signal is noted, and the loop stops at the end of its step
        self.signals.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.close()
        self.pool.close()
        self.logger.close()
        self.signals.__exit__(*exc)

    def is_eval(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == self.cfg.max_steps

    def log(self, step: int) -> None:
        """The interval's means (read back once) and Q on the data, as a row; at an evaluation step the snapshot
        goes to the pool and the row waits for it."""
        agent, state = self.agent, self.state
        sums, first_bad = agent.metric_sum.tolist(), agent.first_nonfinite.tolist()  # the one read-back
        agent.metric_sum.zero_()
        if max(first_bad) >= 0:
            i = min((b, j) for j, b in enumerate(first_bad) if b >= 0)[1]
            raise Diverged(f"{LOSSES[i]} became non-finite at step {first_bad[i]}; the newest checkpoint in "
                           f"{self.run_dir} is from before it (try a lower learning rate or another seed)")
        now = time.time()
        rate = (step - state["last_log"]) / max(now - self.t_interval, 1e-9)
        state["train_seconds"] += now - self.t_interval
        state["trained_steps"] += step - state["last_log"]
        values = {"step": step} | {k: v / (step - state["last_log"]) for k, v in zip(METRICS, sums)}
        if values["alpha_at_clamp"] == 1 and state["last_log"] >= self.cfg.warmup_steps and not state["alpha_pinned"]:
            state["alpha_pinned"] = {"step": step, "mmd": values["mmd"], "epsilon": self.cfg.epsilon}
            tqdm_write(pinned_line(self.cfg, values["mmd"], state["last_log"], step))
        if self.probe_return is not None:
            with matmul_precision(self.cfg.precision, self.device):
                values |= q_vs_return(agent.critics, *self.probe, self.probe_return)
        state["last_log"] = step
        item = {"step": step, "values": values, "rate": rate}
        self.queue.append(item)
        if self.is_eval(step):
            item["snapshot"] = eval_snapshot(agent)
            self.pool.submit(step, item["snapshot"], self.stop)
        self.t_interval = time.time()

    def bookkeeping(self) -> dict:
        return self.state | {"elapsed": self.elapsed_before + time.time() - self.t_start,
                             "eval_wait_seconds": self.pool.waited}

    def keep_checkpoint(self, step: int) -> None:
        """The training state as it is now, kept in memory until the rows up to this step are written."""
        state = {k: v for k, v in self.bookkeeping().items() if k not in ("evals", "csv_offset")}
        self.queue.append({"step": step, "checkpoint": {"step": step, "agent": cpu_copy(self.agent.state_dict()),
                                                        "rng": rng_states(self.device), "state": state}})

    def flush(self, wait: bool = False) -> None:
        """Writes every row whose evaluation is back, and every checkpoint whose rows are all written, in step order."""
        while self.queue:
            item = self.queue[0]
            if "snapshot" in item:
                returns = self.pool.result(item["step"], wait, self.stop)
                if returns is None:
                    return
                self.pool.lengths.pop(item["step"], None)
                self.write_evaluation(item["step"], item["values"], returns, item["snapshot"])
            if "values" in item:
                self.logger.write(item["step"], item["values"], item["rate"])
            if "checkpoint" in item:
                checkpoint = item["checkpoint"]
                checkpoint["state"] |= {"evals": list(self.state["evals"]), "csv_offset": self.logger.offset()}
                save_checkpoint(self.run_dir, checkpoint | {"config": dataclasses.asdict(self.cfg)})
            self.queue.pop(0)

    def write_evaluation(self, step: int, values: dict, returns: np.ndarray, snapshot: dict) -> None:
        ret = float(returns.mean())
        score = normalized_score(ret, self.target.score_range)
        best = max((s if score is not None else r for _, r, s in self.state["evals"]), default=-math.inf)
        self.state["evals"].append((step, ret, score))
        program = self.policies.exported(snapshot)  # once for both files
        self.policies.write("final", snapshot, step, ret, score, program)
        if (score if score is not None else ret) > best:  # the first of equal bests is kept, as max() takes it
            self.policies.write("best", snapshot, step, ret, score, program)
        values |= {"eval_return": ret} | ({"eval_normalized_score": score} if score is not None else {})
        shown = f"normalised score {score:6.1f}" if score is not None else "(no reference scores)"
        self.tqdm.write(f"step {step:>8}  return {ret:8.1f}  {shown}  alpha {values['alpha']:.3g}"
                        f"  mmd {values['mmd']:.3f}  critic loss {values['critic_loss']:.3g}")
        self.bar.set_postfix(score=f"{score if score is not None else ret:.1f}")

    def stop_at(self, step: int) -> None:
        """After a signal: a checkpoint of the training state now that also holds the rows still waiting for their
        evaluations, with those evaluations' snapshots (--resume does them again); then the documented exit."""
        pending = [{k: v for k, v in item.items() if k != "checkpoint"} for item in self.queue if "values" in item]
        save_checkpoint(self.run_dir, {"step": step, "agent": self.agent.state_dict(), "rng": rng_states(self.device),
                                       "state": self.bookkeeping() | {"csv_offset": self.logger.offset(),
                                                                      "pending": pending},
                                       "config": dataclasses.asdict(self.cfg)})
        print(f"\nstopped by signal at step {step}; checkpoint saved in {self.run_dir}; continue with the same "
              "command plus --resume", file=sys.stderr, flush=True)
        raise Stop(EXIT_PREEMPTED if self.stop[0] == signal.SIGTERM else EXIT_INTERRUPTED)

    def progress(self, step: int) -> None:
        if step % 100 == 0 or step == self.cfg.max_steps:
            self.bar.update(step - self.bar.n)

    def results(self) -> dict:
        t = time.time()
        self.flush(wait=True)  # the final evaluation
        if self.stop:
            self.stop_at(self.cfg.max_steps)
        self.bar.close()
        final_wait, state, loaded = time.time() - t, self.bookkeeping(), self.loaded
        _, returns, scores = zip(*state["evals"])
        results = {
            "dataset": self.dataset_name,
            "env_id": self.target.env_id, "seed": self.cfg.seed, "steps": self.cfg.max_steps,
            "final_normalized_score": scores[-1], "best_normalized_score": None if scores[-1] is None else max(scores),
            "final_return": returns[-1], "best_return": max(returns),
            "wall_clock_seconds": round(state["elapsed"], 2),
            "train_steps_per_second": round(state["trained_steps"] / max(state["train_seconds"], 1e-9), 2),
            "precision": self.cfg.precision, "precision_note": self.precision_note,
            "eval_workers": self.pool.n, "eval_wait_seconds": round(max(state["eval_wait_seconds"] - final_wait, 0.0), 2),
            "final_eval_wait_seconds": round(final_wait, 2),
            "device": str(self.device), "dataset_source": loaded.source, "dataset_file": str(loaded.file),
            "dataset_notes": loaded.notes, "comparable_with_published": loaded.source in ("cache", "download") and not loaded.notes,
            "probe_pairs": len(self.probe[0]), "probe_return": self.probe_return, "q_bound": self.q_bound,
            "rng_restarts": state["rng_restarts"], "resume_changes": state["resume_changes"],
            "alpha_pinned": state["alpha_pinned"],
            "run_dir": str(self.run_dir),
        }
        write_json(self.run_dir / "results.json", results)
        print(json.dumps({k: results[k] for k in ("final_normalized_score", "best_normalized_score", "steps",
                                                 "train_steps_per_second", "dataset_source")}), flush=True)
        return results


def cpu_copy(obj):
    """A deep copy with every tensor cloned onto the CPU: a state dict kept while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def pick_device(gpu: int) -> torch.device:
    """The training device, made torch's current CUDA device: whatever uses the current device (stream queries, the
    optimisers' checks, a stray .cuda()) then stays on it instead of opening a context on GPU 0. Called after the
    data are prepared: regeneration forks its workers before CUDA is first touched."""
    if gpu < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        warn(f"--gpu={gpu} asked for CUDA, but CUDA is not available here: training on the CPU")
        return torch.device("cpu")
    if gpu >= torch.cuda.device_count():
        raise UserError(f"--gpu={gpu} but this machine has {torch.cuda.device_count()} CUDA device(s); use 0.."
                        f"{torch.cuda.device_count() - 1}, or -1 for the CPU")
    device = torch.device("cuda", gpu)
    torch.cuda.set_device(device)
    return device


def check_log_dir(folder: str) -> Path:
    log_dir = Path(folder).expanduser()
    if log_dir.exists() and not log_dir.is_dir():
        raise UserError(f"--log-dir={log_dir} is a file, not a folder; pass a folder")
    existing = next(p for p in [log_dir.absolute(), *log_dir.absolute().parents] if p.exists())
    try:  # os.access says yes to root even on read-only file systems: try it
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise UserError(f"--log-dir={log_dir} is not writable ({existing}: {e.strerror}); pass a folder you can write to")
    return log_dir


def run_folder_name(dataset_name: str, seed: int, setting: str = "") -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', dataset_name)}__{setting + '__' if setting else ''}seed{seed}"


def grid_label(cfg: Config, keys: list[str]) -> str:
    """The settings that vary in a grid, as a run folder's name carries them: epsilon=0.05,kernel=gaussian."""
    return ",".join(f"{k.replace('_', '-')}={getattr(cfg, k)}" for k in keys)


def changed_setting(saved: dict, cfg: Config) -> str | None:
    """The first setting of a run's config.json that cfg does not share (those that may change on --resume aside),
    as "--flag=saved, not new"; None when cfg continues that run."""
    defaults = dataclasses.asdict(Config())  # a setting the run predates has its default
    for k, v in dataclasses.asdict(cfg).items():
        if k not in RESUMABLE and saved.get(k, defaults[k]) != v:
            return f"--{k.replace('_', '-')}={saved.get(k, defaults[k])}, not {v}"
    return None


@contextlib.contextmanager
def claimed(run_dir: Path, resuming: bool):
    """The run's folder, held (file_lock) for the run's whole life. A new run makes its folder atomically, moving to
    the next free name (...-2, -3) when another run took it first; a resumed run stops (exit 2) while another
    process trains the same folder (a retry or a requeue while the first still lives). A new run that fails
    before it wrote anything leaves no empty folder."""
    base, i = run_dir, 1
    while not resuming:
        try:
            run_dir.mkdir(parents=True)
            break
        except FileExistsError:
            i += 1
            run_dir = base.with_name(f"{base.name}-{i}")
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with file_lock(run_dir / ".lock", f"training {run_dir}", wait=False):
            yield run_dir
    except Busy as e:
        raise UserError(f"{run_dir} is in use: {e}; wait for it to end, or stop it first") from None
    except Exception as e:
        e.crash_folder = run_dir  # main writes the traceback there
        raise
    finally:
        if not resuming and not any(run_dir.iterdir()):
            run_dir.rmdir()


def prepare_run_dir(cfg: Config, dataset_name: str) -> tuple[Path, bool]:
    """(run folder, whether it resumes). Checks the log folder before anything is written."""
    log_dir = check_log_dir(cfg.log_dir)
    base = log_dir / (cfg.run_name or run_folder_name(dataset_name, cfg.seed))
    if cfg.resume and base.is_dir() and (base / "config.json").exists():
        saved = read_run_json(base / "config.json", "it holds the run's settings: put back a copy, or start the run "
                                                    "again without --resume")
        changed = changed_setting(saved, cfg)
        if changed:
            raise UserError(f"--resume: {base} was started with {changed}; resume with the run's own settings")
        return base, True
    return base, False  # claimed() moves it to the next free name: never overwrite another run


DETERMINISM = {"threads": "training's torch threads", "eval_threads": "evaluation's torch threads",
               "compile": "--compile"}
RESUMABLE = {"max_steps", "resume", "compile", "gpu", "wandb", "log_dir", "summarize", "offline", "regen_workers",
             "threads", "eval_workers", "eval_threads", "checkpoint_every", "ray_address", "cpus_per_run", "gpus_per_run",
             "max_retries", "evaluate", "policy", "video", "video_episodes"}  # may change on --resume


def rng_states(device: torch.device) -> dict:
    """Python's, numpy's and torch's CPU random states, and the training device's CUDA state (only its own: a
    resume may see other GPUs, or fewer). Plain values and tensors only, so that a checkpoint loads with
    weights_only=True: numpy's state is its parts, the key as an int64 tensor."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(), "device_type": device.type,
              "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device) -> bool:
    """Restores what rng_states saved; the CUDA state goes into the training device. False when the run was saved
    on another device type: its draws came from another generator, and the caller restarts the streams."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])  # first: it refuses a state that has left the CPU
    saved = states["numpy"]
    if isinstance(saved, dict):
        saved = (saved["kind"], saved["key"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"], saved["gauss"])
    np.random.set_state(saved)  # a tuple in a checkpoint of an earlier release
    if states.get("device_type", "cpu") != device.type:
        return False
    if device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    return True


# ---------------------------------------------------------------------------------------------- checkpoints
# checkpoint-<step>.pt is written to a temporary file, fsynced and renamed into place; then its manifest
# checkpoint-<step>.json (size and sha256) the same way. --resume (and so a sweep's retry) takes the newest
# checkpoint that matches its manifest and loads; a damaged one is renamed to *.damaged, never deleted, and the run
# falls back to the one before. A checkpoint without a manifest (written by an earlier release) is taken if it
# loads. Nothing is unpickled but tensors and plain values (weights_only=True).
CHECKPOINT_KEYS = ("step", "agent", "rng", "state")


class Refused(UserError):
    """A file that would run code when loaded."""


def safe_load(path: Path, what: str) -> dict:
    """torch.load with weights_only=True: tensors and plain values, nothing that runs code. Refused: one line."""
    import numpy._core.multiarray as multiarray  # the types of an earlier release's numpy random state, exactly

    allowed = [multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)|global '?([\w.]+)", str(e))
        name = next((g for g in found.groups() if g), "") if found else ""
        raise Refused(f"{path} was not loaded: it asks to run code when it is unpickled{f' ({name})' if name else ''}, "
                      f"which {what} never does; use only files this script wrote, or ones you trust and re-save") from None


def load_checkpoint(path: Path) -> dict:
    """Onto the CPU, whatever the training device: each piece then goes where it belongs (load_state_dict copies
    into the device's tensors; random states must stay CPU byte tensors)."""
    return safe_load(path, "a checkpoint of this script")


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("checkpoint-*.pt"))


def manifest_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


def sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(run_dir: Path, state: dict, keep: int = 2) -> Path:
    path = run_dir / f"checkpoint-{state['step']:09d}.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    try:  # committed only once its manifest is in: a checkpoint whose manifest cannot be written is not kept
        write_json(manifest_path(path), {"file": path.name, "step": state["step"], "bytes": path.stat().st_size,
                                         "sha256": sha256(path)})
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    for old in checkpoints(run_dir)[:-keep]:
        old.unlink()
        manifest_path(old).unlink(missing_ok=True)
    return path


def checkpoint_damage(path: Path) -> tuple[str, dict | None]:
    """('', the checkpoint) when it matches its manifest and loads; (what is wrong, None) otherwise."""
    manifest = manifest_path(path)
    if manifest.exists():
        try:
            entry = json.loads(manifest.read_text())
            size, digest = int(entry["bytes"]), str(entry["sha256"])
        except (OSError, ValueError, TypeError, KeyError) as e:
            return f"its manifest {manifest.name} is unreadable ({type(e).__name__})", None
        if path.stat().st_size != size:
            return f"{path.stat().st_size} bytes where its manifest says {size}", None
        if sha256(path) != digest:
            return f"its sha256 does not match {manifest.name}", None
    try:
        saved = load_checkpoint(path)
    except Refused:
        raise
    except Exception as e:
        return f"it does not load: {first_line(e)}", None
    if not isinstance(saved, dict) or any(k not in saved for k in CHECKPOINT_KEYS):
        return "it is not a checkpoint of this script", None
    return "", saved


def set_aside(path: Path) -> Path:
    """path -> path.damaged (or .damaged-2, ...): kept for a post-mortem, out of --resume's way."""
    aside, i = path.with_name(path.name + ".damaged"), 1
    while aside.exists():
        i += 1
        aside = path.with_name(f"{path.name}.damaged-{i}")
    os.replace(path, aside)
    return aside


def newest_intact_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that matches its manifest and loads, with what it holds; the damaged ones after it are
    set aside, each with a one-line warning. None when there is none at all; exit 2 when none is intact."""
    damaged = []
    for path in reversed(checkpoints(run_dir)):
        why, saved = checkpoint_damage(path)
        if not why:
            for name, aside, reason in damaged:
                warn(f"{name} is damaged ({reason}); renamed to {aside}; the run falls back to step {saved['step']} "
                     f"({path.name})")
            return path, saved
        aside = set_aside(path)
        if manifest_path(path).exists():
            set_aside(manifest_path(path))
        damaged.append((path.name, aside.name, why))
    if damaged:
        raise UserError(f"no intact checkpoint in {run_dir}: {'; '.join(f'{n} ({why})' for n, _, why in damaged)}; "
                        f"each was renamed to *.damaged; start the run again without --resume (or with another "
                        f"--run-name)")
    return None


def read_run_json(path: Path, what: str) -> dict:
    """A JSON file this script wrote into a run folder, read back as input: damage is one line, exit 2."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is damaged ({first_line(e)}); "
                        f"{what}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is damaged (not a JSON object); {what}")
    return value


def new_file_mode() -> int:
    """The mode a plain open() gives a new file under the current umask (0644 under umask 022)."""
    try:
        with open("/proc/self/status") as f:  # read without setting: os.umask() would change it for every thread
            mask = int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write, path_only: bool = False) -> None:
    """write(file), or write(path) for writers that open the file themselves, into a temporary file beside path;
    fsync; rename: path is never half-written. The file gets the mode any new file gets under the umask
    (mkstemp's own is 0600, which would hide results and datasets from colleagues)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(path) from e
        raise
    try:
        os.fchmod(fd, new_file_mode())
        if path_only:
            os.close(fd)
            write(Path(tmp))
            fd = os.open(tmp, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        else:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:  # torch.save wraps the OSError of a full disk in a RuntimeError: look down the chain
        cause = e
        while cause is not None and not is_disk_full(cause):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise DiskFull(path) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))


@contextlib.contextmanager
def file_lock(lock: Path, doing: str, wait: bool):
    """The one lock helper: an flock on the file `lock`, which names its holder's process (and host). wait=True
    waits for the holder, saying so once; wait=False raises Busy naming it. The kernel drops an flock when its
    holder dies, so a killed process never leaves a lock that blocks; the holder removes the file on its way out,
    while it still holds it (a waiter that then locks the removed file tries again). Not filelock (4.3.1, installed
    with torch): its FileLock leaves the lock file behind on release and writes nothing into it, so a waiter could
    not name the holder; both are tested behaviours here."""
    import fcntl
    import socket

    lock.parent.mkdir(parents=True, exist_ok=True)
    said = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, _, host = os.pread(fd, 300, 0).decode(errors="replace").strip().partition("\n")
                holder = f"process {pid or '?'}" + (f" on {host}" if host and host != socket.gethostname() else "")
                if not wait:
                    raise Busy(holder, doing) from None
                if not said:
                    print(f"waiting for {holder}, which is {doing} ...", flush=True)
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if lock.exists() and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


class Busy(UserError):
    def __init__(self, holder: str, doing: str):
        super().__init__(f"{holder} is {doing}")
        self.holder = holder


# ---------------------------------------------------------------------------------------------- logs and plots
CSV_FIELDS = ["step"] + METRICS + PROBE_FIELDS + ["eval_return", "eval_normalized_score"]


def pinned_line(cfg: Config, mmd_value: float, start: int, step: int) -> str:
    """The once-per-run line for a support constraint that cannot be met: alpha held at its upper clamp for a whole
    logging interval after warm-up, so the actor's loss is alpha (MMD - eps) and its Q term about 1e-4 of it."""
    return (f"note: α is pinned at e^{cfg.log_alpha_max:g}: the MMD ({mmd_value:.3f}) cannot reach ε "
            f"({cfg.epsilon:g}); the actor ignores Q (steps {start + 1}-{step}), as in the reference's published runs. "
            "To let Q in: an ε above the MMD (--epsilon), more --mmd-samples (a lower floor) or the other --kernel "
            "(docs/differences.md)")


def pinned_step(rows: list[dict], warmup: int) -> int | None:
    """The first logged step ending an interval after warm-up with alpha at its clamp throughout (the rule above)."""
    for before, row in zip([{"step": 0}] + rows, rows):
        if int(before["step"]) >= warmup and row.get("alpha_at_clamp") not in (None, "") and \
                float(row["alpha_at_clamp"]) == 1:
            return int(row["step"])
    return None


def tag_group(key: str) -> str:
    return "losses" if key in LOSSES else "eval" if key.startswith("eval") else \
        "charts/q_vs_return" if key in PROBE_FIELDS else "charts"


PLOT_EVERY = 300  # seconds: curves.png is redrawn at an evaluation at most this often (about 1 s on the training
# process each time: 0.3 % of a run at this rate, 1.7 % at once a minute), and at the end if rows came since


class Logger:
    """metrics.csv (the record), TensorBoard events, the curves PNG and optional Weights & Biases."""

    def __init__(self, run_dir: Path, cfg: Config, csv_offset: int | None, title: str, q_bound: float | None = None):
        self.run_dir, self.title, self.q_bound, self.plotted = run_dir, title, q_bound, 0.0
        self.plotted_size = -1  # metrics.csv's size when curves.png was last drawn
        path = run_dir / "metrics.csv"
        if csv_offset is None:
            path.write_text(",".join(CSV_FIELDS) + "\n")
        else:
            check_metrics(path, csv_offset)
            with open(path, "r+b") as f:  # drop rows written after the checkpoint (a row cut by a kill among them)
                f.truncate(csv_offset)
        self.csv = open(path, "a", newline="")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir), purge_step=None if csv_offset is None else self._last_step() + 1)
            table = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(cfg).items())
            self.tb.add_text("hyperparameters", "|name|value|\n|-|-|\n" + table)
        except ImportError:
            warn("tensorboard is not installed: no TensorBoard events (pip install -r requirements.txt)")
        self.wandb = None
        if cfg.wandb:
            import wandb

            self.wandb = wandb.init(project="bear", name=run_dir.name, group=run_dir.parent.name,  # a sweep's --log-dir
                                    dir=str(run_dir), config=dataclasses.asdict(cfg),
                                    resume="allow", id=re.sub(r"[^\w-]", "_", str(run_dir.resolve()))[-64:])

    def rows(self) -> list[dict]:
        with open(self.run_dir / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))

    def _last_step(self) -> int:
        rows = self.rows()
        return int(rows[-1]["step"]) if rows else 0

    def write(self, step: int, values: dict, steps_per_second: float) -> None:
        try:  # a row cut here by a full disk or a kill is dropped by --resume
            self.csv.write(",".join(f"{values[k]:.9g}" if k in values else "" for k in CSV_FIELDS) + "\n")
            self.csv.flush()
        except OSError as e:
            if is_disk_full(e):
                raise DiskFull(self.run_dir / "metrics.csv") from e
            raise
        scalars = {f"{tag_group(k)}/{k}": v for k, v in values.items() if k != "step"}
        scalars["charts/steps_per_second"] = steps_per_second
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)
        if "eval_return" in values:
            if self.tb:
                self.tb.flush()
            if time.time() - self.plotted > PLOT_EVERY:
                self.plot()

    def plot(self) -> None:
        size = os.path.getsize(self.run_dir / "metrics.csv")
        plot_curves(self.rows(), self.run_dir / "curves.png", self.title, self.q_bound)
        self.plotted, self.plotted_size = time.time(), size

    def offset(self) -> int:
        return self.csv.tell()

    def close(self) -> None:
        self.csv.close()
        if os.path.getsize(self.run_dir / "metrics.csv") != self.plotted_size or not (self.run_dir / "curves.png").exists():
            self.plot()  # not when the last evaluation's plot already shows every row
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def check_metrics(path: Path, offset: int) -> None:
    """Before --resume cuts metrics.csv back to the checkpoint's end of it: those first `offset` bytes must be the
    header and whole rows of numbers, as written; what follows them is written again."""
    fix = "restore it from a copy, or start the run again without --resume"
    try:
        with open(path, "rb") as f:
            head = f.read(offset)
    except FileNotFoundError:
        raise UserError(f"{path} is missing, but the checkpoint holds {offset} bytes of it; {fix}") from None
    lines = head.decode(errors="replace").split("\n")
    if len(head) < offset or lines[-1] != "":
        raise UserError(f"{path} is damaged: shorter than the {offset} bytes the checkpoint holds, or cut there; {fix}")
    if lines[0] == ",".join(f for f in CSV_FIELDS if f != "alpha_at_clamp"):
        raise UserError(f"{path} was written by an older bear-train.py, before its alpha_at_clamp column: resume the "
                        "run with that version, or start it again without --resume")
    if lines[0] != ",".join(CSV_FIELDS):
        raise UserError(f"{path} is damaged: its header is not metrics.csv's; {fix}")
    for i, line in enumerate(lines[1:-1], 2):
        fields = line.split(",")
        try:
            ok = len(fields) == len(CSV_FIELDS) and fields[0] != "" and [float(x) for x in fields if x] is not None
        except ValueError:
            ok = False
        if not ok:
            raise UserError(f"{path} is damaged at line {i}; {fix}")


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


def plot_q_vs_return(ax, steps, q, band, data_return: float | None, bound: float | None,
                     label: str = "critics' Q on the data") -> None:
    """Q on the data's own pairs against the data's Monte-Carlo return of those pairs and the bound r_max/(1-gamma)."""
    if len(steps):
        ax.plot(steps, q, label=label)
        ax.fill_between(steps, *band, alpha=0.25)
    if data_return is not None:
        ax.axhline(data_return, color="tab:green", label="data's MC return")
    if bound is not None:
        ax.axhline(bound, color="tab:red", linestyle="--", label="r_max / (1 - gamma)")
    ax.set_title("Q against the data's return")
    ax.legend(fontsize=7, loc="upper left")


def plot_curves(rows: list[dict], path: Path, title: str, bound: float | None = None) -> None:
    """Learning curves of one run: normalised score, alpha, mean MMD, critic loss, and the critics' Q on the data
    (the ensemble's mean, its min-max band) against the data's return, against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(22, 3.6))
    panels = [("eval_normalized_score", "normalised score"), ("alpha", "alpha"), ("mmd", "mean MMD"),
              ("critic_loss", "critic loss")]
    for ax, (key, label) in zip(axes, panels):
        if points := series(rows, key):
            ax.plot(*zip(*points), marker="o" if key.startswith("eval") else None, markersize=3)
        ax.set_title(label)
    axes[1].set_yscale("log")
    q = series(rows, "q_data")
    band = [[v for _, v in series(rows, k)] for k in ("q_data_min", "q_data_max")]
    data_return = series(rows, "return_data")
    plot_q_vs_return(axes[4], [t for t, _ in q], [v for _, v in q], band, data_return[0][1] if data_return else None,
                     bound)
    for ax in axes:
        ax.set_xlabel("gradient steps")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.035, right=0.99, bottom=0.15, top=0.82, wspace=0.25)  # fixed: tight_layout took 0.4 s
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)


# ============================================================================================== after training
# Every run folder keeps two policies: policy-final.pt (the latest evaluation's) and policy-best.pt (the best
# one's), each written atomically once its evaluation is in. A policy file is a plain torch.save dict that loads
# with weights_only=True: the actor's and the critics' weights, what acting needs (dims, widths, eval_candidates,
# the environment and its action scaling), the step and its score, and "program", the evaluation rule (Policy) as
# a torch.export program in bytes, which needs nothing but torch:
#     saved = torch.load(path, weights_only=True)
#     policy = torch.export.load(io.BytesIO(saved["program"])).module()
#     actions = policy(obs, torch.randn(len(obs), saved["settings"]["eval_candidates"], saved["settings"]["action_dim"]))
# --evaluate plays a policy on many episodes on the evaluation workers, in blocks of the run's eval_episodes: block
# 0 is the run's own evaluation of that step, so --evaluate with the run's seed and episodes gives its return.
POLICY_FORMAT = "bear-policy/1"
POLICY_KEYS = ("format", "step", "return", "env_id", "target", "settings", "actor", "critics", "program")


class PolicyFiles:
    def __init__(self, run_dir: Path, cfg: Config, target: EvalTarget, dataset: str, dims: tuple[int, int]):
        low_high = None if target.action_range is None else [np.asarray(x).tolist() for x in target.action_range]
        self.run_dir, self.dims, self.program = run_dir, dims, None
        self.about = {"format": POLICY_FORMAT, "dataset": dataset, "env_id": target.env_id,
                      "target": {"env_id": target.env_id, "score_range": target.score_range, "action_range": low_high,
                                 "minari_data": target.minari_data},
                      "settings": {"state_dim": dims[0], "action_dim": dims[1], "actor_hidden": cfg.actor_hidden,
                                   "critic_hidden": cfg.critic_hidden, "num_critics": cfg.num_critics,
                                   "eval_candidates": cfg.eval_candidates, "eval_episodes": cfg.eval_episodes,
                                   "precision": cfg.precision, "seed": cfg.seed}}

    def write(self, which: str, snapshot: dict, step: int, ret: float, score: float | None, program: bytes) -> None:
        """policy-{which}.pt; program: exported(snapshot)."""
        content = self.about | {"policy": which, "step": step, "return": ret, "normalized_score": score,
                                "actor": snapshot["actor"], "critics": snapshot["critics"], "program": program}
        atomic_write(self.run_dir / f"policy-{which}.pt", lambda f: torch.save(content, f))

    def exported(self, snapshot: dict) -> bytes:
        """Policy with the snapshot's weights as torch.export bytes. Traced once per run (about a second); each
        file after that only swaps the weights in."""
        import io

        if self.program is None:
            s, a = self.dims
            settings = self.about["settings"]
            with torch.random.fork_rng(devices=[]):
                module = Policy(Actor(s, a, settings["actor_hidden"]),
                                QEnsemble(s, a, settings["critic_hidden"], settings["num_critics"])).requires_grad_(False)
            batch = torch.export.Dim("batch")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.program = torch.export.export(module, (torch.zeros(2, s), torch.zeros(2, settings["eval_candidates"], a)),
                                                   dynamic_shapes=({0: batch}, {0: batch}))
        with torch.no_grad():
            for name, weights in snapshot.items():
                for key, value in weights.items():
                    self.program.state_dict[f"{name}.{key}"].copy_(value)
        buffer = io.BytesIO()
        torch.export.save(self.program, buffer)
        return buffer.getvalue()


def load_policy(path: Path) -> dict:
    """A policy file, checked as input: refused if it would run code, one line if it is damaged."""
    try:
        saved = safe_load(path, "a policy file of this script")
    except Refused:
        raise
    except Exception as e:
        saved, why = None, first_line(e)
    else:
        why = "not a policy file of this script" if not isinstance(saved, dict) or \
            saved.get("format") != POLICY_FORMAT or any(k not in saved for k in POLICY_KEYS) else ""
    if why:
        raise UserError(f"{path} is damaged ({why}); it was written by training: copy it back from where the run "
                        f"was made, or --resume the run to write it again")
    return saved


def policy_target(saved: dict) -> EvalTarget:
    target = saved["target"]
    low_high = target["action_range"]
    obs_space = None
    if target["minari_data"]:  # a Dict observation is flattened as in the data: its space comes from the dataset
        import gymnasium
        import minari

        space = minari.MinariDataset(target["minari_data"]).observation_space
        obs_space = space if isinstance(space, gymnasium.spaces.Dict) else None
    return EvalTarget(target["env_id"], None if target["score_range"] is None else tuple(target["score_range"]),
                      obs_space, None if low_high is None else tuple(np.asarray(x, np.float32) for x in low_high),
                      target["minari_data"])


def evaluate(cfg: Config) -> dict:
    """--evaluate=RUN_DIR: the run's final or best policy on cfg.eval_episodes episodes, on the evaluation workers;
    one line, and evaluation-<policy>-<N>ep-seed<seed>.json in the run folder. Training's files are only read."""
    validate(cfg)
    run_dir = Path(cfg.evaluate).expanduser()
    if not run_dir.is_dir():
        raise UserError(f"--evaluate={cfg.evaluate}: no such folder; pass a run folder (runs/<dataset>__seed<seed>)")
    path = run_dir / f"policy-{cfg.policy}.pt"
    if not path.exists():
        raise UserError(f"{run_dir} holds no {path.name}: it is not a run folder, or its run has not finished an "
                        "evaluation yet; pass a run folder whose run has evaluated at least once")
    saved = load_policy(path)
    config = read_run_json(run_dir / "config.json", "put back a copy") if (run_dir / "config.json").exists() else {}
    if config.get("env_id", saved["env_id"]) != saved["env_id"]:
        raise UserError(f"{path} is a policy for {saved['env_id']}, but {run_dir} trained on {config['env_id']}: it "
                        "comes from another run folder; put that run's own policy file back")
    settings = saved["settings"]
    seed = settings["seed"] if cfg.seed is None else cfg.seed
    if cfg.video:
        choose_gl()
    target = policy_target(saved)
    dims = settings["state_dim"], settings["action_dim"]
    env = target.make()
    shapes = target.observe(env.reset(seed=0)[0]).shape, env.action_space.shape
    env.close()
    if shapes != ((dims[0],), (dims[1],)):
        raise UserError(f"{path} acts on {dims[0]} observations and {dims[1]} actions, but {target.env_id} has "
                        f"{shapes[0]} and {shapes[1]}: it is a policy of another environment")
    block = settings["eval_episodes"]
    run_cfg = Config(**{k: settings[k] for k in ("actor_hidden", "critic_hidden", "num_critics", "eval_candidates",
                                                 "precision")}, seed=seed, eval_episodes=block)
    snapshot = {"actor": saved["actor"], "critics": saved["critics"]}
    if cfg.video and cfg.video_episodes > min(block, cfg.eval_episodes):
        raise UserError(f"--video-episodes={cfg.video_episodes} is more than the first block of "
                        f"{min(block, cfg.eval_episodes)} episodes (the run's --eval-episodes); ask for fewer")
    t = time.time()
    workers = cfg.eval_workers if cfg.eval_workers >= 0 else usable_cpus()
    blocks = [(b, min(block, cfg.eval_episodes - b * block)) for b in range(math.ceil(cfg.eval_episodes / block))]
    with tempfile.TemporaryDirectory() as tmp:
        pool = EvalPool(min(workers, len(blocks)), (target, run_cfg, dims, cfg.eval_threads), Path(tmp) / "workers.log")
        try:
            for b, count in blocks:
                pool.submit(b, snapshot, [], {"step": saved["step"], "block": b, "count": count})
            returns, lengths = [], []
            for b, _ in blocks:
                returns.append(pool.result(b, wait=True))
                lengths.append(pool.lengths.pop(b))
        except EvalFailed as e:
            raise UserError(f"--evaluate: {str(e).split(' (the workers')[0]}: {Path(tmp, 'workers.log').read_text()[-300:]}") from None
        finally:
            pool.close()
    returns, lengths = np.concatenate(returns), np.concatenate(lengths)
    scores = [normalized_score(r, target.score_range) for r in returns]
    has_score = target.score_range is not None
    result = {"run_dir": str(run_dir), "policy": cfg.policy, "policy_file": path.name, "step": saved["step"],
              "env_id": target.env_id, "seed": seed, "episodes": len(returns), "block_size": block,
              "eval_candidates": run_cfg.eval_candidates, "workers": pool.n, "eval_threads": cfg.eval_threads,
              "return_mean": float(returns.mean()), "return_std": float(returns.std()),
              "normalized_score_mean": float(np.mean(scores)) if has_score else None,
              "normalized_score_std": float(np.std(scores)) if has_score else None,
              "training_evaluation_return": saved["return"], "wall_clock_seconds": round(time.time() - t, 2),
              "returns": returns.tolist(), "lengths": lengths.tolist(),
              "normalized_scores": scores if has_score else None}
    if cfg.video:
        result["videos"] = record_videos(run_dir, cfg, target, run_cfg, dims, snapshot, saved["step"])
    name = f"evaluation-{cfg.policy}-{len(returns)}ep-seed{seed}.json"
    write_json(run_dir / name, result)
    shown = f", normalised score {result['normalized_score_mean']:.1f} ± {result['normalized_score_std']:.1f}" \
        if has_score else " (no reference scores)"
    print(f"{cfg.policy} policy of {run_dir} (step {saved['step']}): return {result['return_mean']:.1f} ± "
          f"{result['return_std']:.1f}{shown} over {len(returns)} episodes, seed {seed} ({run_dir / name})", flush=True)
    return result


# ---------------------------------------------------------------------------------------------- videos
GL_PACKAGES = {"egl": "libegl1 libgl1-mesa-dri", "osmesa": "libosmesa6", "glfw": "libglfw3"}  # Debian and Ubuntu


def choose_gl() -> str:
    """MuJoCo's OpenGL backend for off-screen frames: MUJOCO_GL when set and not empty (MuJoCo reads empty as unset),
    else EGL without a display and GLFW with one. Set before mujoco is first imported; checked by rendering one frame."""
    import gc

    gl = os.environ["MUJOCO_GL"] = os.environ.get("MUJOCO_GL") or ("glfw" if os.environ.get("DISPLAY") else "egl")
    why, hook, sys.unraisablehook = "", sys.unraisablehook, lambda unraisable: None  # a half-made viewer's __del__
    try:
        try:
            env = make_env("InvertedPendulum-v5", render_mode="rgb_array", width=16, height=16)
            env.reset(seed=0)
            env.render()
            env.close()
        except Exception as e:  # no libEGL/libOSMesa: AttributeError or ImportError; no display: mujoco.FatalError
            why = first_line(e)
        env = None
        gc.collect()
    finally:
        sys.unraisablehook = hook
    if why:
        install = f"apt-get install {GL_PACKAGES[gl]}" if gl in GL_PACKAGES else "install its libraries"
        raise UserError(f"MuJoCo cannot render off-screen with MUJOCO_GL={gl} ({why}); {install} (Debian/Ubuntu), or set MUJOCO_GL to "
                        "another backend: egl (libegl1 libgl1-mesa-dri), osmesa (libosmesa6)") from None
    return gl


def record_videos(run_dir: Path, cfg: Config, target: EvalTarget, run_cfg: Config, dims: tuple[int, int],
                  snapshot: dict, step: int) -> list[str]:
    """The first cfg.video_episodes episodes of block 0, played again in this process (with the workers' threads:
    the same episodes) and encoded as they are rendered: MP4 (H.264), the environment's own frame rate and size.
    Shadows and multisampling are off: on a software renderer (Mesa's llvmpipe) they are most of the time."""
    import imageio

    evaluator = Evaluator(target, run_cfg, *dims, render=cfg.video_episodes)
    for env in evaluator.envs[:cfg.video_episodes]:
        with contextlib.suppress(AttributeError):  # a MuJoCo env: read when its GL context is made
            env.unwrapped.model.light_castshadow[:] = 0
            env.unwrapped.model.vis.quality.offsamples = 0
    folder = run_dir / "videos"
    folder.mkdir(exist_ok=True)
    fps = evaluator.envs[0].metadata.get("render_fps", 30)
    paths = [folder / f"{cfg.policy}-step{step}-seed{run_cfg.seed}-episode{i}.mp4" for i in range(cfg.video_episodes)]
    temps = [p.with_name(f".{p.stem}.tmp.mp4") for p in paths]
    writers = [imageio.get_writer(t, fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1,
                                  ffmpeg_log_level="error") for t in temps]
    evaluator.sink = lambda i, frame: writers[i].append_data(frame)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.eval_threads)
    try:
        evaluator(snapshot, step, 0, min(run_cfg.eval_episodes, cfg.eval_episodes))
        for writer, temp, path in zip(writers, temps, paths):
            writer.close()
            os.replace(temp, path)
    finally:
        torch.set_num_threads(threads)
        for writer, temp in zip(writers, temps):
            writer.close()
            temp.unlink(missing_ok=True)
        for env in evaluator.envs:
            env.close()
    return [str(p) for p in paths]


# ============================================================================================== seed tables
def summarize(root: Path, run_dirs: list[Path] | None = None) -> str:
    """Markdown table of final and best normalised score (mean +- std over seeds) per dataset, and a PNG of the
    mean +- std curves per dataset, for every run folder under root (or the given ones: a sweep's)."""
    runs, defaults = {}, dataclasses.asdict(Config())
    configs = sorted(root.rglob("config.json")) if run_dirs is None else [d / "config.json" for d in run_dirs]
    for config_path in configs:
        run_dir = config_path.parent
        fix = "restore it from a copy, or move the run folder out of the way"
        try:
            config = read_run_json(config_path, fix)
            with open(run_dir / "metrics.csv", newline="") as f:
                rows = list(csv.DictReader(f))
        except FileNotFoundError as e:  # a run that never trained, or a folder that is not a run's
            print(f"skipped {run_dir} (no {Path(e.filename).name}: it has not trained yet, or is not a run folder)",
                  file=sys.stderr)
            continue
        try:
            evals = series(rows, "eval_normalized_score")
            raw = not evals  # a dataset without reference scores: raw returns
            evals = evals or series(rows, "eval_return")
            q = series(rows, "q_data")
            seed, name = int(config["seed"]), str(config.get("dataset_name", config["dataset"]))
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"{run_dir / 'metrics.csv'} or config.json is damaged ({type(e).__name__}: {e}); {fix}") from None
        if not evals:
            continue
        finished = (run_dir / "results.json").exists()
        if finished:
            read_run_json(run_dir / "results.json", "delete it to count the run as unfinished, or " + fix)
        setting = tuple(config.get(k, defaults[k]) for k in GRID)  # from config.json, whatever the folder's name
        runs.setdefault((name, setting), []).append(
            {"seed": seed, "evals": evals, "finished": finished, "source": config.get("dataset_source", "?"),
             "raw": raw, "q": q, "return_data": config.get("probe_return"),
             "q_bound": config.get("q_bound"), "pinned": pinned_step(rows, int(config.get("warmup_steps", 0)))})
    if not runs:
        raise UserError(f"no runs with an evaluation under {root}; point --summarize at a --log-dir")
    grid = len({d for d, _ in runs}) < len(runs)  # some dataset has runs of several settings: rank them
    lines = ["| dataset | " + ("setting | rank | " if grid else "") + "seeds | steps | final normalised score | best "
             "normalised score | final IQM [95 % CI] | best IQM [95 % CI] | notes |", "|---" * (8 + 2 * grid) + "|"]
    chosen = []
    for dataset in sorted({d for d, _ in runs}):
        settings = {setting: group for (d, setting), group in runs.items() if d == dataset}
        keys = [k for i, k in enumerate(GRID) if len({setting[i] for setting in settings}) > 1]
        labels = {setting: ", ".join(f"{k.replace('_', '-')}={v}" for k, v in zip(GRID, setting) if k in keys)
                  for setting in settings}
        finals = {setting: np.array([r["evals"][-1][1] for r in group]) for setting, group in settings.items()}
        ranked = sorted(settings, key=lambda setting: (-iqm(finals[setting]), labels[setting]))  # by final IQM
        if len(ranked) > 1:
            chosen.append(f"{dataset}: {labels[ranked[0]]} ranks first, final IQM {iqm(finals[ranked[0]]):.1f}. It was "
                          "chosen on the same runs' evaluation returns, so that score is optimistic: confirm it on "
                          "new seeds before reporting it")
        for rank, setting in enumerate(ranked, 1):
            mark = f"**{rank} (best)**" if rank == 1 and len(ranked) > 1 else str(rank)
            lines.append(summary_row(dataset, settings[setting], [labels[setting] or "(one setting)", mark] if grid else []))
        plot_seed_curves(dataset, {labels[setting]: settings[setting] for setting in ranked},
                         root / f"summary_{dataset.replace(os.sep, '_')}.png")
    table = "\n".join(lines) + ("\n\nstd over seeds (numpy, ddof=0); final = last evaluation, best = max over evaluations. "
                                 "IQM: the interquartile mean over seeds (a quarter of the seeds, rounded down, cut at "
                                 "each end); 95 % CI: percentile interval of 50 000 stratified bootstrap resamples of "
                                 "the seeds within the dataset (rliable's definitions).\n")
    table += "".join(f"\n{line}.\n" for line in chosen)
    (root / "summary.md").write_text(table)
    return table


def summary_row(dataset: str, group: list[dict], setting: list[str]) -> str:
    """One row of the summary: the seeds of one (dataset, setting)."""
    final = np.array([r["evals"][-1][1] for r in group])
    best = np.array([max(v for _, v in r["evals"]) for r in group])
    steps = sorted({r["evals"][-1][0] for r in group})
    notes = []
    if any(not r["finished"] for r in group):
        notes.append(f"{sum(not r['finished'] for r in group)} unfinished (latest evaluation used)")
    if any(r["source"] == "regenerated" for r in group):
        notes.append("REGENERATED data: not comparable with published tables")
    if any(r["source"] == "minari" for r in group):
        notes.append("Minari data: not comparable with D4RL tables")
    if any(r["raw"] for r in group):
        notes.append("RAW RETURNS: the dataset has no reference scores")
    if any(r["pinned"] is not None for r in group):
        notes.append(f"ALPHA PINNED in {sum(r['pinned'] is not None for r in group)} of {len(group)} (at its clamp "
                     "after warm-up: the actor ignored Q; docs/differences.md)")
    intervals = [f"{iqm(x):.1f} [{lo:.1f}, {hi:.1f}]" for x in (final, best) for lo, hi in [iqm_interval(x)]]
    return (f"| {dataset} | {''.join(c + ' | ' for c in setting)}{len(group)} | {'/'.join(map(str, steps))} | "
            f"{final.mean():.1f} ± {final.std():.1f} | {best.mean():.1f} ± {best.std():.1f} | {intervals[0]} | "
            f"{intervals[1]} | {'; '.join(notes)} |")


def iqm(scores: np.ndarray) -> np.ndarray:
    """Interquartile mean over the last axis, as rliable's (scipy.stats.trim_mean(x, 0.25)): sorted, int(n / 4)
    values cut from each end, the mean of the rest."""
    x = np.sort(scores, axis=-1)
    cut = int(0.25 * x.shape[-1])
    return x[..., cut:x.shape[-1] - cut].mean(-1)


def iqm_interval(scores: np.ndarray, reps: int = 50_000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the IQM over bootstrap resamples of the seeds (drawn with replacement within the
    dataset, the stratum), rliable's get_interval_estimates for one task. Seeded: the same table every time."""
    boot = np.random.default_rng(seed).choice(scores, (reps, len(scores)))  # [reps, seeds]
    lo, hi = np.percentile(iqm(boot), [2.5, 97.5])
    return float(lo), float(hi)


def plot_seed_curves(dataset: str, groups: dict[str, list[dict]], path: Path) -> None:
    """Score and Q on the data, mean ± std over seeds: one curve per setting (label: the settings that vary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_std(group, key):  # [seeds, steps] at the steps every seed has -> steps, mean, std over seeds
        common = sorted(set.intersection(*[{s for s, _ in r[key]} for r in group]))
        values = np.array([[dict(r[key])[s] for s in common] for r in group]).reshape(len(group), len(common))
        return common, values.mean(0), values.std(0)

    fig, (ax, ax_q) = plt.subplots(1, 2, figsize=(12, 4))
    for i, (label, group) in enumerate(groups.items()):
        common, mean, std = mean_std(group, "evals")
        line, = ax.plot(common, mean, marker="o", markersize=3, label=f"{label} ({len(group)} seeds)" if label else None)
        ax.fill_between(common, mean - std, mean + std, alpha=0.3 if len(groups) == 1 else 0.15, color=line.get_color())
        common, mean, std = mean_std(group, "q")
        plot_q_vs_return(ax_q, common, mean, (mean - std, mean + std), *(
            [group[0]["return_data"], group[0]["q_bound"]] if i == 0 else [None, None]), label=label or "critics' Q on the data")
    seeds = "" if len(groups) > 1 else f" over {len(next(iter(groups.values())))} seeds"
    ax.set(title=f"BEAR {dataset}: mean ± std{seeds}", xlabel="gradient steps", ylabel="normalised score")
    if len(groups) > 1:
        ax.legend(fontsize=7)
    ax_q.set(title="Q on the data (mean ± std over seeds) against its return", xlabel="gradient steps")
    for a in (ax, ax_q):
        a.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)


# ============================================================================================== sweep on Ray
# Several datasets or seeds: every (dataset, seed) pair is one run of this script, as a subprocess inside a Ray
# task, in its own folder under --log-dir. The driver prepares each dataset once, retries runs whose process or
# node died (they continue from their newest checkpoint with --resume), shows one progress bar and ends with the
# --summarize table of the sweep's runs. Ray is imported only here.
SWEEP_ONLY = ("ray_address", "cpus_per_run", "gpus_per_run", "max_retries", "evaluate", "policy", "video",
              "video_episodes")  # not passed on to a sweep's runs
NOT_RETRIED = {EXIT_BAD_INPUT: "bad input", EXIT_DIVERGED: "diverged"}  # EXIT_CRASHED: retried once


def parse_seeds(text: str) -> list[int]:
    """'0-4', '0,2,5-7', '3' -> seeds, in the order given; ranges are inclusive."""
    seeds = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise argparse.ArgumentTypeError(f"'{text}' is not a seed list; write seeds as 0-4, 0,2,5-7 or 3")
        seeds += range(int(m[1]), int(m[2] or m[1]) + 1)
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"'{text}' lists a seed twice")
    return seeds


def parse_datasets(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"'{text}' is not a dataset list; separate names or paths with single commas, "
                                         "each once")
    return names


def run_cpus(cfg: Config, gpus: float) -> tuple[int, int]:
    """(torch threads, evaluation workers) of one run: together the --cpus-per-run cores that Ray reserves for it.
    By default a CPU run trains on all but one of them and evaluates on that one, a GPU run trains on one and
    evaluates on the others; with --cpus-per-run=1 the run evaluates in its training process."""
    cpus = max(1, int(cfg.cpus_per_run))
    workers = cfg.eval_workers if cfg.eval_workers >= 0 else 0 if cpus == 1 else cpus - 1 if gpus > 0 else 1
    if workers and workers >= cpus:
        raise UserError(f"--cpus-per-run={cfg.cpus_per_run} cannot hold a training thread and {workers} evaluation "
                        f"worker(s); raise --cpus-per-run to {workers + 1} or more, or lower --eval-workers")
    return cpus - workers, workers


def run_command(cfg: Config, gpu: int, threads: int, eval_workers: int) -> list[str]:
    """This script's flags for one run of a sweep: every setting, --resume so that a retried or restarted run
    continues from its checkpoint, --offline because the driver has already fetched the data."""
    values = dataclasses.asdict(cfg) | {"resume": True, "offline": True, "gpu": gpu, "threads": threads,
                                        "eval_workers": eval_workers}
    args = []
    for name, value in values.items():
        if name not in SWEEP_ONLY and name != "summarize":
            flag = f"--{name.replace('_', '-')}"
            args.append(flag if value is True else f"--no-{name.replace('_', '-')}" if value is False else f"{flag}={value}")
    return args


def _run_in_task(script: str, args: list[str], log: str, caches: dict[str, str]) -> tuple[int, str]:
    """Body of a sweep's Ray task: run this script for one pair; (exit code, last line of its output). Ray's
    cancellation (the driver was stopped) arrives as KeyboardInterrupt: the run gets SIGTERM and checkpoints."""
    import ctypes
    import os
    import signal
    import subprocess
    import sys
    import time

    def die_with_the_task():  # if this worker is killed, the run gets SIGTERM instead of living on as an orphan
        os.setpgrp()
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    env = dict(os.environ, PYTHONUNBUFFERED="1", **caches)  # Ray's CUDA_VISIBLE_DEVICES for this task is inherited
    with open(log, "a") as out:
        out.write(f"=== started on {os.uname().nodename}, CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')}\n")
        out.flush()
        proc = subprocess.Popen([sys.executable, script, *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=die_with_the_task)
        try:
            while proc.poll() is None:  # not proc.wait(): Ray's interrupt only lands between Python bytecodes
                time.sleep(0.2)
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    with open(log, errors="replace") as f:
        lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    return proc.returncode, (lines[-1] if lines else "")


@dataclass
class SweepRun:
    cfg: Config
    folder: Path
    log: Path
    attempts: int = 0
    ref: object = None  # the Ray task now running it
    state: str = "waiting"  # waiting, running (or queued by Ray), done, failed
    reason: str = ""
    log_size: int = 0  # the log's size when the current attempt was submitted
    crashes: int = 0  # attempts that ended with EXIT_CRASHED


def sweep(cfgs: list[Config]) -> int:
    """Runs every pair; returns 0 when all finished, 1 when any failed; a signal stops every run (checkpointed)."""
    head = cfgs[0]
    for cfg in cfgs:  # every setting of the grid checked before anything starts
        validate(cfg)
    varying = [k for k in GRID if len({getattr(c, k) for c in cfgs}) > 1]
    sizes = [f"{len({c.dataset for c in cfgs})} dataset(s)"] + [
        f"{k.replace('_', '-')} {', '.join(map(str, dict.fromkeys(getattr(c, k) for c in cfgs)))}" for k in varying]
    print(f"sweep: {len(cfgs)} runs = {' × '.join(sizes + [f'{len({c.seed for c in cfgs})} seed(s)'])}", flush=True)
    if head.run_name:
        raise UserError("--run-name names one run; a sweep names each run <dataset>__[<setting>__]seed<seed> itself: drop it")
    if not head.cpus_per_run > 0:
        raise UserError(f"--cpus-per-run={head.cpus_per_run} must be above 0")
    if head.max_retries < 0:
        raise UserError(f"--max-retries={head.max_retries} must be 0 or more")
    run_cpus(head, 0)  # --eval-workers must fit in --cpus-per-run
    log_dir = check_log_dir(head.log_dir).absolute()
    try:
        with file_lock(log_dir / ".sweep.lock", f"running a sweep in {log_dir}", wait=False):
            return _sweep(cfgs, head, log_dir, varying)
    except Busy as e:
        raise UserError(f"--log-dir={log_dir} is in use: {e}; wait for that sweep to end (the same command then "
                        "continues what is unfinished)") from None
    except Exception as e:
        e.crash_folder = log_dir
        raise


def _sweep(cfgs: list[Config], head: Config, log_dir: Path, varying: list[str]) -> int:
    runs, failed_early = [], []
    for dataset in dict.fromkeys(c.dataset for c in cfgs):  # each dataset found or fetched once, by the driver
        group = [c for c in cfgs if c.dataset == dataset]
        try:
            spec = resolve_dataset(dataset, head.env)
            load_data(spec, is_offline(head), head.regen_steps, head.regen_workers)  # fetched once, here
        except UserError as e:
            failed_early += [(f"{c.dataset} seed {c.seed}", str(e)) for c in group]
            continue
        for c in group:  # absolute paths: the runs start in other folders, or on other machines
            c.log_dir, c.dataset = str(log_dir), c.dataset if spec.url or spec.kind == "minari" else str(spec.path.absolute())
            folder = log_dir / run_folder_name(spec.name, c.seed, grid_label(c, varying))
            c.run_name = folder.name if varying else ""  # a plain sweep's folders keep the name a run gives itself
            runs.append(SweepRun(c, folder, log_dir / "sweep-logs" / f"{folder.name}.log",
                                 state="done" if _finished(folder, c) else "waiting"))
    print(f"sweep: {len(cfgs)} runs ({sum(r.state == 'done' for r in runs)} already finished, {len(failed_early)} "
          f"with bad data) under {log_dir}", flush=True)
    stop = []  # from here on a signal is noted, and the loop stops every run
    with on_signals(stop.append):
        _sweep_on_ray(head, runs, log_dir, stop, len(failed_early))
    if stop:
        raise Interrupted(stop[0], f"during a sweep: its runs were stopped and wrote their checkpoints; the same "
                                   "command continues them and skips the finished ones")
    failures = [(r.folder.name, r.reason) for r in runs if r.state == "failed"] + failed_early
    done = [r.folder for r in runs if r.state == "done"]
    if done:
        print(summarize(log_dir, done), end="", flush=True)
    for name, reason in failures:
        print(f"FAILED {name}: {reason}", file=sys.stderr)
    return EXIT_DIVERGED if failures else 0


def _finished(folder: Path, cfg: Config) -> bool:
    """The folder holds this run, trained to its --max-steps. A folder with other settings is not it: the run
    started there refuses it (exit 2) and leaves it as it is; a damaged one is left to the run to report."""
    try:
        saved = json.loads((folder / "config.json").read_text())
        return json.loads((folder / "results.json").read_text()).get("steps") == cfg.max_steps and \
            not changed_setting(saved, cfg)
    except (OSError, ValueError, AttributeError):
        return False


def _sweep_on_ray(head: Config, runs: list[SweepRun], log_dir: Path, stop: list, failed_early: int) -> None:
    if not (head.ray_address or os.environ.get("RAY_ADDRESS")):
        # A local instance is for this machine alone: Ray's single-node mode puts its services on 127.0.0.1
        # instead of the machine's network address, where anyone who reaches the machine could submit work.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import logging

    import ray
    from tqdm import tqdm

    t0 = time.time()
    ray.init(address=head.ray_address or None, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))  # ray.init installed its own
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
        resources = ray.cluster_resources()
        print(f"Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs ({time.time() - t0:.1f} s to "
              "start or connect)", flush=True)
        gpus = head.gpus_per_run if head.gpus_per_run >= 0 else float(resources.get("GPU", 0) > 0 and head.gpu >= 0)
        task = ray.remote(num_cpus=head.cpus_per_run, num_gpus=gpus, max_retries=0)(_run_in_task)
        cpus = run_cpus(head, gpus)
        script = str(Path(__file__).resolve())
        # the runs read the data where the driver prepared it, whatever the environment of the Ray workers says
        caches = {"D4RL_DATASET_DIR": str(d4rl_dir().absolute()), "MINARI_DATASETS_PATH": str(minari_dir().absolute())}
        (log_dir / "sweep-logs").mkdir(parents=True, exist_ok=True)

        def submit(run: SweepRun) -> None:
            run.attempts += 1
            run.log_size = run.log.stat().st_size if run.log.exists() else 0  # the task's first line says it started
            args = run_command(run.cfg, 0 if gpus > 0 else -1, *cpus)
            run.ref, run.state = task.remote(script, args, str(run.log), caches), "running"

        for run in runs:
            if run.state == "waiting" and not stop:
                submit(run)
        bar = tqdm(total=(len(runs) + failed_early) * head.max_steps, unit="step", dynamic_ncols=True,
                   mininterval=1 if sys.stderr.isatty() else 30)
        try:
            while not stop and any(r.state == "running" for r in runs):
                ready, _ = ray.wait([r.ref for r in runs if r.state == "running"], num_returns=1, timeout=0.5)
                for run in [r for r in runs if r.state == "running" and r.ref in ready]:
                    _finish(run, ray, head.max_retries, submit)
                bar.update(sum(head.max_steps if r.state == "done" else _steps_done(r.folder) for r in runs) - bar.n)
                started = sum(r.state == "running" and _started(r) for r in runs)
                bar.set_postfix_str(f"done {sum(r.state == 'done' for r in runs)}, running {started}, queued "
                                    f"{sum(r.state == 'running' for r in runs) - started}, failed "
                                    f"{sum(r.state == 'failed' for r in runs) + failed_early}", refresh=False)
        finally:
            bar.close()
        if stop:
            running = [r for r in runs if r.state == "running"]
            for run in running:  # Ray interrupts the task, which sends its run SIGTERM: the run writes a checkpoint
                ray.cancel(run.ref)
            deadline = time.time() + 300
            while running and time.time() < deadline:
                ready, _ = ray.wait([r.ref for r in running], num_returns=len(running), timeout=0.5)
                running = [r for r in running if r.ref not in ready]
    finally:
        ray.shutdown()


def _finish(run: SweepRun, ray, max_retries: int, submit) -> None:
    try:
        code, last = ray.get(run.ref)
    except ray.exceptions.RayError as e:  # the worker or its node died
        code, last = None, first_line(e)
    if code == 0:
        run.state = "done"
        results = json.loads((run.folder / "results.json").read_text())
        tqdm_write(f"finished {run.folder.name}: final {results['final_normalized_score']:.1f}, "
                   f"best {results['best_normalized_score']:.1f} ({results['wall_clock_seconds']:.0f} s)")
    elif code in NOT_RETRIED or (code == EXIT_CRASHED and run.crashes):
        run.state, run.reason = "failed", f"{NOT_RETRIED.get(code, 'crashed twice')}: {last}"
        tqdm_write(f"failed {run.folder.name} ({run.reason}); not retried")
    elif code == EXIT_CRASHED:
        run.crashes += 1
        tqdm_write(f"{run.folder.name} crashed ({last}); retrying it once from its newest checkpoint")
        submit(run)
    elif run.attempts <= max_retries:
        tqdm_write(f"{run.folder.name} ended with {_describe(code, last)}; retry {run.attempts} of "
                   f"{max_retries} from its newest checkpoint")
        submit(run)
    else:
        run.state, run.reason = "failed", f"{_describe(code, last)} after {run.attempts} attempts"
        tqdm_write(f"failed {run.folder.name}: {run.reason}")


def _describe(code, last: str) -> str:
    if code is None:
        return last
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code} ({last})" if last else f"exit code {code}"


def tqdm_write(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line)
    sys.stdout.flush()


def _steps_done(folder: Path) -> int:
    """The run's newest metrics.csv row (read from the shared log folder, wherever the run is)."""
    try:
        with open(folder / "metrics.csv", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            last = f.read().splitlines()[-1].split(b",")[0]
        return int(last)
    except (OSError, IndexError, ValueError):
        return 0


def _started(run: SweepRun) -> bool:
    try:
        return run.log.stat().st_size > run.log_size
    except OSError:
        return False


# ============================================================================================== command line and main
def validate(cfg: Config) -> None:
    for name in ("max_steps", "batch_size", "num_critics", "num_target_samples", "mmd_samples", "eval_every",
                 "eval_episodes", "eval_candidates", "eval_threads", "log_every", "checkpoint_every", "actor_hidden",
                 "critic_hidden", "vae_hidden", "video_episodes"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}={getattr(cfg, name)} must be a positive whole number")
    for name in ("warmup_steps", "probe_size"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')}={getattr(cfg, name)} must be 0 or more")
    if cfg.regen_steps < 2:
        raise UserError(f"--regen-steps={cfg.regen_steps} must be at least 2")
    if cfg.eval_workers < -1:
        raise UserError(f"--eval-workers={cfg.eval_workers} must be 0 (in the training process), more, or -1 (auto)")
    if cfg.regen_workers < 0:
        raise UserError(f"--regen-workers={cfg.regen_workers} must be 0 (every usable core) or more")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name.replace('_', '-')}={value} must be a finite number")
    for name, lo, hi in (("gamma", 0, 1), ("lam", 0, 1), ("tau", 1e-12, 1), ("actor_lr", 1e-12, 1e3),
                         ("critic_lr", 1e-12, 1e3), ("vae_lr", 1e-12, 1e3), ("alpha_lr", 1e-12, 1e3),
                         ("mmd_sigma", 1e-12, math.inf), ("epsilon", 0, math.inf), ("var_penalty", 0, math.inf)):
        if not lo <= getattr(cfg, name) <= hi:
            raise UserError(f"--{name.replace('_', '-')}={getattr(cfg, name)} is out of range; it must lie in [{lo:g}, {hi:g}]")
    if cfg.log_alpha_min > cfg.log_alpha_max:
        raise UserError(f"--log-alpha-min={cfg.log_alpha_min} is above --log-alpha-max={cfg.log_alpha_max}")
    if cfg.env not in ("", *ENVS):
        raise UserError(f"--env={cfg.env} is unknown; use one of {', '.join(ENVS)} (or leave it empty)")
    if cfg.kernel not in ("auto", *KERNELS):
        raise UserError(f"--kernel={cfg.kernel} is unknown; use laplacian, gaussian or auto")
    if cfg.precision not in ("fp32", "bf16"):
        raise UserError(f"--precision={cfg.precision} is unknown; use fp32 or bf16")
    if cfg.policy not in ("final", "best"):
        raise UserError(f"--policy={cfg.policy} is unknown; use final or best")
    if cfg.video and not cfg.evaluate:
        raise UserError("--video records an evaluation: use it with --evaluate=RUN_DIR")
    if cfg.actor_q not in ("min", "mean_var"):
        raise UserError(f"--actor-q={cfg.actor_q} is unknown; use min or mean_var")
    if cfg.gpu < -1:
        raise UserError(f"--gpu={cfg.gpu} is not a device; use a CUDA index such as 0, or -1 for the CPU")
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--wandb needs the wandb package: pip install wandb (or drop --wandb)")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def parse_int(text: str) -> int:
    """Whole numbers, also written 1e6 or 1_000_000."""
    value = float(text.replace("_", "")) if re.search(r"[.eE]", text) else int(text.replace("_", ""))
    if value != int(value):
        raise ValueError(text)
    return int(value)


parse_int.__name__ = "int"  # argparse names the type in its error message


def parse_list(kind):
    """A hyperparameter's value, or a comma list of them for a grid: each value parsed as the single flag's."""
    def parse(text: str) -> list:
        values = []
        for part in text.split(","):
            try:
                values.append(kind(part.strip()))
            except ValueError:
                raise argparse.ArgumentTypeError(f"'{part}' in '{text}' is not {'an' if kind is parse_int else 'a'} "
                                                 f"{kind.__name__}") from None
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"'{text}' lists a value twice")
        return values
    parse.__name__ = kind.__name__
    return parse


def single(kind, name: str):
    """A flag that a sweep cannot vary: a comma list is refused, naming it."""
    def parse(text: str):
        if "," in text:
            raise argparse.ArgumentTypeError(f"'{text}' is a list, and a sweep cannot vary --{name}: give it one value "
                                             "(a sweep lists --dataset, --seed and the flags under "
                                             f"{' and '.join(repr(t) for t in GRID_SECTIONS)} in --help)")
        return kind(text)
    parse.__name__ = kind.__name__
    return parse


def parse_args(argv: list[str] | None = None) -> list[Config]:
    """One Config per (dataset, setting, seed): one for a single run, several for a sweep (the grid's product)."""
    parser = OneLineParser(prog="bear-train.py", description="BEAR (Kumar et al. 2019) on D4RL MuJoCo data.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           epilog="Documentation: README.md, and docs/ one page per topic: evaluation.md, data.md, "
                                  "sweeps.md, runs.md (what a run writes, --resume, --evaluate, exit codes), "
                                  "q-vs-return.md, gpu-and-precision.md, performance.md, tests.md, differences.md.")
    lists = {"dataset": (parse_datasets, "NAMES"), "seed": (parse_seeds, "SEEDS")}
    groups = {title: parser.add_argument_group(title) for title in SECTIONS}
    for f in dataclasses.fields(Config):
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        group = groups[f.metadata["section"]]
        if f.type is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            kind, metavar = lists.get(f.name, ({int: parse_int, float: float, str: str}[f.type], f.type.__name__.upper()))
            if f.name in GRID:
                kind, metavar = parse_list(kind), f"{metavar}[,{metavar}...]"
            elif f.name not in lists and f.name not in ("run_name", "evaluate", "summarize"):  # paths: grid folders
                kind = single(kind, f.name.replace("_", "-"))
            group.add_argument(*flags, type=kind, default=f.default, help=f.metadata["help"], metavar=metavar)
    values = vars(parser.parse_args(argv))
    given = {a.split("=")[0].replace("_", "-") for a in (sys.argv[1:] if argv is None else argv)}
    if values["evaluate"]:  # defaults of their own: 100 episodes, the run's seed (None until its folder is read)
        values["eval_episodes"] = values["eval_episodes"] if "--eval-episodes" in given else 100
        values["seed"] = values["seed"] if "--seed" in given else None
    datasets, seeds, *grid = (v if isinstance(v, list) else [v] for v in [values[k] for k in ("dataset", "seed", *GRID)])
    return [Config(**values | dict(zip(GRID, setting)) | {"dataset": d, "seed": s})
            for d in datasets for setting in itertools.product(*grid) for s in seeds]


def main(argv: list[str] | None = None) -> int:
    cfgs = parse_args(argv)
    try:
        with on_signals(raise_interrupted):
            if cfgs[0].summarize:
                print(summarize(Path(cfgs[0].summarize)), end="")
            elif cfgs[0].evaluate:
                if len(cfgs) > 1:
                    raise UserError("--evaluate takes one run folder and one --seed (not a list or a range)")
                evaluate(cfgs[0])
            elif len(cfgs) > 1:
                return sweep(cfgs)
            else:
                train(cfgs[0])
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        print(f"bear-train.py: stopped by {name} {e.what or 'before training started'}", file=sys.stderr, flush=True)
        return e.code
    except UserError as e:
        print(f"bear-train.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Diverged as e:
        print(f"bear-train.py: training stopped: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except Stop as e:
        return e.code
    except DiskFull as e:
        print(f"bear-train.py: disk full: {e}", file=sys.stderr, flush=True)
        return EXIT_DISK_FULL
    except Exception as e:  # a crash: its own exit code, so that retry logic does not read it as a divergence
        if is_disk_full(e):
            print(f"bear-train.py: disk full: {DiskFull(Path(e.filename or Path.cwd() / '-'))}", file=sys.stderr)
            return EXIT_DISK_FULL
        path = crash_report(e, getattr(e, "crash_folder", None))
        print(f"bear-train.py: crashed: {first_line(e)} (traceback in "
              f"{path})", file=sys.stderr, flush=True)
        return EXIT_CRASHED
    return 0


def crash_report(error: BaseException, folder: Path | None) -> Path:
    """The traceback, appended to error.log in the run folder (or in the temporary folder when there is none)."""
    import traceback

    text = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n" + "".join(traceback.format_exception(error))
    for path in ([folder / "error.log"] if folder else []) + [Path(tempfile.gettempdir()) / f"bear-train-crash-{os.getpid()}.log"]:
        try:
            with open(path, "a") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return Path("(could not be written)")


if __name__ == "__main__":
    sys.exit(main())
