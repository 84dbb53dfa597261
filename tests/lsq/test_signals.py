"""A signal at any moment leaves no temporary file or folder (issue 23, item 2).

Real processes: SIGTERM to ``lsq squeeze`` the instant its temporary folder appears and at random moments
of the run (its exit included), and to ``lsq train`` the instant it starts writing its adapter. In process:
each window where a signal raised as an exception (the CLI's SIGTERM, Prefect's, Ctrl-C) once left
something behind: tempfile's mkdtemp / mkstemp returning before the caller's ``try``, ``--force`` moving
the old output aside, the plot's child writing into a folder that is being removed, and a SIGTERM while
the command exits.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lsq.adapter
import lsq.api
from lsq import workdir
from lsq.adapter import AtomicFolder
from lsq.config import SqueezeConfig
from lsq.records import Evaluation, UnitResult, Variant
from lsq.storage import Storage
from lsq.workdir import adapter_digest, atomic_write
from tests.lsq.test_atomic_output import assert_whole_adapter, make_wide_adapter
from tests.lsq.test_train import lsq_train
from tests.lsq.tiny import cls_csv, tiny_bert  # noqa: F401  (fixtures)

LSQ = Path(sys.executable).parent / "lsq"
TERMINATED = 128 + signal.SIGTERM


def _hidden(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def _signal_when(proc: subprocess.Popen, folder: Path, prefix: str, timeout: float = 180) -> bool:
    """SIGTERM ``proc`` the instant a ``prefix*.tmp`` entry appears in ``folder`` (fast polling); False when
    the process ended first."""
    deadline = time.monotonic() + timeout
    while True:
        with os.scandir(folder) as entries:
            if any(e.name.startswith(prefix) and e.name.endswith(".tmp") for e in entries):
                proc.send_signal(signal.SIGTERM)
                return True
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "no temporary folder appeared"
        time.sleep(0.0002)


@pytest.mark.slow
def test_sigterm_at_any_moment_of_lsq_squeeze_leaves_nothing(tmp_path):
    """Twelve runs signalled the instant the temporary folder appears, four the instant they have printed their
    summary (exiting), eight at random moments of the second half of a run: each ends with 143 ("lsq:
    terminated") or 0 (the output was whole before the signal counted), never killed outright or with a
    traceback, and leaves no temporary folder and no half-written output."""
    src = make_wide_adapter(tmp_path / "src", modules=40, d=64, r=16)
    command = [str(LSQ), "squeeze", str(src), "--ranks", "2", "4", "--out"]
    started = time.monotonic()  # one plain run: how long a whole run takes here and now
    done = subprocess.run([*command, str(tmp_path / "plain" / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    whole_run = time.monotonic() - started
    written = sorted(os.listdir(tmp_path / "plain" / "out"))  # r2, r4 and the spectrum plot
    rng = random.Random(0)
    moments = ["first"] * 12 + ["printed"] * 4 + [rng.uniform(0.5, 1.1) * whole_run for _ in range(8)]
    for attempt, moment in enumerate(moments):
        work = tmp_path / f"try{attempt}"
        work.mkdir()
        proc = subprocess.Popen([*command, str(work / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            if moment == "first":
                assert _signal_when(proc, work, ".out."), "lsq squeeze ended before its temporary folder was seen"
            elif moment == "printed":
                printed = [proc.stdout.readline() for _ in range(3)]  # the summary: a header, a row per output
                assert printed[-1].startswith("r4"), printed
                proc.send_signal(signal.SIGTERM)
            else:
                try:
                    proc.wait(timeout=moment)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
            proc.wait()
        where = f"try {attempt} (signal at {moment if isinstance(moment, str) else f'{moment:.2f} s'}): " \
                f"exit {proc.returncode}"
        assert _hidden(work) == [], where
        if proc.returncode == -signal.SIGTERM:  # before the handler was installed: at interpreter start-up only
            assert os.listdir(work) == [] and stdout == "", where
            continue
        assert proc.returncode in (0, TERMINATED), f"{where}: {stderr[-2000:]}"
        if proc.returncode == TERMINATED:
            assert stderr == "lsq: terminated\n", f"{where}: {stderr[-2000:]}"
        else:
            assert stderr == "", f"{where}: {stderr[-2000:]}"
        if (work / "out").exists():  # published before the signal: whole
            assert sorted(os.listdir(work / "out")) == written, where
            for rank in (2, 4):
                assert_whole_adapter(work / "out" / f"r{rank}", rank=rank, modules=40)
        else:
            assert proc.returncode == TERMINATED and stdout == "", where


@pytest.mark.slow
def test_sigterm_the_moment_lsq_train_writes_its_adapter(tiny_bert, cls_csv, tmp_path):
    """SIGTERM the instant ``lsq train`` makes the adapter's temporary folder: exit 143 and no adapter, no
    temporary folder or file (or, when the adapter was whole first, exit 0 and a whole adapter)."""
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        out.mkdir()
        proc = subprocess.Popen(lsq_train(tiny_bert, cls_csv, out, steps=4), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert _signal_when(proc, out, ".adapter."), "lsq train ended before its adapter folder was seen"
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
            proc.wait()
        assert _hidden(out) == [], stderr[-3000:]
        assert proc.returncode in (0, TERMINATED), stderr[-3000:]
        if proc.returncode == TERMINATED:
            assert "lsq: terminated\n" in stderr and "Traceback" not in stderr and stdout == ""
            assert not (out / "adapter").exists()
        else:
            assert json.loads(stdout)["adapter_dir"] == str(out / "adapter")


def test_a_sigterm_while_lsq_exits_changes_nothing():
    """A SIGTERM after the command is done (here: from an exit handler) neither prints a traceback nor changes
    the exit status: the command's work, clean-up included, is over."""
    code = ("import atexit, os, signal, time\n"
            "import lsq.cli\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.2)))\n"
            "lsq.cli.main = lambda: 0\n"
            "lsq.cli.run()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, "")


# ------------------------------------------------------------------------------------ in process


def _then_interrupt(monkeypatch, module, name: str) -> None:
    """``module.name`` does its real work, then raises KeyboardInterrupt (a signal landing right after it)."""
    real = getattr(module, name)

    def real_then_interrupt(*args, **kwargs):
        result = real(*args, **kwargs)
        if isinstance(result, int):  # a file descriptor: the caller would own it
            os.close(result)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, real_then_interrupt)


def test_interrupt_right_after_atomic_write_makes_its_file(tmp_path, monkeypatch):
    (tmp_path / "record.json").write_text("old")
    _then_interrupt(monkeypatch, os, "open")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "record.json", b"new")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["record.json"] and (tmp_path / "record.json").read_text() == "old"
    assert not workdir._UNFINISHED


def _published(tmp_path: Path) -> tuple[Storage, UnitResult]:
    """A unit's record whose adapter one machine put into a ``file://`` root; the Storage of another machine."""
    adapter = tmp_path / "a" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 2}')
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    variant = Variant(method="post", rank=2, source_rank=8, adapter_dir=str(adapter),
                      adapter_sha256=adapter_digest(adapter))
    evaluation = Evaluation(label="post-r2", split="test", examples=3, scores={"accuracy": 0.5},
                            trainable_params=1, lora_params=1, adapter_bytes=7)
    record = UnitResult(name="post-r2-abc", variant=variant, evaluations=(evaluation,))
    root = (tmp_path / "bucket").as_uri()
    return Storage(root, tmp_path / "b"), Storage(root, tmp_path / "a").put_adapters(record)


def test_interrupt_right_after_a_fetch_makes_its_temporary_folder(tmp_path, monkeypatch):
    storage, record = _published(tmp_path)
    storage.cache.mkdir(parents=True)
    _then_interrupt(monkeypatch, os, "mkdir")
    with pytest.raises(KeyboardInterrupt):
        storage.localize(record)
    monkeypatch.undo()
    assert _hidden(storage.cache) == [] and not workdir._UNFINISHED


def test_interrupt_right_after_a_checkpoint_pull_makes_its_temporary_folder(tmp_path, monkeypatch):
    storage = Storage((tmp_path / "bucket").as_uri(), tmp_path / "b")
    checkpoint = tmp_path / "a" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    storage.push_checkpoint("train-x", checkpoint)
    into = tmp_path / "b" / "checkpoints"
    into.mkdir(parents=True)
    _then_interrupt(monkeypatch, os, "mkdir")
    with pytest.raises(KeyboardInterrupt):
        storage.pull_checkpoint("train-x", into)
    monkeypatch.undo()
    assert os.listdir(into) == [] and not workdir._UNFINISHED


def test_interrupt_right_after_force_moves_the_old_output_aside(tmp_path, monkeypatch):
    """``--force``: a signal just after the old output is moved aside puts it back; nothing else is left."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with AtomicFolder(target, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            _then_interrupt(monkeypatch, os, "replace")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["old.txt"]
    assert not lsq.workdir._UNFINISHED


def test_the_plot_child_stops_before_its_folder_is_removed(tmp_path):
    """The plot's child writes spectrum.png into the temporary folder: a failed squeeze stops it while that
    folder still exists, so it cannot put a file back into a folder being removed."""
    src = make_wide_adapter(tmp_path / "src", modules=3, d=16, r=4)

    class Plotter:  # stands in for lsq.plotting.PlotProcess
        folder = None
        folder_at_close = None

        def submit(self, spectra, path, marks):
            self.folder = Path(path).parent

        def wait(self):
            raise KeyboardInterrupt  # Ctrl-C while the child draws

        def close(self):
            if self.folder_at_close is None:
                self.folder_at_close = self.folder is not None and self.folder.is_dir()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    plotter = Plotter()
    with pytest.raises(KeyboardInterrupt):
        lsq.api.squeeze_adapter(src, tmp_path / "out", SqueezeConfig(ranks=[2]), plotter=plotter)
    assert plotter.folder_at_close is True
    assert sorted(os.listdir(tmp_path)) == ["src"]
