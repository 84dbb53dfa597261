"""Parent runs left RUNNING by a pipeline that died (kill -9, a lost machine) are closed by the next one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from lsq.processes import pid_alive, process_start
from tasks import tracking
from tasks.tracking.stale_runs import stale_reason
from tests.tasks.mlflow_store import MODEL

pytestmark = pytest.mark.usefixtures("mlflow_uri")

EXPERIMENT = "lsq-test"
TAGS = {"lsq.registered_model": MODEL}


def _parent(uri: str, name: str, tags=TAGS, **override: str) -> str:
    """A parent run started by this process, its process tags then replaced by ``override``."""
    run_id = tracking.start_pipeline_run(uri, EXPERIMENT, name, {}, tags)
    client = tracking.client_for(uri)
    for key, value in override.items():
        client.set_tag(run_id, f"lsq.{key}", value)
    return run_id


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _status(uri: str, run_id: str) -> str:
    return tracking.client_for(uri).get_run(run_id).info.status


def test_the_parent_run_records_its_process_and_heartbeat(mlflow_uri):
    before = int(time.time())
    run_id = tracking.start_pipeline_run(mlflow_uri, EXPERIMENT, "pipeline", {"seed": 0}, {"lsq.flow_run": "x"})
    tags = tracking.client_for(mlflow_uri).get_run(run_id).data.tags
    assert tags["lsq.flow_run"] == "x"
    assert tags["lsq.host"] == socket.gethostname() and tags["lsq.pid"] == str(os.getpid())
    assert tags["lsq.pid_started"] == process_start(os.getpid()) and tags["lsq.pid_started"].startswith("psutil:")
    assert before <= int(tags["lsq.heartbeat"]) <= time.time()

    tracking.client_for(mlflow_uri).set_tag(run_id, "lsq.heartbeat", "1")
    tracking.heartbeat(mlflow_uri, run_id)
    assert int(tracking.client_for(mlflow_uri).get_run(run_id).data.tags["lsq.heartbeat"]) >= before


def test_a_dead_pipeline_on_this_host_is_closed_with_its_running_children(mlflow_uri):
    client = tracking.client_for(mlflow_uri)
    exp = tracking.ensure_experiment(mlflow_uri, EXPERIMENT)
    dead = _parent(mlflow_uri, "killed", pid=str(_dead_pid()))  # fresh heartbeat: the pid decides here
    running_child = client.create_run(exp, run_name="post-r4", tags={"mlflow.parentRunId": dead}).info.run_id
    done_child = client.create_run(exp, run_name="post-r8", tags={"mlflow.parentRunId": dead}).info.run_id
    client.set_terminated(done_child, "FINISHED")
    other_model = _parent(mlflow_uri, "another model", {"lsq.registered_model": "other"}, pid=str(_dead_pid()))
    live = _parent(mlflow_uri, "live")  # this process, fresh heartbeat
    new = _parent(mlflow_uri, "new")

    closed = tracking.close_stale_runs(mlflow_uri, exp, TAGS, exclude=new)
    assert closed == [dead]
    run = client.get_run(dead)
    assert run.info.status == "KILLED" and run.data.tags["lsq.closed_by"] == new
    assert "is gone" in run.data.tags["lsq.closed_reason"]
    assert _status(mlflow_uri, running_child) == "KILLED"
    assert client.get_run(running_child).data.tags["lsq.closed_by"] == new
    assert _status(mlflow_uri, done_child) == "FINISHED"
    assert [_status(mlflow_uri, r) for r in (live, new, other_model)] == ["RUNNING"] * 3
    assert tracking.close_stale_runs(mlflow_uri, exp, TAGS, exclude=new) == []  # nothing left to close


def test_an_old_heartbeat_from_another_host_is_closed_a_recent_one_is_not(mlflow_uri):
    exp = tracking.ensure_experiment(mlflow_uri, EXPERIMENT)
    now = int(time.time())
    silent = _parent(mlflow_uri, "silent", host="elsewhere", pid="1", heartbeat=str(now - 2000))
    beating = _parent(mlflow_uri, "beating", host="elsewhere", pid="1", heartbeat=str(now - 60))
    closed = tracking.close_stale_runs(mlflow_uri, exp, TAGS, stale_after_s=900)
    assert closed == [silent]
    tags = tracking.client_for(mlflow_uri).get_run(silent).data.tags
    assert "no heartbeat on elsewhere" in tags["lsq.closed_reason"]
    assert tags["lsq.closed_by"] == f"{socket.gethostname()}:{os.getpid()}"  # no run of its own given
    assert _status(mlflow_uri, beating) == "RUNNING"
    assert tracking.close_stale_runs(mlflow_uri, exp, TAGS, stale_after_s=30) == [beating]


def test_on_this_host_a_live_process_is_kept_and_a_reused_pid_is_not(mlflow_uri):
    exp = tracking.ensure_experiment(mlflow_uri, EXPERIMENT)
    ours = process_start(os.getpid())
    quiet = _parent(mlflow_uri, "quiet", heartbeat=str(int(time.time()) - 5000))  # alive: its process ends it
    reused = _parent(mlflow_uri, "reused", pid_started=ours.rsplit(":", 1)[0] + ":1")  # same pid, other process
    closed = tracking.close_stale_runs(mlflow_uri, exp, TAGS)
    assert closed == [reused]
    assert "another process" in tracking.client_for(mlflow_uri).get_run(reused).data.tags["lsq.closed_reason"]
    assert _status(mlflow_uri, quiet) == "RUNNING"


def test_process_helpers():
    assert pid_alive(os.getpid()) and not pid_alive(_dead_pid()) and not pid_alive(0)
    assert process_start(os.getpid()) == process_start(os.getpid())
    assert process_start(_dead_pid()) is None
    # a run of an older version (no process tags): its start time stands in for the heartbeat
    assert stale_reason({}, int(time.time() * 1000)) is None
    assert "no heartbeat" in stale_reason({}, int((time.time() - 1000) * 1000))
