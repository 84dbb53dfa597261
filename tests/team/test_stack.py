"""The team stack (deployments/stack.py) with real servers: artifacts go through the MLflow server into
the S3 bucket, runs into PostgreSQL; a client needs only the tracking URL; nothing outlives the stack."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import save_file

from deployments import stack
from deployments.stack import MlflowServer, Postgres, TeamServers
from lsq.errors import LsqError
from tasks.tracking import client_for, download_adapter, log_folder
from tests.team.conftest import descendants, gone, secrets_of

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def fake_adapter(folder: Path) -> Path:
    """adapter_config.json + adapter_model.safetensors, tiny and seeded."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    save_file({"base_model.model.q.lora_A.weight": torch.randn(4, 16),
               "base_model.model.q.lora_B.weight": torch.randn(16, 4)}, str(folder / "adapter_model.safetensors"))
    return folder


def closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.usefixtures("without_object_store_credentials")
def test_artifacts_go_through_the_server_to_the_bucket_and_runs_to_postgres(team_servers, tmp_path, chdir_to):
    uri, name = team_servers.tracking_uri, f"lsq-team-{uuid.uuid4().hex[:8]}"
    # a writer in one folder, with no object-store credentials
    chdir_to(tmp_path / "writer")
    adapter = fake_adapter(tmp_path / "writer" / "adapter")
    client = client_for(uri)
    run = client.create_run(client.create_experiment(name))
    log_folder(uri, run.info.run_id, adapter, "adapter")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id).version

    # a reader in another folder, also without credentials, gets the same bytes through the server
    chdir_to(tmp_path / "reader")
    copy = Path(download_adapter(uri, name, version, dst_path=str(tmp_path / "reader")))
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (copy / file).read_bytes() == (adapter / file).read_bytes()

    # the objects are in the bucket, under mlflow/
    s3 = team_servers.object_store.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lsq", Prefix="mlflow/")["Contents"]]
    weights = [k for k in keys if run.info.run_id in k and k.endswith("adapter/adapter_model.safetensors")]
    assert len(weights) == 1, keys
    stored = s3.get_object(Bucket="lsq", Key=weights[0])["Body"].read()
    assert stored == (adapter / "adapter_model.safetensors").read_bytes()
    with pytest.raises(urllib.error.HTTPError, match="403"):  # the bucket wants signed requests
        urllib.request.urlopen(f"{team_servers.object_store.endpoint_url}/lsq/{weights[0]}", timeout=5)

    # the run and the registered model are rows in PostgreSQL
    conn = team_servers.postgres.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT version()")
            assert cur.fetchone()[0].startswith("PostgreSQL 16")
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
            assert cur.fetchone() == ("FINISHED",)
            cur.execute("SELECT version FROM model_versions WHERE name = %s", (name,))
            assert cur.fetchall() == [(int(version),)]
    finally:
        conn.close()


def test_the_stack_shows_no_secret(team_servers):
    shown = [team_servers.postgres.redacted_uri, team_servers.tracking_uri, repr(team_servers.postgres)]
    assert team_servers.postgres.redacted_uri.startswith("postgresql://lsq@127.0.0.1:")
    for log in team_servers.folder.glob("*/*.log"):
        shown.append(log.read_text(errors="replace"))
    for secret in secrets_of(team_servers):
        assert not any(secret in text for text in shown)
    for name in ("AWS_SECRET_ACCESS_KEY", "PGPASSWORD"):  # only the servers got the credentials
        assert os.environ.get(name) not in secrets_of(team_servers)


def test_a_stopped_stack_leaves_no_process_and_no_open_port(tmp_path, no_leftover_processes):
    with TeamServers(tmp_path) as team:
        pids = {pid for leader in team.pids().values() for pid in {leader} | descendants(leader)}
        assert len(team.pids()) == 3 and len(pids) > 3  # PostgreSQL's backends, uvicorn under mlflow
        store = team.object_store
        ports = [team.postgres.port, team.mlflow.port, store.s3_port, store.master_port, store.volume_port,
                 store.filer_port]
        assert not any(closed(port) for port in ports)
    assert gone(pids, within=1.0) == set()
    assert all(closed(port) for port in ports)
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{store.master_port}.sock"))


def test_a_server_that_fails_stops_those_started_and_names_itself(tmp_path, monkeypatch, no_leftover_processes):
    started, session = {}, descendants()  # the session's servers may be up

    def failing_mlflow(folder, backend_uri, destination, env, timeout):
        started["before"] = descendants() - session
        return MlflowServer(folder, backend_uri.replace("postgresql+psycopg2", "nosuchdb"), destination, env, timeout)

    monkeypatch.setattr(stack, "MlflowServer", failing_mlflow)
    team = TeamServers(tmp_path)
    with pytest.raises(LsqError) as failed:
        team.start()
    message = str(failed.value)  # one line: the server, its command line, its port, its last output
    assert message.startswith("mlflow exited during start-up") and "mlflow.log" in message and "\n" not in message
    assert " -m mlflow server --host 127.0.0.1 --port " in message and "; port " in message
    assert "nosuchdb://lsq:***@" in message  # the tail of its log, secrets masked
    for secret in secrets_of(team):
        assert secret not in message
    assert len(started["before"]) >= 2 and gone(started["before"]) == set()


def test_a_port_taken_before_the_server_bound_it_is_replaced(tmp_path, no_leftover_processes):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        postgres = Postgres(tmp_path)
        postgres.port = taken.getsockname()[1]  # picked free, then taken by someone else
        with postgres:
            assert postgres.port != taken.getsockname()[1] and f":{postgres.port}/" in postgres.redacted_uri
            postgres.connect().close()
            assert "already in use" in (tmp_path / "postgres.log").read_text()


def test_the_stack_dies_with_its_killed_parent(tmp_path):
    script = ("import json, sys, time\nimport psutil\nfrom deployments.stack import TeamServers\n"
              "TeamServers(sys.argv[1]).start()\n"
              "print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    pids: list[int] = []
    try:
        line = parent.stdout.readline()
        assert line, f"the stack did not start (status {parent.wait()})"
        pids = json.loads(line)
        names = {pid: " ".join(psutil.Process(pid).cmdline()[:3]) for pid in pids}
        assert len(pids) > 3
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        left = gone(pids, within=15.0)
        assert left == set(), f"servers outlived their SIGKILLed parent: {[names[pid] for pid in left]}"
    finally:
        parent.kill()
        for pid in gone(pids, within=0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_postgresql_store_promotes_under_an_advisory_lock_that_dies_with_its_holder(team_servers):
    """Tracking straight into PostgreSQL: the promotion lock is an advisory lock per registered model; a
    second promoter waits for it, another model's lock is free, and the server frees a lock whose holder
    was killed (its connection dropped)."""
    from tasks.tracking import registry_lock

    uri = team_servers.postgres.uri
    env = {**os.environ, "LSQ_TEST_STORE": uri}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, time\nfrom tasks.tracking import registry_lock\n"
         "with registry_lock(os.environ['LSQ_TEST_STORE'], 'model a') as how:\n"
         "    print(how, flush=True)\n    time.sleep(600)\n"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        how = holder.stdout.readline().strip()
        assert how.startswith("advisory lock "), how
        with pytest.raises(TimeoutError, match="model a: the promotion lock"):
            with registry_lock(uri, "model a", timeout=2):
                pass
        with registry_lock(uri, "model b", timeout=30) as other:
            assert other.startswith("advisory lock ") and other != how
        holder.kill()
        holder.wait(timeout=60)
        with registry_lock(uri, "model a", timeout=120) as again:
            assert again == how
    finally:
        holder.kill()
        holder.wait()
