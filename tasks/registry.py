"""Prefect tasks over the MLflow adapter (tasks/tracking.py): log, register, promote, report.

Run ids and the tracking URI are passed explicitly (MLflow's active run is thread-local and Prefect
runs tasks in worker threads). Registry writes retry on the decorator and inside tasks/tracking.py.
"""

from __future__ import annotations

import tempfile
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lsq.evaluate import evaluate_adapter
from lsq.pipeline_config import PipelineConfig
from lsq.variants import Decision, Variant, decide
from tasks import tracking
from tasks.steps import COMPUTE_TAG


def variant_params(cfg: PipelineConfig, variant: Variant, data_fingerprint: str) -> dict[str, Any]:
    return {
        "base_model": cfg.model.name, "dataset": str(cfg.data.source), "dataset_fingerprint": data_fingerprint,
        "source_rank": variant.source_rank, "rank": variant.rank, "method": variant.method, "steps": variant.steps,
        "learning_rate": variant.lr, "seed": cfg.train.seed,
    }


def variant_metrics(variant: Variant, evaluation: dict[str, Any]) -> dict[str, float]:
    metrics = {f"test_{k}": float(v) for k, v in evaluation.items()
               if isinstance(v, (int, float)) and k not in ("trainable_params", "lora_params", "adapter_bytes", "examples")}
    metrics.update(trainable_params=float(evaluation["trainable_params"]), adapter_bytes=float(evaluation["adapter_bytes"]),
                   train_seconds=float(variant.train_seconds))
    if variant.retained_energy is not None:
        metrics["retained_energy"] = float(variant.retained_energy)
    if variant.relative_error is not None:
        metrics["relative_error"] = float(variant.relative_error)
    return metrics


@task(retries=3, retry_delay_seconds=[2, 5, 10])
def start_run(uri: str, cfg: PipelineConfig, data_fingerprint: str, flow_run: str) -> str:
    params = {"base_model": cfg.model.name, "dataset": str(cfg.data.source), "dataset_fingerprint": data_fingerprint,
              "source_rank": cfg.source_rank, "target_ranks": list(cfg.target_ranks), "seed": cfg.train.seed}
    return tracking.start_pipeline_run(uri, cfg.tracking.experiment, f"pipeline-{flow_run}", params,
                                       {"lsq.flow_run": flow_run, "lsq.registered_model": cfg.registered_model})


@task(retries=3, retry_delay_seconds=[2, 5, 10])
def log_and_register(uri: str, cfg: PipelineConfig, parent_run_id: str, variant: Variant, evaluation: dict[str, Any],
                     data_fingerprint: str) -> dict[str, Any]:
    """One child run with params, metrics and artifacts, and one registered model version."""
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    metrics = variant_metrics(variant, evaluation)
    run_id = tracking.log_variant_run(uri, experiment_id, parent_run_id, variant,
                                      variant_params(cfg, variant, data_fingerprint), metrics)
    metric = f"test_{cfg.promotion.metric}"
    version = tracking.register_variant(uri, cfg.registered_model, run_id, variant, cfg.model,
                                        {"lsq.dataset_fingerprint": data_fingerprint, metric: str(metrics.get(metric))})
    return {"label": variant.label, "method": variant.method, "rank": variant.rank, "run_id": run_id,
            "version": version, "adapter_bytes": int(evaluation["adapter_bytes"]),
            "metric": metrics.get(metric), "metrics": metrics}


@task(retries=1, tags=[COMPUTE_TAG])
def champion_score(uri: str, cfg: PipelineConfig) -> tuple[str | None, float | None]:
    """The current champion's metric on this run's test data (re-evaluated here, not read from its run)."""
    with tempfile.TemporaryDirectory(prefix="lsq-champion-") as tmp:  # the downloaded adapter goes with it
        current = tracking.champion(uri, cfg.registered_model, cfg.promotion.champion_alias, dst_path=tmp)
        if current is None:
            return None, None
        evaluation = evaluate_adapter(current["adapter_path"], cfg.model, cfg.data, split=cfg.eval_split,
                                      batch_size=cfg.train.eval_batch_size)
    return current["version"], float(evaluation[cfg.promotion.metric])


@task(retries=3, retry_delay_seconds=[2, 5, 10])
def promote(uri: str, cfg: PipelineConfig, rows: list[dict[str, Any]], champion: tuple[str | None, float | None]) -> Decision:
    p = cfg.promotion
    scores = {r["label"]: r["metric"] for r in rows}
    sizes = {r["label"]: r["adapter_bytes"] for r in rows}
    decision = decide(scores, sizes, p.tolerance, champion[1], p.greater_is_better, p.champion_alias, p.challenger_alias)
    version = next(r["version"] for r in rows if r["label"] == decision.winner)
    tracking.set_alias(uri, cfg.registered_model, version, decision.alias, decision)
    return decision


@task
def report(uri: str, cfg: PipelineConfig, parent_run_id: str, rows: list[dict[str, Any]], decision: Decision) -> str:
    """Pareto plot on the parent run; a table and a markdown decision as Prefect artifacts."""
    metric = f"test_{cfg.promotion.metric}"
    tracking.log_pareto(uri, parent_run_id, rows, metric)
    base = uri.removeprefix("sqlite:///") if uri.startswith("sqlite") else uri
    table = [{"variant": r["label"], "method": r["method"], "rank": r["rank"], metric: round(r["metric"], 4),
              "adapter_bytes": r["adapter_bytes"], "version": r["version"], "mlflow_run": r["run_id"]} for r in rows]
    create_table_artifact(key="lsq-variants", table=table, description=f"Adapters of MLflow run {parent_run_id}")
    markdown = (
        f"## Promotion: `{cfg.registered_model}`\n\n**{decision.winner}** -> alias **{decision.alias}**\n\n"
        f"{decision.reason}\n\nMLflow parent run `{parent_run_id}` ({base})."
    )
    create_markdown_artifact(key="lsq-promotion", markdown=markdown, description="Promotion decision")
    return markdown
