"""--precision=bf16: bf16 matrix multiplies, float32 everywhere else; close to the fp32 update; refused where it cannot
run, with the usual one line; a resume keeps the run's precision. (The fp32 default is the update of every other test,
test_update.py's reference included.)"""
import json
import subprocess
import sys

import pytest
import torch

import launch
from conftest import SCRIPT, random_transitions, write_d4rl_file

TINY = ["--actor-hidden=16", "--critic-hidden=16", "--vae-hidden=16", "--batch-size=16", "--warmup-steps=10",
        "--log-every=10", "--eval-episodes=1", "--eval-candidates=4", "--gpu=-1", "--eval-workers=0"]


def buffer_and_agents(bear, precision_pairs=("fp32", "bf16"), hidden=32):
    data = random_transitions(2000)
    buffer = bear.ReplayBuffer(data, torch.device("cpu"))
    agents = []
    for precision in precision_pairs:
        torch.manual_seed(0)
        cfg = bear.Config(precision=precision, actor_hidden=hidden, critic_hidden=hidden, vae_hidden=2 * hidden,
                          batch_size=64, warmup_steps=100)
        agents.append(bear.BEAR(cfg, 17, 6, "laplacian", torch.device("cpu")))
    return buffer, agents


def test_the_bf16_update_stays_close_to_the_fp32_one(bear):
    """Same seed, same batches, 300 steps across the warm-up boundary: every logged 50-step mean within 2 % of the
    fp32 one, or within 0.002 of it for Q, which starts near 0 (measured here: at most 0.04 % on the losses, 0.0002
    on Q), while the parameters did move apart (bf16 did run)."""
    buffer, (fp32, bf16) = buffer_and_agents(bear)
    worst, worst_q = {k: 0.0 for k in bear.METRICS if k not in ("q_mean", "alpha_at_clamp")}, 0.0
    for block in range(6):
        for i in range(50):
            batch = buffer.sample(64)
            step = 50 * block + i + 1
            for agent in (fp32, bf16):
                torch.manual_seed(step)  # the same draws for both
                agent.update(batch, step <= 100)
        means = [dict(zip(bear.METRICS, (a.metric_sum / 50).tolist())) for a in (fp32, bf16)]
        for a in (fp32, bf16):
            a.metric_sum.zero_()
        for k in worst:
            worst[k] = max(worst[k], abs(means[1][k] - means[0][k]) / abs(means[0][k]))
        assert means[1]["alpha_at_clamp"] == means[0]["alpha_at_clamp"]  # a share of steps: the same steps
        worst_q = max(worst_q, abs(means[1]["q_mean"] - means[0]["q_mean"]))
    print("largest relative difference of the 50-step means:", {k: f"{v:.2e}" for k, v in worst.items()},
          f"q_mean: {worst_q:.2e} absolute")
    assert max(worst.values()) < 0.02 and worst_q < 0.002, (worst, worst_q)
    moved = max((p - q).abs().max().item() for p, q in zip(fp32.actor.parameters(), bf16.actor.parameters()))
    assert moved > 1e-6  # the bf16 run is not the fp32 run


def test_under_bf16_the_matmuls_are_bf16_and_the_equations_float32(bear, monkeypatch):
    seen = {}

    def watch(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen.setdefault(name, set()).update(a.dtype for a in (*args, out) if isinstance(a, torch.Tensor))
            return out
        monkeypatch.setattr(bear, name, wrapped)

    for name in ("mmd", "critic_target", "dual_loss", "actor_q_term"):
        watch(name, getattr(bear, name))
    monkeypatch.setitem(bear.KERNELS, "laplacian", watch_kernel(bear.KERNELS["laplacian"], seen))
    matmuls, real_addmm = [], torch.addmm

    def recording_addmm(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        matmuls.append(out.dtype)
        return out

    monkeypatch.setattr(torch, "addmm", recording_addmm)
    buffer, (agent,) = buffer_and_agents(bear, ("bf16",), hidden=8)
    agent.update(buffer.sample(64), False)
    for name in ("mmd", "critic_target", "dual_loss", "actor_q_term", "kernel"):
        assert seen[name] == {torch.float32}, (name, seen[name])
    assert matmuls and set(matmuls) == {torch.bfloat16}  # every addmm of the networks ran in bf16
    assert all(p.dtype == torch.float32 for p in agent.critics.parameters())  # master weights
    assert all(v.dtype == torch.float32 for state in agent.critic_opt.state.values() for v in state.values()
               if v.is_floating_point())  # the optimiser's state
    assert agent.metric_sum.dtype == torch.float32


def watch_kernel(kernel, seen):
    def wrapped(x, y, sigma):
        out = kernel(x, y, sigma)
        seen.setdefault("kernel", set()).update({x.dtype, y.dtype, out.dtype})
        return out
    return wrapped


def test_bf16_evaluates_in_bf16_too(bear):
    """The evaluation's candidates are scored under the training precision: a bf16 run's returns differ from what the
    same snapshot gives in fp32."""
    cfg32 = bear.Config(actor_hidden=16, critic_hidden=16, vae_hidden=16, eval_episodes=1, eval_candidates=50)
    cfg16 = bear.Config(**{**cfg32.__dict__, "precision": "bf16"})
    torch.manual_seed(0)
    agent = bear.BEAR(cfg32, 11, 3, "laplacian", torch.device("cpu"))
    target = bear.EvalTarget("Hopper-v4", None)
    snapshot = bear.eval_snapshot(agent)
    seen = []
    real = bear.QEnsemble.forward
    bear.QEnsemble.forward = lambda self, s, a: seen.append(torch.get_autocast_dtype("cpu")
                                                            if torch.is_autocast_enabled("cpu") else None) or real(self, s, a)
    try:
        bear.Evaluator(target, cfg16, 11, 3)(snapshot, 1)
        assert seen and set(seen) == {torch.bfloat16}
        seen.clear()
        bear.Evaluator(target, cfg32, 11, 3)(snapshot, 1)
        assert set(seen) == {None}
    finally:
        bear.QEnsemble.forward = real


def run(args, cwd):
    return launch.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_a_bf16_run_says_what_the_hardware_lacks_and_a_resume_keeps_its_precision(bear, tmp_path):
    data = tmp_path / "walker2d_p.hdf5"
    write_d4rl_file(data, n=400)
    args = [f"--dataset={data}", f"--log-dir={tmp_path}", "--max-steps=20", "--eval-every=20", *TINY]
    out = run(args + ["--precision=bf16"], tmp_path)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "walker2d_p__seed0" / "results.json").read_text())
    slow = bear.bf16_slow(torch.device("cpu"))
    assert results["precision"] == "bf16" and results["precision_note"] == slow
    warnings = [line for line in out.stderr.splitlines() if "WARNING: --precision=bf16" in line]
    assert len(warnings) == (1 if slow else 0)  # once, and only where bf16 would be slow
    refused = run(args[:2] + ["--max-steps=40", "--resume", "--precision=fp32", *args[3:]], tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"bear-train.py: error: --resume: {tmp_path / 'walker2d_p__seed0'} was started with --precision=bf16, not fp32; "
        "resume with the run's own settings"]


def test_unsupported_precisions_are_one_line_errors(bear, tmp_path, monkeypatch, capsys):
    data = tmp_path / "walker2d_q.hdf5"
    write_d4rl_file(data, n=400)
    out = run([f"--dataset={data}", "--precision=fp16", "--gpu=-1"], tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "bear-train.py: error: --precision=fp16 is unknown; use fp32 or bf16"]
    # a GPU without bf16 tensor cores (a V100: compute capability 7.0), simulated
    for name, value in (("is_available", lambda: True), ("device_count", lambda: 1), ("set_device", lambda d: None),
                        ("get_device_capability", lambda d=None: (7, 0))):
        monkeypatch.setattr(torch.cuda, name, value)
    code = bear.main([f"--dataset={data}", "--precision=bf16", "--gpu=0", f"--log-dir={tmp_path / 'runs'}"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "bear-train.py: error: --precision=bf16 needs a GPU with bf16 tensor cores (compute capability 8.0 or newer); "
        "cuda:0 has compute capability 7.0: use --precision=fp32"]
    assert not (tmp_path / "runs").exists()
