"""The squeeze pipeline end to end on a tiny BERT under the Prefect test harness, checked in MLflow.

Every test builds its own MLflow store (sqlite in tmp_path) and working folder; the harness (one per
session) records flow and task runs, whose states the cache test reads back.
"""

from __future__ import annotations

import errno
import os

import math
import shutil
import threading
from collections import defaultdict
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

import lsq.steps
import lsq.train
import tasks.steps
import flows.squeeze_pipeline as pipeline_module
from flows.squeeze_pipeline import squeeze_pipeline
from lsq.data import DataConfig, fingerprint, load_data
from lsq.errors import LsqError
from tests.flows.conftest import tiny_pipeline
from tests.lsq.tiny import write_classification_csv

VARIANTS = {"source-r8", "post-r4", "post-r2", "cont-r4", "cont-r2", "in-r2"}
EVERY_CHILD_METRIC = {"val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1", "trainable_params", "adapter_bytes", "train_seconds",
                      "retained_energy"}
VERSION_TAGS = {"lsq.method", "lsq.rank", "lsq.source_rank", "lsq.run_id", "lsq.dataset_fingerprint", "lsq.metric",
                "val_accuracy", "test_accuracy", "lsq.serving.vllm"}


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
    """Task runs of the flow run behind ``state`` and of its sub-flow runs, by the first word of their name
    (``train cont-r4``, ``prepare data``, ...)."""
    top = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[top])))
        ids = [top, *(f.id for f in subflows)]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    out = defaultdict(list)
    for r in runs:
        out[r.name.split(" ")[0]].append(r)
    return out


def test_pipeline_end_to_end_then_cached_rerun(tiny_config, tiny_csv, monkeypatch):
    cfg = tiny_config
    result = squeeze_pipeline(cfg)

    runs = all_runs(cfg)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    assert parents[0].info.status == "FINISHED"
    assert {c.data.tags["lsq.variant"] for c in children} == VARIANTS and len(children) == len(VARIANTS)
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == result.parent_run_id and child.info.status == "FINISHED"
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
        assert math.isclose(float(v.tags["val_accuracy"]), run.data.metrics["val_accuracy"])
        assert v.tags["lsq.metric"] == "accuracy" and v.tags["lsq.serving.vllm"].startswith("no: modules_to_save")
    champion = client_of(cfg).get_model_version_by_alias("lsq-tiny", "champion")
    assert client_of(cfg).get_run(champion.run_id).data.tags["lsq.variant"] == result.decision.winner
    assert champion.tags["lsq.decision"] == "champion" and champion.tags["lsq.reason"] == result.decision.reason
    # balanced labels: auto chose accuracy, on the validation split, and says so on the parent run
    assert result.decision.reason.startswith("by val_accuracy (validation split): ") and result.promotion_metric == "accuracy"
    parent_run = client_of(cfg).get_run(result.parent_run_id)
    assert parent_run.data.params["promotion_metric"] == "accuracy"
    assert "rarest class" in parent_run.data.tags["lsq.promotion_metric_reason"]
    winner = next(r for r in result.variants if r.label == result.decision.winner)
    assert winner.metric == winner.metrics["val_accuracy"] and winner.test_metric == winner.metrics["test_accuracy"]
    what_people_see(cfg, result, children, registered, data_fp)

    # the same config again: every training, squeeze and evaluation is reused from its work folder
    work = Path(cfg["output_dir"])
    adapters = sorted(work.rglob("adapter_model.safetensors"))
    mtimes = [p.stat().st_mtime_ns for p in adapters]
    real_train = lsq.train.train
    trained = []
    monkeypatch.setattr(lsq.steps, "train", lambda cfg, log=None, data=None, **kw: trained.append(cfg) or real_train(cfg, log, data, **kw))
    state = squeeze_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    states = task_runs(state)
    for name in ("train", "squeeze", "evaluate"):
        assert states[name] and {r.state_name for r in states[name]} == {"Completed"}, (name, states[name])
    # every task run is named after what it does, and the variant it does it to (beside the sub-flow's own)
    assert sorted(r.name for runs in states.values() for r in runs if not r.name.startswith("lsq-pipeline-run")) == sorted([
        "prepare data", "start MLflow run", "promotion metric", "squeeze source-r8", "score champion", "promote", "report",
        "train source-r8", "train cont-r4", "train cont-r2", "train in-r2", "evaluate post-r4", "evaluate post-r2",
        *(f"register {label}" for label in VARIANTS)])
    assert trained == []
    assert sorted(work.rglob("adapter_model.safetensors")) == adapters
    assert [p.stat().st_mtime_ns for p in adapters] == mtimes
    second = state.result()
    assert {r.label: r.metrics["train_seconds"] for r in second.variants} == \
           {r.label: r.metrics["train_seconds"] for r in result.variants}
    # the same adapters on the same data are the same registered versions, not copies
    assert {r.label: r.version for r in second.variants} == {r.label: r.version for r in result.variants}
    again = versions(cfg)
    assert len(again) == len(VARIANTS)
    assert all(v.tags.get("lsq.last_run_id") in {r.run_id for r in second.variants} for v in again)

    # a deleted adapter folder is rebuilt, never served from a record that no longer describes it
    [source_adapter] = [p.parent for p in adapters if p.parent.parent.name.startswith("source-r8-")]
    shutil.rmtree(source_adapter)
    state = squeeze_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    assert (source_adapter / "adapter_model.safetensors").is_file()
    assert [c.method for c in trained] == ["source"]


def what_people_see(cfg: dict, result, children: list, registered: list, data_fp: str) -> None:
    """Training curves, real durations and the dataset on each child run; the parent run as the comparison
    page; versions that say what they are (issue 12)."""
    client = client_of(cfg)
    for child in children:
        label, m = child.data.tags["lsq.variant"], child.data.metrics
        if not label.startswith("post-"):  # trained by its unit: one point per logging step (logging_steps=1)
            history = client.get_metric_history(child.info.run_id, "loss")
            assert len({h.step for h in history}) > 1, (label, history)
        assert (child.info.end_time - child.info.start_time) / 1000 > m["train_seconds"], label
        assert m["total_train_seconds"] >= m["train_seconds"], label
        [data] = client.get_run(child.info.run_id).inputs.dataset_inputs
        assert (data.dataset.name, data.dataset.digest) == (cfg["data"]["source"], data_fp), label
    by_label = {c.data.tags["lsq.variant"]: c.data.metrics for c in children}
    assert by_label["post-r4"]["train_seconds"] == 0 < by_label["post-r4"]["total_train_seconds"]
    assert by_label["cont-r4"]["total_train_seconds"] > by_label["source-r8"]["train_seconds"]
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["mlflow.note.content"].startswith(f"**{result.decision.winner}** -> `lsq-tiny@champion`")
    assert parent.data.metrics["variants"] == len(VARIANTS)
    assert "variants_table.json" in {f.path for f in client.list_artifacts(result.parent_run_id)}
    assert result.runs_url.endswith("/runs?viewStateShareKey=lsq&workflowType=machine_learning")
    experiment = client.get_experiment(parent.info.experiment_id)
    assert {"mlflow.sharedViewState.lsq", "mlflow.experimentKind"} <= set(experiment.tags)
    for v in registered:
        label = client.get_run(v.run_id).data.tags["lsq.variant"]
        assert v.description.startswith(f"{label}: ") and f"{int(v.tags['adapter_bytes']):,} bytes" in v.description
        assert int(v.tags["adapter_bytes"]) == client.get_run(v.run_id).data.metrics["adapter_bytes"]


def test_new_data_retrains_in_a_fresh_folder(tiny_model, tmp_path):
    data = write_classification_csv(tmp_path / "reviews.csv", n=48, seed=0)
    cfg = tiny_pipeline(tiny_model, data, tmp_path, recover__enabled=False, insqueeze__enabled=False)
    first = squeeze_pipeline(cfg)
    write_classification_csv(data, n=48, seed=1)  # same path, new rows
    state = squeeze_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    assert {r.state_name for r in task_runs(state)["train"]} == {"Completed"}
    fps = {v.tags["lsq.dataset_fingerprint"] for v in versions(cfg)}
    assert len(fps) == 2 and fingerprint(load_data(DataConfig(**cfg["data"]))) in fps
    folders = sorted(p.name for p in Path(cfg["output_dir"]).glob("source-r8-*"))
    assert len(folders) == 2, folders  # one source folder per dataset
    assert first.variants[0].run_id != state.result().variants[0].run_id


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
    [prep] = task_runs(state)["prepare"]
    assert prep.run_count == 1  # an LsqError is not retried
    assert all_runs(tiny_config) == []


@pytest.mark.parametrize("error, attempts", [(RuntimeError("CUDA out of memory (simulated)"), 2),
                                             (LsqError("train.lr: diverged (simulated)"), 1)])
def test_failing_training_retries_then_fails_the_flow(tiny_config, monkeypatch, error, attempts):
    calls = []

    def broken_train(cfg, log=None, data=None, **kw):
        calls.append(cfg.method)
        raise error

    monkeypatch.setattr(lsq.steps, "train", broken_train)
    monkeypatch.setattr(tasks.steps, "run_unit", tasks.steps.run_unit.with_options(retry_delay_seconds=0))
    state = squeeze_pipeline(tiny_config, return_state=True)
    assert state.is_failed() and str(error) in state.message
    assert calls == ["source"] * attempts
    [parent, child] = sorted(all_runs(tiny_config), key=lambda r: "mlflow.parentRunId" in r.data.tags)
    assert parent.info.status == "FAILED"
    # the unit's child run was opened when it started and ended FAILED; a retry reopened it, not a second one
    assert child.data.tags["lsq.variant"] == "source-r8" and child.info.status == "FAILED"
    assert versions(tiny_config) == []


def test_failure_while_registering_leaves_no_half_registered_version(tiny_model, tiny_csv, tmp_path, monkeypatch):
    cfg = tiny_pipeline(tiny_model, tiny_csv, tmp_path, recover__enabled=False, insqueeze__enabled=False)
    real = MlflowClient.search_model_versions

    def flaky(self, filter_string=None, *args, **kwargs):  # from the 3rd version on, the check after creation fails
        found = real(self, filter_string, *args, **kwargs)
        if "lsq.adapter_sha256" in (filter_string or "") and any(int(v.version) >= 3 for v in found):
            raise RuntimeError("registry went away (simulated)")
        return found

    monkeypatch.setattr(MlflowClient, "search_model_versions", flaky)
    import tasks.promotion

    monkeypatch.setattr(tasks.promotion, "log_and_register",
                        tasks.promotion.log_and_register.with_options(retry_delay_seconds=0))
    monkeypatch.setattr(pipeline_module, "log_and_register", tasks.promotion.log_and_register)
    state = squeeze_pipeline(cfg, return_state=True)
    assert state.is_failed() and "registry went away" in state.message
    left = versions(cfg)
    assert sorted(int(v.version) for v in left) == [1, 2]
    for v in left:
        assert VERSION_TAGS <= set(v.tags)
    assert not client_of(cfg).get_registered_model("lsq-tiny").aliases
    parent = [r for r in all_runs(cfg) if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parent] == ["FAILED"]


def test_a_full_artifact_store_ends_the_command_with_one_line(tiny_model, tiny_csv, tmp_path, monkeypatch, capsys):
    """MLflow cannot store a variant's artifacts (its disk is full): the command ends with one line naming the
    file and the cause, exit 2; the parent run is FAILED and no version was registered half-way."""
    from flows.pipeline_command import Command
    from lsq.pipeline_config import load_pipeline_config

    cfg = tiny_pipeline(tiny_model, tiny_csv, tmp_path, recover__enabled=False, insqueeze__enabled=False)
    target = tmp_path / "artifacts" / "adapter" / "adapter_model.safetensors"

    def no_space(self, run_id, local_dir, artifact_path=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(MlflowClient, "log_artifacts", no_space)
    import tasks.promotion

    monkeypatch.setattr(pipeline_module, "log_and_register",
                        tasks.promotion.log_and_register.with_options(retry_delay_seconds=0))
    assert pipeline_module.main(Command(None, [], load_pipeline_config(cfg))) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("squeeze_pipeline: error:")]
    assert errors == [f"squeeze_pipeline: error: [Errno 28] No space left on device: '{target}'"]
    assert versions(cfg) == []
    parent = [r for r in all_runs(cfg) if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parent] == ["FAILED"]


def test_two_pipelines_at_once_leave_the_registry_intact(tiny_model, tiny_csv, tmp_path):
    configs = [tiny_pipeline(tiny_model, tiny_csv, tmp_path, train__seed=i + 1, recover__enabled=False,
                             insqueeze__enabled=False) for i in range(2)]  # one output_dir, one store
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
    parents = {s.result().parent_run_id for s in states}
    assert len(parents) == 2 and all(runs[p].info.status == "FINISHED" for p in parents)
    assert len({v.run_id for v in registered}) == 6
    for v in registered:
        assert VERSION_TAGS <= set(v.tags)
        assert runs[v.run_id].data.tags["mlflow.parentRunId"] in parents
    for s in states:  # each run logged its own seed's adapters, bit for bit
        result = s.result()
        seed = runs[result.parent_run_id].data.params["seed"]
        for r in result.variants:
            assert runs[r.run_id].data.params["seed"] == seed
    assert len({v.tags["lsq.adapter_sha256"] for v in registered}) == 6
    champion = client_of(cfg).get_model_version_by_alias("lsq-tiny", "champion")
    assert champion.version in {v.version for v in registered}


def test_compute_tag_only_where_a_server_can_limit_it():
    """On a real Prefect server the compute tasks carry lsq-compute (deployments.setup limits it per
    device); on the temporary per-process server, which holds no limit, they do not pay for one."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.server import TemporaryServer
    from flows.squeeze_pipeline import limited
    from tasks.steps import COMPUTE_TAG, run_unit as train_adapter, squeeze_source as evaluate_variant

    assert COMPUTE_TAG in train_adapter.tags and COMPUTE_TAG in evaluate_variant.tags
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert all(COMPUTE_TAG in t.tags for t in limited(train_adapter, evaluate_variant))
    server = TemporaryServer()  # never started: only its URL counts here
    try:
        server_url = server.api_url
        from flows import server as server_module

        server_module._TEMPORARY_URLS.add(server_url)
        with temporary_settings({PREFECT_API_URL: server_url}):
            assert all(COMPUTE_TAG not in t.tags for t in limited(train_adapter, evaluate_variant))
    finally:
        server.stop()
    with temporary_settings({PREFECT_API_URL: None}):
        stripped = limited(train_adapter, evaluate_variant)
    assert all(COMPUTE_TAG not in t.tags for t in stripped)
    assert [t.name for t in stripped] == [train_adapter.name, evaluate_variant.name]
    assert stripped[0].retries == train_adapter.retries and stripped[0].cache_policy == train_adapter.cache_policy


def test_prefect_keeps_no_result_file_so_a_planted_pickle_never_runs(tiny_model, tiny_csv, tmp_path):
    """A results folder anyone can write to must hold no code: Prefect persists nothing of lsq's, and
    what someone plants there is never loaded (the steps' own records are validated JSON)."""
    import cloudpickle
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    cfg = tiny_pipeline(tiny_model, tiny_csv, tmp_path, recover__enabled=False, insqueeze__enabled=False)
    storage = tmp_path / "prefect-results"
    storage.mkdir()
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
        squeeze_pipeline(cfg)
        assert [p for p in storage.rglob("*") if p.is_file()] == []
        sentinel = tmp_path / "pwned"

        class Evil:
            def __reduce__(self):
                return (Path.touch, (sentinel,))

        for name in ("a" * 32, "train_adapter", "result"):
            (storage / name).write_bytes(cloudpickle.dumps(Evil()))
        for record in Path(cfg["output_dir"]).rglob("record.json"):  # a step record is validated JSON
            record.write_bytes(cloudpickle.dumps(Evil()))
        state = squeeze_pipeline(cfg, return_state=True)
    assert state.is_completed(), state.message
    assert not sentinel.exists()
