"""What people see in MLflow: child runs open while their unit works (curves, dataset input, real
durations), the parent run as the comparison page, versions that say what they are.

Against a real MLflow (sqlite store in tmp_path); the pipeline end to end is checked in
tests/flows/test_pipeline.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pytest

from lsq.models import ModelConfig
from tasks import tracking
from tasks.promotion import run_url, runs_url
from tests.tasks.mlflow_store import EVALUATION, LABELS, MODEL, PARAMS

pytestmark = pytest.mark.usefixtures("mlflow_uri")


def _parent(uri: str) -> tuple[str, str]:
    parent = tracking.start_pipeline_run(uri, "lsq-test", "pipeline-1", {"seed": 0}, {})
    return tracking.ensure_experiment(uri, "lsq-test"), parent


def test_child_run_opened_by_its_unit_carries_curves_dataset_and_its_own_duration(mlflow_uri, variants):
    client = tracking.client_for(mlflow_uri)
    exp, parent = _parent(mlflow_uri)
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    data = tracking.dataset_input("/data/reviews.csv", "0123456789abcdef", "training")
    v = variants[1].model_copy(update={"method": "cont", "total_train_seconds": 4.5})
    run_id = tracking.open_variant_run(mlflow_uri, exp, parent, v.label, {"lsq.method": "cont"}, data)
    assert client.get_run(run_id).info.status == "RUNNING"
    log = tracking.variant_logger(mlflow_uri, run_id)
    for step in (1, 2, 3):
        log({"loss": 1.0 / step, "learning_rate": 1e-3, "grad_norm": 0.5, "epoch": step / 3}, step)
        time.sleep(0.02)
    log({"loss": float("nan")}, 4)  # dropped, not an error
    tracking.close_variant_run(mlflow_uri, run_id, "FAILED")
    # a retry of the unit reopens the same run instead of creating a second one
    assert tracking.open_variant_run(mlflow_uri, exp, parent, v.label, {"lsq.method": "cont"}, data) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    tracking.close_variant_run(mlflow_uri, run_id)
    ended = client.get_run(run_id).info
    assert ended.status == "FINISHED" and ended.end_time - ended.start_time >= 40

    # registration logs the rest into that run: no second child run, its end time kept
    metrics = {**EVALUATION, "train_seconds": v.train_seconds, "total_train_seconds": v.total_train_seconds}
    assert tracking.log_variant_run(mlflow_uri, exp, parent, v, PARAMS, metrics, dataset=data) == run_id
    assert tracking.log_variant_run(mlflow_uri, exp, parent, v, PARAMS, metrics, dataset=data) == run_id  # a retry
    assert len(client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")) == 1
    run = client.get_run(run_id)
    assert run.info.end_time == ended.end_time and run.data.tags["lsq.logged"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert run.data.metrics["total_train_seconds"] == 4.5 >= run.data.metrics["train_seconds"]
    assert run.data.tags["lsq.rank"] == "4" and run.data.params["method"] == "post"
    [inp] = run.inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest) == ("/data/reviews.csv", "0123456789abcdef")
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"


def test_a_variant_no_unit_opened_gets_its_run_at_registration(mlflow_uri, variants):
    client = tracking.client_for(mlflow_uri)
    exp, parent = _parent(mlflow_uri)
    data = tracking.dataset_input("builtin:movie", "fedcba9876543210", "evaluation")
    run_id = tracking.log_variant_run(mlflow_uri, exp, parent, variants[0], PARAMS, EVALUATION, dataset=data)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["builtin:movie"]


def test_a_failed_pipeline_ends_the_child_runs_its_units_left_open(mlflow_uri):
    client = tracking.client_for(mlflow_uri)
    exp, parent = _parent(mlflow_uri)
    lost = tracking.open_variant_run(mlflow_uri, exp, parent, "cont-r4", {})
    tracking.finish_run(mlflow_uri, parent, "FAILED")
    assert client.get_run(lost).info.status == "FAILED"


def test_parent_run_is_the_comparison_page(mlflow_uri, tmp_path):
    client = tracking.client_for(mlflow_uri)
    _, parent = _parent(mlflow_uri)
    table = [{"variant": "source-r8", "rank": 8, "val_accuracy": 0.8, "adapter_bytes": 900},
             {"variant": "cont-r2", "rank": 2, "val_accuracy": 0.78, "adapter_bytes": 300}]
    for _ in range(2):  # a second call neither appends rows nor fails
        tracking.describe_pipeline_run(mlflow_uri, parent, "**cont-r2** -> champion", {"variants": 2, "winner_rank": 2},
                                       table)
    run = client.get_run(parent)
    assert run.data.tags["mlflow.note.content"] == "**cont-r2** -> champion"
    assert run.data.metrics == {"variants": 2.0, "winner_rank": 2.0}
    path = mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="variants_table.json",
                                               dst_path=str(tmp_path), tracking_uri=mlflow_uri)
    logged = json.loads(Path(path).read_text())
    assert logged["columns"] == ["variant", "rank", "val_accuracy", "adapter_bytes"]
    assert [row[0] for row in logged["data"]] == ["source-r8", "cont-r2"]


def test_a_version_says_what_it_is(mlflow_uri, variants, base_dir):
    exp, parent = _parent(mlflow_uri)
    v = variants[1]
    run_id = tracking.log_variant_run(mlflow_uri, exp, parent, v, PARAMS, EVALUATION)
    version = tracking.register_variant(mlflow_uri, MODEL, run_id, v, ModelConfig(name=str(base_dir), device="cpu"),
                                        {"val_accuracy": "0.8125", "test_accuracy": "0.75"}, LABELS)
    mv = tracking.client_for(mlflow_uri).get_model_version(MODEL, version)
    weights = (Path(v.adapter_dir) / "adapter_model.safetensors").stat().st_size
    assert mv.tags["adapter_bytes"] == str(weights)
    assert mv.description == (f"post-r4: squeezed from the rank-16 source; rank 4; {weights:,} bytes; "
                              "val_accuracy 0.8125, test_accuracy 0.7500")


def test_the_printed_url_opens_the_shared_runs_view(mlflow_uri):
    exp, _ = _parent(mlflow_uri)
    tracking.share_runs_view(mlflow_uri, exp, ["val_accuracy", "test_accuracy", "adapter_bytes"])
    state = json.loads(tracking.client_for(mlflow_uri).get_experiment(exp).tags["mlflow.sharedViewState.lsq"])
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "mlflow.parentRunId"}]  # every variant a row
    assert state["runsHiddenMode"] == "SHOW_ALL" and {c["runsCountToCompare"] for c in state["compareRunCharts"]} == {100}
    assert state["selectedColumns"][:2] == ["metrics.`val_accuracy`", "metrics.`test_accuracy`"]
    parallel = next(c for c in state["compareRunCharts"] if c["type"] == "PARALLEL")
    assert parallel["selectedParams"] == ["method", "rank"] and parallel["selectedMetrics"][:2] == ["adapter_bytes",
                                                                                                    "val_accuracy"]
    assert {c["metricKey"] for c in state["compareRunCharts"] if c["type"] == "LINE"} == {"loss", "learning_rate",
                                                                                          "grad_norm"}
    assert runs_url("sqlite:///tmp/mlflow.db", "3") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?viewStateShareKey=lsq&workflowType=machine_learning"
    assert runs_url("https://user:pw@mlflow.example/base/", "3").startswith("https://mlflow.example/base/#/")
    assert run_url("sqlite:///tmp/mlflow.db", "1", "abc") == ("http://127.0.0.1:5000/#/experiments/1/runs/abc"
                                                                "?workflowType=machine_learning")


def test_a_unit_runs_inside_its_child_run(mlflow_uri, variants):
    from lsq.data import DataConfig
    from lsq.steps import Unit
    from tasks.steps import tracked

    client = tracking.client_for(mlflow_uri)
    exp, parent = _parent(mlflow_uri)
    runs = tracking.ChildRuns(tracking_uri=mlflow_uri, experiment_id=exp, parent_run_id=parent)
    unit = Unit(kind="evaluate", parent=variants[0], model=ModelConfig(name="tiny"), data=DataConfig(source="builtin:movie"),
                splits=("test",), eval_batch_size=8, data_fingerprint="fp0123", code="c", output_dir="out")
    with tracked(unit, None) as log:
        assert log is None  # no tracking asked for
    with tracked(unit, runs) as log:
        log({"loss": 0.5}, 1)
    [run] = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert (run.info.status, run.info.run_name, run.data.tags["lsq.rank"]) == ("FINISHED", "post-r2", "2")
    assert [(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs] == [("builtin:movie", "fp0123")]
    for error, status in ((RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        with pytest.raises(type(error)), tracked(unit, runs):
            raise error
        assert client.get_run(run.info.run_id).info.status == status  # the same run, reopened and ended again
    assert len(client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")) == 1
