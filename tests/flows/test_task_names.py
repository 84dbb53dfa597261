"""What people see in Prefect: task runs named after their variant, one log line per finished variant,
links to the MLflow runs in the artifacts. The steps and MLflow are stubbed: only the Prefect side runs."""

from __future__ import annotations

import re

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterTaskRunId,
)
from prefect.logging.handlers import APILogWorker

import lsq.steps
from lsq.pipeline_config import load_pipeline_config
from lsq.records import Decision, Evaluation, PreparedData, Squeezed, UnitResult, Variant
from lsq.serving import ServingCheck
from tasks import promotion, steps, tracking


def variant(method: str, rank: int) -> Variant:
    return Variant(method=method, rank=rank, source_rank=8, adapter_dir=f"/adapters/{method}-r{rank}",
                   adapter_sha256=f"{method}{rank}", worker="box", device="cpu")


def result(v: Variant, accuracy: float) -> UnitResult:
    e = [Evaluation(label=v.label, split=split, examples=10, scores={"accuracy": accuracy - d, "macro_f1": accuracy - 0.1},
                    trainable_params=2000, lora_params=1536, adapter_bytes=6240 * v.rank)
         for split, d in (("validation", 0.05), ("test", 0.0))]
    return UnitResult(name=f"{v.label}-key", variant=v, evaluations=tuple(e), wall_seconds=1.5)


def test_task_runs_log_lines_and_links(tiny_config, monkeypatch):
    cfg = load_pipeline_config(tiny_config, ["promotion.metric=accuracy"])
    source, post = variant("source", 8), variant("post", 4)
    scores = {"cont-r4": 0.75, "post-r4": 0.5}
    monkeypatch.setattr(lsq.steps, "squeeze_unit", lambda *a, **k: Squeezed(source=source, variants=(post,)))
    monkeypatch.setattr(lsq.steps, "run_unit", lambda unit, **kw: result(
        variant(unit.train.method, unit.train.rank) if unit.kind == "train" else unit.parent, scores[unit.label]))
    monkeypatch.setattr(tracking, "ensure_experiment", lambda uri, name: "7")
    monkeypatch.setattr(tracking, "log_variant_run", lambda uri, exp, parent, v, params, metrics, **kw: f"run{v.label}00")
    monkeypatch.setattr(tracking, "register_variant", lambda *a, **k: "3")
    monkeypatch.setattr(promotion, "check_adapter", lambda folder: ServingCheck(False, reasons=("a head",)))
    monkeypatch.setattr(tracking, "log_pareto", lambda *a, **k: None)
    described = []
    monkeypatch.setattr(tracking, "describe_pipeline_run", lambda uri, run, note, metrics, table: described.append(
        (run, note, metrics, table)))
    monkeypatch.setattr(tracking, "share_runs_view", lambda *a, **k: None)
    uri = "http://alice:secret@mlflow.example:5000/"
    decision = Decision(winner="cont-r4", alias="champion", reason="best accuracy")

    @flow
    def story():
        squeezed = steps.squeeze_source(source, cfg, "code")
        units = [steps.make_unit(cfg, "fp", "code", "cont", 4, squeezed.variants[0]),
                 steps.make_unit(cfg, "fp", "code", parent=squeezed.variants[0])]
        data = PreparedData(fingerprint="fp", class_names=("neg", "pos"))
        rows = [promotion.log_and_register(uri, cfg, "parent0123456789", r.variant, r.evaluations, data)
                for r in (steps.run_unit(u) for u in units)]
        return promotion.report(uri, cfg, "parent0123456789", rows, decision)

    state = story(return_state=True)
    assert state.is_completed(), state.message
    APILogWorker.drain_all(timeout=10)
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        names = {r.name: r for r in runs}
        logs = {name: [log.message for log in client.read_logs(log_filter=LogFilter(
            task_run_id=LogFilterTaskRunId(any_=[names[name].id])))] for name in ("train cont-r4", "evaluate post-r4")}
        artifacts = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))}

    assert set(names) == {"squeeze source-r8", "train cont-r4", "evaluate post-r4", "register cont-r4",
                          "register post-r4", "report"}
    assert "cont-r4 finished: val_accuracy=0.7000 val_macro_f1=0.6500 test_accuracy=0.7500 test_macro_f1=0.6500; 24,960 bytes (1,536 LoRA parameters); " \
           "1.5 s on box (cpu)" in logs["train cont-r4"]
    assert any(m.startswith("post-r4 finished: val_accuracy=0.4500") for m in logs["evaluate post-r4"])

    markdown = artifacts["lsq-promotion"].data
    link = "http://mlflow.example:5000/#/experiments/7/runs/"
    ml = "?workflowType=machine_learning"
    assert f"[runcont-]({link}runcont-r400{ml})" in markdown
    assert f"[parent run parent01]({link}parent0123456789{ml})" in markdown
    assert re.search(r"\| cont-r4 \| 4 \| 0\.7000 \| 0\.7500 \| 24,960 \| 3 \| \[", markdown)
    assert "secret" not in markdown and "(http://alice" not in markdown  # links carry no user info
    assert f"]({link}parent0123456789{ml})" in artifacts["lsq-variants"].description
    [(run, note, metrics, table)] = described  # the parent run as the comparison page
    assert run == "parent0123456789" and note.startswith("**cont-r4** -> `lsq-tiny@champion` (version 3): val_accuracy 0.7000")
    assert metrics == {"best_val_accuracy": 0.7, "winner_val_accuracy": 0.7, "winner_rank": 4,
                       "winner_adapter_bytes": 24960, "variants": 2}
    assert [(r["variant"], r["test_accuracy"], r["winner"]) for r in table] == [("cont-r4", 0.75, True),
                                                                               ("post-r4", 0.5, False)]


def test_run_url_of_a_local_store_points_at_mlflow_ui():
    ml = "?workflowType=machine_learning"  # a fresh browser lands on the run's ML layout
    assert promotion.run_url("sqlite:///tmp/mlflow.db", "1", "abc") == "http://127.0.0.1:5000/#/experiments/1/runs/abc" + ml
    assert promotion.run_url("https://u:p@host/mlflow/?token=x", "2", "r") == "https://host/mlflow/#/experiments/2/runs/r" + ml
