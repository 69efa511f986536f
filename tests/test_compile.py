"""--compile: torch.compile of the update gives the same losses as the eager update (CPU, float tolerance).

Both tests and the speed benchmark's --small compile the update at the same sizes (8 wide, batch 8, K = 2, 17-dim
states, 6-dim actions): inductor's cache of compiled graphs then compiles it once in a session, not three times."""
import pytest
import torch

from conftest import random_transitions, run_main

EIGHT = dict(actor_hidden=8, critic_hidden=8, vae_hidden=8, batch_size=8)  # benchmarks/speed.py's TINY_NETS


def test_compiled_update_matches_eager(bear):
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True  # the compiled graph draws the same random numbers as eager
    data = random_transitions(500, terminal_rate=0.1)
    buffer = bear.ReplayBuffer(data, torch.device("cpu"))
    batches = [buffer.sample(8) for _ in range(4)]
    sums = []
    for compile in (False, True):
        cfg = bear.Config(compile=compile, **EIGHT)
        torch.manual_seed(0)
        agent = bear.BEAR(cfg, 17, 6, "laplacian", torch.device("cpu"))
        per_step = []
        for i, batch in enumerate(batches):
            agent.update(batch, warmup=i < 2)  # two warm-up steps, then two with the Q term
            per_step.append(agent.metric_sum.clone())
            agent.metric_sum.zero_()
        sums.append(torch.stack(per_step))
        params = torch.cat([p.detach().flatten() for p in agent.actor.parameters()])
        sums.append(params)
    eager, eager_params, compiled, compiled_params = sums
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_params, eager_params, rtol=1e-4, atol=1e-5)
    assert not torch.equal(eager[0], eager[-1])  # the steps did change something


def test_compile_through_the_command_line_gives_the_eager_runs_numbers(bear, tmp_path, capsys, monkeypatch):
    import csv
    import json

    from conftest import write_d4rl_file

    compiled_calls, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compiled_calls.append(a) or real_compile(*a, **k))

    data = tmp_path / "walker2d_c.hdf5"
    write_d4rl_file(data, n=400)
    args = [f"--dataset={data}", f"--log-dir={tmp_path}", "--max-steps=8", "--warmup-steps=4", "--log-every=4",
            "--eval-every=8", *(f"--{k.replace('_', '-')}={v}" for k, v in EIGHT.items()), "--eval-episodes=1",
            "--eval-candidates=4", "--gpu=-1", "--eval-workers=0", "--threads=1"]
    rows = {}
    for name, flag in (("eager", "--no-compile"), ("compiled", "--compile")):
        before = len(compiled_calls)
        code, _, err = run_main(bear, args + [flag, f"--run-name={name}"], capsys)
        assert code == 0, err[-3000:]
        assert len(compiled_calls) - before == (name == "compiled")  # the update, compiled only with --compile
        with open(tmp_path / name / "metrics.csv", newline="") as f:
            rows[name] = list(csv.DictReader(f))
    assert len(rows["compiled"]) == len(rows["eager"]) == 2
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compile"] is True
    for eager, compiled in zip(rows["eager"], rows["compiled"]):  # both warm-up and post-warm-up steps
        for key in ("vae_loss", "critic_loss", "actor_loss", "alpha", "mmd", "q_mean", "q_data"):
            assert float(compiled[key]) == pytest.approx(float(eager[key]), rel=1e-4, abs=1e-6), key
