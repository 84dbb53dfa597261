"""PostgreSQL for the team stack: a new cluster from pgserver's binaries, run directly.

Traps: ``pg_ctl`` daemonizes out of reach of PDEATHSIG, so ``postgres`` is a direct child; PostgreSQL
refuses to run as root, so root runs it as an unprivileged account (:func:`_service_user`), with the
cluster in a private folder under the temporary directory (that account may not be able to enter the
caller's folder), and PDEATHSIG is set after the user switch (which clears it); pgserver's import sets
up a runtime folder and warns about XDG_RUNTIME_DIR, so its binaries are found without importing it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

from deployments.common import STARTUP_HINT, TeamServer, child_env, private_file, startup_timeout
from lsq.errors import LsqError
from lsq.processes import ServerProcess, free_port, private_folder

GRACE_S = 10.0


def _pg_bin(name: str) -> str:
    """A PostgreSQL program of the pgserver package (found without importing it)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise LsqError("postgres: the pgserver package is missing (pip install 'lsq[team]')")
    return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name)


def _service_user() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as when this process is root (it refuses root): ``$LSQ_POSTGRES_USER``,
    else ``postgres``, else ``nobody``. None when not root."""
    if os.geteuid() != 0:
        return None
    for name in filter(None, (os.environ.get("LSQ_POSTGRES_USER"), "postgres", "nobody")):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise LsqError("postgres: running as root needs an unprivileged account (set LSQ_POSTGRES_USER)")


class Postgres(TeamServer):
    """A new PostgreSQL 16 cluster: user ``lsq`` with a generated password, database ``mlflow``.

    ``initdb`` then ``postgres`` as a direct child (not ``pg_ctl``, which daemonizes out of reach of
    PDEATHSIG), TCP on 127.0.0.1 only (no Unix socket), password (SCRAM) authentication. The cluster
    lives in ``<folder>/pgdata``, or, when this process is root (PostgreSQL then runs as
    :func:`_service_user`, which may not be able to enter ``folder``), in a private folder under the
    temporary directory, removed by :meth:`stop` (or by the next root start, when a SIGKILL left it).
    Either way, ``data_dir`` says where. The port is final once :meth:`wait` returns (a port taken
    before PostgreSQL could bind it is replaced by a new one there).
    """

    name = "postgres"

    def __init__(self, folder: str | os.PathLike, timeout: float | None = None):
        self.folder = Path(folder).resolve()
        self.timeout = startup_timeout(timeout)
        self.port = free_port()
        self.user, self.database = "lsq", "mlflow"
        self._password = secrets.token_urlsafe(24)
        self.data_dir: Path | None = None
        self._private: Path | None = None
        self._account: pwd.struct_passwd | None = None
        self._process = ServerProcess(self.name, self.folder / f"{self.name}.log", hidden=(self._password,))

    @property
    def redacted_uri(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI, password included: never show it (see :attr:`redacted_uri`)."""
        return f"postgresql+psycopg2://{self.user}:{self._password}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> Postgres:
        self.folder.mkdir(parents=True, exist_ok=True)
        account = self._account = _service_user()
        if account is None:
            self.data_dir = self.folder / "pgdata"
            if self.data_dir.exists():
                raise LsqError(f"postgres: {self.data_dir} already exists; a new cluster needs an empty folder")
        else:
            self._private = private_folder("lsq-pgdata")
            os.chown(self._private, account.pw_uid, account.pw_gid)
            self.data_dir = self._private / "pgdata"
        work = self.data_dir.parent
        pwfile = work / ".pw"
        private_file(pwfile, self._password + "\n", account)
        initdb = [_pg_bin("initdb"), "-D", str(self.data_dir), "-U", self.user, "--auth=scram-sha-256",
                  f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C", "--no-instructions", "--no-sync"]
        self._process.log.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self._process.log, "ab") as out:
                since = os.fstat(out.fileno()).st_size
                done = subprocess.run(
                    initdb, cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False,
                    timeout=self.timeout, **({} if account is None else {
                        "user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}))
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode:
            raise self._process.failure(f"initdb failed (status {done.returncode})", argv=initdb, since=since)
        self._launch()
        return self

    def _launch(self) -> None:
        self._process.spawn(
            [_pg_bin("postgres"), "-D", str(self.data_dir), "-h", "127.0.0.1", "-p", str(self.port), "-k", "",
             "-c", "max_connections=40", "-c", "shared_buffers=32MB"],
            env=child_env(("AWS_", "MLFLOW_", "PG")), cwd=self.data_dir.parent, deathsig=signal.SIGINT,
            user=self._account, ports=(self.port,))

    def _relaunch(self) -> None:
        self.port = free_port()
        self._launch()

    def wait(self) -> Postgres:
        """Block until PostgreSQL accepts ``lsq``'s password; create database ``mlflow``."""
        try:
            self._process.wait_until(self._accepts, self.timeout, lambda: f"accept connections at {self.redacted_uri}",
                                     hint=STARTUP_HINT, respawn=self._relaunch)
            conn = self.connect("postgres")
            try:
                conn.autocommit = True  # CREATE DATABASE refuses a transaction
                with conn.cursor() as cur:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                    if cur.fetchone() is None:
                        cur.execute(f'CREATE DATABASE "{self.database}" OWNER "{self.user}"')
            finally:
                conn.close()
        except BaseException:
            self.stop()
            raise
        return self

    def connect(self, database: str | None = None):
        """A psycopg2 connection as ``lsq`` (to ``mlflow`` by default); close it (``with`` only commits)."""
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self._password,
                                dbname=database or self.database, connect_timeout=3)

    def _accepts(self) -> bool:
        import psycopg2

        try:
            self.connect("postgres").close()
            return True
        except psycopg2.OperationalError:
            return False

    def stop(self) -> None:
        """Fast shutdown (SIGINT: backends end, clients are disconnected); SIGKILL after 10 s. Safe twice."""
        self._process.stop(signal.SIGINT, GRACE_S)
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None
