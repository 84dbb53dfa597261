"""The deployment definitions, checked without a server: the serve module's deployments and prefect.yaml.

(Serving them, deploying prefect.yaml and running deployments.setup against a real server is
tests/flows/test_e2e_servers.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.events import DeploymentEventTrigger
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron

from deployments.serve import build_deployments
from deployments.setup import POOL
from lsq.errors import LsqError
from lsq.monitoring import DATASET_UPDATED, MODEL_DEGRADED, dataset_resource, model_resource
from lsq.pipeline_config import load_pipeline_config

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"


def write_config(tmp_path: Path, **tracking) -> Path:
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "builtin:minilm"}, "data": {"source": "builtin:tweets"},
                                    "source_rank": 8, "target_ranks": [2], "tracking": tracking}))
    return path


def test_serve_builds_a_schedule_a_trigger_and_a_monitor(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, registered_model="team-model")
    weekly, retrain, daily = build_deployments("my.yaml", "0 4 * * 2", "30 5 * * *", margin=0.05, timezone="Europe/Paris")
    assert (weekly.name, retrain.name, daily.name) == ("team-model-weekly", "team-model-retrain", "team-model-daily")
    assert weekly.entrypoint == retrain.entrypoint == "flows.squeeze_pipeline.squeeze_pipeline"
    assert daily.entrypoint == "flows.monitor.monitor"
    for d in (weekly, retrain, daily):
        assert d.parameters["config"] == str(config.resolve())  # absolute: runs start elsewhere
    assert daily.parameters["margin"] == 0.05
    assert [(s.schedule.cron, s.schedule.timezone) for s in weekly.schedules] == [("0 4 * * 2", "Europe/Paris")]
    assert [s.schedule.cron for s in daily.schedules] == ["30 5 * * *"]
    assert not retrain.schedules and not weekly.triggers and not daily.triggers
    [trigger] = retrain.triggers
    assert trigger.expect == {DATASET_UPDATED, MODEL_DEGRADED}
    assert sorted(trigger.match.root["prefect.resource.id"]) == ["lsq.dataset.team-model", "lsq.model.team-model"]
    assert trigger.parameters == {"config": str(config.resolve())}
    assert weekly.concurrency_limit == retrain.concurrency_limit == 1


def test_serve_refuses_a_bad_config_before_serving(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("source_rank: 4\ntarget_ranks: [8]\n")
    with pytest.raises(LsqError, match="target_ranks"):
        build_deployments(bad)
    with pytest.raises(LsqError, match="not found"):
        build_deployments(tmp_path / "missing.yaml")


def test_prefect_yaml_is_consistent_with_flows_config_and_events():
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert len(deployments) == 3
    kinds = {"weekly": 0, "retrain": 0, "daily": 0}
    for name, d in deployments.items():
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"].split(":")[0]) + ":" + d["entrypoint"].split(":")[1])
        flow.validate_parameters(d["parameters"])  # names and types the flow accepts
        assert d["work_pool"]["name"] == POOL
        config = load_pipeline_config(ROOT / d["parameters"]["config"])  # the path is relative to the repo root
        assert name.startswith(config.registered_model)
        for schedule in d.get("schedules", []):
            Cron(schedule["cron"], timezone=schedule.get("timezone"))
        for raw in d.get("triggers", []):
            trigger = DeploymentEventTrigger.model_validate(raw)
            assert trigger.expect == {DATASET_UPDATED, MODEL_DEGRADED}
            assert sorted(trigger.match.root["prefect.resource.id"]) == sorted(
                [dataset_resource(config.registered_model), model_resource(config.registered_model)])
            assert trigger.parameters == {"config": d["parameters"]["config"]}
        kinds[name.rsplit("-", 1)[1]] += 1
        assert bool(d.get("triggers")) == name.endswith("-retrain")
        assert bool(d.get("schedules")) != name.endswith("-retrain")
    assert kinds == {"weekly": 1, "retrain": 1, "daily": 1}
    assert deployments["lsq-minilm-movie-daily"]["entrypoint"] == "flows/monitor.py:monitor"


def test_compute_slots_are_counted_without_torch(monkeypatch, tmp_path):
    """One slot per device this process may use; no torch import (``python -m deployments.setup`` took 31 s)."""
    import subprocess
    import sys

    from deployments.setup import default_slots

    for visible, slots in (("0,1,2", 3), ("1", 1), ("", 1), ("0,-1,1", 1)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert default_slots() == slots, visible
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: a)'\necho 'GPU 1: NVIDIA H200 (UUID: b)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert default_slots() == 2
    monkeypatch.setenv("PATH", "/nonexistent")
    assert default_slots() == 1
    loaded = subprocess.run([sys.executable, "-c", "import sys, deployments.setup; print('torch' in sys.modules)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"
