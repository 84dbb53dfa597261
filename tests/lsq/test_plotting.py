"""The spectrum plot: in-process, and in the child process that ``lsq squeeze`` starts at launch."""

import json
import subprocess
import sys

import pytest

from lsq.plotting import PlotProcess, plot_spectra

SPECTRA = [[4.0, 2.0, 1.0, 0.5], [3.0, 0.3, 0.03, 0.0], [0.0, 0.0]]  # a zero module is skipped, not an error


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_in_process_plot(tmp_path):
    plot_spectra(SPECTRA, tmp_path / "s.png", {"r2": 2})
    assert is_png(tmp_path / "s.png")


def test_child_process_draws_what_it_is_sent(tmp_path):
    with PlotProcess() as plotter:
        plotter.submit(SPECTRA, tmp_path / "s.png", {"r2": 2})
        plotter.wait()
    assert is_png(tmp_path / "s.png")


def test_child_failure_is_reported_in_one_line(tmp_path):
    with PlotProcess() as plotter:
        plotter.submit(SPECTRA, tmp_path / "missing" / "s.png", {})
        with pytest.raises(RuntimeError, match=r"spectrum plot failed: .*(No such file|missing)") as info:
            plotter.wait()
    assert "\n" not in str(info.value)


def test_an_unused_child_is_stopped():
    plotter = PlotProcess()
    plotter.close()
    assert plotter._proc.returncode is not None


def test_the_child_imports_neither_torch_nor_the_rest_of_lsq():
    code = ("import sys, runpy; sys.argv = ['lsq.plotting']; sys.stdin = open('/dev/null');"
            "\ntry: runpy.run_module('lsq.plotting', run_name='__main__')\nexcept SystemExit: pass"
            "\nprint(__import__('json').dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('lsq'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert "torch" not in loaded and set(loaded) <= {"lsq", "lsq.plotting"}
