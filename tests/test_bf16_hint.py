"""An fp32 run on a CPU that reports bf16 instructions says, in one line, that --precision=bf16 is there."""
import pytest
import torch

from conftest import write_d4rl_file

HINT = "--precision=bf16 is available here"


@pytest.fixture
def flags(bear, tmp_path, monkeypatch):
    def fake(line):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: {line}\n")
        monkeypatch.setattr(bear, "CPUINFO", str(path))
    return fake


@pytest.mark.parametrize("line, shown", [("fpu sse2 avx2 avx512f avx512_bf16", "avx512_bf16"),
                                          ("fpu avx2 amx_bf16 amx_tile", "amx_bf16"),
                                          ("fpu avx2 amx_bf16 avx512_bf16", "amx_bf16 and avx512_bf16"),
                                          ("fpu sse2 avx2 avx512f", None)])
def test_the_hint_names_the_cpus_bf16_instructions_and_only_for_fp32_on_the_cpu(bear, flags, line, shown):
    flags(line)
    hint = bear.bf16_hint("fp32", torch.device("cpu"))
    if shown is None:
        assert hint == ""
    else:
        assert hint == (f"note: this CPU reports {shown}: --precision=bf16 is available here, and in the 3-seed "
                        "comparison on such a CPU it learned the same as fp32, 1.7x faster (docs/gpu-and-precision.md)")
    assert bear.bf16_hint("bf16", torch.device("cpu")) == ""  # already on
    assert bear.bf16_hint("fp32", torch.device("cuda", 0)) == ""  # no word on GPUs


@pytest.mark.parametrize("line, said", [("fpu avx2 avx512_bf16", 1), ("fpu avx2", 0)])
def test_a_run_prints_the_hint_once_at_start_up(bear, flags, tmp_path, capsys, line, said):
    flags(line)
    data = tmp_path / "walker2d_tiny.hdf5"
    write_d4rl_file(data, n=300)
    args = [f"--dataset={data}", f"--log-dir={tmp_path / 'runs'}", "--max-steps=2", "--eval-every=2",
            "--actor-hidden=8", "--critic-hidden=8", "--vae-hidden=8", "--batch-size=8", "--eval-episodes=1",
            "--eval-candidates=2", "--probe-size=8", "--gpu=-1", "--eval-workers=0", "--threads=1"]
    assert bear.main(args) == 0
    out = capsys.readouterr()
    assert (out.out + out.err).count(HINT) == said
