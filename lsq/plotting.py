"""The spectrum plot, torch-free, in this process or in a child process started ahead of the maths.

``lsq squeeze`` spends about 1 s of its run importing matplotlib and drawing. :class:`PlotProcess`
starts ``python -m lsq.plotting`` first thing, so the child imports matplotlib while the parent
imports torch and decomposes; the parent sends the spectra (JSON on stdin) and writes the adapters
while the child draws. This module imports neither torch nor the rest of lsq, so the child stays light.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

# Matplotlib's text layout (pyparsing-based) is not thread-safe; every lsq plot takes this lock, so
# squeezes running in worker threads (Prefect's task runner) and the tracking code can share it.
PLOT_LOCK = threading.Lock()
DPI = 100
# the child's errors that PlotProcess.wait raises as an OSError naming the file: the disk's, not the plot's
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


def plot_spectra(spectra: Sequence[Sequence[float]], path: str | Path, marks: Mapping[str, int] | None = None) -> None:
    """PNG: normalised singular values per module (left) and cumulative energy (right), with the
    uniform target ranks marked. Matplotlib is imported here only (object API, no pyplot state)."""
    with PLOT_LOCK:
        _plot(spectra, Path(path), marks or {})


def _plot(spectra: Sequence[Sequence[float]], path: Path, marks: Mapping[str, int]) -> None:
    _draw(*_figure(), spectra, path, marks)


def _figure():
    """The empty figure and its two axes (the part that costs the same whatever the data)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ax_s, ax_e = fig.subplots(1, 2)
    ax_s.set(xlabel="k", ylabel="sigma_k / sigma_1", yscale="log")
    ax_e.set(xlabel="rank k", ylabel="retained energy", title="Cumulative energy", ylim=(0, 1.02))
    for ax in (ax_s, ax_e):
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.22)
    return fig, ax_s, ax_e


def _draw(fig, ax_s, ax_e, spectra: Sequence[Sequence[float]], path: Path, marks: Mapping[str, int]) -> None:
    from matplotlib.collections import LineCollection

    alpha = max(0.08, min(0.8, 8 / max(len(spectra), 1)))
    curves, energies = [], []
    for S in spectra:
        if not S or S[0] <= 0:
            continue
        sq = [x * x for x in S]
        total, run, energy = math.fsum(sq), 0.0, []
        for x in sq:
            run += x
            energy.append(run / total)
        curves.append([(k, max(x / S[0], 1e-12)) for k, x in enumerate(S, 1)])
        energies.append(list(enumerate(energy, 1)))
    # one collection per axis: hundreds of modules draw as fast as one line
    ax_s.add_collection(LineCollection(curves, colors="tab:blue", alpha=alpha, linewidths=1))
    ax_e.add_collection(LineCollection(energies, colors="tab:blue", alpha=alpha, linewidths=1))
    longest = max((len(c) for c in curves), default=1)
    floor = min((p[1] for c in curves for p in c), default=1e-3)
    ax_s.set(xlim=(1, max(longest, 2)), ylim=(floor / 2, 2.0), title=f"Singular values ({len(spectra)} modules)")
    ax_e.set_xlim(1, max(longest, 2))
    for label, k in marks.items():
        for ax in (ax_s, ax_e):
            ax.axvline(k, color="tab:red", ls="--", lw=1)
        ax_e.annotate(label, (k, 0.02), color="tab:red", rotation=90, fontsize=8, ha="right")
    fig.savefig(path, dpi=DPI)


class PlotProcess:
    """A child process that imports matplotlib now and draws one plot when :meth:`submit` is called.

    Use as a context manager; leaving it kills a child that is still drawing. :meth:`wait` raises
    ``OSError`` naming the file when the child could not write it (disk full, no permission), and
    ``RuntimeError`` with the child's last error line when drawing failed otherwise.
    """

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "lsq.plotting"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )
        self._path: str | None = None  # the plot's file, once submitted

    def submit(self, spectra: Sequence[Sequence[float]], path: str | Path, marks: Mapping[str, int]) -> None:
        """Hand the data to the child; it draws while the caller goes on."""
        self._path = str(path)
        payload = {"spectra": [list(map(float, S)) for S in spectra], "path": self._path, "marks": dict(marks)}
        try:
            self._proc.stdin.write(json.dumps(payload))
            self._proc.stdin.close()
        except BrokenPipeError:
            pass  # the child died early; wait() reports why

    def wait(self) -> None:
        """Block until the plot is written."""
        err = self._proc.stderr.read()  # EOF when the child exits
        self._proc.wait()
        if self._proc.returncode != 0:
            lines = [ln for ln in (err or "").splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit {self._proc.returncode}"
            found = re.search(r"\[Errno (\d+)\]", last)
            if found and int(found[1]) in _WRITE_ERRNOS:
                raise OSError(int(found[1]), os.strerror(int(found[1])), self._path)
            raise RuntimeError(f"spectrum plot failed: {last}")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stderr):
            if stream and not stream.closed:
                with contextlib.suppress(OSError):  # stdin's unsent payload: the child is gone (BrokenPipeError)
                    stream.close()

    def __enter__(self) -> PlotProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _main() -> int:
    # matplotlib imported, the axes laid out, fonts and the PNG writer loaded (a first save) before
    # the data arrives: that is the point of the child
    figure = _figure()
    figure[0].savefig(io.BytesIO(), format="png", dpi=DPI)
    data = sys.stdin.read()
    if not data:  # the parent gave up (an error): nothing to draw
        return 0
    payload = json.loads(data)
    _draw(*figure, payload["spectra"], Path(payload["path"]), payload["marks"])
    return 0


if __name__ == "__main__":
    sys.exit(_main())
