"""``python -m flows.squeeze_pipeline`` as a command: help without a server, one line for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "flows.squeeze_pipeline", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_shows_usage_and_starts_no_server():
    started = time.monotonic()
    done = run("--help")
    assert done.returncode == 0 and "key=value" in done.stdout and "configs/demo.yaml" in done.stdout
    assert "Starting temporary server" not in done.stderr + done.stdout
    assert time.monotonic() - started < 60  # imports only (no server wait); the 5 s is for later


@pytest.mark.parametrize("args, message", [
    (("configs/demo.yaml", "source_rank=[1"), "source_rank=[1"),
    (("configs/missing.yaml",), "config file not found"),
    (("configs/demo.yaml", "target_ranks=[128]"), "target_ranks"),
])
def test_bad_input_is_one_line_and_status_2(args, message):
    done = run(*args)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lsq: error: ") and message in lines[0], done.stderr[-2000:]
