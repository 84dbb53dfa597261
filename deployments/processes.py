"""The Prefect side of a team stack on one machine: a Prefect server and work-pool workers, each a
child process that ends with its parent.

- :class:`PrefectServer`: ``prefect server start`` with its services (scheduler, triggers: the
  lost-worker automation needs them), its own ``PREFECT_HOME`` and database, on a free loopback port
  (started again on a new one when another process took it first).
- :class:`Worker`: ``prefect worker start --pool P --limit 1`` in its own folder (its own cache,
  ``HOME`` and work folder: as another machine would be), its own process group, with
  ``LSQ_WORKER`` naming it and ``CUDA_VISIBLE_DEVICES`` giving it one device when it has one.

Both are :class:`lsq.processes.ServerProcess` processes, stopped by :meth:`stop` (the whole process group: the worker's flow runs with it) and, when
the parent dies, by the kernel (``PR_SET_PDEATHSIG``; a unit's flow run asks for the same towards
its worker, see ``flows/unit.py``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil

from lsq.processes import ServerProcess, answers, entered, free_port

BIN = Path(sys.executable).parent


def _quiet_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "PREFECT_HOME"))}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    return env


class PrefectServer:
    """A Prefect server with its services, in ``folder``, on 127.0.0.1."""

    def __init__(self, folder: str | os.PathLike, timeout: float = 180.0, database_url: str | None = None,
                 ui: bool = False):
        self.folder = Path(folder)
        self.timeout = timeout
        self.ui = ui  # the web UI at http://127.0.0.1:<port>/ (off: the API only)
        self.port = free_port()
        self.database_url = database_url or f"sqlite+aiosqlite:///{self.folder / 'prefect.db'}"
        self.process = ServerProcess("Prefect server", self.folder / "prefect-server.log")

    @property
    def api_url(self) -> str:
        """Final once :meth:`wait` returns (a port taken before the server bound it is replaced there)."""
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> PrefectServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._launch()
        return self

    def _launch(self) -> None:
        env = _quiet_env(PREFECT_HOME=str(self.folder / "home"), PREFECT_API_DATABASE_CONNECTION_URL=self.database_url,
                         PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(self.port),  # the UI's API URL
                         PREFECT_LOGGING_LEVEL="WARNING")
        self.process.spawn([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                            "--ui" if self.ui else "--no-ui", "--analytics-off"], env=env, cwd=self.folder,
                           deathsig=signal.SIGTERM, ports=(self.port,))

    def _relaunch(self) -> None:
        self.port = free_port()
        self._launch()

    def wait(self) -> PrefectServer:
        try:
            self.process.wait_until(self._healthy, self.timeout, lambda: f"answer at {self.api_url}/health",
                                    respawn=self._relaunch)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        return answers(f"{self.api_url}/health")

    def stop(self) -> None:
        self.process.stop(signal.SIGTERM, grace=10.0)

    def __enter__(self) -> PrefectServer:
        return entered(self)

    def __exit__(self, *exc) -> None:
        self.stop()


class Worker:
    """``prefect worker start`` for ``pool`` in its own folder, one flow run at a time."""

    def __init__(self, name: str, folder: str | os.PathLike, pool: str, api_url: str, env: dict[str, str] | None = None,
                 device: str | None = None, cpus: str | None = None, heartbeat: int = 30, poll: int = 2):
        self.name, self.folder, self.pool, self.api_url = name, Path(folder), pool, api_url
        self.env, self.device, self.cpus, self.heartbeat = dict(env or {}), device, cpus, heartbeat
        self.poll = poll  # seconds between the worker's polls of its pool (Prefect's default: 10)
        self.process = ServerProcess(f"worker {name}", self.folder / "worker.log")

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
        self.process.spawn(command, env=env, cwd=self.folder, deathsig=signal.SIGTERM)
        return self

    def pids(self) -> list[int]:
        """The worker and every process under it (its flow runs)."""
        if self.process.pid is None or self.process.exited() is not None:
            return []
        try:
            root = psutil.Process(self.process.pid)
            return [root.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the worker and its flow runs at once: a machine lost."""
        self.process.stop(signal.SIGKILL, grace=0.0)

    def stop(self) -> None:
        """SIGTERM, 10 s, then SIGKILL to the worker's whole process group (its flow runs too)."""
        self.process.stop(signal.SIGTERM, grace=10.0)

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
