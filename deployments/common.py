"""What the team servers (:mod:`deployments.postgres`, :mod:`deployments.objectstore`,
:mod:`deployments.mlflow_server`) share: their start-up timeout, the environment they get, private
files for their secrets, and the ``with`` protocol. Each is started by :class:`lsq.processes.ServerProcess`
logging to ``<folder>/<name>.log``."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from lsq.processes import ServerProcess, entered

DEFAULT_TIMEOUT_S = 120.0  # MLflow's migrations on an empty PostgreSQL take ~10-30 s on two busy cores
STARTUP_HINT = "raise LSQ_STACK_STARTUP_TIMEOUT"


def startup_timeout(timeout: float | None) -> float:
    """``timeout``, else ``$LSQ_STACK_STARTUP_TIMEOUT``, else 120 s."""
    return float(timeout or os.environ.get("LSQ_STACK_STARTUP_TIMEOUT", DEFAULT_TIMEOUT_S))


def child_env(drop: tuple[str, ...] = ("AWS_", "MLFLOW_")) -> dict[str, str]:
    """This process's environment without credentials or settings meant for clients."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def private_file(path: Path, text: str, owner: pwd.struct_passwd | None = None) -> None:
    """``text`` in ``path``, readable by its owner only (``owner``, else this process's user)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


class TeamServer:
    """A server of the stack: ``start()`` (returns at once), ``wait()`` (until it answers; stops it and raises
    :class:`lsq.processes.ServerFailed` if it does not), ``stop()`` (safe twice), and ``with``."""

    name = "server"
    _process: ServerProcess

    @property
    def pid(self) -> int | None:
        """Its process (group leader) while it runs."""
        return self._process.pid

    def start(self):
        raise NotImplementedError

    def wait(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return entered(self)

    def __exit__(self, *exc) -> None:
        self.stop()
