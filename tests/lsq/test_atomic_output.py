"""Output folders under races and signals: two ``lsq squeeze`` runs to one new --out (one wins, the other
is refused with one line), a folder that appears while ``AtomicFolder`` writes (never replaced without
--force, retried with it), and SIGTERM mid-write (exit 143, no temporary folder left)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lsq.adapter
import lsq.workdir
from lsq.adapter import AtomicFolder, find_modules, read_adapter
from lsq.errors import LsqError

LSQ = Path(sys.executable).parent / "lsq"


def make_wide_adapter(folder: Path, modules: int = 1500, d: int = 128, r: int = 16) -> Path:
    """A rank-r adapter with many small modules: ``lsq squeeze`` spends about a second on it (reading,
    decomposing, writing), long enough for two runs to overlap and for a signal to land mid-write."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    weights = {}
    for i in range(modules):
        weights[f"base_model.model.model.layers.{i}.q_proj.lora_A.weight"] = torch.randn(r, d, generator=g)
        weights[f"base_model.model.model.layers.{i}.q_proj.lora_B.weight"] = torch.randn(d, r, generator=g)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def wide_src(tmp_path_factory) -> Path:
    return make_wide_adapter(tmp_path_factory.mktemp("wide") / "src")


def assert_whole_adapter(folder: Path, rank: int, modules: int) -> None:
    """Every module of the source is there, at ``rank``, and lsq reads the folder back."""
    config, weights = read_adapter(folder)
    found = find_modules(list(weights.keys()), config)
    assert len(found) == modules and {m.rank for m in found} == {rank}
    tensors = load_file(folder / "adapter_model.safetensors")
    assert all(t.shape[0] == rank for k, t in tensors.items() if k.endswith("lora_A.weight"))
    assert json.loads((folder / "squeeze_report.json").read_text())


# ------------------------------------------------------------------------- AtomicFolder, in process


@pytest.fixture(params=["renameat2", "mkdir fallback"])
def rename_path(request, monkeypatch):
    """Run each AtomicFolder test with Linux's renameat2(RENAME_NOREPLACE) and with the portable fallback."""
    renameat2 = getattr(lsq.adapter, "_renameat2", None)
    if request.param == "mkdir fallback":
        monkeypatch.setattr(lsq.adapter, "_renameat2", lambda: None, raising=False)
    elif renameat2 is not None and renameat2() is None:
        pytest.skip("no renameat2 in this C library")
    return request.param


def _appear(target: Path, how: str) -> None:
    """Another writer's output, created at ``target``."""
    if how == "file":
        target.write_text("theirs")
    else:
        target.mkdir()
        if how == "folder":
            (target / "theirs.txt").write_text("theirs")


@pytest.mark.parametrize("how", ["folder", "empty folder", "file"])
def test_target_that_appears_while_writing_is_never_replaced(how, rename_path, tmp_path):
    target = tmp_path / "out"
    with pytest.raises(LsqError) as info:
        with AtomicFolder(target) as tmp:
            (tmp / "mine.txt").write_text("mine")
            _appear(target, how)  # between the check at the start and the final rename
    message = str(info.value)
    assert "\n" not in message and str(target) in message and "appeared while writing" in message
    assert "--force" in message
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    if how == "file":
        assert target.read_text() == "theirs"
    else:
        assert [p.name for p in target.iterdir()] == ([] if how == "empty folder" else ["theirs.txt"])


def test_force_replaces_a_target_that_appears_between_move_aside_and_rename(rename_path, tmp_path, monkeypatch):
    target = tmp_path / "out"
    _appear(target, "folder")  # the folder --force replaces
    real, calls = getattr(lsq.adapter, "rename_no_replace", os.rename), []

    def racing(src, dst):  # another writer puts its folder in place just before our rename, once
        calls.append(dst)
        if len(calls) == 1:
            _appear(Path(dst), "folder")
        return real(src, dst)

    monkeypatch.setattr(lsq.adapter, "rename_no_replace", racing, raising=False)
    with AtomicFolder(target, force=True) as tmp:
        (tmp / "mine.txt").write_text("mine")
    assert len(calls) == 2  # refused once, moved that aside too, then renamed
    assert [p.name for p in target.iterdir()] == ["mine.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the moved-aside folders are deleted


def test_force_keeps_the_old_target_when_the_rename_fails(rename_path, tmp_path, monkeypatch):
    target = tmp_path / "out"
    _appear(target, "folder")

    real = getattr(lsq.adapter, "rename_no_replace", os.rename)

    def broken(src, dst):  # the new folder cannot be renamed; putting the old one back still works
        if Path(src).name.endswith(".tmp"):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(lsq.adapter, "rename_no_replace", broken, raising=False)
    with pytest.raises(OSError, match="Input/output error"):
        with AtomicFolder(target, force=True) as tmp:
            (tmp / "mine.txt").write_text("mine")
    monkeypatch.undo()
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupt_right_after_the_temporary_folder_is_made(tmp_path, monkeypatch):
    """A signal raised just after the mkdir, before ``with`` has a block to clean up: nothing is left."""
    real = os.mkdir

    def mkdir_then_signal(path, *args, **kwargs):
        real(path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "mkdir", mkdir_then_signal)
    with pytest.raises(KeyboardInterrupt):
        with AtomicFolder(tmp_path / "out"):
            pass
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == [] and not lsq.workdir._UNFINISHED


# ------------------------------------------------------------------------------- real processes


def test_two_squeezes_to_one_new_folder(wide_src, tmp_path):
    """Started together, both pass the "--out exists?" check before either has written: the first rename
    wins, the second is refused (exit 2, one line) instead of silently replacing the first's output."""
    for attempt in range(3):  # each try needs the two runs to overlap; they nearly always do at once
        out = tmp_path / f"try{attempt}" / "out"
        out.parent.mkdir()
        command = [str(LSQ), "squeeze", str(wide_src), "--ranks", "2", "--out", str(out), "--no-plot"]
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        assert sorted(rc for rc, _, _ in results) == [0, 2], results
        (_, won_out, won_err), = [r for r in results if r[0] == 0]
        (_, lost_out, lost_err), = [r for r in results if r[0] == 2]
        header, row = won_out.splitlines()  # the summary: one output
        assert header.startswith("output") and row.split()[0] == "r2" and row.endswith(f"  {out / 'r2'}")
        assert won_err == ""
        assert lost_out == "" and len(lost_err.splitlines()) == 1 and lost_err.startswith(f"lsq: error: {out}: ")
        assert [p.name for p in out.parent.iterdir()] == ["out"]  # the loser left no temporary folder
        assert [p.name for p in out.iterdir()] == ["r2"]
        assert_whole_adapter(out / "r2", rank=2, modules=1500)
        if "appeared while writing" in lost_err:  # the race itself, not the check at the start
            return
        assert "output folder exists" in lost_err
    pytest.fail("the two runs never overlapped in 3 tries")


def _wait_for_tmp(proc: subprocess.Popen, folder: Path, prefix: str, timeout: float = 120) -> None:
    """Poll (fast) until a hidden ``prefix*.tmp`` folder appears in ``folder``."""
    deadline = time.monotonic() + timeout
    while not any(n.startswith(prefix) and n.endswith(".tmp") for n in os.listdir(folder)):
        assert proc.poll() is None, f"exited {proc.returncode} before writing: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no temporary folder appeared"
        time.sleep(0.0005)


@pytest.mark.parametrize("plot", [False, True], ids=["no-plot", "plot"])
def test_sigterm_mid_write_leaves_nothing(plot, wide_src, tmp_path):
    """SIGTERM (timeout, docker, kubernetes) while the outputs are written: exit 143, one line, and
    neither the output folder nor its hidden temporary folder is left."""
    work = tmp_path / "work"
    work.mkdir()
    ranks = [str(k) for k in range(1, 9)]  # eight outputs: the temporary folder lives for about a second
    command = [str(LSQ), "squeeze", str(wide_src), "--ranks", *ranks, "--out", str(work / "out")]
    proc = subprocess.Popen(command + ([] if plot else ["--no-plot"]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_tmp(proc, work, ".out.")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr == "lsq: terminated\n" and stdout == ""
    assert list(work.iterdir()) == []
