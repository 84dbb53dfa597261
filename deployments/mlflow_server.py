"""The team stack's MLflow server: runs and the registry in a database, artifacts proxied to an object store.

Traps: MLflow writes the backend URI into its log when the store fails to open, so a PostgreSQL password
reaches it as ``PGPASSWORD`` (read by libpq), never in the URI or on the command line; the object
store's credentials go to this process alone (clients need only the tracking URL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

from deployments.common import STARTUP_HINT, TeamServer, child_env, startup_timeout
from lsq.processes import ServerProcess, free_port

GRACE_S = 10.0


class MlflowServer(TeamServer):
    """``mlflow server`` (uvicorn, one worker) with a database backend and proxied artifacts.

    ``backend_uri`` reaches the server by environment variable, never its command line (a PostgreSQL
    password apart, as ``PGPASSWORD``: MLflow logs the URI when the store fails to open);
    ``object_store_env`` (e.g. :meth:`ObjectStore.env`) is given to this process only.
    Job execution (huey workers) and telemetry are off. Answers on ``url`` once migrations are done
    (``url`` is final once :meth:`wait` returns: a port taken before it could bind is replaced there).
    """

    name = "mlflow"

    def __init__(self, folder: str | os.PathLike, backend_uri: str, artifacts_destination: str,
                 object_store_env: dict[str, str] | None = None, timeout: float | None = None):
        from tasks.tracking.store import redact_uri

        self.folder = Path(folder).resolve()
        self.timeout = startup_timeout(timeout)
        self.backend_uri, self.artifacts_destination = backend_uri, artifacts_destination
        self.object_store_env = dict(object_store_env or {})
        self.port = free_port()
        self._backend, self._backend_env = _password_to_env(backend_uri)
        hidden = [v for k, v in self.object_store_env.items() if "SECRET" in k or "TOKEN" in k]
        with contextlib.suppress(ValueError):
            hidden.append(unquote(urlsplit(backend_uri).password or ""))
        self._redacted_backend = redact_uri(backend_uri)
        self._process = ServerProcess(self.name, self.folder / f"{self.name}.log",
                                      hidden=tuple(filter(None, hidden)))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._launch()
        return self

    def _launch(self) -> None:
        env = {**child_env(), **self.object_store_env, **self._backend_env,
               "MLFLOW_BACKEND_STORE_URI": self._backend, "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self._process.spawn(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--serve-artifacts", "--artifacts-destination", self.artifacts_destination],
            env=env, cwd=self.folder, deathsig=signal.SIGTERM, ports=(self.port,))

    def _relaunch(self) -> None:
        self.port = free_port()
        self._launch()

    def wait(self) -> MlflowServer:
        """Block until ``/health`` answers (MLflow first migrates an empty database)."""
        try:
            self._process.wait_until(
                self._healthy, self.timeout, lambda: f"answer at {self.url}/health (backend {self._redacted_backend})",
                hint=STARTUP_HINT, respawn=self._relaunch)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM (forwarded to uvicorn), SIGKILL to its process group after 10 s. Safe twice."""
        self._process.stop(signal.SIGTERM, GRACE_S)


def _password_to_env(uri: str) -> tuple[str, dict[str, str]]:
    """A PostgreSQL URI without its password, and ``PGPASSWORD`` (read by libpq) to pass it instead:
    MLflow writes the backend URI into its log when the store fails to open. Other URIs unchanged."""
    parts = urlsplit(uri)
    if not parts.scheme.startswith("postgresql") or parts.password is None:
        return uri, {}
    host, user = parts.netloc.rpartition("@")[2], parts.username or ""
    without = parts._replace(netloc=f"{user}@{host}" if user else host).geturl()
    return without, {"PGPASSWORD": unquote(parts.password)}
