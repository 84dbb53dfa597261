"""The Prefect side of a team stack on one machine: a Prefect server and work-pool workers, each a
child process that ends with its parent.

- :class:`PrefectServer`: ``prefect server start`` with its services (scheduler, triggers: the
  lost-worker automation needs them), its own ``PREFECT_HOME`` and database, on a free loopback port.
- :class:`Worker`: ``prefect worker start --pool P --limit 1`` in its own folder (its own cache,
  ``HOME`` and work folder: as another machine would be), its own process group, with
  ``LSQ_WORKER`` naming it and ``CUDA_VISIBLE_DEVICES`` giving it one device when it has one.

Both are stopped by :meth:`stop` (the whole process group: the worker's flow runs with it) and, when
the parent dies, by the kernel (``PR_SET_PDEATHSIG``; a unit's flow run asks for the same towards
its worker, see ``flows/unit.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows.server import _die_with_parent, _free_port
from lsq.errors import LsqError

BIN = Path(sys.executable).parent


def _quiet_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "PREFECT_HOME"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _stop(process: subprocess.Popen | None, grace: float = 10.0, group: bool = False) -> None:
    if process is None or process.poll() is not None:
        if process is not None and group:
            _kill_group(process.pid)
        return
    try:
        (os.killpg if group else os.kill)(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    if group:
        _kill_group(process.pid)
    if process.poll() is None:
        process.kill()
    process.wait()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class PrefectServer:
    """A Prefect server with its services, in ``folder``, on 127.0.0.1."""

    def __init__(self, folder: str | os.PathLike, timeout: float = 180.0, database_url: str | None = None):
        self.folder = Path(folder)
        self.timeout = timeout
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.database_url = database_url or f"sqlite+aiosqlite:///{self.folder / 'prefect.db'}"
        self.process: subprocess.Popen | None = None
        self.log = self.folder / "prefect-server.log"

    def start(self) -> PrefectServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = _quiet_env(PREFECT_HOME=str(self.folder / "home"), PREFECT_API_DATABASE_CONNECTION_URL=self.database_url,
                         PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_LOGGING_LEVEL="WARNING")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                 "--no-ui", "--analytics-off"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                cwd=self.folder)
        return self

    def wait(self) -> PrefectServer:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                self.stop()
                raise LsqError(f"Prefect server exited during start-up; see {self.log}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise LsqError(f"Prefect server did not answer within {self.timeout:g} s; see {self.log}")

    def stop(self) -> None:
        _stop(self.process)
        self.process = None

    def __enter__(self) -> PrefectServer:
        return self.start().wait()

    def __exit__(self, *exc) -> None:
        self.stop()


class Worker:
    """``prefect worker start`` for ``pool`` in its own folder, one flow run at a time."""

    def __init__(self, name: str, folder: str | os.PathLike, pool: str, api_url: str, env: dict[str, str] | None = None,
                 device: str | None = None, cpus: str | None = None, heartbeat: int = 30, poll: int = 2):
        self.name, self.folder, self.pool, self.api_url = name, Path(folder), pool, api_url
        self.env, self.device, self.cpus, self.heartbeat = dict(env or {}), device, cpus, heartbeat
        self.poll = poll  # seconds between the worker's polls of its pool (Prefect's default: 10)
        self.process: subprocess.Popen | None = None
        self.log = self.folder / "worker.log"

    def start(self) -> Worker:
        home = self.folder / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = _quiet_env(
            PREFECT_API_URL=self.api_url, PREFECT_HOME=str(home / ".prefect"), HOME=str(home),
            XDG_CACHE_HOME=str(home / ".cache"), HF_HOME=str(home / ".cache" / "huggingface"),
            LSQ_WORKER=self.name, LSQ_WORKDIR=str(self.folder), LSQ_EXIT_WITH_WORKER="1",
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(self.heartbeat), PREFECT_WORKER_QUERY_SECONDS=str(self.poll),
            PREFECT_LOGGING_LEVEL="INFO", **self.env)
        if self.device is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.device
        command = [str(BIN / "prefect"), "worker", "start", "--pool", self.pool, "--name", self.name, "--limit", "1",
                   "--type", "process", "--install-policy", "never", "--no-create-pool-if-not-found"]
        if self.cpus is not None:  # pinned (benchmarks): the worker and its flow runs on these cores only
            command = ["taskset", "-c", self.cpus, *command]
            env["OMP_NUM_THREADS"] = str(len(self.cpus.split(",")))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=self.folder, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        return self

    def pids(self) -> list[int]:
        """The worker and every process under it (its flow runs)."""
        import psutil

        if self.process is None or self.process.poll() is not None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the worker and its flow runs at once: a machine lost."""
        if self.process is not None:
            _kill_group(self.process.pid)
            self.process.wait()

    def stop(self) -> None:
        _stop(self.process, grace=10.0, group=True)

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
