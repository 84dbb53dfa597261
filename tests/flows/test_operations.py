"""The pipeline command as operators run it: two at once on one store and one output folder, kill -9
at each stage and a rerun, SIGTERM; each with its own temporary Prefect server, and nothing left behind.

Every run here is a real ``python -m flows.squeeze_pipeline`` process on the tiny BERT.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from lsq.data import DataConfig, fingerprint, load_data
from lsq.workdir import adapter_digest
from tests.flows.conftest import tiny_pipeline

REPO = Path(__file__).resolve().parents[2]
LABELS = {"source-r8", "post-r4", "post-r2", "cont-r4", "cont-r2", "in-r2"}
pytestmark = pytest.mark.slow


MARK = ("LSQ_TEST_COMMANDS", uuid.uuid4().hex)  # in the environment of the commands these tests start


def prefect_servers() -> set[int]:
    """Pids of Prefect API servers (uvicorn on prefect's app) started by these tests' commands: other lsq work on
    the machine (a team demo, another checkout's tests) starts and stops servers of its own meanwhile."""
    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        if "prefect.server.api.server:create_app" not in " ".join(p.info["cmdline"] or []):
            continue
        try:
            if p.environ().get(MARK[0]) == MARK[1]:
                out.add(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def command_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), **dict([MARK]))
    return env


def start(config: Path, home: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.squeeze_pipeline", str(config), *overrides], cwd=REPO,
                            env=command_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture
def config(tiny_model, tiny_csv, tmp_path) -> tuple[Path, dict]:
    raw = tiny_pipeline(tiny_model, tiny_csv, tmp_path)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def client(raw: dict) -> MlflowClient:
    uri = raw["tracking"]["tracking_uri"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_registry(raw: dict, tmp_path: Path, seeds: set[int]) -> list:
    """Every version whole and true to its provenance; no RUNNING run; aliases on existing versions."""
    c = client(raw)
    name = raw["tracking"]["registered_model"]
    versions = c.search_model_versions(f"name = '{name}'")
    data_fp = fingerprint(load_data(DataConfig(**raw["data"])))
    exp = c.get_experiment_by_name("lsq")
    runs = {r.info.run_id: r for r in c.search_runs([exp.experiment_id], max_results=1000)}
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    seen = set()
    for v in versions:
        run = runs[v.run_id]
        assert v.tags["lsq.run_id"] == v.run_id and v.tags["lsq.dataset_fingerprint"] == data_fp
        assert run.data.tags["lsq.variant"] == f"{v.tags['lsq.method']}-r{v.tags['lsq.rank']}"
        assert int(run.data.params["seed"]) in seeds
        local = c.download_artifacts(v.run_id, "adapter", str(tmp_path / f"v{v.version}"))
        assert adapter_digest(local) == v.tags["lsq.adapter_sha256"]  # the files are the ones registered
        key = (v.tags["lsq.adapter_sha256"], v.tags["lsq.dataset_fingerprint"])
        assert key not in seen, f"version {v.version} duplicates another"
        seen.add(key)
    live = {v.version for v in versions}
    for alias, version in c.get_registered_model(name).aliases.items():
        assert version in live, (alias, version)
    return versions


def test_two_pipeline_commands_at_once_share_nothing_but_the_store(config, tmp_path):
    path, raw = config
    before = prefect_servers()
    procs = [start(path, tmp_path / f"home-{seed}", f"train.seed={seed}") for seed in (1, 2)]
    for p in procs:
        finish(p)

    versions = check_registry(raw, tmp_path, {1, 2})
    by_seed = {}
    for v in versions:
        seed = int(client(raw).get_run(v.run_id).data.params["seed"])
        by_seed.setdefault(seed, set()).add(f"{v.tags['lsq.method']}-r{v.tags['lsq.rank']}")
    assert by_seed == {1: LABELS, 2: LABELS}  # 2 x 6 distinct adapters, no duplicate
    # every training folder's summary agrees with the record the step kept
    for summary in Path(raw["output_dir"]).glob("*/train_summary.json"):
        record = yaml.safe_load((summary.parent / "record.json").read_text())
        assert yaml.safe_load(summary.read_text())["config"]["train"]["seed"] == record["seed"]
    name = raw["tracking"]["registered_model"]
    champion = client(raw).get_model_version_by_alias(name, "champion")
    reasons = [v.tags.get("lsq.reason", "") for v in versions]
    assert champion.version in {v.version for v in versions}
    assert sum("no current champion" in r for r in reasons) <= 1  # the second promotion saw the first
    assert prefect_servers() == before, "a temporary Prefect server outlived its pipeline"
    for seed in (1, 2):  # Prefect kept no result file (nothing it could unpickle)
        assert not [p for p in (tmp_path / f"home-{seed}").rglob("*") if p.is_file() and "storage" in p.parts]


def stage_reached(stage: str, raw: dict) -> bool:
    out = Path(raw["output_dir"])
    if stage == "training":
        return any(p.is_dir() and not (p / "record.json").exists() for p in out.glob("source-r8-*/checkpoints"))
    if stage == "registration":
        db = raw["tracking"]["tracking_uri"].removeprefix("sqlite:///")
        try:
            with sqlite3.connect(db, timeout=0.1) as con:
                return con.execute("SELECT count(*) FROM model_versions").fetchone()[0] >= 2
        except sqlite3.Error:
            return False
    raise ValueError(stage)


@pytest.mark.parametrize("stage", ["training", "registration"])
def test_kill_9_then_rerun_ends_with_a_correct_registry(config, tmp_path, stage):
    path, raw = config
    raw_changes = ["train.save_steps=1"]  # a checkpoint at every step: the kill may land inside a save
    before = prefect_servers()
    proc = start(path, tmp_path / "home", *raw_changes)
    deadline = time.monotonic() + 600
    while not stage_reached(stage, raw):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while prefect_servers() != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert prefect_servers() == before, "the killed pipeline's temporary server is still running"

    finish(start(path, tmp_path / "home", *raw_changes))
    versions = check_registry(raw, tmp_path, {0})
    labels = sorted(f"{v.tags['lsq.method']}-r{v.tags['lsq.rank']}" for v in versions)
    assert sorted(LABELS) == labels
    c = client(raw)
    exp = c.get_experiment_by_name("lsq")
    parents = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    statuses = sorted(p.info.status for p in parents)
    assert statuses == ["FINISHED", "KILLED"], statuses  # the killed run was closed by the rerun
    assert prefect_servers() == before


def test_sigterm_ends_the_run_as_killed_and_stops_its_server(config, tmp_path):
    path, raw = config
    before = prefect_servers()
    proc = start(path, tmp_path / "home")
    deadline = time.monotonic() + 600
    while not stage_reached("training", raw):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("SIGTERM did not end the pipeline: " + proc.communicate()[0][-3000:]) from None
    assert proc.returncode == 143, out[-3000:]
    assert prefect_servers() == before
    c = client(raw)
    exp = c.get_experiment_by_name("lsq")
    [parent] = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED"
