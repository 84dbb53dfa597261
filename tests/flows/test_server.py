"""The temporary Prefect server (flows/server.py) ends with the process that started it: stopped,
timed out, or killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from flows.server import TemporaryServer, is_temporary
from lsq.errors import LsqError

REPO = Path(__file__).resolve().parents[2]


def gone(pid: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def test_a_server_that_does_not_start_in_time_is_stopped(monkeypatch):
    server = TemporaryServer(timeout=0.2).start()
    pid, home, port = server.process.pid, server.home, server.port
    assert is_temporary(server.api_url)
    with pytest.raises(LsqError, match="did not answer within 0.2 s") as failed:
        server.wait()
    assert gone(pid) and not Path(home).exists() and not is_temporary(server.api_url)
    message = str(failed.value)  # one line: the server, its command line, its port
    assert message.startswith("temporary Prefect server did not answer") and "\n" not in message
    assert f"--port {port} " in message and f"; port {port}; last output: " in message


@pytest.mark.slow
def test_a_port_taken_before_the_server_bound_it_is_replaced():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = TemporaryServer()
        server.port = taken.getsockname()[1]  # picked free, then taken by someone else
        server.start()
        try:
            server.wait()
            assert server.port != taken.getsockname()[1] and is_temporary(server.api_url)
            with urllib.request.urlopen(f"{server.api_url}/health", timeout=10) as response:
                assert response.status == 200
        finally:
            pid = server.process.pid
            server.stop()
    assert gone(pid) and not is_temporary(server.api_url) and not Path(server.home).exists()


@pytest.mark.slow
def test_the_server_answers_then_dies_with_its_killed_parent(tmp_path):
    script = ("import sys, time\nfrom flows.server import TemporaryServer\n"
              "s = TemporaryServer().start().wait()\nprint(s.process.pid, s.api_url, s.home, flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        pid, url, home = parent.stdout.readline().split()
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            assert response.status == 200
        assert psutil.Process(int(pid)).ppid() == parent.pid
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert gone(int(pid)), "the temporary server outlived its SIGKILLed parent"
        assert Path(home).is_dir()  # nobody could clean up after a SIGKILL ...
        TemporaryServer().stop()  # ... so the next server does
        assert not Path(home).exists()
    finally:
        parent.kill()
        parent.wait()
