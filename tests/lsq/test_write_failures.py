"""A disk that is full, read-only or not ours (issue 23, item 5): every write lsq does itself ends with one line
``lsq: error: cannot write PATH: CAUSE (errno N); nothing was written``, exit 2, and nothing half-written.

The tests run as root, where file modes stop no write: the failures are injected in process (as the
writers raise them: safetensors' SafetensorError, an OSError) and made real in a subprocess on a small tmpfs,
full and then read-only, where ``mount`` is allowed (skipped elsewhere).
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import peft.peft_model
import pytest
from safetensors import SafetensorError

import lsq.adapter
from benchmarks.squeeze_speed import write_llama_adapter
from lsq.cli import main
from lsq.errors import WriteFailed
from lsq.plotting import PlotProcess
from lsq.workdir import atomic_write
from tests.lsq.test_atomic_output import make_wide_adapter
from tests.lsq.test_train import lsq_train
from tests.lsq.tiny import cls_csv, tiny_bert  # noqa: F401  (fixtures)

LSQ = Path(sys.executable).parent / "lsq"
CAUSES = {errno.ENOSPC: "disk full", errno.EACCES: "no permission", errno.EROFS: "read-only", errno.EDQUOT: "quota"}


def _line(path: Path | str, code: int) -> str:
    return f"lsq: error: cannot write {path}: {os.strerror(code)} (errno {code}); nothing was written\n"


def _safetensors_fails(code: int):
    """``save_file`` as safetensors fails on an I/O error: its own error type, the errno in its message only."""

    def save_file(*args, **kwargs):
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    return save_file


@pytest.mark.parametrize("code", list(CAUSES), ids=list(CAUSES.values()))
def test_squeeze_that_cannot_write_its_weights(code, tmp_path, monkeypatch, capsys):
    src = make_wide_adapter(tmp_path / "src", modules=3, d=16, r=4)
    monkeypatch.setattr(lsq.adapter, "save_file", _safetensors_fails(code))
    out = tmp_path / "squeezed"
    assert main(["squeeze", str(src), "--ranks", "2", "--out", str(out), "--no-plot"]) == 2
    assert capsys.readouterr() == ("", _line(out / "r2" / "adapter_model.safetensors", code))
    assert os.listdir(tmp_path) == ["src"]


def test_squeeze_that_cannot_write_its_report(tmp_path, monkeypatch, capsys):
    """A plain OSError inside the temporary folder names the file as it would have been in --out."""
    src = make_wide_adapter(tmp_path / "src", modules=3, d=16, r=4)
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "squeeze_report.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "squeezed"
    assert main(["squeeze", str(src), "--ranks", "2", "--out", str(out), "--no-plot"]) == 2
    assert capsys.readouterr() == ("", _line(out / "r2" / "squeeze_report.json", errno.ENOSPC))
    assert os.listdir(tmp_path) == ["src"]


def test_atomic_write_that_fails_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    record = tmp_path / "record.json"
    record.write_text("old")

    def fsync(fd):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(WriteFailed) as failed:
        atomic_write(record, b"new")
    assert f"lsq: error: {failed.value}\n" == _line(record, errno.EDQUOT)
    assert os.listdir(tmp_path) == ["record.json"] and record.read_text() == "old"


def test_train_checkpoint_on_a_full_disk(tiny_bert, cls_csv, tmp_path, monkeypatch, capsys):
    """The Trainer's checkpoint cannot be written: one line naming it, exit 2, the partial checkpoint removed,
    no adapter and no temporary file."""
    monkeypatch.setattr(peft.peft_model, "safe_save_file", _safetensors_fails(errno.ENOSPC))
    out = tmp_path / "run"
    assert main(lsq_train(tiny_bert, cls_csv, out, steps=4)[1:]) == 2
    stderr = capsys.readouterr().err
    assert stderr.endswith(_line(out / "checkpoints" / "checkpoint-2", errno.ENOSPC))  # after a progress bar
    assert "Traceback" not in stderr
    assert sorted(os.listdir(out)) == ["checkpoints", "checkpoints.config.sha256"]
    assert os.listdir(out / "checkpoints") == []


# ------------------------------------------------------------------------- real disks: a small tmpfs


@pytest.fixture
def small_disk(request, tmp_path) -> Iterator[Path]:
    """A tmpfs of ``request.param`` bytes (``3m``) mounted at ``tmp_path/disk``, unmounted after; skipped where
    mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(disk)], check=True,
                       capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], capture_output=True, timeout=60)


@pytest.mark.parametrize("small_disk", ["3m"], indirect=True)
def test_squeeze_onto_a_real_full_then_read_only_disk(small_disk, tmp_path):
    """The 8B-shaped adapter (one layer) squeezed onto 3 MiB: one line, exit 2, the disk left empty; then the
    same disk read-only."""
    src = tmp_path / "src"
    write_llama_adapter(src, layers=1)  # rank 64, bf16: 10.5 MB; r8 is 1.3 MB, r16 2.6 MB
    out = small_disk / "squeezed"
    command = [str(LSQ), "squeeze", str(src), "--ranks", "8", "16", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-3000:]
    pattern = re.escape(_line(out / "rX" / "adapter_model.safetensors", errno.ENOSPC)).replace("rX", "r(8|16)")
    assert re.fullmatch(pattern, done.stderr), done.stderr[-3000:]
    assert os.listdir(small_disk) == []

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, capture_output=True, timeout=60)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", _line(out, errno.EROFS))
    assert os.listdir(small_disk) == []


@pytest.mark.parametrize("small_disk", ["64k"], indirect=True)
def test_train_onto_a_real_full_disk(small_disk, tiny_bert, cls_csv):
    """``lsq train`` whose first checkpoint (about 100 kB: torch's optimizer file fails, an error with no errno)
    does not fit: one line naming it, exit 2, the partial checkpoint removed."""
    out = small_disk / "run"
    done = subprocess.run(lsq_train(tiny_bert, cls_csv, out, steps=4), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-3000:]
    assert done.stderr.endswith(_line(out / "checkpoints" / "checkpoint-2", errno.ENOSPC)), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert sorted(os.listdir(out)) == ["checkpoints", "checkpoints.config.sha256"]
    assert os.listdir(out / "checkpoints") == []


@pytest.mark.parametrize("small_disk", ["1m"], indirect=True)
def test_plot_child_that_cannot_write_names_the_file(small_disk):
    """The spectrum plot's child on a read-only disk: an OSError naming the file (which AtomicFolder turns into
    the one line), not the child's last error line."""
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, capture_output=True, timeout=60)
    with PlotProcess() as plotter:
        plotter.submit([[1.0, 0.5, 0.1]], small_disk / "spectrum.png", {})
        with pytest.raises(OSError) as failed:
            plotter.wait()
    assert (failed.value.errno, failed.value.filename) == (errno.EROFS, str(small_disk / "spectrum.png"))
