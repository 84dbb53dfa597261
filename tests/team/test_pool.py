"""Team mode with real servers on loopback: units on a Prefect work pool across two workers that share no
folder, a worker lost mid-unit, and two pipelines registering into one PostgreSQL-backed model at once.

The session's PostgreSQL + S3 + MLflow stack (conftest) is shared; this module adds a Prefect server
with its services and two process workers, each in its own folder (``deployments/processes.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from deployments import team
from deployments.processes import PrefectServer, Worker
from tests.flows.conftest import tiny_pipeline
from tests.lsq.tiny import built_once, save_tiny_bert, write_classification_csv
from tests.team.conftest import descendants, gone

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
HEARTBEAT_TIMEOUT = 40.0  # with the workers' 30 s heartbeats: a lost unit is Crashed within about a minute


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model and data set: read-only inputs every machine has (a model hub or package, here a folder)."""
    model = built_once(tmp_path_factory, "tiny-bert", save_tiny_bert)
    data = write_classification_csv(tmp_path_factory.mktemp("data") / "reviews.csv", n=48)
    return model, data


@pytest.fixture(scope="module")
def pool(team_servers, tmp_path_factory):
    """A Prefect server, the team's deployments and two unit workers; everything stopped at the end."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    base = tmp_path_factory.mktemp("pool")
    env = {"MLFLOW_TRACKING_URI": team_servers.tracking_uri, **team_servers.object_store.env()}
    with PrefectServer(base / "prefect") as server, temporary_settings({PREFECT_API_URL: server.api_url}):
        team.setup(team.UNIT_POOL, HEARTBEAT_TIMEOUT)
        workers = {name: Worker(name, base / name, team.UNIT_POOL, server.api_url, env=env).start()
                   for name in ("worker-a", "worker-b")}
        try:
            yield server, workers, base
        finally:
            from flows.server import drain_prefect_workers

            drain_prefect_workers()  # this process's logs reach the server before it stops
            pids = {p for w in workers.values() for p in w.pids()}
            for w in workers.values():
                w.stop()
            assert gone(pids) == set(), "a worker or its flow run outlived stop()"


def team_config(inputs, team_servers, control: Path, **changes) -> dict:
    model, data = inputs
    tag = uuid.uuid4().hex[:8]
    return tiny_pipeline(model, data, control, **{
        "orchestration": {"runner": "work-pool", "unit_attempts": 3},
        "storage": {"root": f"s3://{team_servers.object_store.bucket}/test-{tag}"},
        "tracking": {"tracking_uri": team_servers.tracking_uri, "experiment": f"team-{tag}",
                     "registered_model": f"lsq-team-{tag}"},
        "output_dir": "runs",  # relative: each worker's own folder ($LSQ_WORKDIR)
        **changes})


def beating(api_url: str):
    """This process's flow runs against the pool's server, beating as often as the workers' (every flow
    run on a server with the lost-worker automation must beat more often than its timeout)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings({PREFECT_API_URL: api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30})


def registry(team_servers, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(team_servers.tracking_uri)
    return client, sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def test_team_demo_runs_units_on_both_workers_that_meet_only_in_the_object_store(inputs, tmp_path):
    """``make team-demo`` on a tiny config: its own servers and three workers, a JSON last line, every
    version in the object store and loaded through the tracking server alone, and no process left."""
    import yaml

    from tests.team.conftest import descendants

    model, data = inputs
    cfg = tiny_pipeline(model, data, tmp_path, target_ranks=[4], insqueeze={"enabled": False}, output_dir="runs",
                        tracking={"experiment": "team-demo", "registered_model": "lsq-team-demo"})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    folder = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_API"))}
    before = descendants()
    done = subprocess.run([sys.executable, "-m", "deployments.team_demo", "--config", str(tmp_path / "tiny.yaml"),
                           "--keep", str(folder)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert gone(descendants() - before) == set()  # servers, workers and flow runs all ended with it
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["tracking_backend"].startswith("postgresql://lsq@127.0.0.1:")  # no password
    assert summary["artifact_root"] == "s3://lsq/mlflow" and summary["storage_root"] == "s3://lsq/runs"
    labels = {"source-r8", "post-r4", "cont-r4"}
    assert {v["label"] for v in summary["versions"]} == labels and len(summary["versions"]) == len(labels)
    assert all(v["artifact_uri"].startswith("s3://lsq/mlflow/") for v in summary["versions"])
    assert summary["champion"] in labels
    assert set(summary["workers"]) == {"worker-a", "worker-b"}, summary["workers"]  # both ran units
    assert "digests match" in done.stdout

    # each worker's folder holds only what it ran, and no path of another worker's folder or the control's
    for name, ran in summary["workers"].items():
        trained = {p.name.rsplit("-", 1)[0] for p in (folder / name / "runs").iterdir()
                   if p.name.split("-")[0] in ("source", "cont")}
        assert trained == {label for label in ran if label.split("-")[0] in ("source", "cont")}, (name, trained)
        others = [str(folder / other) for other in ("worker-a", "worker-b", "control") if other != name]
        for record in (folder / name / "runs").rglob("*.json"):
            text = record.read_text()
            assert not any(other in text for other in others), record


def test_a_unit_lost_with_its_worker_runs_again_on_the_other(pool, inputs, team_servers, tmp_path, chdir_to):
    """kill -9 of a worker (and so of its flow run) during a recovery: the flow run stops beating, the
    automation sets it Crashed, the pipeline runs the unit again on the surviving worker."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.squeeze_pipeline import squeeze_pipeline

    server, workers, base = pool
    control = chdir_to(tmp_path / "control")
    cfg = team_config(inputs, team_servers, control, recover={"steps": 400, "lr": 5e-3, "warmup_steps": 0},
                      insqueeze={"enabled": False}, target_ranks=[4])
    outcome: dict = {}

    def run():
        with beating(server.api_url), pytest.MonkeyPatch.context() as mp:
            for key, value in team_servers.object_store.env().items():
                mp.setenv(key, value)
            try:
                outcome["result"] = squeeze_pipeline(cfg)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = exc

    pipeline = threading.Thread(target=run)
    pipeline.start()
    victim = None
    deadline = time.monotonic() + 240
    with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
        while victim is None and time.monotonic() < deadline and pipeline.is_alive():
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["train-cont-r4"])))
            running = [r for r in runs if r.state_name == "Running" and r.infrastructure_pid]
            if running:
                time.sleep(3)  # training under way
                pid = int(running[0].infrastructure_pid.rsplit(":", 1)[-1])  # "<host>:<pid>", set by the worker
                [victim] = [w for w in workers.values() if pid in w.pids()]
                victim.kill()
            time.sleep(0.5)
        assert victim is not None, "never saw the recovery unit running"
        pipeline.join(timeout=400)
        assert not pipeline.is_alive()
        assert "error" not in outcome, outcome.get("error")
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["train-cont-r4"])))
    assert sorted(r.state_name for r in runs) == ["Completed", "Crashed"]

    survivor = ({"worker-a", "worker-b"} - {victim.name}).pop()
    client_, versions = registry(team_servers, cfg["tracking"]["registered_model"])
    labels = [client_.get_run(v.run_id).data.tags["lsq.variant"] for v in versions]
    assert sorted(labels) == sorted(["source-r8", "post-r4", "cont-r4"])  # each once: none lost, none twice
    [cont] = [v for v in versions if client_.get_run(v.run_id).data.tags["lsq.variant"] == "cont-r4"]
    assert client_.get_run(cont.run_id).data.tags["lsq.worker"] == survivor
    victim.start()  # back for the next test


def test_two_pipelines_at_once_register_every_version_once(inputs, team_servers, tmp_path):
    """Two pipeline commands (laptop runner, temporary Prefect servers) registering into one model on the
    PostgreSQL-backed server at once: every variant of each registered exactly once."""
    import yaml

    name = f"lsq-two-{uuid.uuid4().hex[:8]}"
    before = descendants()
    procs = []
    for seed in (1, 2):
        folder = tmp_path / f"run{seed}"
        folder.mkdir()
        cfg = team_config(inputs, team_servers, folder, insqueeze={"enabled": False}, target_ranks=[4],
                          storage={"root": None}, orchestration={"runner": "threads"}, output_dir=str(folder / "runs"))
        cfg["train"]["seed"] = seed
        cfg["tracking"].update(registered_model=name, experiment="team-two")
        (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        procs.append(subprocess.Popen([sys.executable, "-m", "flows.squeeze_pipeline", str(folder / "cfg.yaml")],
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    servers = {pid for leader in team_servers.pids().values() for pid in {leader} | descendants(leader)}
    assert gone(descendants() - servers - before) == set()  # the commands' temporary Prefect servers too

    client, versions = registry(team_servers, name)
    per_variant = {"source-r8", "post-r4", "cont-r4"}
    assert [v.version for v in versions] == [str(i) for i in range(1, 2 * len(per_variant) + 1)]
    runs = [client.get_run(v.run_id) for v in versions]
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 2
    for parent in parents:
        assert sorted(r.data.tags["lsq.variant"] for r in runs if r.data.tags["mlflow.parentRunId"] == parent) \
            == sorted(per_variant)
    digests = [v.tags["lsq.adapter_sha256"] for v in versions]
    assert len(set(digests)) == len(digests)  # no adapter registered twice


SLOW_START = """\
import pathlib, time
if b"prefect.engine" in pathlib.Path("/proc/self/cmdline").read_bytes():
    time.sleep(150)  # this worker's flow runs start late: the run stays Pending while the test kills the worker, and
    # the late start comes after the pipeline has deleted it (unit_start_timeout below, 60 s)
"""


def test_a_unit_whose_worker_is_lost_as_it_takes_the_run_is_dispatched_again(pool, inputs, team_servers, tmp_path,
                                                                              chdir_to):
    """kill -9 of a worker the moment it has taken a unit's flow run (Pending, not started): nothing would ever end
    that run; after orchestration.unit_start_timeout the pipeline deletes it and dispatches it again, and the
    other worker runs it. The flow-run process that still starts, late, finds no run and runs nothing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.squeeze_pipeline import squeeze_pipeline

    pending_only = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING])))

    server, workers, base = pool
    for worker in workers.values():
        worker.stop()
    late = tmp_path / "late-start"
    late.mkdir()
    (late / "sitecustomize.py").write_text(SLOW_START)
    env = {"MLFLOW_TRACKING_URI": team_servers.tracking_uri, **team_servers.object_store.env(), "PYTHONPATH": str(late)}
    victim = Worker("worker-late", base / "worker-late", team.UNIT_POOL, server.api_url, env=env).start()
    control = chdir_to(tmp_path / "control")
    cfg = team_config(inputs, team_servers, control, insqueeze={"enabled": False}, target_ranks=[4],
                      recover={"enabled": False},
                      orchestration={"runner": "work-pool", "unit_attempts": 3, "unit_start_timeout": 60})
    # 60 s, not less: the other worker's own start of the run it is given again (a worker and a flow-run process
    # importing torch and prefect) must fit in it on a busy 2-core box, or that run is deleted too (seen at 10 s)
    outcome: dict = {}

    def run():
        with beating(server.api_url), pytest.MonkeyPatch.context() as mp:
            for key, value in team_servers.object_store.env().items():
                mp.setenv(key, value)
            try:
                outcome["result"] = squeeze_pipeline(cfg)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = exc

    started = datetime.now(timezone.utc)  # runs of this module's earlier pipelines may bear the same names
    pipeline = threading.Thread(target=run)
    pipeline.start()
    taken, late_starters = None, set()
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 300
            while taken is None and time.monotonic() < deadline and pipeline.is_alive():
                # a unit's run, taken by the only worker up (the pipeline's own runs are Pending an instant too)
                pending = [r for r in client.read_flow_runs(flow_run_filter=pending_only) if r.deployment_id]
                if pending:
                    taken = pending[0]
                    late_starters |= descendants(victim.process.pid)
                    victim.kill()  # the worker took it and is gone before starting it
                    workers["worker-b"].start()
                time.sleep(0.2)
            assert taken is not None, "never saw a unit's flow run taken by the worker"
            pipeline.join(timeout=600)
            assert not pipeline.is_alive()
            assert "error" not in outcome, outcome.get("error")
            with pytest.raises(ObjectNotFound):
                client.read_flow_run(taken.id)
            same = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[taken.name]))) if r.created >= started]
            assert [r.state_name for r in same] == ["Completed"]
            assert gone(late_starters, within=300) == set()  # the late start found no run and ended
            same = [r for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[taken.name]))) if r.created >= started]
        assert [r.state_name for r in same] == ["Completed"]  # it ran nothing
        versions = registry(team_servers, cfg["tracking"]["registered_model"])[1]
        assert len(versions) == 2  # source-r8 and post-r4: none lost
    finally:
        victim.kill()
        for pid in late_starters:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for worker in workers.values():
            if not worker.pids():
                worker.start()


def test_the_team_demo_leaves_no_flow_run_behind_a_lost_worker_or_a_sigterm(inputs, tmp_path):
    """Mid-pipeline, the control worker is killed (kill -9, the worker alone): the pipeline's flow run, which
    Prefect started in a session of its own, dies with it. Then SIGTERM to ``python -m deployments.team_demo``:
    it exits 143 and every process it started is gone within 60 s (servers, workers, the units' flow runs)."""
    import psutil
    import yaml

    model, data = inputs
    cfg = tiny_pipeline(model, data, tmp_path, target_ranks=[4], insqueeze={"enabled": False}, output_dir="runs",
                        recover={"steps": 400, "lr": 5e-3, "warmup_steps": 0},
                        tracking={"experiment": "team-demo", "registered_model": "lsq-team-sigterm"})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_API"))}
    demo = subprocess.Popen([sys.executable, "-m", "deployments.team_demo", "--config", str(tmp_path / "tiny.yaml"),
                             "--keep", str(tmp_path / "demo")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: set[int] = set()

    def command(pid: int) -> str:
        try:
            return " ".join(psutil.Process(pid).cmdline())
        except psutil.NoSuchProcess:
            return ""

    try:
        deadline = time.monotonic() + 600
        while True:  # mid-pipeline: the pipeline's flow run and a unit's both run
            seen |= descendants(demo.pid)
            if sum("prefect.engine" in command(pid) for pid in seen) >= 2:
                break
            assert demo.poll() is None, demo.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the demo never ran a unit"
            time.sleep(0.5)
        [control] = [pid for pid in seen if "worker start" in command(pid) and "--name control" in command(pid)]
        pipeline_run = descendants(control)
        assert any("prefect.engine" in command(pid) for pid in pipeline_run)
        os.kill(control, signal.SIGKILL)
        assert gone(pipeline_run, within=30) == set(), "the pipeline's flow run outlived its worker"
        demo.send_signal(signal.SIGTERM)
        out, _ = demo.communicate(timeout=300)
        assert demo.returncode == 143, out[-3000:]
        left = gone(seen, within=60)
        assert left == set(), [command(pid) for pid in left]
    finally:
        demo.kill()
        demo.wait()


def test_a_flow_run_dies_with_its_lsq_worker_even_when_silent(pool, tmp_path):
    """Prefect starts a flow run in a session of its own, which a signal to its worker's process group misses,
    and a silent one (waiting on units, say) never notices a dead worker through a broken pipe: kill -9 of the
    worker alone must still end it (as a lost machine would)."""
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.deployments.runner import EntrypointType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.team.sleeper import sleeper

    server, workers, base = pool
    pool_name = "lsq-test-silent"
    worker = Worker("worker-silent", base / "worker-silent", pool_name, server.api_url,
                    env={"PYTHONPATH": str(REPO)})
    runs: set[int] = set()
    with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
        team.create_pool(pool_name, "flow runs of the process tests")
        sleeper.to_deployment(name="silent", entrypoint_type=EntrypointType.MODULE_PATH,
                              work_pool_name=pool_name).apply(work_pool_name=pool_name)
        worker.start()
        try:
            run = run_deployment("lsq-test-sleeper/silent", timeout=0)
            deadline = time.monotonic() + 300
            while client.read_flow_run(run.id).state_name != "Running":
                assert time.monotonic() < deadline, client.read_flow_run(run.id).state_name
                time.sleep(0.5)
            runs = {pid for pid in descendants(worker.process.pid)
                    if "prefect.engine" in " ".join(psutil.Process(pid).cmdline())}
            assert runs, "no flow-run process under the worker"
            os.kill(worker.process.pid, signal.SIGKILL)  # the worker alone, as when its machine's agent dies
            assert gone(runs, within=30) == set(), "the flow run outlived its worker"
        finally:
            worker.kill()
            for pid in runs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
