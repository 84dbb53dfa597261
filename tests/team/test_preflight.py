"""Pre-flight checks (tasks/preflight.py): one line naming what is down, in seconds, with no secret in it."""

from __future__ import annotations

import os
import time

import pytest

from deployments.stack import MlflowServer
from lsq.processes import free_port
from lsq.errors import LsqError
from tasks.preflight import preflight
from tests.team.conftest import one_line, secrets_of

pytestmark = pytest.mark.e2e
FAKE_SECRET = "fake-secret-key-0123456789"


def failure(*args, **kwargs) -> tuple[str, float]:
    """The message of the LsqError ``preflight(*args)`` raises, and how long it took."""
    start = time.monotonic()
    with pytest.raises(LsqError) as failed:
        preflight(*args, **kwargs)
    return str(failed.value), time.monotonic() - start


def use_object_store(monkeypatch, env: dict[str, str], endpoint: str | None = None) -> None:
    for name, value in env.items():
        if endpoint and name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
            value = endpoint
        monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("without_object_store_credentials")
def test_all_reachable_passes_and_leaves_nothing(team_servers, tmp_path, monkeypatch):
    uri, store = team_servers.tracking_uri, team_servers.object_store
    preflight(uri, str(tmp_path / "root"))  # the server needs no client credentials
    assert list((tmp_path / "root").iterdir()) == []
    use_object_store(monkeypatch, store.env())
    preflight(uri, "s3://lsq/preflight-test")
    preflight(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}", "s3://lsq/preflight-test/")
    s3 = store.client()
    for prefix in ("preflight-test/", "mlflow/lsq-preflight/"):
        assert s3.list_objects_v2(Bucket="lsq", Prefix=prefix)["KeyCount"] == 0, prefix


def test_a_tracking_server_that_is_down(team_servers):
    port = free_port()
    message, seconds = failure(f"http://lsq:tracking-password@127.0.0.1:{port}", None, timeout=5)
    assert message == f"preflight: tracking server http://lsq:***@127.0.0.1:{port} unreachable (Connection refused)"
    assert seconds < 15
    one_line(message, ["tracking-password", *secrets_of(team_servers)])


def test_an_object_store_that_is_down_behind_a_running_server(team_servers, tmp_path, no_leftover_processes):
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**team_servers.object_store.env(), "AWS_ENDPOINT_URL_S3": dead, "AWS_ENDPOINT_URL": dead,
           "MLFLOW_S3_ENDPOINT_URL": dead}
    with MlflowServer(tmp_path, team_servers.postgres.uri, "s3://lsq/mlflow", env) as broken:
        message, seconds = failure(broken.url, None, timeout=10)
    assert message.startswith(f"preflight: artifact store behind {broken.url} not writable (HTTP 500"), message
    assert "tracking server" not in message and seconds < 45
    one_line(message, secrets_of(team_servers))


def test_a_storage_root_that_is_not_writable(tmp_path, monkeypatch):
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    if os.geteuid() == 0:  # root writes anywhere: put a file in the way instead
        (tmp_path / "file").write_text("not a folder")
        root = tmp_path / "file" / "runs"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        root = locked / "runs"
    try:
        message, _ = failure(tracking, str(root))
    finally:
        if os.geteuid() != 0:
            (tmp_path / "locked").chmod(0o700)
    assert message.startswith(f"preflight: storage root {root} not writable ("), message
    one_line(message, [])

    use_object_store(monkeypatch, {"AWS_ACCESS_KEY_ID": "lsqtest", "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
                                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                                   "AWS_ENDPOINT_URL_S3": "?"}, endpoint=f"http://127.0.0.1:{free_port()}")
    message, seconds = failure(tracking, "s3://lsq/runs", timeout=5)
    assert message.startswith("preflight: storage root s3://lsq/runs not writable ("), message
    assert seconds < 15
    one_line(message, [FAKE_SECRET])


def test_a_tracking_store_folder_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    message, _ = failure(f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}", None)
    assert message.startswith("preflight: tracking store sqlite:///") and "not writable" in message
    one_line(message, [])
