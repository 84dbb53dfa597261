"""End to end with real servers: Prefect server, MLflow server, served deployments, an event, a retraining.

Starts ``prefect server start`` and ``mlflow server`` on free loopback ports (state in tmp_path),
creates the work pool and tag limit (``deployments.setup``), deploys ``deployments/prefect.yaml``
(registration only: no worker runs it), serves the deployments of a tiny config
(``deployments.serve``), emits ``lsq.dataset.updated`` and waits for the triggered pipeline run to
complete and a champion to land in the MLflow registry. Every wait is bounded; every process is
killed with its process group at the end. About a minute or two on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.flows.conftest import tiny_pipeline

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Subprocesses in their own process groups, output to log files, all killed on exit."""

    def __init__(self, folder: Path):
        self.folder, self.procs = folder, {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def stop_all(self) -> None:
        """SIGTERM to every group, the last started first (serve before the servers), then SIGKILL."""
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                time.sleep(0.5)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever is left of the group (flow-run subprocesses, server workers)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


def http(method: str, url: str, body: dict | None = None, timeout: float = 10) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            try:
                return resp.status, json.loads(raw) if raw else None
            except ValueError:  # a plain-text answer ("OK")
                return resp.status, raw.decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, None


def wait_for(what: str, check, timeout: float, procs: Processes, names: list[str], every: float = 1.0):
    """``check()``'s first truthy value within ``timeout`` seconds; fails early if a process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in names:
            if procs.procs[name].poll() is not None:
                pytest.fail(f"{name} exited ({procs.procs[name].returncode}) while waiting for {what}:\n{procs.log(name)}")
        try:
            value = check()
        except (OSError, urllib.error.URLError):
            value = None
        if value:
            return value
        time.sleep(every)
    logs = "\n".join(f"--- {n}\n{procs.log(n)}" for n in names)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


EMIT = """
import json, sys
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
event = emit_event(sys.argv[1], resource={"prefect.resource.id": sys.argv[2]}, payload=json.loads(sys.argv[3]))
assert event is not None, "events are off: is PREFECT_API_URL set?"
EventsWorker.drain_all(timeout=30)
print(event.id)
"""


def test_event_triggers_retraining_on_real_servers(tiny_model, tiny_csv, tmp_path):
    prefect_port, mlflow_port = free_port(), free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PREFECT_RUNNER_POLL_FREQUENCY="2", PREFECT_LOGGING_LEVEL="INFO")
    client_env = {**env, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_uri}
    raw = tiny_pipeline(tiny_model, tiny_csv, tmp_path)
    raw["tracking"].pop("tracking_uri")  # the served runs use $MLFLOW_TRACKING_URI: the MLflow server
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))

    procs = Processes(tmp_path)
    try:
        procs.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                       "--port", str(prefect_port)], env)
        procs.start("mlflow-server", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                                      "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                      "--artifacts-destination", str(tmp_path / "mlflow-artifacts"),
                                      "--workers", "1"], env)
        servers = ["prefect-server", "mlflow-server"]
        wait_for("the Prefect API", lambda: http("GET", f"{api}/health")[0] == 200, 120, procs, servers)
        wait_for("the MLflow server", lambda: http("GET", f"{mlflow_uri}/health")[0] == 200, 120, procs, servers)

        # work pool + tag limit, then the prefect.yaml deployments (registered, not run)
        out = run([sys.executable, "-m", "deployments.setup", "--slots", "1"], client_env, 120).stdout
        assert "lsq-process" in out and "lsq-compute = 1" in out, out
        assert http("GET", f"{api}/work_pools/lsq-process")[1]["type"] == "process"
        run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
            client_env, 180)
        names = {d["name"] for d in http("POST", f"{api}/deployments/filter", {})[1]}
        assert {"lsq-minilm-movie-weekly", "lsq-minilm-movie-retrain", "lsq-minilm-movie-daily"} <= names, names

        # serve the tiny config's deployments; wait until the retraining trigger exists
        procs.start("serve", [sys.executable, "-m", "deployments.serve", str(config)], client_env)
        watched = ["prefect-server", "mlflow-server", "serve"]
        deployment = wait_for(
            "the served retrain deployment",
            lambda: http("GET", f"{api}/deployments/name/lsq-squeeze-pipeline/lsq-tiny-retrain")[1], 120, procs, watched)
        assert deployment["parameters"] == {"config": str(config.resolve())}
        wait_for("the retrain automation", lambda: [a for a in http("POST", f"{api}/automations/filter", {})[1]
                                                    if a["name"] == "retrain lsq-tiny"], 60, procs, watched)
        # serve applies the deployments one after another: the daily monitor comes after the retrain trigger
        wait_for("the served daily monitor",
                 lambda: http("GET", f"{api}/deployments/name/lsq-monitor/lsq-tiny-daily")[0] == 200, 60, procs, watched)

        # the event a monitor would send
        emitted = run([sys.executable, "-c", EMIT, "lsq.dataset.updated", "lsq.dataset.lsq-tiny",
                       json.dumps({"reason": "test", "new_fingerprint": "x"})], client_env, 120)
        assert emitted.stdout.strip()

        def finished_runs():
            _, runs = http("POST", f"{api}/flow_runs/filter",
                           {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})
            return [r for r in runs or [] if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]

        [flow_run] = wait_for("the triggered pipeline run", finished_runs, 420, procs, watched, every=3)
        assert flow_run["state_type"] == "COMPLETED", f"{flow_run['state_name']}\n{procs.log('serve')}"
        assert flow_run["parameters"]["config"] == str(config.resolve())

        client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
        champion = client.get_model_version_by_alias("lsq-tiny", "champion")
        assert champion.tags["lsq.dataset_fingerprint"] and champion.tags["lsq.run_id"] == champion.run_id
        assert len(client.search_model_versions("name = 'lsq-tiny'")) == 6
        files = {f.path for f in client.list_artifacts(champion.run_id, "adapter")}
        assert "adapter/adapter_model.safetensors" in files
    finally:
        procs.stop_all()
