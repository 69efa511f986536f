"""--compile: torch.compile of the update is one graph per phase (warm-up, then with the Q term) with no graph break,
and gives the eager update's numbers step by step, through the command line, across the warm-up boundary.

Not bitwise: inductor fuses the float32 arithmetic into kernels of its own and the compiled step runs torch's foreach
Adam where eager runs the fused one, so the two differ in the last bits (about 1e-7 relative per step). The test holds
every metric row and every final parameter to 1e-4 relative over 300 steps.

The update is compiled here as the script compiles it for `--gpu=0` on a machine with a GPU (simulated: the fake
torch.cuda of tests/test_device.py), with mode="reduce-overhead": inductor then runs its own checks for a CUDA graph
on each graph, and the test holds it to none. Only the capture itself, which needs a GPU, is left out. Inductor's
cache keeps its verdict with each graph: a graph compiled in this mode with these checks changed (a break-check of
the test itself) leaves its verdict there for the next run, so such a check runs with its own TORCHINDUCTOR_CACHE_DIR."""
import csv
import json
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor import cudagraph_utils, output_code
from torch._inductor.output_code import CompiledFxGraph
from torch._inductor.utils import BoxedBool

from conftest import run_main, write_d4rl_file
from test_device import FakeCuda

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
    with pytest.MonkeyPatch.context() as one_gpu:  # --gpu=0 where torch.cuda finds one GPU
        FakeCuda(1).install(one_gpu)
        gpu = bear.pick_device(0)
    assert gpu == torch.device("cuda", 0) and bear.compile_mode(torch.device("cpu")) is None
    real_mode = bear.compile_mode
    monkeypatch.setattr(bear, "compile_mode", lambda device: real_mode(gpu))  # each compile here as for that GPU
    modes, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: modes.append(k.get("mode")) or real_compile(*a, **k))
    # what a CUDA graph needs: one device (the CPU stands in for the GPU), none of inductor's reasons to skip it,
    # and every input the graph updates in place at a fixed address (cudagraph trees check that at run time)
    devices, reasons, captures, moving, real_post_compile = [], [], [], [], CompiledFxGraph.post_compile
    real_one_device = cudagraph_utils.check_multiple_devices_or_any_cpu_nodes

    def one_device(mapping):
        devices.append(sorted(map(str, mapping)))
        return real_one_device({torch.device("cuda", 0) if d.type == "cpu" else d: n for d, n in mapping.items()})

    def post_compile(graph, *args):
        info = graph.cudagraph_info  # None where cudagraphs were off for the graph before these checks
        reasons.append(graph.disabled_cudagraphs_reason or (info.cudagraph_fail_reasons if info else "cudagraphs off"))
        moving.append(sorted(set(graph.mutated_input_idxs) - set(graph.fx_kwargs["static_input_idxs"])))
        return real_post_compile(graph, *args)

    def no_capture(example_inputs, graph, cudagraphs, *args):  # where the capture (a GPU's job) would start
        captures.append(graph.cudagraph_info.cudagraph_fail_reasons)
        BoxedBool.disable(cudagraphs)

    monkeypatch.setattr(cudagraph_utils, "check_multiple_devices_or_any_cpu_nodes", one_device)
    monkeypatch.setattr(CompiledFxGraph, "post_compile", post_compile)
    for capture in ("cudagraph_post_compile", "cudagraph_partition_post_compile"):  # (inductor partitions by default)
        monkeypatch.setattr(output_code, capture, no_capture)
    data = tmp_path / "walker2d_c.hdf5"
    write_d4rl_file(data, n=400)
    args = [f"--dataset={data}", f"--log-dir={tmp_path}", f"--max-steps={steps}", f"--warmup-steps={warmup}",
            "--log-every=1", f"--eval-every={warmup}", f"--checkpoint-every={warmup}",
            *(f"--{k.replace('_', '-')}={v}" for k, v in EIGHT.items()), "--eval-episodes=1", "--eval-candidates=4",
            "--gpu=-1", "--eval-workers=0", "--threads=1"]
    eager = finished_run(bear, args, "eager", capsys, "--no-compile")
    assert not modes
    counters.clear()
    compiled = finished_run(bear, args, "compiled", capsys, "--compile")
    assert modes == ["reduce-overhead"]  # the update, compiled only with --compile, as for a CUDA graph
    breaks = {reason[:200]: n for reason, n in counters["graph_break"].items()}
    assert not breaks, f"graph breaks in the compiled update: {breaks}"
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # warm-up, then with the Q term
    assert reasons == captures == [[], []], f"inductor would not capture these graphs: {reasons}"
    assert all(found == ["cpu"] for found in devices), devices  # checked when compiled, not when read from the cache
    assert moving == [[], []], f"inputs updated in place at addresses that may move: {moving}"
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compile"] is True
    assert_same_run(*compiled, *eager)
    assert eager[0][148]["actor_loss"] != eager[0][149]["actor_loss"]  # the steps did change something
    assert float(eager[0][151]["q_mean"]) != float(eager[0][0]["q_mean"])

    for name, flag in (("on", "--compile"), ("off", "--no-compile")):
        finished_run(bear, args, name, capsys, "--compile", f"--max-steps={warmup}")
        moving.clear(), reasons.clear(), captures.clear()
        resumed = finished_run(bear, args, name, capsys, "--resume", flag)
        assert moving == ([[]] if name == "on" else []), moving  # the loaded states too; after the boundary: 1 graph
        assert reasons == captures == ([[]] if name == "on" else []), reasons
        if name == "on":  # the same compiled graphs from the same state and random streams
            assert_same_run(*resumed, *compiled, rel=0, abs=0)
        else:
            assert_same_run(*resumed, *compiled)
