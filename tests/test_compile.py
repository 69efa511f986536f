"""--compile: torch.compile of the update gives the eager update's numbers (CPU, float tolerance), step by step, through
the command line: first the warm-up steps, then the steps with the Q term.

Both tests and the speed benchmark's --small compile the update at the same sizes (8 wide, batch 8, K = 2, 17-dim
states, 6-dim actions): inductor's cache of compiled graphs then compiles each graph once in a session. The second test
finds the warm-up graphs in it and compiles only those of the Q term, so that neither test compiles everything."""
import csv
import json

import pytest
import torch

from conftest import run_main, write_d4rl_file

EIGHT = dict(actor_hidden=8, critic_hidden=8, vae_hidden=8, batch_size=8)  # benchmarks/speed.py's TINY_NETS
METRICS = ("vae_loss", "critic_loss", "actor_loss", "alpha_loss", "alpha", "alpha_at_clamp", "mmd", "q_mean",
           "q_data")


def eager_and_compiled(bear, tmp_path, capsys, monkeypatch, steps, warmup):
    """The same run eager and with --compile, a metrics.csv row per step: (rows, final agent state) of each."""
    compiled_calls, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compiled_calls.append(a) or real_compile(*a, **k))
    data = tmp_path / "walker2d_c.hdf5"
    write_d4rl_file(data, n=400)
    args = [f"--dataset={data}", f"--log-dir={tmp_path}", f"--max-steps={steps}", f"--warmup-steps={warmup}",
            "--log-every=1", f"--eval-every={steps}", f"--checkpoint-every={steps}",
            *(f"--{k.replace('_', '-')}={v}" for k, v in EIGHT.items()), "--eval-episodes=1", "--eval-candidates=4",
            "--gpu=-1", "--eval-workers=0", "--threads=1"]
    rows, states = {}, {}
    for name, flag in (("eager", "--no-compile"), ("compiled", "--compile")):
        before = len(compiled_calls)
        code, _, err = run_main(bear, args + [flag, f"--run-name={name}"], capsys)
        assert code == 0, err[-3000:]
        assert len(compiled_calls) - before == (name == "compiled")  # the update, compiled only with --compile
        with open(tmp_path / name / "metrics.csv", newline="") as f:
            rows[name] = list(csv.DictReader(f))
        states[name] = torch.load(tmp_path / name / f"checkpoint-{steps:09d}.pt", weights_only=False)["agent"]
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compile"] is True
    assert len(rows["compiled"]) == len(rows["eager"]) == steps
    for eager, compiled in zip(rows["eager"], rows["compiled"]):
        for key in METRICS:
            assert float(compiled[key]) == pytest.approx(float(eager[key]), rel=1e-4, abs=1e-6), (eager["step"], key)
    for net in ("vae", "actor", "critics", "target_critics"):
        for key, value in states["eager"][net].items():
            torch.testing.assert_close(states["compiled"][net][key], value, rtol=1e-4, atol=1e-5, msg=f"{net}.{key}")
    torch.testing.assert_close(states["compiled"]["log_alpha"], states["eager"]["log_alpha"], rtol=1e-4, atol=1e-5)
    return rows


def test_compiled_warm_up_steps_give_the_eager_numbers(bear, tmp_path, capsys, monkeypatch):
    rows = eager_and_compiled(bear, tmp_path, capsys, monkeypatch, steps=2, warmup=2)
    assert rows["eager"][0]["actor_loss"] != rows["eager"][1]["actor_loss"]  # the steps did change something


def test_compiled_steps_with_the_q_term_give_the_eager_numbers(bear, tmp_path, capsys, monkeypatch):
    eager_and_compiled(bear, tmp_path, capsys, monkeypatch, steps=4, warmup=2)
