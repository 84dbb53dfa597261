"""The squeeze pipeline end to end on a tiny BERT under the Prefect test harness, checked in MLflow.

Every test builds its own MLflow store (sqlite in tmp_path) and working folder; the harness (one per
session) records flow and task runs, whose states the cache test reads back.
"""

from __future__ import annotations

import math
import shutil
import threading
from collections import defaultdict
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

import tasks.steps as steps
import flows.squeeze_pipeline as pipeline_module
from flows.squeeze_pipeline import squeeze_pipeline
from lsq.data import DataConfig, fingerprint, load_data
from lsq.errors import LsqError
from tests.flows.conftest import tiny_pipeline
from tests.lsq.tiny import write_classification_csv

VARIANTS = {"source-r8", "post-r4", "post-r2", "cont-r4", "cont-r2", "in-r2"}
EVERY_CHILD_METRIC = {"test_accuracy", "test_macro_f1", "trainable_params", "adapter_bytes", "train_seconds",
                      "retained_energy"}
VERSION_TAGS = {"lsq.method", "lsq.rank", "lsq.source_rank", "lsq.run_id", "lsq.dataset_fingerprint", "test_accuracy"}


def client_of(cfg: dict) -> MlflowClient:
    uri = cfg["tracking"]["tracking_uri"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def all_runs(cfg: dict) -> list:
    client = client_of(cfg)
    exp = client.get_experiment_by_name("lsq")
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


def versions(cfg: dict) -> list:
    return client_of(cfg).search_model_versions(f"name = '{cfg['tracking']['registered_model']}'")


def task_runs(state) -> dict[str, list]:
    """Task runs of the flow run behind ``state``, by task name."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    out = defaultdict(list)
    for r in runs:
        out[r.name.rsplit("-", 1)[0]].append(r)
    return out


def test_pipeline_end_to_end_then_cached_rerun(tiny_config, tiny_csv):
    cfg = tiny_config
    result = squeeze_pipeline(cfg)

    runs = all_runs(cfg)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.run_id for p in parents] == [result["parent_run_id"]]
    assert parents[0].info.status == "FINISHED"
    assert {c.data.tags["lsq.variant"] for c in children} == VARIANTS and len(children) == len(VARIANTS)
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == result["parent_run_id"] and child.info.status == "FINISHED"
        assert EVERY_CHILD_METRIC <= set(child.data.metrics), child.data.tags["lsq.variant"]
        assert 0 <= child.data.metrics["test_accuracy"] <= 1
        files = {f.path for f in client_of(cfg).list_artifacts(child.info.run_id, "adapter")}
        assert "adapter/adapter_config.json" in files and "adapter/adapter_model.safetensors" in files
    by_label = {c.data.tags["lsq.variant"]: c for c in children}
    assert by_label["post-r2"].data.metrics["retained_energy"] < 1.0 == by_label["source-r8"].data.metrics["retained_energy"]

    data_fp = fingerprint(load_data(DataConfig(**cfg["data"])))
    registered = versions(cfg)
    assert len(registered) == len(VARIANTS)
    for v in registered:
        assert VERSION_TAGS <= set(v.tags), v.tags
        assert v.tags["lsq.dataset_fingerprint"] == data_fp
        assert v.tags["lsq.run_id"] == v.run_id and v.run_id in {c.info.run_id for c in children}
        run = client_of(cfg).get_run(v.run_id)
        assert math.isclose(float(v.tags["test_accuracy"]), run.data.metrics["test_accuracy"])
    champion = client_of(cfg).get_model_version_by_alias("lsq-tiny", "champion")
    assert client_of(cfg).get_run(champion.run_id).data.tags["lsq.variant"] == result["decision"]["winner"]
    assert champion.tags["lsq.decision"] == "champion" and champion.tags["lsq.reason"] == result["decision"]["reason"]

    # the same config again: every training, squeeze and evaluation comes from the cache
    work = Path(cfg["output_dir"])
    adapters = sorted(work.rglob("adapter_model.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in adapters]
    state = squeeze_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    states = task_runs(state)
    for name in ("train_adapter", "squeeze_source", "evaluate_variant"):
        assert states[name] and {r.state_name for r in states[name]} == {"Cached"}, (name, states[name])
    assert states["prepare_data"][0].state_name == "Completed"  # the fingerprint is always fresh
    assert sorted(work.rglob("adapter_model.safetensors")) == adapters
    assert [p.stat().st_mtime_ns for p in adapters] == mtimes
    second = state.result()
    assert {r["label"]: r["metrics"]["train_seconds"] for r in second["variants"]} == \
           {r["label"]: r["metrics"]["train_seconds"] for r in result["variants"]}
    # the same adapters on the same data are the same registered versions, not copies
    assert {r["label"]: r["version"] for r in second["variants"]} == {r["label"]: r["version"] for r in result["variants"]}
    again = versions(cfg)
    assert len(again) == len(VARIANTS)
    assert all(v.tags.get("lsq.last_run_id") in {r["run_id"] for r in second["variants"]} for v in again)

    # a deleted adapter folder is rebuilt, never served from the cache
    [source_adapter] = [p.parent for p in adapters if p.parent.parent.name == "source"]
    shutil.rmtree(source_adapter)
    state = squeeze_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    assert (source_adapter / "adapter_model.safetensors").is_file()
    assert [r.state_name for r in task_runs(state)["train_adapter"]].count("Completed") >= 1


def test_new_data_retrains_in_a_fresh_folder(tiny_model, tmp_path):
    data = write_classification_csv(tmp_path / "reviews.csv", n=48, seed=0)
    cfg = tiny_pipeline(tiny_model, data, tmp_path, recover__enabled=False, insqueeze__enabled=False)
    first = squeeze_pipeline(cfg)
    write_classification_csv(data, n=48, seed=1)  # same path, new rows
    state = squeeze_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    assert {r.state_name for r in task_runs(state)["train_adapter"]} == {"Completed"}
    fps = {v.tags["lsq.dataset_fingerprint"] for v in versions(cfg)}
    assert len(fps) == 2 and fingerprint(load_data(DataConfig(**cfg["data"]))) in fps
    folders = sorted(p.name for p in Path(cfg["output_dir"]).iterdir())
    assert len(folders) == 2, folders  # <fingerprint>-<code version>, one per dataset
    assert first["variants"][0]["run_id"] != state.result()["variants"][0]["run_id"]


@pytest.mark.parametrize("change, message", [
    ({"target_ranks": [8, 2]}, "target_ranks: 8 is not in 1..7"),
    ({"source_rank": "high"}, "source_rank"),
    ({"unknown_key": 1}, "unknown_key"),
])
def test_bad_config_is_refused_before_any_work(tiny_config, change, message):
    cfg = {**tiny_config, **change}
    state = squeeze_pipeline(cfg, return_state=True)
    assert state.is_failed() and message in state.message
    assert task_runs(state) == {}
    assert all_runs(tiny_config) == [] and versions(tiny_config) == []


def test_bad_data_fails_fast_without_retries_or_runs(tiny_config, tmp_path):
    (tmp_path / "bad.csv").write_text("text,label\nonly one class,1\nstill one,1\n")
    cfg = {**tiny_config, "data": {**tiny_config["data"], "source": str(tmp_path / "bad.csv")}}
    state = squeeze_pipeline(cfg, return_state=True)
    assert state.is_failed() and "label_column" in state.message
    [prep] = task_runs(state)["prepare_data"]
    assert prep.run_count == 1  # an LsqError is not retried
    assert all_runs(tiny_config) == []


@pytest.mark.parametrize("error, attempts", [(RuntimeError("CUDA out of memory (simulated)"), 2),
                                             (LsqError("train.lr: diverged (simulated)"), 1)])
def test_failing_training_retries_then_fails_the_flow(tiny_config, monkeypatch, error, attempts):
    calls = []

    def broken_train(cfg, log=None):
        calls.append(cfg.method)
        raise error

    monkeypatch.setattr(steps, "train", broken_train)
    monkeypatch.setattr(steps, "train_adapter", steps.train_adapter.with_options(retry_delay_seconds=0))
    state = squeeze_pipeline(tiny_config, return_state=True)
    assert state.is_failed() and str(error) in state.message
    assert calls == ["source"] * attempts
    [parent] = all_runs(tiny_config)
    assert parent.info.status == "FAILED"
    assert versions(tiny_config) == []


def test_failure_while_registering_leaves_no_half_registered_version(tiny_model, tiny_csv, tmp_path, monkeypatch):
    cfg = tiny_pipeline(tiny_model, tiny_csv, tmp_path, recover__enabled=False, insqueeze__enabled=False)
    real = MlflowClient.set_model_version_tag

    def flaky(self, name, version, key, value):  # the 3rd version can never get its data fingerprint
        if int(version) >= 3 and key == "lsq.dataset_fingerprint":
            raise RuntimeError("registry went away (simulated)")
        return real(self, name, version, key, value)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", flaky)
    monkeypatch.setattr(pipeline_module, "log_and_register",
                        pipeline_module.log_and_register.with_options(retry_delay_seconds=0))
    state = squeeze_pipeline(cfg, return_state=True)
    assert state.is_failed() and "registry went away" in state.message
    left = versions(cfg)
    assert sorted(int(v.version) for v in left) == [1, 2]
    for v in left:
        assert VERSION_TAGS <= set(v.tags)
    assert not client_of(cfg).get_registered_model("lsq-tiny").aliases
    parent = [r for r in all_runs(cfg) if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parent] == ["FAILED"]


def test_two_pipelines_at_once_leave_the_registry_intact(tiny_model, tiny_csv, tmp_path):
    configs = [tiny_pipeline(tiny_model, tiny_csv, tmp_path, output_dir=str(tmp_path / f"runs-{i}"),
                             train__seed=i, recover__enabled=False, insqueeze__enabled=False) for i in range(2)]
    states, errors = [None, None], []

    def run(i):
        try:
            states[i] = squeeze_pipeline(configs[i], return_state=True)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and all(s is not None and s.is_completed() for s in states), (errors, states)

    cfg = configs[0]
    registered = versions(cfg)
    assert sorted(int(v.version) for v in registered) == list(range(1, 7))  # 2 x (source, post-r4, post-r2)
    runs = {r.info.run_id: r for r in all_runs(cfg)}
    parents = {s.result()["parent_run_id"] for s in states}
    assert len(parents) == 2 and all(runs[p].info.status == "FINISHED" for p in parents)
    assert len({v.run_id for v in registered}) == 6
    for v in registered:
        assert VERSION_TAGS <= set(v.tags)
        assert runs[v.run_id].data.tags["mlflow.parentRunId"] in parents
    champion = client_of(cfg).get_model_version_by_alias("lsq-tiny", "champion")
    assert champion.version in {v.version for v in registered}


def test_compute_tag_only_where_a_server_can_limit_it():
    """On a real Prefect server the compute tasks carry lsq-compute (deployments.setup limits it per
    device); on the temporary per-process server, which holds no limit, they do not pay for one."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.squeeze_pipeline import limited
    from tasks.steps import COMPUTE_TAG, evaluate_variant, train_adapter

    assert COMPUTE_TAG in train_adapter.tags and COMPUTE_TAG in evaluate_variant.tags
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert all(COMPUTE_TAG in t.tags for t in limited(train_adapter, evaluate_variant))
    with temporary_settings({PREFECT_API_URL: None}):
        stripped = limited(train_adapter, evaluate_variant)
    assert all(COMPUTE_TAG not in t.tags for t in stripped)
    assert [t.name for t in stripped] == [train_adapter.name, evaluate_variant.name]
    assert stripped[0].retries == train_adapter.retries and stripped[0].cache_policy == train_adapter.cache_policy
