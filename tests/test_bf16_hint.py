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


AMX, AVX512 = "1.22x on an AMX host", "1.53x on an AVX512-BF16 host without AMX"


@pytest.mark.parametrize("line, shown, speed", [("fpu sse2 avx2 avx512f avx512_bf16", "avx512_bf16", AVX512),
                                                 ("fpu avx2 amx_bf16 amx_tile", "amx_bf16", AMX),
                                                 ("fpu avx2 amx_bf16 avx512_bf16", "amx_bf16 and avx512_bf16", AMX),
                                                 ("fpu sse2 avx2 avx512f", None, None)])
def test_the_hint_names_the_cpus_bf16_instructions_and_the_speed_measured_on_its_class(bear, flags, line, shown, speed):
    """An AMX CPU is told AMX's 1.22x, not the 1.53x of a CPU without AMX: no figure its class did not give."""
    flags(line)
    hint = bear.bf16_hint("fp32", torch.device("cpu"))
    if shown is None:
        assert hint == ""
    else:
        assert hint == (f"note: this CPU reports {shown}: --precision=bf16 is available here; it learned the same as "
                        f"fp32 in a 3-seed comparison, and its update ran {speed} (measure this one: python "
                        "benchmarks/speed.py --parts bf16)")
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
