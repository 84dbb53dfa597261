"""A temporary Prefect server that ends with the command that started it.

With no ``PREFECT_API_URL``, Prefect starts its own temporary server and stops it with ``atexit``:
a server whose start-up timed out, or whose parent was killed, stays behind (seen: a uvicorn
server still listening 15 minutes after ``make demo`` exited), and two such servers share
``~/.prefect/prefect.db``. This one is Prefect's own server app started the same way, but

- in a private folder (its own ``PREFECT_HOME`` and database, removed afterwards, or by the next
  server when a SIGKILL left it behind), on a free loopback port;
- bound to its parent: the kernel sends it SIGTERM when the parent dies, ``kill -9`` included
  (``PR_SET_PDEATHSIG``), and :meth:`stop` terminates it, also when start-up times out;
- waited for up to ``LSQ_SERVER_STARTUP_TIMEOUT`` seconds (default 180): two pipelines starting
  at once on two busy cores need more than Prefect's 20 s.

Light module: prefect's settings are imported only inside the functions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from lsq.distributed import die_with_parent_by  # also imported from here by flows.unit and deployments
from lsq.errors import LsqError

_TEMPORARY_URLS: set[str] = set()


def is_temporary(api_url: str | None) -> bool:
    """True when ``api_url`` is a server of this module (per process, no other flow runs, no limits)."""
    return bool(api_url) and api_url in _TEMPORARY_URLS


_die_with_parent = die_with_parent_by(signal.SIGTERM)


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _remove_orphaned_homes() -> None:
    """Folders of servers whose parent died without cleaning up (SIGKILL): their server is gone too."""
    for folder in Path(tempfile.gettempdir()).glob("lsq-prefect-*-*"):
        pid = folder.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TemporaryServer:
    """``start()`` launches the server (returns at once); ``wait()`` blocks until it answers; ``stop()``."""

    def __init__(self, timeout: float | None = None):
        self.timeout = float(timeout or os.environ.get("LSQ_SERVER_STARTUP_TIMEOUT", 180))
        _remove_orphaned_homes()
        self.home = tempfile.mkdtemp(prefix=f"lsq-prefect-{os.getpid()}-")
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.process: subprocess.Popen | None = None

    def start(self) -> TemporaryServer:
        import prefect

        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
        env.update(PREFECT_HOME=self.home, PREFECT_UI_ENABLED="0", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   DO_NOT_TRACK="1", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1",
                   PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.home}/prefect.db")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        _TEMPORARY_URLS.add(self.api_url)
        return self

    def wait(self) -> TemporaryServer:
        """Block until the server answers ``/health``; stop it and raise LsqError when it does not."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                self.stop()
                raise LsqError(f"temporary Prefect server exited during start-up (status {code})")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise LsqError(f"temporary Prefect server did not answer within {self.timeout:g} s "
                       "(raise LSQ_SERVER_STARTUP_TIMEOUT, or start one and set PREFECT_API_URL)")

    def stop(self) -> None:
        """Terminate the server (kill after 10 s), reap it and remove its folder. Safe to call twice."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        _TEMPORARY_URLS.discard(self.api_url)
        shutil.rmtree(self.home, ignore_errors=True)


def start_unless_configured() -> TemporaryServer | None:
    """A started :class:`TemporaryServer` when this process has no Prefect API to talk to, else None."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    return TemporaryServer().start()


@contextlib.contextmanager
def prefect_api(server: TemporaryServer | None) -> Iterator[str | None]:
    """Run the body against ``server`` (waited for, then stopped at the end), or the configured API."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if server is None:
        yield PREFECT_API_URL.value()
        return
    try:
        server.wait()
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                _drain_prefect_workers()
    finally:
        server.stop()


def _drain_prefect_workers(timeout: float = 5.0) -> None:
    """Send the logs and events still queued for the server before it stops (else: 'Error logging to API')."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception:  # best effort: the run's outcome is already decided
            pass


_TERMINATING = threading.Event()


def terminating() -> bool:
    """True once SIGTERM arrived (an exception seen after that is the termination, whatever its type:
    Prefect's engine may wrap the SystemExit)."""
    return _TERMINATING.is_set()


def terminate_on_sigterm() -> None:
    """Turn SIGTERM (timeout, docker, kubernetes) into SystemExit(143) so ``finally`` blocks run."""
    def _raise(signum, frame):
        _TERMINATING.set()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
