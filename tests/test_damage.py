"""A damaged run folder costs one checkpoint, never the run; nothing the script loads runs code; a full disk loses
nothing. Runs are trained in this process (main), tiny, from one shared reference run."""
import errno
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import SCRIPT, write_d4rl_file

TINY = ["--actor-hidden=16", "--critic-hidden=16", "--vae-hidden=16", "--batch-size=32", "--warmup-steps=100",
        "--log-every=25", "--eval-episodes=1", "--eval-candidates=4", "--probe-size=64", "--gpu=-1",
        "--eval-workers=0", "--threads=1", "--max-steps=400", "--eval-every=100", "--checkpoint-every=100"]


def args(data, log_dir, *extra):
    return [f"--dataset={data}", f"--log-dir={log_dir}", *TINY, *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "walker2d_tiny.hdf5"
    write_d4rl_file(path, n=1500)
    return path


@pytest.fixture(scope="module")
def reference(bear, data, tmp_path_factory):
    """An uninterrupted run: checkpoints at 300 and 400 are kept."""
    log_dir = tmp_path_factory.mktemp("reference")
    assert bear.main(args(data, log_dir)) == 0
    return log_dir / "walker2d_tiny__seed0"


@pytest.fixture
def copy(reference, tmp_path):
    """The reference folder as a run that has not finished: its results.json removed."""
    folder = tmp_path / reference.name
    shutil.copytree(reference, folder)
    (folder / "results.json").unlink()
    return folder


def resume(bear, data, folder, *extra):
    return bear.main(args(data, folder.parent, "--resume", *extra))


def scores(folder):
    results = json.loads((folder / "results.json").read_text())
    return results["final_return"], results["best_return"]


def one_line(text):
    """The one line said, past the progress bar's."""
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip() and not re.search(r"\d%\|", line)]
    assert len(lines) == 1, text
    return lines[0]


def test_every_checkpoint_has_a_manifest_with_its_digest_and_loads_without_pickle(bear, reference):
    ckpts = bear.checkpoints(reference)
    assert [p.name for p in ckpts] == ["checkpoint-000000300.pt", "checkpoint-000000400.pt"]
    for path in ckpts:
        manifest = json.loads(path.with_suffix(".json").read_text())
        assert manifest == {"file": path.name, "step": int(path.stem.split("-")[1]), "bytes": path.stat().st_size,
                            "sha256": bear.sha256(path)}
        torch.load(path, weights_only=True)  # plain values and tensors: no allow-list needed
    assert sorted(p.name for p in reference.glob("checkpoint-*.json")) == ["checkpoint-000000300.json",
                                                                          "checkpoint-000000400.json"]


def test_a_truncated_newest_checkpoint_costs_one_checkpoint(bear, data, reference, copy, capsys):
    newest = copy / "checkpoint-000000400.pt"
    with open(newest, "r+b") as f:
        f.truncate(1000)
    assert resume(bear, data, copy) == 0
    err = capsys.readouterr().err
    assert ("checkpoint-000000400.pt is damaged (1000 bytes where its manifest says "
            f"{(reference / newest.name).stat().st_size}); renamed to checkpoint-000000400.pt.damaged; the run falls "
            "back to step 300 (checkpoint-000000300.pt)") in err
    assert err.count("is damaged") == 1
    assert (copy / "checkpoint-000000400.pt.damaged").stat().st_size == 1000  # kept, never deleted
    assert (copy / "checkpoint-000000400.json.damaged").exists()
    assert (copy / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert scores(copy) == scores(reference)
    assert bear.checkpoint_damage(newest)[0] == ""  # written again, whole


def test_a_checkpoint_whose_bytes_changed_is_set_aside_by_its_digest(bear, data, reference, copy, capsys):
    newest = copy / "checkpoint-000000400.pt"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the digest can tell
    newest.write_bytes(bytes(raw))
    assert resume(bear, data, copy) == 0
    assert "its sha256 does not match checkpoint-000000400.json" in capsys.readouterr().err
    assert (copy / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()


def test_a_damaged_manifest_costs_its_checkpoint_and_no_intact_one_is_exit_2(bear, data, copy, capsys):
    (copy / "checkpoint-000000400.json").write_text("{not json")
    (copy / "checkpoint-000000300.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (copy / "checkpoint-000000300.json").unlink()  # an earlier release's: taken only if it loads
    assert resume(bear, data, copy) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"bear-train.py: error: no intact checkpoint in {copy}: checkpoint-000000400.pt (its "
                           "manifest checkpoint-000000400.json is unreadable (JSONDecodeError)); "
                           "checkpoint-000000300.pt (it does not load: ")
    assert "start the run again without --resume" in line
    assert sorted(p.name for p in copy.glob("checkpoint-*")) == [
        "checkpoint-000000300.pt.damaged", "checkpoint-000000400.json.damaged", "checkpoint-000000400.pt.damaged"]


def test_a_metrics_csv_whose_last_row_was_cut_by_a_kill_is_repaired(bear, data, reference, copy):
    for path in (copy / "checkpoint-000000400.pt", copy / "checkpoint-000000400.json"):
        path.unlink()  # killed after the row of step 400 began, before its checkpoint
    metrics = copy / "metrics.csv"
    metrics.write_bytes(metrics.read_bytes()[:-7])
    assert not metrics.read_bytes().endswith(b"\n")
    assert resume(bear, data, copy) == 0
    assert metrics.read_bytes() == (reference / "metrics.csv").read_bytes()


@pytest.mark.parametrize("damage, message", [
    ("config", "config.json is damaged (JSONDecodeError: "),
    ("metrics", "metrics.csv is damaged at line 3; restore it from a copy, or start the run again without --resume"),
    ("metrics-short", "metrics.csv is damaged: shorter than the "),
    ("metrics-missing", "metrics.csv is missing, but the checkpoint holds "),
])
def test_damage_to_what_resume_reads_back_is_one_line_and_exit_2(bear, data, copy, capsys, damage, message):
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file() and p.name != ".lock"}
    metrics = copy / "metrics.csv"
    if damage == "config":
        (copy / "config.json").write_text('{"dataset": "walker')
    elif damage == "metrics":
        lines = metrics.read_text().splitlines(keepends=True)
        metrics.write_text("".join(lines[:2] + ["x" * (len(lines[2]) - 1) + "\n"] + lines[3:]))  # same size
    elif damage == "metrics-short":
        metrics.write_bytes(metrics.read_bytes()[:200])
    else:
        metrics.unlink()
    damaged = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file() and p.name != ".lock"}
    assert resume(bear, data, copy) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"bear-train.py: error: {copy}{os.sep}") and message in line, line
    after = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == damaged and before.keys() >= after.keys()  # nothing touched


def test_summarize_names_a_damaged_results_json_in_one_line(bear, reference, tmp_path, capsys):
    folder = tmp_path / "runs" / reference.name
    shutil.copytree(reference, folder)
    (folder / "results.json").write_text("[1, 2")
    assert bear.main([f"--summarize={tmp_path / 'runs'}"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"bear-train.py: error: {folder / 'results.json'} is damaged (JSONDecodeError")
    assert "delete it to count the run as unfinished" in line


class RunsCode:
    """Unpickling this runs a command: what a booby-trapped checkpoint or policy file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_checkpoint(bear, path, marker):
    saved = torch.load(path, weights_only=True)
    saved["state"]["trap"] = RunsCode(marker)
    torch.save(saved, path)
    bear.write_json(path.with_suffix(".json"), {"file": path.name, "step": saved["step"],
                                                "bytes": path.stat().st_size, "sha256": bear.sha256(path)})


def test_a_checkpoint_crafted_to_run_code_is_refused_and_its_code_does_not_run(bear, data, copy, tmp_path, capsys):
    marker = tmp_path / "the-code-ran"
    crafted_checkpoint(bear, copy / "checkpoint-000000400.pt", marker)
    torch.load(copy / "checkpoint-000000400.pt", weights_only=False)  # the trap works when loaded unsafely
    assert marker.exists()
    marker.unlink()
    assert resume(bear, data, copy) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"bear-train.py: error: {copy / 'checkpoint-000000400.pt'} was not loaded: it asks to run "
                           "code when it is unpickled (posix.system)"), line
    assert not marker.exists()
    assert (copy / "checkpoint-000000400.pt").exists()  # refused, not taken for damage and set aside


def test_a_checkpoint_of_an_earlier_release_with_numpys_pickled_state_resumes(bear, data, reference, copy):
    """Before this release the numpy random state was pickled as numpy's tuple, and there were no manifests."""
    (copy / "checkpoint-000000400.pt").unlink()
    (copy / "checkpoint-000000400.json").unlink()
    path = copy / "checkpoint-000000300.pt"
    saved = torch.load(path, weights_only=True)
    state = saved["rng"]["numpy"]
    saved["rng"]["numpy"] = (state["kind"], state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                             state["gauss"])
    for key in ("resume_changes", "determinism"):
        del saved["state"][key]
    torch.save(saved, path)
    path.with_suffix(".json").unlink()
    assert resume(bear, data, copy) == 0
    assert (copy / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert scores(copy) == scores(reference)


@pytest.mark.parametrize("full_at", ["checkpoint", "policy"])
def test_a_full_disk_loses_nothing_and_resume_continues_exactly(bear, data, reference, tmp_path, monkeypatch, capsys,
                                                                full_at):
    real_save = torch.save
    key = {"checkpoint": "agent", "policy": "program"}[full_at]  # the first write of step 300: its policy, or checkpoint

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 300 and key in obj:
            f.write(b"\0" * 4096)  # part of it, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    assert bear.main(args(data, tmp_path)) == bear.EXIT_DISK_FULL == 74
    folder = tmp_path / reference.name
    line = one_line(capsys.readouterr().err)
    assert line.startswith("bear-train.py: disk full: no space left on the disk mounted at ")
    name = {"checkpoint": "checkpoint-000000300.pt", "policy": "policy-final.pt"}[full_at]
    assert f"while writing {folder / name}" in line and line.endswith("plus --resume")
    assert "nothing written before is lost; the newest checkpoint (step 200) is whole: free space" in line
    assert torch.load(folder / "policy-final.pt", weights_only=True)["step"] == (300 if full_at == "checkpoint" else 200)
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-000000100.json", "checkpoint-000000100.pt",
                                                                  "checkpoint-000000200.json", "checkpoint-000000200.pt"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # no partial file
    assert bear.checkpoint_damage(folder / "checkpoint-000000200.pt")[0] == ""
    monkeypatch.undo()  # space freed
    assert resume(bear, data, folder) == 0
    assert (folder / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    assert scores(folder) == scores(reference)


def test_a_disk_that_fills_before_the_first_checkpoint_says_resume_starts_from_step_0(bear, data, reference, tmp_path,
                                                                                      monkeypatch, capsys):
    real_save = torch.save

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 100 and "agent" in obj:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    assert bear.main(args(data, tmp_path)) == bear.EXIT_DISK_FULL
    line = one_line(capsys.readouterr().err)
    assert "nothing written before is lost; no checkpoint yet: --resume starts from step 0: free space there" in line
    assert "newest checkpoint (" not in line
    folder = tmp_path / reference.name
    assert not list(folder.glob("checkpoint-*")) and not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert resume(bear, data, folder) == 0
    assert (folder / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()


def test_a_manifest_that_cannot_be_written_leaves_no_checkpoint_behind(bear, tmp_path, monkeypatch):
    def full(path, obj):
        raise bear.DiskFull(path)

    monkeypatch.setattr(bear, "write_json", full)
    with pytest.raises(bear.DiskFull):
        bear.save_checkpoint(tmp_path, {"step": 7})
    assert list(tmp_path.iterdir()) == []


def test_resume_with_other_threads_says_so_once_and_records_it(bear, data, reference, copy, capsys):
    for path in (copy / "checkpoint-000000400.pt", copy / "checkpoint-000000400.json"):
        path.unlink()
    threads = torch.get_num_threads()
    try:
        assert resume(bear, data, copy, "--threads=2") == 0
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert err.count("--resume with other settings than the run had (training's torch threads 1 -> 2, evaluation's "
                     "torch threads 1 -> 2): from step 300 on the run is no longer bitwise the same") == 1
    results = json.loads((copy / "results.json").read_text())
    assert results["resume_changes"] == [{"step": 300, "threads": [1, 2], "eval_threads": [1, 2]}]
    assert json.loads((reference / "results.json").read_text())["resume_changes"] == []


def test_the_sweeps_retry_takes_the_same_path_past_a_damaged_checkpoint(bear, data, reference, copy):
    """A sweep's run is this command with --resume inside a Ray task (_run_in_task): no Ray needed to check it."""
    with open(copy / "checkpoint-000000400.pt", "r+b") as f:
        f.truncate(1000)
    cfg = bear.parse_args(args(data, copy.parent))[0]
    log = copy.parent / "sweep-run.log"
    code, last = bear._run_in_task(str(SCRIPT), bear.run_command(cfg, -1, 1, 0), str(log), {})
    assert code == 0, log.read_text()
    assert "the run falls back to step 300" in log.read_text()
    assert (copy / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
