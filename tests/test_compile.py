"""--compile: torch.compile of the update is one graph per phase (warm-up, then with the Q term) with no graph break,
and gives the eager update's numbers step by step, through the command line, across the warm-up boundary.

Not bitwise: inductor fuses the float32 arithmetic into kernels of its own and the compiled step runs torch's foreach
Adam where eager runs the fused one, so the two differ in the last bits (about 1e-7 relative per step). The test holds
every metric row and every final parameter to 1e-4 relative over 300 steps.

The test and the speed benchmark's --small compile the update at the same sizes (8 wide, batch 8, K = 2, 17-dim
states, 6-dim actions): inductor's cache of compiled graphs then compiles each graph once in a session."""
import csv
import json
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.output_code import CompiledFxGraph

from conftest import run_main, write_d4rl_file

EIGHT = dict(actor_hidden=8, critic_hidden=8, vae_hidden=8, batch_size=8)  # benchmarks/speed.py's TINY_NETS
METRICS = ("vae_loss", "critic_loss", "actor_loss", "alpha_loss", "alpha", "alpha_at_clamp", "mmd", "q_mean",
           "q_data")


def finished_run(bear, args, name, capsys, *flags):
    code, _, err = run_main(bear, args + [*flags, f"--run-name={name}"], capsys)
    assert code == 0, err[-3000:]
    folder = Path(args[1].split("=", 1)[1]) / name
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    [last] = sorted(folder.glob("checkpoint-*.pt"))[-1:]
    return rows, torch.load(last, weights_only=False)["agent"]


def assert_same_run(rows, state, reference_rows, reference_state, rel=1e-4, abs=1e-5):
    assert len(rows) == len(reference_rows)
    for row, reference in zip(rows, reference_rows):
        for key in METRICS:
            assert float(row[key]) == pytest.approx(float(reference[key]), rel=rel, abs=abs / 10), (row["step"], key)
    for net in ("vae", "actor", "critics", "target_critics"):
        for key, value in reference_state[net].items():
            torch.testing.assert_close(state[net][key], value, rtol=rel, atol=abs, msg=f"{net}.{key}")
    torch.testing.assert_close(state["log_alpha"], reference_state["log_alpha"], rtol=rel, atol=abs)


def test_the_compiled_update_is_one_graph_per_phase_gives_the_eager_numbers_and_resumes(bear, tmp_path, capsys,
                                                                                      monkeypatch):
    """300 steps across the warm-up boundary (150), eager and compiled; then the compiled run stopped at step 150
    and resumed with --compile and with --no-compile."""
    steps, warmup = 300, 150
    compiled_calls, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compiled_calls.append(a) or real_compile(*a, **k))
    # what a CUDA graph (--compile on CUDA: mode="reduce-overhead") needs: every input the graph updates in place
    # at a fixed address, else inductor skips the capture for "mutated inputs"
    moving, real_post_compile = [], CompiledFxGraph.post_compile

    def post_compile(graph, *args):
        moving.append(sorted(set(graph.mutated_input_idxs) - set(graph.fx_kwargs["static_input_idxs"])))
        return real_post_compile(graph, *args)

    monkeypatch.setattr(CompiledFxGraph, "post_compile", post_compile)
    data = tmp_path / "walker2d_c.hdf5"
    write_d4rl_file(data, n=400)
    args = [f"--dataset={data}", f"--log-dir={tmp_path}", f"--max-steps={steps}", f"--warmup-steps={warmup}",
            "--log-every=1", f"--eval-every={warmup}", f"--checkpoint-every={warmup}",
            *(f"--{k.replace('_', '-')}={v}" for k, v in EIGHT.items()), "--eval-episodes=1", "--eval-candidates=4",
            "--gpu=-1", "--eval-workers=0", "--threads=1"]
    eager = finished_run(bear, args, "eager", capsys, "--no-compile")
    assert not compiled_calls
    counters.clear()
    compiled = finished_run(bear, args, "compiled", capsys, "--compile")
    assert len(compiled_calls) == 1  # the update, compiled only with --compile
    breaks = {reason[:200]: n for reason, n in counters["graph_break"].items()}
    assert not breaks, f"graph breaks in the compiled update: {breaks}"
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # warm-up, then with the Q term
    assert moving == [[], []], f"inputs updated in place at addresses that may move: {moving}"
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compile"] is True
    assert_same_run(*compiled, *eager)
    assert eager[0][148]["actor_loss"] != eager[0][149]["actor_loss"]  # the steps did change something
    assert float(eager[0][151]["q_mean"]) != float(eager[0][0]["q_mean"])

    for name, flag in (("on", "--compile"), ("off", "--no-compile")):
        finished_run(bear, args, name, capsys, "--compile", f"--max-steps={warmup}")
        moving.clear()
        resumed = finished_run(bear, args, name, capsys, "--resume", flag)
        assert moving == ([[]] if name == "on" else []), moving  # the loaded states too; after the boundary: 1 graph
        if name == "on":  # the same compiled graphs from the same state and random streams
            assert_same_run(*resumed, *compiled, rel=0, abs=0)
        else:
            assert_same_run(*resumed, *compiled)
