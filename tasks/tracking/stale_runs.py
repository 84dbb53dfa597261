"""Parent runs whose pipeline died without ending them (``kill -9``, a lost machine), found and closed.

A parent run carries ``lsq.host``, ``lsq.pid``, ``lsq.pid_started`` (the process's start time, so a
reused pid is told apart), ``lsq.pid_ns`` (its pid namespace, so two containers sharing a host name are
told apart) and ``lsq.heartbeat`` (unix seconds, refreshed while it runs: :mod:`.parent_runs`). A
``kill -9`` leaves such a run RUNNING; :func:`close_stale_runs`, called by the next pipeline, ends it
as KILLED. Whether a process lives, and when it started, comes from :mod:`lsq.processes` (psutil).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

from lsq.processes import pid_alive, pid_namespace, process_start
from tasks.tracking.store import _quote, _tag, all_runs, client_for, retry

log = logging.getLogger(__name__)

__all__ = ["close_stale_runs", "process_tags", "stale_reason"]

STALE_AFTER_S = 900.0
HOST_TAG, PID_TAG, STARTED_TAG, NS_TAG = "lsq.host", "lsq.pid", "lsq.pid_started", "lsq.pid_ns"
HEARTBEAT_TAG, CLOSED_BY_TAG, CLOSED_REASON_TAG = "lsq.heartbeat", "lsq.closed_by", "lsq.closed_reason"


def close_stale_runs(uri: str, experiment_id: str, tags: Mapping[str, str], stale_after_s: float = STALE_AFTER_S,
                     exclude: str | None = None) -> list[str]:
    """End as KILLED the RUNNING parent runs of ``experiment_id`` carrying ``tags`` whose pipeline is gone.

    A run is gone when it was started on this host (same host name and pid namespace) and its process
    is not alive, or is alive with another start time (the pid was reused); a run started elsewhere
    (or without a recorded pid) is gone when its heartbeat (else its start) is older than
    ``stale_after_s``. A live process on this host is never closed, whatever its heartbeat says:
    its own process still ends it. ``exclude`` (the caller's own run) is never closed; it is recorded
    as ``lsq.closed_by`` on every run closed (with ``lsq.closed_reason``). RUNNING child runs of a
    closed parent end as KILLED too. Returns the ids of the parents closed.
    """
    client = client_for(uri)
    query = " AND ".join(["attributes.status = 'RUNNING'",
                          *(f"tags.`{k}` = '{_quote(str(v))}'" for k, v in tags.items())])
    closer = exclude or f"{socket.gethostname()}:{os.getpid()}"
    closed = []
    for run in all_runs(client, experiment_id, query):
        if run.info.run_id == exclude or "mlflow.parentRunId" in run.data.tags:
            continue
        reason = stale_reason(run.data.tags, run.info.start_time, stale_after_s)
        if reason is None:
            continue
        for child in all_runs(client, experiment_id,
                              f"tags.mlflow.parentRunId = '{run.info.run_id}' AND attributes.status = 'RUNNING'"):
            _kill(client, child.info.run_id, closer, f"parent {run.info.run_id}: {reason}")
        if client.get_run(run.info.run_id).info.status == "RUNNING":  # not ended meanwhile by its own process
            _kill(client, run.info.run_id, closer, reason)
            closed.append(run.info.run_id)
            log.warning("closed stale run %s (%s) as KILLED", run.info.run_id, reason)
    return closed


def stale_reason(tags: Mapping[str, str], start_time_ms: int | None, stale_after_s: float = STALE_AFTER_S,
                 now: float | None = None) -> str | None:
    """Why the run with ``tags`` has no live pipeline behind it, or None while it may have one."""
    pid = tags.get(PID_TAG, "")
    if tags.get(HOST_TAG) == socket.gethostname() and pid.isdigit() and _same_pid_namespace(tags.get(NS_TAG)):
        if not pid_alive(int(pid)):
            return f"process {pid} on {tags[HOST_TAG]} is gone"
        started, now_started = tags.get(STARTED_TAG), process_start(int(pid))
        if started and now_started and started.split(":", 1)[0] == now_started.split(":", 1)[0] \
                and started != now_started:
            return f"process {pid} on {tags[HOST_TAG]} is gone (its pid now belongs to another process)"
        return None
    beat = tags.get(HEARTBEAT_TAG)
    try:
        last = float(beat) if beat else (start_time_ms or 0) / 1000
    except ValueError:
        last = (start_time_ms or 0) / 1000
    age = (time.time() if now is None else now) - last
    if age > stale_after_s:
        where = f" on {tags[HOST_TAG]}" if tags.get(HOST_TAG) else ""
        return f"no heartbeat{where} for {age:.0f} s (over {stale_after_s:g} s)"
    return None


def process_tags(pid: int | None = None) -> dict[str, str]:
    """``lsq.host``, ``lsq.pid``, ``lsq.pid_started``, ``lsq.pid_ns`` of ``pid`` (this process) and a heartbeat now."""
    pid = os.getpid() if pid is None else pid
    out = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), HEARTBEAT_TAG: str(int(time.time()))}
    started, namespace = process_start(pid), pid_namespace()
    if started:
        out[STARTED_TAG] = started
    if namespace:
        out[NS_TAG] = namespace
    return out


def _same_pid_namespace(recorded: str | None) -> bool:
    ours = pid_namespace()
    return not recorded or not ours or recorded == ours


def _kill(client, run_id: str, closer: str, reason: str) -> None:
    retry(client.set_tag, run_id, CLOSED_BY_TAG, closer)
    retry(client.set_tag, run_id, CLOSED_REASON_TAG, _tag(reason))
    retry(client.set_terminated, run_id, "KILLED")
