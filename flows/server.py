"""A temporary Prefect server that ends with the command that started it.

With no ``PREFECT_API_URL``, Prefect starts its own temporary server and stops it with ``atexit``:
a server whose start-up timed out, or whose parent was killed, stays behind (seen: a uvicorn
server still listening 15 minutes after ``make demo`` exited), and two such servers share
``~/.prefect/prefect.db``. This one is Prefect's own server app started the same way, but

- in a private folder (its own ``PREFECT_HOME``, database and log, removed afterwards, or by the
  next server when a SIGKILL left it behind), on a free loopback port (started again on a new one
  if another process took it first);
- bound to its parent: the kernel sends it SIGTERM when the parent dies, ``kill -9`` included
  (``PR_SET_PDEATHSIG``), and :meth:`stop` terminates it, also when start-up times out; in its
  own session (Ctrl-C reaches the pipeline, which stops it after its last logs are sent);
- waited for up to ``LSQ_SERVER_STARTUP_TIMEOUT`` seconds (default 180): two pipelines starting
  at once on two busy cores need more than Prefect's 20 s;
- a failed start is one line: the command, the port and the server's last output.

Started by :class:`lsq.processes.ServerProcess`, as every lsq server. Light module (the pipeline
starts the server before its heavy imports: ``start()`` returns at once, the server boots on the
other core meanwhile): prefect is imported only inside the functions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from lsq.processes import ServerProcess, answers, free_port, private_folder

_TEMPORARY_URLS: set[str] = set()
HINT = "raise LSQ_SERVER_STARTUP_TIMEOUT, or start one and set PREFECT_API_URL"


def is_temporary(api_url: str | None) -> bool:
    """True when ``api_url`` is a server of this module (per process, no other flow runs, no limits)."""
    return bool(api_url) and api_url in _TEMPORARY_URLS


class TemporaryServer:
    """``start()`` launches the server (returns at once); ``wait()`` blocks until it answers; ``stop()``.

    ``api_url`` is final once :meth:`wait` returns (a port taken before the server could bind it is
    replaced by a new one there)."""

    def __init__(self, timeout: float | None = None):
        self.timeout = float(timeout or os.environ.get("LSQ_SERVER_STARTUP_TIMEOUT", 180))
        self.home = str(private_folder("lsq-prefect"))  # also removes those of SIGKILLed parents
        self.port = free_port()
        self.process = ServerProcess("temporary Prefect server", Path(self.home) / "server.log", keep_log=False)
        self._env: dict[str, str] = {}

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> TemporaryServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
        env.update(PREFECT_HOME=self.home, PREFECT_UI_ENABLED="0", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   DO_NOT_TRACK="1", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1",
                   PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.home}/prefect.db")
        self._env = env
        self._launch()
        return self

    def _launch(self) -> None:
        import prefect

        self.process.spawn(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=self._env, cwd=None, deathsig=signal.SIGTERM, ports=(self.port,))
        _TEMPORARY_URLS.add(self.api_url)

    def _relaunch(self) -> None:
        """Its port was taken before it could bind it: a new port, a new start."""
        _TEMPORARY_URLS.discard(self.api_url)
        self.port = free_port()
        self._launch()

    def wait(self) -> TemporaryServer:
        """Block until the server answers ``/health``; stop it and raise LsqError (one line: the command,
        the port, its last output) when it does not."""
        try:
            self.process.wait_until(self._healthy, self.timeout, "answer", hint=HINT, respawn=self._relaunch,
                                    interval=0.2)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        return answers(f"{self.api_url}/health")

    def stop(self) -> None:
        """Terminate the server (SIGKILL after 10 s), reap it and remove its folder. Safe to call twice."""
        self.process.stop(signal.SIGTERM, grace=10.0)
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
                drain_prefect_workers()
    finally:
        server.stop()


def drain_prefect_workers(timeout: float = 5.0) -> None:
    """Send the logs and events still queued for the server before it stops (else: 'Error logging to API')."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception:  # best effort: the run's outcome is already decided
            pass


_drain_prefect_workers = drain_prefect_workers  # the name older callers (tests) use


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
