"""Speed benchmark of bear-train.py: prints a table, one part at a time or all of them.

    python benchmarks/speed.py                      # every part except regen (about 3 minutes)
    python benchmarks/speed.py --parts update d3rlpy flops
    python benchmarks/speed.py --parts regen        # regenerate a 1M-step random dataset, 1 then 2 workers (~5 min)
    python benchmarks/speed.py --device=cuda --parts device   # every GPU figure in one go
    python benchmarks/speed.py --parts compile      # compiled against eager, fp32 and bf16 (about 2 minutes)
    python benchmarks/speed.py --parts evalpool     # evaluation in a pool against none and against in-process
    python benchmarks/speed.py --parts evalpool --pool-variants off pool --pool-rounds 3   # one ratio, A B A B
    python benchmarks/speed.py --small --parts ...  # a tiny version of any part (the test suite runs each so)

Parts:
  update   post-warm-up BEAR update rate (steps/s), default hyperparameters, synthetic walker2d-shaped data
           (obs 17, act 6) in memory, CPU, 2 threads
  d3rlpy   the same for d3rlpy 2.8.1's BEAR configured identically, timed A B A B against ours in one run, and
           the matmul arithmetic it executes per update (needs a separate venv: see README; skipped when absent)
  flops    counted matrix-multiply arithmetic per step from the layer shapes, the time those matrix multiplies
           take on this machine when run alone, and the fraction of that limit the update achieves
  scaling  steps/s for K = 2, 5, 10 critics and batch 256, 512, 1024; the script's loop of K networks vs one
           batched bmm module over the same weights
  script   bear-train.py itself, end to end on a synthetic walker2d-shaped file (warm-up 0): the
           train_steps_per_second it records in results.json, to compare with `update`
  eval     seconds for 10 episodes x 1000 steps with 100 candidates per step (HalfCheetah-v4 never terminates,
           so every episode runs the full 1000 steps), on one thread as a pool worker runs it, and the share of it
           spent in MuJoCo and the environments' Python
  evalpool bear-train.py end to end on a HalfCheetah-shaped file, evaluating every 250 steps: training pinned to
           one core with 1 thread, the evaluation pool on the other (CPU affinities), against the same run with
           evaluation off (one evaluation, at the end) and with --eval-workers=0; wall-time ratios (--pool-rounds:
           each variant that many times, alternating; --pool-variants: some of them)
  compile  --compile against eager, A B alternating in one run, in fp32 and (where the CPU has bf16 instructions)
           bf16; the fraction of the fp32 arithmetic limit each reaches; seconds from a new agent to its first
           compiled update with a cold and a warm inductor cache; aten operators per update, eager and compiled
  device   every figure of --device (cuda:0 on a GPU machine) in one go: eager updates/s at K=2 batch 256, K=10,
           batch 1024; --compile against eager; d3rlpy 2.8.1 on the same device; one evaluation; the operations and
           kernels per update (profiler); the seed command end to end for 4 x --steps steps with the evaluation pool
           (wall time, evaluation share, projected 1M-step time)
  data     seconds and peak RSS to load a 1M-transition D4RL-layout file into training tensors
  regen    seconds to regenerate a 1M-step random dataset (walker2d) with 1 worker, then with 2, in one run; the
           two files' arrays must be identical (the recipe does not depend on the number of workers)

Every timing runs in a worker process of its own (this file with --worker or --serve). For update, d3rlpy and
flops, one long-lived process per implementation (d3rlpy in its own venv) times blocks of --block updates on
request, and the driver alternates them round after round (A B A B ..., rotating which goes first), so that each
ratio compares blocks run seconds apart under the same load: this shared machine's speed drifts by 20-30 % within
minutes, so only ratios measured in one run mean anything.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBS, ACT = 17, 6


def load_bear():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bear_train", ROOT / "bear-train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bear_train"] = module
    spec.loader.exec_module(module)
    return module


def synthetic(n=100_000, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return {"observations": rng.normal(size=(n, OBS)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, ACT)).astype(np.float32),
            "rewards": rng.normal(size=n).astype(np.float32),
            "next_observations": rng.normal(size=(n, OBS)).astype(np.float32),
            "terminals": (rng.random(n) < 0.05).astype(np.float32)}


# ---------------------------------------------------------------------------------------------- workers
def timed(one_step, warmup, finish=lambda: None):
    """run(n, fixed) -> seconds for n calls of one_step(fixed) then finish(), after `warmup` untimed calls."""
    def run(n, fixed=False):
        t = time.perf_counter()
        for _ in range(n):
            one_step(fixed)
        finish()
        return time.perf_counter() - t

    run(warmup)
    return run


def make_agent(args, **config):
    """bear-train.py's BEAR on args.device (its current device) with args.threads threads, seed 0, K = args.k."""
    import torch

    bear = load_bear()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = bear.Config(num_critics=args.k, precision=args.precision, **(TINY_NETS if args.tiny else {}) | config)
    return bear, bear.BEAR(cfg, OBS, ACT, "laplacian", device)


TINY_NETS = {"batch_size": 8, "vae_hidden": 8, "actor_hidden": 8, "critic_hidden": 8}


def bear_stepper(args):
    """bear-train.py's update after warm-up (the full update: sampling on the device included), as run(n) ->
    seconds for n more updates."""
    import torch

    # --tiny: 8-wide networks, batch 8: the same operations with next to no arithmetic
    bear, agent = make_agent(args, compile=bool(args.compile), **{} if args.tiny else {"batch_size": args.batch})
    buffer = bear.ReplayBuffer(synthetic(), agent.device)
    if args.batched:
        agent.critics.forward = batched_forward(agent.critics)
        agent.target_critics.forward = batched_forward(agent.target_critics)
    batch_size = agent.cfg.batch_size
    # post-warm-up (False): the Q term is in the actor loss
    return timed(lambda fixed: agent.update(buffer.sample(batch_size), False), args.warmup, agent.metric_sum.tolist)


def batched_forward(ensemble):
    """The same K critics as one batched module: every layer one bmm over [K, rows, in] x [K, in, out] (the
    alternative to the script's loop of 2-D matrix multiplies)."""
    import torch
    import torch.nn.functional as F

    def forward(s, a):
        single = a.dim() == 2
        if single:
            a = a[:, None]
        (b, n, _), k = a.shape, ensemble.weights[0].shape[0]
        w1, w2, w3 = ensemble.weights
        b1, b2, b3 = (x[:, None] for x in ensemble.biases)  # [K, 1, out]
        hs = torch.baddbmm(b1, s.expand(k, -1, -1), w1[:, :ensemble.state_dim])  # [K, B, H]
        ha = torch.bmm(a.reshape(1, b * n, -1).expand(k, -1, -1), w1[:, ensemble.state_dim:])  # [K, B*n, H]
        h = F.relu(ha.view(k, b, n, -1) + hs[:, :, None]).view(k, b * n, -1)
        h = F.relu(torch.baddbmm(b2, h, w2))
        q = torch.baddbmm(b3, h, w3).view(k, b, n)
        return q[..., 0] if single else q

    return forward


def d3rlpy_stepper(args):
    """d3rlpy 2.8.1 BEAR with the same networks and hyperparameters, as run(n, fixed) -> seconds for n updates: its
    own batch sampling + update as in its fit loop, or (fixed) the update alone on one batch."""
    import d3rlpy
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    d3rlpy.seed(0)
    data = synthetic()
    timeouts = np.zeros(len(data["rewards"]), bool)
    timeouts[999::1000] = True
    data["terminals"][timeouts] = 0.0  # d3rlpy refuses rows that are both
    dataset = d3rlpy.dataset.MDPDataset(data["observations"], data["actions"], data["rewards"],
                                        data["terminals"], timeouts)
    enc = d3rlpy.models.encoders.VectorEncoderFactory
    config = d3rlpy.algos.BEARConfig(
        actor_learning_rate=1e-4, critic_learning_rate=3e-4, imitator_learning_rate=3e-4, alpha_learning_rate=1e-3,
        temp_learning_rate=0.0, initial_temperature=1e-20, initial_alpha=1.0, actor_encoder_factory=enc([256, 256]),
        critic_encoder_factory=enc([256, 256]), imitator_encoder_factory=enc([750, 750]), batch_size=args.batch,
        gamma=0.99, tau=0.005, n_critics=args.k, alpha_threshold=0.05, lam=0.75, n_action_samples=100,
        n_target_samples=10, n_mmd_action_samples=4, mmd_kernel="laplacian", mmd_sigma=20.0, vae_kl_weight=0.5,
        warmup_steps=0)
    algo = config.create(device=args.device if ":" in args.device else f"{args.device}:0")
    algo.build_with_dataset(dataset)
    batch = dataset.sample_transition_batch(args.batch)
    run = timed(lambda fixed: algo.update(batch if fixed else dataset.sample_transition_batch(args.batch)), args.warmup)
    run.algo, run.batch = algo, batch  # for benchmarks/d3rlpy_actor_gradient.py
    return run


def gemm_shapes(k=2, batch=256, n=4, n_t=10, s=OBS, a=ACT, hv=750, ha=256, hc=256):
    """Every matrix multiply of one post-warm-up update, as (rows, inner, cols, count), forward and backward:
    a layer on m rows from i to o costs m*i*o forward, as much again for the input gradient (when one is needed)
    and for the weight gradient (when the layer trains)."""
    z = 2 * a
    shapes = []

    def layer(m, i, o, grad_in=True, train=True, count=1):
        shapes.append((m, i, o, count))  # forward
        if grad_in:
            shapes.append((m, o, i, count))  # input gradient
        if train:
            shapes.append((i, m, o, count))  # weight gradient

    # 1. VAE: encoder on [s, a], mean and log-std heads, decoder on [s, z] (one z per state: one matmul)
    layer(batch, s + a, hv, grad_in=False)
    layer(batch, hv, hv)
    layer(batch, hv, z, count=2)
    layer(batch, s + z, hv)
    layer(batch, hv, hv)
    layer(batch, hv, a)
    # 2. target: actor at s', K target critics on n_t actions per state (state part once per state)
    layer(batch, s, ha, False, False)
    layer(batch, ha, ha, False, False)
    layer(batch, ha, a, False, False, 2)
    layer(batch, s, hc, False, False, k)
    layer(batch * n_t, a, hc, False, False, k)
    layer(batch * n_t, hc, hc, False, False, k)
    layer(batch * n_t, hc, 1, False, False, k)
    # 3. critics on (s, a)
    layer(batch, s + a, hc, False, True, k)
    layer(batch, hc, hc, True, True, k)
    layer(batch, hc, 1, True, True, k)
    # 4. actor: VAE samples (no gradient), actor forward/backward, critics on the policy action (input grads only)
    layer(batch, s, hv, False, False)
    layer(batch * n, z, hv, False, False)
    layer(batch * n, hv, hv, False, False)
    layer(batch * n, hv, a, False, False)
    layer(batch, s, ha, False, True)
    layer(batch, ha, ha, True, True)
    layer(batch, ha, a, True, True, 2)
    layer(batch, s + a, hc, True, False, k)
    layer(batch, hc, hc, True, False, k)
    layer(batch, hc, 1, True, False, k)
    return shapes


def flops_stepper(args):
    """The matrix multiplies of one update and nothing else, as run(n) -> seconds for n steps' worth: every
    (rows, inner, cols) of gemm_shapes() as one torch.mm on its own inputs, back to back. That is the time an update
    would take if it did nothing but its matrix multiplies, at this machine's rate for those shapes."""
    import torch

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32  # bf16 inputs; float32 accumulation inside
    mats = [(torch.randn(m, i, dtype=dtype), torch.randn(i, o, dtype=dtype))
            for m, i, o, count in gemm_shapes(k=args.k, batch=args.batch) for _ in range(count)]

    def matmuls(fixed):
        for x, w in mats:
            torch.mm(x, w)

    return timed(matmuls, 3)


def optim_stepper(args):
    """The update's optimiser work and nothing else, as run(n) -> seconds for n steps' worth: the four fused Adam
    steps (VAE, critics, actor, log alpha) and the Polyak average, on gradients set once. A floor under the part of
    an update that is not matrix multiplies (the real update also computes activations, their gradients, the MMD,
    samples, and allocates fresh gradients every step)."""
    import torch

    _, agent = make_agent(args, batch_size=args.batch)
    optimisers = [agent.vae_opt, agent.critic_opt, agent.actor_opt, agent.alpha_opt]
    for opt in optimisers:
        for group in opt.param_groups:
            for param in group["params"]:
                param.grad = torch.randn_like(param) * 1e-3

    def optimiser_work(fixed):
        for opt in optimisers:
            opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(*agent.polyak_pairs, agent.cfg.tau)

    return timed(optimiser_work, 3)


def executed_matmul_flops(update) -> int:
    """2*m*k*n summed over the matrix multiplies that one call of update() executes, read from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        update()
    total = 0
    for event in prof.events():
        shapes = event.input_shapes
        if event.name in ("aten::mm", "aten::bmm"):
            (*lead, m, k), n = shapes[0], shapes[1][-1]
        elif event.name in ("aten::addmm", "aten::baddbmm"):
            (*lead, m, k), n = shapes[1], shapes[2][-1]
        elif event.name == "aten::mv":
            lead, (m, k), n = [], shapes[0], 1
        elif event.name == "aten::addmv":
            lead, (m, k), n = [], shapes[1], 1
        else:
            continue
        total += 2 * m * k * n * (lead[0] if lead else 1)
    return total


def worker_d3flops(args) -> dict:
    """d3rlpy's executed matmul arithmetic per update (same configuration as d3rlpy_stepper)."""
    run = d3rlpy_stepper(args)
    return {"flops_per_step": executed_matmul_flops(lambda: run(1))}


def worker_flops(args) -> dict:
    """Counted arithmetic per update, and the rate of one large GEMM for reference."""
    import torch

    torch.set_num_threads(args.threads)
    big = torch.randn(1024, 1024)
    big @ big
    t = time.perf_counter()
    for _ in range(20):
        big @ big
    peak = 20 * 2 * 1024 ** 3 / (time.perf_counter() - t)
    flops = sum(2 * m * i * o * count for m, i, o, count in gemm_shapes(k=args.k, batch=args.batch))
    return {"flops_per_step": flops, "large_gemm_flops_per_s": peak}


def worker_eval(args) -> dict:
    """One evaluation as the pool runs it (bear-train.py's Evaluator on a snapshot, args.threads threads), and the
    time its environments take alone: MuJoCo and gymnasium's wrappers, stepped with the same actions again."""
    import numpy as np
    import torch

    bear = load_bear()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = bear.Config(eval_episodes=2 if args.tiny else 10, **TINY_NETS if args.tiny else {})
    agent = bear.BEAR(cfg, OBS, ACT, "gaussian", torch.device("cpu"))
    evaluator = bear.Evaluator(bear.EvalTarget("HalfCheetah-v4", None), cfg, OBS, ACT)
    actions, real_steps = [], [env.step for env in evaluator.envs]
    for env, real in zip(evaluator.envs, real_steps):
        env.step = lambda action, real=real: actions.append((real, action)) or real(action)
    evaluator(bear.eval_snapshot(agent), 0)  # a warm-up, which records the actions taken
    for env, real in zip(evaluator.envs, real_steps):
        env.step = real
    t = time.perf_counter()
    returns = evaluator(bear.eval_snapshot(agent), 0)
    seconds = time.perf_counter() - t
    for env, seed in zip(evaluator.envs, evaluator.seeds):
        env.reset(seed=seed)
    t = time.perf_counter()
    for real, action in actions:
        real(action)
    return {"seconds": seconds, "episodes": len(returns), "env_steps": len(actions),
            "env_seconds": time.perf_counter() - t, "mean_return": float(np.mean(returns))}


def worker_launches(args) -> dict:
    """Operators (aten calls, every level) and, on CUDA, kernels that one post-warm-up update launches (profiler);
    --compile=1: of the compiled update, whose fused loops inductor runs as kernels of its own, which call no aten."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    bear, agent = make_agent(args, compile=bool(args.compile), **{} if args.tiny else {"batch_size": args.batch})
    buffer = bear.ReplayBuffer(synthetic(10_000), agent.device)
    cuda = agent.device.type == "cuda"
    for _ in range(3):
        agent.update(buffer.sample(agent.cfg.batch_size), False)
    agent.metric_sum.tolist()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        agent.update(buffer.sample(agent.cfg.batch_size), False)
        agent.metric_sum.tolist()
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA) if cuda else None
    return {"aten_calls": sum(1 for e in events if e.name.startswith("aten::")), "kernels": kernels}


def worker_data(args) -> dict:
    import resource

    import torch

    bear = load_bear()
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    raw = bear.read_d4rl(Path(args.file), "walker2d")
    transitions = bear.to_transitions(raw)
    buffer = bear.ReplayBuffer(transitions, torch.device("cpu"))
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    n = len(raw["rewards"])  # the Monte-Carlo returns alone, as to_transitions computes them (once per run)
    t = time.perf_counter()
    bear.discounted_returns(raw["rewards"].reshape(n), raw["terminals"].reshape(n) > 0,
                            (raw["terminals"] + raw["timeouts"]).reshape(n) > 0, 0.99)
    returns_seconds = time.perf_counter() - t
    cfg = bear.Config()  # the Q probe as train() reads it once per logging interval, at the default sizes
    critics = bear.QEnsemble(buffer.obs.shape[1], buffer.act.shape[1], cfg.critic_hidden, cfg.num_critics)
    probe = torch.as_tensor(bear.probe_rows(transitions["returns_complete"], cfg.probe_size))
    s, a = buffer.obs[probe], buffer.act[probe]
    times = []
    for _ in range(21):
        t = time.perf_counter()
        bear.q_vs_return(critics, s, a, 1.0)
        times.append(time.perf_counter() - t)
    return {"seconds": seconds, "transitions": buffer.size, "peak_rss_gb": peak, "returns_seconds": returns_seconds,
            "probe_pairs": len(probe), "probe_ms": 1000 * sorted(times)[10]}


def worker_regen(args) -> dict:
    import hashlib

    import h5py

    bear = load_bear()
    spec = bear.resolve_dataset("walker2d-random-v2")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "regen.hdf5"
        t = time.perf_counter()
        bear.regenerate_random(spec, args.regen_steps, path, args.regen_workers)
        seconds = time.perf_counter() - t
        data = bear.to_transitions(bear.read_d4rl(path, "walker2d"))
        digest = hashlib.sha256()
        with h5py.File(path) as f:
            for key in bear.KEYS:
                digest.update(f[key][()].tobytes())
    return {"seconds": seconds, "transitions": len(data["rewards"]), "terminals": int(data["terminals"].sum()),
            "sha256": digest.hexdigest()}


def worker_first_step(args) -> dict:
    """Seconds from a new agent to the end of its first compiled update (post-warm-up), then of the second; the
    inductor cache is TORCHINDUCTOR_CACHE_DIR, cold or warm as the driver chooses."""
    t = time.perf_counter()
    bear, agent = make_agent(args, compile=True, **{} if args.tiny else {"batch_size": args.batch})
    buffer = bear.ReplayBuffer(synthetic(10_000), agent.device)
    times = []
    for _ in range(2):
        agent.update(buffer.sample(agent.cfg.batch_size), False)
        agent.metric_sum.tolist()
        times.append(time.perf_counter() - t)
    return {"first": times[0], "second": times[1] - times[0]}


WORKERS = {"flops": worker_flops, "d3flops": worker_d3flops, "eval": worker_eval, "data": worker_data,
           "regen": worker_regen, "launches": worker_launches, "first_step": worker_first_step}
STEPPERS = {"bear": bear_stepper, "d3rlpy": d3rlpy_stepper, "matmuls": flops_stepper, "optim": optim_stepper}


def serve(args) -> None:
    """Build one stepper, then time blocks on request: each stdin line "n fixed" answers with the seconds taken.
    Protocol lines start with @@ (libraries may print their own lines to stdout)."""
    run = STEPPERS[args.serve](args)
    print("@@ready", flush=True)
    for line in sys.stdin:
        n, fixed = line.split()
        print(f"@@{run(int(n), fixed == '1')}", flush=True)


# ---------------------------------------------------------------------------------------------- driver
def spawn(kind, python=sys.executable, **kw) -> dict:
    cmd = [python, __file__, f"--worker={kind}"] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Server:
    """A stepper in its own process (its own interpreter: d3rlpy lives in a separate venv), kept alive so that blocks
    of the implementations can alternate every few seconds: A B A B ... in one run, under the same machine load.
    It starts at once and is waited for at its first use: servers made together load (and compile) side by side,
    and timing starts once all of them are ready (`ready`)."""

    def __init__(self, kind, python=sys.executable, **kw):
        cmd = [python, __file__, f"--serve={kind}"] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
        self.kind, self.started = kind, False
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))

    def ready(self) -> "Server":
        if not self.started:
            self._answer()
            self.started = True
        return self

    def _answer(self) -> str:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return line[2:].strip()
        raise RuntimeError(f"{self.kind} worker failed:\n{self.proc.stderr.read()[-3000:]}")

    def steps_per_s(self, n, fixed=False) -> float:
        self.ready()
        self.proc.stdin.write(f"{n} {int(fixed)}\n")
        self.proc.stdin.flush()
        return n / float(self._answer())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def ready(*servers) -> None:
    """Waits until every server has loaded, before any is timed."""
    for server in servers:
        server.ready()


def alternated(args, blocks: dict) -> dict:
    """blocks: name -> (server, fixed batch or not). Once every server has loaded, times each block args.rounds
    times, A B A B ..., rotating which goes first, then closes the servers. Returns name -> steps/s, one per round."""
    names, servers = list(blocks), list({id(server): server for server, _ in blocks.values()}.values())
    rate = {name: [] for name in names}
    ready(*servers)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            server, fixed = blocks[name]
            rate[name].append(server.steps_per_s(args.block, fixed))
    for server in servers:
        server.close()
    return rate


def quartiles(xs) -> str:
    q = statistics.quantiles(xs, n=4)
    return f"{q[0]:.2f}-{q[2]:.2f}"


def row(name, value, note=""):
    print(f"| {name} | {value} | {note} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = ["update", "d3rlpy", "flops", "scaling", "script", "eval", "data", "regen", "evalpool", "device", "bf16",
             "compile"]
    p.add_argument("--parts", nargs="+", default=parts[:7], choices=parts)
    p.add_argument("--rounds", type=int, default=15, help="A B rounds; medians are reported")
    p.add_argument("--block", type=int, default=10, help="updates per timed block in the A B rounds")
    p.add_argument("--steps", type=int, default=200, help="bear-train.py's runs in the script and device parts are 4x this")
    p.add_argument("--device", default="cpu", help="where the updates run (cuda:0 on a GPU machine)")
    p.add_argument("--small", action="store_true", help="every part at a tiny size, in seconds (the test suite's smoke "
                                                         "tests); its figures mean nothing")
    p.add_argument("--d3rlpy-python", default=os.environ.get("D3RLPY_PYTHON", str(ROOT / ".venv-d3rlpy/bin/python")))
    p.add_argument("--regen-steps", type=int, default=1_000_000, help="environment steps of the regen part")
    p.add_argument("--pool-steps", type=int, default=1000, help="steps of each run of the evalpool part")
    p.add_argument("--pool-rounds", type=int, default=1, help="runs of each evalpool variant, A B alternating")
    p.add_argument("--pool-variants", nargs="+", default=list(POOL_VARIANTS), choices=list(POOL_VARIANTS),
                   help="evalpool variants: off, pool (a spare core), shared (the training core), inline "
                        "(--eval-workers=0)")
    # worker-only options
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--serve", choices=sorted(STEPPERS), help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--batched", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--tiny", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--compile", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--file", default="", help=argparse.SUPPRESS)
    p.add_argument("--regen-workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    if args.serve:
        serve(args)
        return
    if args.small:
        args.rounds, args.block, args.steps, args.regen_steps, args.pool_steps = 2, 2, 10, 2000, 10
    tiny = int(args.small)  # every bear-train.py agent 8 wide in --small

    import platform

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {cpu_flags()}, torch "
          f"{torch.__version__}, 2 threads; {time.strftime('%Y-%m-%d')}{'; --small: figures mean nothing' * tiny}\n")
    print("| figure | value | how |\n|---|---|---|")
    if {"update", "d3rlpy", "flops"} & set(args.parts):
        have_d3 = "d3rlpy" in args.parts and Path(args.d3rlpy_python).exists()
        servers = {"ours": Server("bear", tiny=tiny)}
        blocks = [("ours", False)]
        if have_d3:
            servers["d3rlpy"] = Server("d3rlpy", python=args.d3rlpy_python, batch=8 if tiny else 256)
            blocks += [("d3rlpy", False), ("d3rlpy fixed", True)]
        if "flops" in args.parts:
            servers["matmuls"] = Server("matmuls", batch=8 if tiny else 256)
            servers["optim"], servers["tiny"] = Server("optim", tiny=tiny), Server("bear", tiny=1)
            blocks += [("matmuls", False), ("optim", False), ("tiny", False)]
        rate = alternated(args, {name: (servers[name.split()[0]], fixed) for name, fixed in blocks})
        how = f"median of {args.rounds} blocks of {args.block} updates"
        ours = statistics.median(rate["ours"])
        row("BEAR update, K=2, batch 256 (steps/s)", f"{ours:.1f}", f"{how}, middle half {quartiles(rate['ours'])}")
        if have_d3:
            theirs, upd = statistics.median(rate["d3rlpy"]), statistics.median(rate["d3rlpy fixed"])
            paired = [x / y for x, y in zip(rate["ours"], rate["d3rlpy"])]
            d3 = spawn("d3flops", python=args.d3rlpy_python, batch=8 if tiny else 256)
            row("d3rlpy 2.8.1 BEAR, same settings, its sampling + update (steps/s)", f"{theirs:.1f}",
                f"{how}, middle half {quartiles(rate['d3rlpy'])}")
            row("d3rlpy 2.8.1 BEAR, update on a fixed batch (steps/s)", f"{upd:.1f}", "excludes its batch sampling")
            row("d3rlpy 2.8.1 BEAR, matrix-multiply arithmetic per update (GFLOP)", f"{d3['flops_per_step'] / 1e9:.2f}",
                "from the shapes of the matmuls it executes (profiler)")
            row("ratio ours / d3rlpy (same run)", f"{statistics.median(paired):.2f}x",
                f"median of the {len(paired)} per-round ratios, middle half {quartiles(paired)}; ratio of medians "
                f"{ours / theirs:.2f}x; {ours / upd:.2f}x against its update alone")
        elif "d3rlpy" in args.parts:
            row("d3rlpy 2.8.1 BEAR", "skipped", f"no interpreter at {args.d3rlpy_python} (see README)")
        if "flops" in args.parts:
            f = spawn("flops", batch=8 if tiny else 256)
            limit = statistics.median(rate["matmuls"])
            fraction = [x / y for x, y in zip(rate["ours"], rate["matmuls"])]
            row("matrix-multiply arithmetic per update (GFLOP)", f"{f['flops_per_step'] / 1e9:.2f}",
                "counted from the layer shapes (equals what the profiler sees executed: tests/test_benchmark.py)")
            row("matrix-multiply rate at those shapes (GFLOP/s)", f"{f['flops_per_step'] * limit / 1e9:.0f}",
                f"large 1024x1024 GEMM: {f['large_gemm_flops_per_s'] / 1e9:.0f}")
            row("arithmetic limit (steps/s)", f"{limit:.1f}",
                "a step's matmuls alone, back to back, in blocks between the update blocks")
            row("achieved fraction of the limit", f"{statistics.median(fraction):.0%}",
                f"median of the per-round ratios, middle half {quartiles([100 * x for x in fraction])} %")
            optim_ms = 1e3 / statistics.median(rate["optim"])
            row("optimiser steps + Polyak alone (ms/update)", f"{optim_ms:.1f}",
                "4 fused Adam steps and the target average, nothing else: a floor under the non-matmul work")
            tiny_ms = 1e3 / statistics.median(rate["tiny"])
            row("the same update on 8-wide networks, batch 8 (ms/update)", f"{tiny_ms:.1f}",
                "the same operations with next to no arithmetic: per-operation cost that no size shrinks")
            if have_d3:
                need = 1.5 * theirs
                row("1.5x d3rlpy would need (steps/s)", f"{need:.1f}",
                    f"{need / limit:.0%} of the arithmetic limit: {1e3 / need - 1e3 / limit:.1f} ms/update for all "
                    f"non-matmul work, against {optim_ms:.1f} ms for the optimisers alone and {tiny_ms:.1f} ms for "
                    "the operations on 8-wide networks")
    if "scaling" in args.parts:
        rounds = 1 if tiny else max(3, args.rounds // 3)
        for k in (2,) if tiny else (2, 5, 10):  # A B A B: the script's loop of K networks, one batched bmm module
            looped, batched = Server("bear", k=k, tiny=tiny), Server("bear", k=k, batched=1, tiny=tiny)
            ready(looped, batched)
            rates = [(looped.steps_per_s(args.block), batched.steps_per_s(args.block)) for _ in range(rounds)]
            looped.close(), batched.close()
            row(f"K={k} critics, batch 256 (steps/s)", f"{statistics.median(r[0] for r in rates):.1f}",
                f"as one batched bmm module: {statistics.median(r[1] for r in rates):.1f} (medians of {rounds} blocks each)")
        for batch in (512,) if tiny else (512, 1024):
            server = Server("bear", batch=batch, tiny=tiny)
            rate = statistics.median(server.steps_per_s(max(2, args.block // 2)) for _ in range(rounds))
            server.close()
            row(f"K=2, batch {batch} (steps/s)", f"{rate:.1f}", f"median of {rounds} blocks")
    if "script" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "walker2d_synthetic.hdf5"
            write_million(path, n=2000 if tiny else 100_000)
            results = run_script(path, tmp, tiny, "--gpu=-1", "--warmup-steps=0", f"--max-steps={4 * args.steps}",
                                 "--eval-every=1000000", "--eval-episodes=1", "--eval-workers=0")
        row("bear-train.py end to end, results.json (steps/s)", f"{results['train_steps_per_second']:.1f}",
            f"{4 * args.steps} steps, warm-up 0, evaluation excluded")
    if "eval" in args.parts:
        e = spawn("eval", threads=1, tiny=tiny)
        row(f"evaluation, {e['episodes']} episodes x 1000 steps, 100 candidates, 1 thread (s)", f"{e['seconds']:.1f}",
            f"HalfCheetah-v4, as a pool worker runs it; the environments alone (MuJoCo, gymnasium's wrappers, the "
            f"same {e['env_steps']} actions): {e['env_seconds']:.2f} s, {e['env_seconds'] / e['seconds']:.0%}")
    if "data" in args.parts:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "walker2d_random-v2.hdf5"
            write_million(path, n=10_000 if tiny else 1_000_000)
            d = spawn("data", file=path)
        row(f"load {d['transitions'] + 1} rows into training tensors (s)", f"{d['seconds']:.1f}",
            f"peak RSS {d['peak_rss_gb']:.2f} GB, {d['transitions']} transitions, gzip like D4RL's; of which the "
            f"data's Monte-Carlo returns {d['returns_seconds']:.2f} s")
        row(f"the Q probe, {d['probe_pairs']} pairs through the K=2 critics (ms)", f"{d['probe_ms']:.1f}",
            f"median of 21; once per logging interval (--log-every, 1 000 updates), outside the update; "
            f"{args.threads} threads")
    if "regen" in args.parts:
        one, two = (spawn("regen", regen_steps=args.regen_steps, regen_workers=w) for w in (1, 2))
        for workers, r in ((1, one), (2, two)):
            row(f"regenerate walker2d-random, {args.regen_steps} steps, {workers} worker(s) (s)", f"{r['seconds']:.0f}",
                f"{r['transitions']} transitions, {r['terminals']} terminal")
        row("regeneration speed-up, 2 workers over 1", f"{one['seconds'] / two['seconds']:.2f}x",
            "arrays identical" if one["sha256"] == two["sha256"] else "ARRAYS DIFFER")
        if args.regen_steps == 1_000_000:  # the README's figure
            same = (one["transitions"], one["terminals"]) == README_REGEN
            row("the README's 999 999 transitions, 47 295 terminal", "reproduced" if same else "NOT REPRODUCED",
                f"{one['transitions']} and {one['terminals']} in this run")
    if "evalpool" in args.parts:
        evalpool_part(args, tiny)
    if "bf16" in args.parts:
        bf16_part(args, tiny)
    if "compile" in args.parts:
        compile_part(args, tiny)
    if "device" in args.parts:
        device_part(args, tiny)


README_REGEN = (999_999, 47_295)  # walker2d-random-v2 regenerated by the current recipe, 1M steps


def cpu_flags() -> str:
    """What the CPU reports that matters here: its vector and matrix extensions."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "CPU flags unknown"
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return "flags: " + (" ".join(flag for flag in wanted if flag in flags) or "none of " + " ".join(wanted))


def run_script(path, tmp, tiny, *flags, popen=False):
    """bear-train.py on `path`; 8-wide networks in --small. Returns its results.json, or the Popen."""
    small = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_NETS.items()] + ["--eval-episodes=2", "--eval-candidates=4"]
    cmd = [sys.executable, str(ROOT / "bear-train.py"), f"--dataset={path}", f"--log-dir={tmp}/runs", *flags,
           *(small if tiny else [])]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bear-train.py failed:\n{out.stderr[-3000:]}")
    return json.loads(max(Path(tmp).glob("runs/*/results.json"), key=os.path.getmtime).read_text())


POOL_VARIANTS = {"off": "only at the end (off)", "pool": "pool",
                 "shared": "pool on the training core", "inline": "in process"}


def evalpool_part(args, tiny) -> None:
    """Up to four runs on a HalfCheetah-shaped file (every evaluation is 10 full 1000-step episodes): evaluation every
    250 steps in the pool (on a spare core, and on the training core), the same in the training process, and
    evaluation off (one evaluation, at the end). Training is pinned to one core with 1 thread; the pool's worker is
    moved to its core once it starts. With --pool-rounds=R every variant runs R times, A B A B (the order rotating
    each round): walls are medians, ratios the medians of the per-round ratios."""
    cores = sorted(os.sched_getaffinity(0))
    train_core, pool_core = cores[0], cores[-1]
    every = 5 if tiny else 250
    names = [v for v in POOL_VARIANTS if v in args.pool_variants]
    walls, rates, waits = ({name: [] for name in names} for _ in range(3))
    with tempfile.TemporaryDirectory() as tmp:
        # --small: a walker2d-shaped file, whose evaluation episodes end within steps, not after 1000
        path = Path(tmp) / ("walker2d_synthetic.hdf5" if tiny else "halfcheetah_synthetic.hdf5")
        write_million(path, n=2000 if tiny else 100_000)
        flags = {"off": ([f"--eval-every={args.pool_steps}", "--eval-workers=1"], pool_core),
                 "pool": ([f"--eval-every={every}", "--eval-workers=1"], pool_core),
                 "shared": ([f"--eval-every={every}", "--eval-workers=1"], train_core),
                 "inline": ([f"--eval-every={every}", "--eval-workers=0"], pool_core)}
        for r in range(args.pool_rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                extra, worker_core = flags[name]
                results = pool_run(path, tmp, tiny, f"{name}-{r}", args.pool_steps, extra, train_core, worker_core)
                walls[name].append(results["wall_clock_seconds"])
                rates[name].append(results["train_steps_per_second"])
                waits[name].append(results["eval_wait_seconds"] + results["final_eval_wait_seconds"])
    rounds = f"median of {args.pool_rounds} runs; " if args.pool_rounds > 1 else ""
    for name in names:
        worker_core = flags[name][1]
        label = POOL_VARIANTS[name] if name == "off" else f"every {every} steps, {POOL_VARIANTS[name]}"
        row(f"{args.pool_steps} steps, evaluation {label} (wall s)", f"{statistics.median(walls[name]):.0f}",
            f"{rounds}training on core {train_core}, 1 thread, between evaluations "
            f"{statistics.median(rates[name]):.2f} steps/s; "
            f"{'no worker' if name == 'inline' else f'the worker on core {worker_core}'}; waited for evaluations "
            f"{statistics.median(waits[name]):.1f} s in all")
    ratios = (("pool", "evaluation in the pool, wall time over evaluation off", f"{len(cores)} usable cores; the "
               "worker on a spare core"),
              ("shared", "the pool without a spare core, over evaluation off", "the worker shares the training core"),
              ("inline", "evaluation in the training process, wall time over evaluation off", "--eval-workers=0"))
    for name, what, how in ratios:
        if "off" in names and name in names:
            paired = statistics.median(a / b for a, b in zip(walls[name], walls["off"]))
            row(what, f"{paired:.3f}x", f"same run; {how}" + (f"; per round: "
                + ", ".join(f"{a / b:.3f}" for a, b in zip(walls[name], walls["off"])) if args.pool_rounds > 1 else ""))


def pool_run(path, tmp, tiny, run_name, steps, extra, train_core, worker_core) -> dict:
    """One run of the evalpool part: training pinned to train_core, its evaluation worker moved to worker_core once
    it starts. Returns its results.json."""
    proc = run_script(path, tmp, tiny, "--gpu=-1", "--threads=1", "--warmup-steps=0", f"--run-name={run_name}",
                      f"--max-steps={steps}", *extra, popen=True)
    os.sched_setaffinity(proc.pid, {train_core})
    while proc.poll() is None:  # the worker (a child of the training process) goes to its core
        for child in children(proc.pid):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(child, {worker_core})
        time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(f"bear-train.py failed:\n{proc.stderr.read()[-3000:]}")
    return json.loads((Path(tmp) / "runs" / run_name / "results.json").read_text())


def bf16_part(args, tiny) -> None:
    """--precision=bf16 against fp32, A B alternating in one run: the update, the step's matmuls alone in each dtype
    (the arithmetic limits) and d3rlpy 2.8.1 (fp32) when its venv is there."""
    servers = {"fp32": Server("bear", tiny=tiny), "bf16": Server("bear", tiny=tiny, precision="bf16"),
               "fp32 matmuls": Server("matmuls", batch=8 if tiny else 256),
               "bf16 matmuls": Server("matmuls", batch=8 if tiny else 256, precision="bf16")}
    if Path(args.d3rlpy_python).exists():
        servers["d3rlpy"] = Server("d3rlpy", python=args.d3rlpy_python, batch=8 if tiny else 256)
    rate = alternated(args, {name: (server, False) for name, server in servers.items()})
    median = {name: statistics.median(v) for name, v in rate.items()}
    how = f"median of {args.rounds} blocks of {args.block} updates, A B alternating"
    row("BEAR update, fp32 (steps/s)", f"{median['fp32']:.1f}", how)
    row("BEAR update, --precision=bf16 (steps/s)", f"{median['bf16']:.1f}", how)
    paired = [b / f for b, f in zip(rate["bf16"], rate["fp32"])]
    row("bf16 over fp32", f"{statistics.median(paired):.2f}x", f"median of the per-round ratios; this CPU: "
        f"{cpu_flags()}; bf16 is fast only with amx_bf16 or avx512_bf16")
    for dtype in ("fp32", "bf16"):
        fraction = statistics.median(x / y for x, y in zip(rate[dtype], rate[f"{dtype} matmuls"]))
        how = f"the step's matmuls alone in {dtype}, as contiguous torch.mm; the update runs at {fraction:.0%} of it"
        if fraction > 1:  # then it is no limit: the layers' own operand layouts ran faster than contiguous ones
            how += (" (above 100 %: not a limit on this CPU, whose bf16 kernels for contiguous operands are slower "
                    "than for the transposed weights nn.Linear passes)")
        row(f"{dtype} matmuls alone (steps/s)", f"{median[f'{dtype} matmuls']:.1f}", how)
    if "d3rlpy" in rate:
        paired = [b / d for b, d in zip(rate["bf16"], rate["d3rlpy"])]
        row("bf16 update over d3rlpy 2.8.1 (fp32), same run", f"{statistics.median(paired):.2f}x",
            f"d3rlpy {median['d3rlpy']:.1f} steps/s")
    else:
        row("d3rlpy 2.8.1 BEAR", "skipped", f"no interpreter at {args.d3rlpy_python} (see README)")


def has_bf16() -> bool:
    return any(flag in cpu_flags().split() for flag in ("avx512_bf16", "amx_bf16"))


def compile_part(args, tiny) -> None:
    """--compile against eager, A B alternating in one run: fp32, and bf16 where the CPU has bf16 instructions; the
    fp32 arithmetic limit; the time to the first compiled step with a cold and a warm inductor cache; operators per
    update, eager and compiled. Everything after the cold start compiles into the cache that start filled."""
    batch, bf16 = 8 if tiny else 256, has_bf16() and not tiny  # --small: fp32 only, one compile fewer for the suite
    with tempfile.TemporaryDirectory() as cache, patched_environ(TORCHINDUCTOR_CACHE_DIR=cache):
        cold, warm = spawn("first_step", tiny=tiny), spawn("first_step", tiny=tiny)  # an empty cache, then filled
        servers = {"eager fp32": Server("bear", tiny=tiny), "compiled fp32": Server("bear", tiny=tiny, compile=1,
                                                                                    warmup=3),
                   "fp32 matmuls": Server("matmuls", batch=batch)}
        if bf16:
            servers |= {"eager bf16": Server("bear", tiny=tiny, precision="bf16"),
                        "compiled bf16": Server("bear", tiny=tiny, precision="bf16", compile=1, warmup=3)}
        rate = alternated(args, {name: (server, False) for name, server in servers.items()})
        eager_ops, compiled_ops = spawn("launches", tiny=tiny), spawn("launches", tiny=tiny, compile=1)

    def paired(a, b, form="{:.2f}x"):
        return form.format(statistics.median(x / y for x, y in zip(rate[a], rate[b])))

    how, no_bf16 = (f"median of {args.rounds} blocks of {args.block} post-warm-up updates, A B alternating",
                    "skipped in --small" if tiny else f"skipped: this CPU has no bf16 instructions ({cpu_flags()})")
    for name in ("eager fp32", "compiled fp32", "eager bf16", "compiled bf16"):
        row(f"BEAR update, {name} (steps/s)", f"{statistics.median(rate[name]):.1f}" if name in rate else no_bf16, how)
    row("compiled over eager, fp32", paired("compiled fp32", "eager fp32"), "median of the per-round ratios")
    row("compiled over eager, bf16", paired("compiled bf16", "eager bf16") if bf16 else no_bf16,
        "median of the per-round ratios")
    row("compiled bf16 over eager fp32", paired("compiled bf16", "eager fp32") if bf16 else no_bf16,
        "median of the per-round ratios")
    row("fp32 arithmetic limit (steps/s)", f"{statistics.median(rate['fp32 matmuls']):.1f}",
        "a step's matmuls alone, back to back, in blocks between the update blocks")
    for name in ("eager fp32", "compiled fp32"):
        row(f"{name}: fraction of that limit", paired(name, "fp32 matmuls", "{:.0%}"), "median of the per-round ratios")
    row("new agent to the end of its first compiled update, cold inductor cache (s)", f"{cold['first']:.1f}",
        f"a fresh process and an empty cache; its second update then took {cold['second'] * 1e3:.0f} ms")
    row("the same, warm inductor cache (s)", f"{warm['first']:.1f}", "a fresh process, the cache the run above filled")
    row("operators per update, eager (aten calls)", eager_ops["aten_calls"], "one post-warm-up update, profiler")
    row("operators per update, compiled (aten calls)", compiled_ops["aten_calls"],
        "the rest of the step runs in inductor's own fused loops, which call no aten operator")


@contextlib.contextmanager
def patched_environ(**env):
    """os.environ with env added, for the worker processes started inside."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def children(pid: int) -> list[int]:
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


def device_part(args, tiny) -> None:
    """Every figure of one device, in one go (on a GPU machine: --device=cuda:0)."""
    dev, rounds = args.device, 2 if tiny else 5
    shapes = ((2, 256),) if tiny else ((2, 256), (10, 256), (2, 1024))
    eager = {shape: Server("bear", k=shape[0], batch=shape[1], device=dev, tiny=tiny) for shape in shapes}
    compiled = Server("bear", device=dev, tiny=tiny, compile=1, warmup=3)
    ready(*eager.values(), compiled)  # loaded (and compiled) side by side; timed one at a time
    for (k, batch), server in eager.items():
        rate = statistics.median(server.steps_per_s(args.block) for _ in range(rounds))
        row(f"{dev}: eager update, K={k}, batch {batch} (steps/s)", f"{rate:.1f}", f"median of {rounds} blocks of "
            f"{args.block}")
    pairs = [(eager[2, 256].steps_per_s(args.block), compiled.steps_per_s(args.block)) for _ in range(rounds)]
    for server in (*eager.values(), compiled):
        server.close()
    plain, fast = statistics.median(r[0] for r in pairs), statistics.median(r[1] for r in pairs)
    row(f"{dev}: --compile, K=2, batch 256 (steps/s)", f"{fast:.1f}", f"eager {plain:.1f} in the same A B rounds: "
        f"{fast / plain:.2f}x")
    if Path(args.d3rlpy_python).exists():
        server = Server("d3rlpy", python=args.d3rlpy_python, device=dev, batch=8 if tiny else 256)
        rate = statistics.median(server.steps_per_s(args.block) for _ in range(rounds))
        server.close()
        row(f"{dev}: d3rlpy 2.8.1 BEAR, same settings (steps/s)", f"{rate:.1f}", f"median of {rounds} blocks")
    else:
        row(f"{dev}: d3rlpy 2.8.1 BEAR", "skipped", f"no interpreter at {args.d3rlpy_python} (see README)")
    e = spawn("eval", threads=1, tiny=tiny)
    row("one evaluation, 10 HalfCheetah episodes, on one CPU core (s)", f"{e['seconds']:.1f}",
        "the pool's workers evaluate on the CPU, whatever the training device")
    launches = spawn("launches", device=dev, tiny=tiny)
    row(f"{dev}: operators per update (aten calls)", launches["aten_calls"], "one post-warm-up update, profiler")
    row(f"{dev}: kernels per update", launches["kernels"] if launches["kernels"] is not None else "n/a (no CUDA)",
        "CUDA kernels launched by one update, profiler")
    steps = 4 * args.steps
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "walker2d_synthetic.hdf5"
        write_million(path, n=2000 if tiny else 100_000)
        gpu = "0" if dev.startswith("cuda") else "-1"
        t = time.perf_counter()
        results = run_script(path, tmp, tiny, "--seed=0", f"--gpu={gpu}", f"--max-steps={steps}",
                             f"--eval-every={10 if tiny else 1000}")
        wall = time.perf_counter() - t
    waited = results["eval_wait_seconds"] + results["final_eval_wait_seconds"]
    row(f"the seed command, {steps} steps, evaluation pool of {results['eval_workers']} (wall s)", f"{wall:.0f}",
        f"a synthetic walker2d-shaped file; results.json: {results['wall_clock_seconds']:.0f} s training, "
        f"{results['train_steps_per_second']:.0f} updates/s")
    row("evaluation share of that wall time", f"{waited / results['wall_clock_seconds']:.1%}",
        f"time training waited for the pool ({waited:.1f} s), final evaluation included")
    per_step = (results["wall_clock_seconds"] - results["final_eval_wait_seconds"]) / steps
    row("projected 1M steps (h)", f"{1e6 * per_step / 3600:.2f}", f"{per_step * 1e3:.2f} ms a step, evaluations "
        f"included; the pool must then finish {1 / (per_step * 1000):.2f} evaluations a second at the default "
        f"schedule: {e['seconds'] * 1 / (per_step * 1000):.1f} worker cores at {e['seconds']:.1f} s each")


def write_million(path: Path, n=1_000_000):
    """A D4RL-layout file of n rows with walker2d's shapes, gzip-compressed as D4RL's files are."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=rng.normal(size=(n, OBS)).astype(np.float32), compression="gzip")
        f.create_dataset("next_observations", data=rng.normal(size=(n, OBS)).astype(np.float32), compression="gzip")
        f.create_dataset("actions", data=rng.uniform(-1, 1, (n, ACT)).astype(np.float32), compression="gzip")
        f.create_dataset("rewards", data=rng.normal(size=n).astype(np.float32), compression="gzip")
        f.create_dataset("terminals", data=rng.random(n) < 0.05, compression="gzip")
        f.create_dataset("timeouts", data=np.zeros(n, bool), compression="gzip")


if __name__ == "__main__":
    main()
