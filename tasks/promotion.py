"""The pipeline's end, as Prefect tasks over the MLflow adapter (tasks/tracking/): choose the promotion
metric, start the parent run, log and register each variant, log the base model's reference, score the
champion, promote, report. Records in, records out (:mod:`lsq.records`); what they need of the data comes
from :class:`lsq.records.PreparedData` (never loaded here again, except to score the champion).

Run ids and the tracking URI are passed explicitly (MLflow's active run is thread-local and Prefect
runs tasks in worker threads). Registry writes retry on the decorator and inside tasks/tracking/.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from lsq.errors import LsqError
from lsq.evaluate import evaluate_adapter
from lsq.pipeline_config import PipelineConfig, resolve_promotion
from lsq.records import (
    SPLIT_PREFIX,
    Champion,
    Decision,
    Evaluation,
    PreparedData,
    Reference,
    Registered,
    UnitResult,
    Variant,
    variant_metrics,
)
from lsq.serving import check_adapter
from lsq.variants import decide
from tasks import tracking
from tasks.steps import COMPUTE_TAG, storage_of

_NO_RESULTS = {"cache_policy": NO_CACHE, "persist_result": False}


SERVING_TAG = "lsq.serving.vllm"


def promotion_metric(cfg: PipelineConfig) -> str:
    """The logged name of the metric that chooses: ``val_<metric>``, on the validation split."""
    return f"{SPLIT_PREFIX['validation']}_{cfg.promotion.metric}"


def reported_metric(cfg: PipelineConfig) -> str:
    """The logged name of the score reported beside it, never used to choose: ``test_<metric>``."""
    return f"{SPLIT_PREFIX['test']}_{cfg.promotion.metric}"


@task(retries=1, task_run_name="promotion metric", **_NO_RESULTS)
def choose_metric(uri: str, cfg: PipelineConfig, data: PreparedData, parent_run_id: str) -> PipelineConfig:
    """``cfg`` with a concrete promotion metric (``auto`` resolved on the training labels of ``data``), recorded
    on the parent run (param ``promotion_metric``, tag ``lsq.promotion_metric_reason``) and in the log."""
    resolved, why = resolve_promotion(cfg, data)
    client = tracking.client_for(uri)
    tracking.retry(client.log_param, parent_run_id, "promotion_metric", resolved.promotion.metric)
    tracking.retry(client.set_tag, parent_run_id, "lsq.promotion_metric_reason", why)
    get_run_logger().info("%s; chosen on %s, %s reported beside it", why, promotion_metric(resolved),
                          reported_metric(resolved))
    return resolved


def variant_params(cfg: PipelineConfig, variant: Variant, data_fingerprint: str) -> dict[str, Any]:
    return {
        "base_model": cfg.model.name, "dataset": str(cfg.data.source), "dataset_fingerprint": data_fingerprint,
        "source_rank": variant.source_rank, "rank": variant.rank, "method": variant.method, "steps": variant.steps,
        "learning_rate": variant.lr, "seed": variant.seed,
    }


@task(retries=3, retry_delay_seconds=[2, 5, 10], task_run_name="start MLflow run", **_NO_RESULTS)
def start_run(uri: str, cfg: PipelineConfig, data: PreparedData, flow_run: str) -> str:
    """The parent run of this pipeline run; RUNNING parents of dead runs of the same model are closed first."""
    params = {"base_model": cfg.model.name, "dataset": str(cfg.data.source), "dataset_fingerprint": data.fingerprint,
              "source_rank": cfg.source_rank, "target_ranks": list(cfg.target_ranks), "seed": cfg.train.seed}
    tags = {"lsq.flow_run": flow_run, "lsq.registered_model": cfg.registered_model}
    run_id = tracking.start_pipeline_run(uri, cfg.tracking.experiment, f"pipeline-{flow_run}", params, tags)
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    tracking.close_stale_runs(uri, experiment_id, {"lsq.registered_model": cfg.registered_model}, exclude=run_id)
    return run_id


@task(retries=3, retry_delay_seconds=[2, 5, 10], task_run_name="register {variant.label}", **_NO_RESULTS)
def log_and_register(uri: str, cfg: PipelineConfig, parent_run_id: str, variant: Variant,
                     evaluations: tuple[Evaluation, ...], data: PreparedData) -> Registered:
    """One child run with params, metrics (``val_*`` and ``test_*``) and artifacts, and one registered model
    version tagged with the promotion metric on both splits and the serving contract (:mod:`lsq.serving`),
    predicting the data's class names (classification: ``spam``, not ``1``)."""
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    evaluation = evaluations[0]
    metrics = variant_metrics(variant, *evaluations)
    stored = variant.adapter_dir
    variant = storage_of(cfg).localize(variant)  # fetched into this machine's cache when a URI
    params = {"adapter_uri": stored} if stored != variant.adapter_dir else {}
    run_id = tracking.log_variant_run(uri, experiment_id, parent_run_id, variant,
                                      {**variant_params(cfg, variant, data.fingerprint), **params}, metrics,
                                      dataset=tracking.dataset_input(str(cfg.data.source), data.fingerprint,
                                                                     "evaluation" if variant.method == "post" else "training"))
    metric, test = promotion_metric(cfg), reported_metric(cfg)
    serving = check_adapter(variant.adapter_dir).tag()
    version = tracking.register_variant(uri, cfg.registered_model, run_id, variant, cfg.model,
                                        {"lsq.dataset_fingerprint": data.fingerprint, "lsq.metric": cfg.promotion.metric,
                                         metric: str(metrics.get(metric)), test: str(metrics.get(test)),
                                         SERVING_TAG: serving}, label_names=data.class_names)
    return Registered(label=variant.label, method=variant.method, rank=variant.rank, run_id=run_id, version=version,
                      adapter_bytes=evaluation.adapter_bytes, metric=metrics.get(metric), metrics=metrics,
                      test_metric=metrics.get(test), serving=serving)


@task(retries=3, retry_delay_seconds=[2, 5, 10], task_run_name="log base (zero-shot)", **_NO_RESULTS)
def log_reference(uri: str, cfg: PipelineConfig, parent_run_id: str, base: UnitResult,
                  data: PreparedData) -> Reference:
    """The base model's zero-shot scores as a child run (param ``method=base``, ``val_*`` and ``test_*``
    metrics, no adapter), never registered: the floor every variant is read against."""
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    metrics = variant_metrics(base.variant, *base.evaluations)
    run_id = tracking.log_variant_run(uri, experiment_id, parent_run_id, base.variant,
                                      variant_params(cfg, base.variant, data.fingerprint), metrics,
                                      dataset=tracking.dataset_input(str(cfg.data.source), data.fingerprint, "evaluation"))
    return Reference(run_id=run_id, metric=metrics.get(promotion_metric(cfg)),
                     test_metric=metrics.get(reported_metric(cfg)), metrics=metrics)


def score_version(uri: str, cfg: PipelineConfig, version: str) -> float:
    """The promotion metric of registered ``version`` on this run's validation split, where the winner was
    chosen (its adapter downloaded, then removed)."""
    with tempfile.TemporaryDirectory(prefix="lsq-champion-") as tmp:
        adapter = tracking.download_adapter(uri, cfg.registered_model, version, tmp)
        evaluation = evaluate_adapter(adapter, cfg.model, cfg.data, split="validation",
                                      batch_size=cfg.train.eval_batch_size)
    return float(evaluation[cfg.promotion.metric])


@task(retries=1, tags=[COMPUTE_TAG], task_run_name="score champion", **_NO_RESULTS)
def champion_score(uri: str, cfg: PipelineConfig) -> Champion:
    """The current champion's metric on this run's validation data (re-evaluated here, not read from its run)."""
    version = tracking.alias_version(uri, cfg.registered_model, cfg.promotion.champion_alias)
    if version is None:
        return Champion()
    return Champion(version=version, score=score_version(uri, cfg, version))


@task(retries=3, retry_delay_seconds=[2, 5, 10], task_run_name="promote", **_NO_RESULTS)
def promote(uri: str, cfg: PipelineConfig, rows: list[Registered], champion: Champion) -> Decision:
    """Decide against the champion as it is when the alias moves (under the registry lock), then move it.

    ``champion`` was scored before registration; if another run moved the alias meanwhile, the new
    champion is scored now and the decision is made against it.
    """
    scored = {champion.version: champion.score} if champion.version is not None else {}
    decide_promotion(cfg, rows, None)  # bad input (no servable variant, a metric not measured) fails before the lock

    def against(version: str | None) -> Decision:
        if version is not None and version not in scored:
            scored[version] = score_version(uri, cfg, version)
        score = scored.get(version) if version is not None else None
        return decide_promotion(cfg, rows, score).model_copy(update={"compared_to": version})

    versions = {r.label: r.version for r in rows}
    return tracking.promote_alias(uri, cfg.registered_model, cfg.promotion.champion_alias, against, versions)


def decide_promotion(cfg: PipelineConfig, rows: Sequence[Registered], champion_score: float | None) -> Decision:
    """The winner among ``rows`` by the validation metric (``Registered.metric``), against the champion's
    validation score; the reason names the metric and gives the winner's test score beside it. With
    ``promotion.servable_only`` only adapters the serving contract accepts take part."""
    p, metric, test = cfg.promotion, promotion_metric(cfg), reported_metric(cfg)
    candidates = [r for r in rows if not p.servable_only or r.serving.startswith("yes")]
    if not candidates:
        raise LsqError("promotion.servable_only: no variant is servable by vLLM-style servers ("
                       + "; ".join(f"{r.label}: {r.serving}" for r in rows) + ")")
    missing = [r.label for r in candidates if r.metric is None]
    if missing:
        raise LsqError(f"promotion.metric: {metric} was not measured for {', '.join(missing)} "
                       f"(measured: {', '.join(sorted(candidates[0].metrics))})")
    scores = {r.label: r.metric for r in candidates}
    sizes = {r.label: r.adapter_bytes for r in candidates}
    decision = decide(scores, sizes, p.tolerance, champion_score, p.higher_is_better, p.champion_alias,
                      p.challenger_alias)
    winner = next(r for r in candidates if r.label == decision.winner)
    reported = "-" if winner.test_metric is None else f"{winner.test_metric:.4f}"
    only = ", servable adapters only" if p.servable_only else ""
    reason = f"by {metric} (validation split{only}): {decision.reason}; {test} {reported} (reported, not used to choose)"
    return decision.model_copy(update={"reason": reason})


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run: on the tracking server itself for an http(s) URI (its user info
    and query left out), else where ``mlflow ui --backend-store-uri URI`` serves a local store by default.
    ``workflowType=machine_learning``: a browser that never chose gets the run's ML layout (see :func:`runs_url`)."""
    return f"{_ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def runs_url(uri: str, experiment_id: str) -> str:
    """The runs table of the experiment in the MLflow UI, in the view :func:`log_comparison` shares (every
    variant a row, grouped by pipeline run, with its metrics). ``workflowType=machine_learning`` makes
    MLflow 3's UI open the runs view, not the GenAI traces overview, in a browser that never chose."""
    return (f"{_ui_base(uri)}/#/experiments/{experiment_id}/runs?viewStateShareKey={tracking.VIEW_KEY}"
            "&workflowType=machine_learning")


def _ui_base(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}"
    return "http://127.0.0.1:5000"


def against_base(cfg: PipelineConfig, reference: Reference | None, winner: Registered) -> str:
    """One sentence: the base model's zero-shot scores and what the winner adds on test ('' without them)."""
    if reference is None:
        return ""
    metric, test = promotion_metric(cfg), reported_metric(cfg)
    shown = ", ".join(f"{name} {value:.4f}" for name, value in ((metric, reference.metric), (test, reference.test_metric))
                      if value is not None)
    gain = ("" if reference.test_metric is None or winner.test_metric is None
            else f"; {winner.label} {winner.test_metric - reference.test_metric:+.4f} on test")
    return f"Base model zero-shot (no adapter): {shown or 'not measured'}{gain}."


def promotion_markdown(uri: str, experiment_id: str, cfg: PipelineConfig, parent_run_id: str,
                       rows: Sequence[Registered], decision: Decision, reference: Reference | None = None) -> str:
    """The decision, then every variant with its metric, size, version and a link to its MLflow run (the base
    model's zero-shot row first, when scored)."""
    metric, test = promotion_metric(cfg), reported_metric(cfg)
    winner = next(r for r in rows if r.label == decision.winner)
    lines = [f"## Promotion: `{cfg.registered_model}`", "", f"**{decision.winner}** -> alias **{decision.alias}**", "",
             decision.reason, "", against_base(cfg, reference, winner), "",
             f"| variant | rank | {metric} | {test} | size (bytes) | version | MLflow run |",
             "|---|---:|---:|---:|---:|---:|---|"]
    if reference is not None:
        cells = ["-" if v is None else f"{v:.4f}" for v in (reference.metric, reference.test_metric)]
        lines.append(f"| base (zero-shot) | - | {cells[0]} | {cells[1]} | 0 | - | "
                     f"[{reference.run_id[:8]}]({run_url(uri, experiment_id, reference.run_id)}) |")
    for r in rows:
        score = "-" if r.metric is None else f"{r.metric:.4f}"
        tested = "-" if r.test_metric is None else f"{r.test_metric:.4f}"
        lines.append(f"| {r.label} | {r.rank} | {score} | {tested} | {r.adapter_bytes:,} | {r.version} | "
                     f"[{r.run_id[:8]}]({run_url(uri, experiment_id, r.run_id)}) |")
    parent = f"[parent run {parent_run_id[:8]}]({run_url(uri, experiment_id, parent_run_id)})"
    lines += ["", f"MLflow: {parent} in experiment `{cfg.tracking.experiment}` of `{tracking.redact_uri(uri)}`."]
    if urlsplit(uri).scheme not in ("http", "https"):
        lines.append(f"The links need `mlflow ui --backend-store-uri {tracking.redact_uri(uri)}` running.")
    return "\n".join(lines)


def log_comparison(uri: str, cfg: PipelineConfig, parent_run_id: str, rows: Sequence[Registered],
                   decision: Decision, reference: Reference | None = None) -> None:
    """The parent run as the page that compares the variants (:func:`tracking.describe_pipeline_run`).

    Description: the decision (winner, alias, version, metric, size, why). Metrics: ``best_<metric>``,
    ``winner_<metric>``, ``winner_rank``, ``winner_adapter_bytes``, ``variants``. Table
    ``variants_table.json``: variant, method, rank, the chosen and the reported metric, adapter_bytes,
    train_seconds (this variant's own training), total_train_seconds (the source's share included),
    version, winner. With the base model's zero-shot scores (``reference``): ``base_<metric>`` and
    ``base_<test metric>`` beside them, and a sentence in the description."""
    metric, test = promotion_metric(cfg), reported_metric(cfg)
    winner = next(r for r in rows if r.label == decision.winner)
    scored = [r.metric for r in rows if r.metric is not None]
    best = (max if cfg.promotion.higher_is_better else min)(scored) if scored else None
    score = "-" if winner.metric is None else f"{winner.metric:.4f}"
    note = "\n".join([
        (f"**{decision.winner}** -> `{cfg.registered_model}@{decision.alias}` (version {winner.version}): "
         f"{metric} {score}, rank {winner.rank}, {winner.adapter_bytes:,} bytes."), "",
        f"Why: {decision.reason}", "", *([against_base(cfg, reference, winner), ""] if reference else []),
        (f"{len(rows)} variants compared by {metric}; each child run holds its training curves "
         "(Model metrics: loss, learning_rate, grad_norm) and its adapter. Artifacts here: "
         "`variants_table.json` (every variant), `pareto/pareto.png` (size against the metric, the winner circled).")])
    metrics = {f"best_{metric}": best, f"winner_{metric}": winner.metric, "winner_rank": winner.rank,
               "winner_adapter_bytes": winner.adapter_bytes, "variants": len(rows)}
    if reference is not None:
        metrics.update({f"base_{metric}": reference.metric, f"base_{test}": reference.test_metric})
    table = [{"variant": r.label, "method": r.method, "rank": r.rank, metric: r.metric, test: r.metrics.get(test),
              "adapter_bytes": r.adapter_bytes, "train_seconds": r.metrics.get("train_seconds"),
              "total_train_seconds": r.metrics.get("total_train_seconds"), "version": r.version,
              "winner": r.label == decision.winner} for r in rows]
    tracking.describe_pipeline_run(uri, parent_run_id, note, metrics, table)
    tracking.share_runs_view(uri, tracking.ensure_experiment(uri, cfg.tracking.experiment),
                             [metric, test, "adapter_bytes", "train_seconds", "total_train_seconds"])


@task(task_run_name="report", **_NO_RESULTS)
def report(uri: str, cfg: PipelineConfig, parent_run_id: str, rows: list[Registered], decision: Decision,
           reference: Reference | None = None) -> str:
    """Pareto plot on the parent run, which becomes the comparison page (:func:`log_comparison`); a table
    and a markdown decision (with links to the MLflow runs) as Prefect artifacts."""
    metric = promotion_metric(cfg)
    tracking.log_pareto(uri, parent_run_id, [{"label": r.label, "adapter_bytes": r.adapter_bytes, "metric": r.metric}
                                             for r in rows], metric, greater_is_better=cfg.promotion.higher_is_better,
                        champion_label=decision.winner)
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
    table = [{"variant": r.label, "method": r.method, "rank": r.rank, metric: round(r.metric, 4),
              reported_metric(cfg): None if r.test_metric is None else round(r.test_metric, 4),
              "adapter_bytes": r.adapter_bytes, "version": r.version, "mlflow_run": r.run_id} for r in rows]
    create_table_artifact(key="lsq-variants", table=table, description=(
        f"Adapters of MLflow [run {parent_run_id[:8]}]({run_url(uri, experiment_id, parent_run_id)})"))
    markdown = promotion_markdown(uri, experiment_id, cfg, parent_run_id, rows, decision, reference)
    create_markdown_artifact(key="lsq-promotion", markdown=markdown, description="Promotion decision")
    log_comparison(uri, cfg, parent_run_id, rows, decision, reference)
    return markdown
