"""Child runs: one per variant of a pipeline run (opened when its unit starts, with its training curves,
its dataset input, then its params, metrics and artifacts) or per study record; and folders as artifacts.

Every function takes the tracking URI and the run ids it works on (the caller's active run is never
read or changed). A child run is found again by its parent and label, so a retried or re-dispatched
unit reopens its run instead of creating a second one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import DatasetInput, InputTag, Metric, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from pydantic import BaseModel, ConfigDict

from lsq.variants import Variant
from tasks.tracking.store import _params, _quote, _tag, client_for, retry

log = logging.getLogger(__name__)

__all__ = ["ChildRuns", "close_variant_run", "dataset_input", "log_folder", "log_study_record", "log_variant_run",
           "open_variant_run", "variant_logger", "variant_run_metrics"]

SIZE_METRICS = ("trainable_params", "lora_params", "adapter_bytes")
VARIANT_METRICS = ("retained_energy", "relative_error", "train_seconds")
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
STUDY_PARAMS = ("task", "method", "rank", "seed", "lr", "steps", "budget", "fraction")
LOGGED_TAG = "lsq.logged"  # a child run whose params, metrics and artifacts are all logged


def variant_run_metrics(variant: Variant, metrics: Mapping[str, Any]) -> dict[str, float]:
    """The fixed metric names of a variant run: ``test_<metric>``, sizes, squeeze numbers, train seconds.

    ``metrics`` is an evaluation (``accuracy``, ``macro_f1``, sizes, ...) or already prefixed
    (``test_``, ``val_``, ``train_``); strings and None are dropped. The variant's own numbers (when
    set) fill what ``metrics`` lacks.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        fixed = (key in SIZE_METRICS or key in VARIANT_METRICS or key == "total_train_seconds"
                 or key.startswith(("test_", "val_", "train_")))
        out[key if fixed else f"test_{key}"] = float(value)
    for key in VARIANT_METRICS:
        if getattr(variant, key, None) is not None:
            out.setdefault(key, float(getattr(variant, key)))
    return out


class ChildRuns(BaseModel):
    """Where a unit logs its child run: the store, the experiment and the pipeline's parent run.

    Passed to each unit (a thread, a Dask worker, or a flow run on a work pool, which gets the URI
    without its password: see :func:`tasks.steps.tracked`), so the child run of a variant is opened
    when its work starts and its training curves are logged while it trains.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def dataset_input(source: str, fingerprint: str, context: str) -> DatasetInput:
    """The data as an MLflow dataset input: named after its source, its content fingerprint as digest
    (no data uploaded); ``context`` (``training``, ``evaluation``) becomes the input's context tag."""
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a path is a local source
            warnings.simplefilter("ignore")
            where = resolve_dataset_source(source)
    except Exception:  # noqa: BLE001 - builtin:NAME and the like: named, not resolvable
        where = CodeDatasetSource(tags={"lsq.data.source": source})
    entity = MetaDataset(where, name=source[-500:], digest=fingerprint[:36])._to_mlflow_entity()
    return DatasetInput(dataset=entity, tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)])


def _child_of(client, experiment_id: str, parent_run_id: str, label: str):
    found = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' AND tags.`lsq.variant` = '{_quote(label)}'",
        max_results=1, order_by=["attributes.start_time ASC"])
    return found[0] if found else None


def open_variant_run(uri: str, experiment_id: str, parent_run_id: str, label: str, tags: Mapping[str, str],
                     dataset: DatasetInput | None = None) -> str:
    """The child run of variant ``label`` under ``parent_run_id``, RUNNING from now: found or created.

    Called when the variant's work starts (:func:`tasks.steps.tracked`), so the run's duration is that
    work's. Idempotent: a retry of the unit, or a unit run again on another worker, reopens the run it
    left (FAILED or KILLED) instead of creating a second one; a FINISHED one is left as it is.
    """
    client = client_for(uri)
    run = retry(_child_of, client, experiment_id, parent_run_id, label)
    if run is None:
        run_id = retry(client.create_run, experiment_id, run_name=label, tags={
            "mlflow.parentRunId": parent_run_id, "lsq.variant": label, **{k: _tag(v) for k, v in tags.items()}}
        ).info.run_id
    else:
        run_id = run.info.run_id
        if run.info.status not in ("RUNNING", "FINISHED"):
            retry(client.update_run, run_id, "RUNNING")
    if dataset is not None:
        retry(client.log_inputs, run_id, [dataset])
    return run_id


def variant_logger(uri: str, run_id: str) -> Callable[[Mapping[str, float], int], None]:
    """``log(metrics, step)`` for :func:`lsq.train.train`: each call one batch of points on ``run_id``
    (loss, learning_rate, grad_norm, eval_* at every logging step: MLflow draws them as curves). A point
    that cannot be logged is a warning, not a failed training."""
    client = client_for(uri)

    def log_metrics(metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        try:
            if points:
                client.log_batch(run_id, metrics=points)
        except Exception as exc:  # noqa: BLE001 - a lost point of a curve is not a failed training
            log.warning("metrics at step %d not logged to run %s: %s", step, run_id, exc)

    return log_metrics


def close_variant_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """End the child run ``run_id`` when its unit's work ends."""
    if status not in RUN_STATUSES:
        raise ValueError(f"status: {status!r} is not one of {', '.join(RUN_STATUSES)}")
    retry(client_for(uri).set_terminated, run_id, status)


def log_variant_run(uri: str, experiment_id: str, parent_run_id: str, variant: Variant,
                    params: Mapping[str, Any], metrics: Mapping[str, Any],
                    dataset: DatasetInput | None = None) -> str:
    """Params, metrics (see :func:`variant_run_metrics`) and artifacts of a variant on its child run.

    The child run is the one its unit opened (:func:`open_variant_run`, with the training curves), or,
    when no unit ran for it (its result was kept from an earlier run), one created here. Artifacts:
    the adapter folder unchanged under ``adapter/``, ``squeeze_report.json`` and ``spectrum.png`` when
    the variant has them. The run ends FINISHED if still RUNNING (a run its unit ended keeps its end
    time). Done once: a retry returns the run already logged (tag ``lsq.logged``); a failure marks a
    run created here FAILED.
    """
    client = client_for(uri)
    found = retry(_child_of, client, experiment_id, parent_run_id, variant.label)
    if found is not None and found.data.tags.get(LOGGED_TAG) == "1":
        return found.info.run_id
    adapter = Path(variant.adapter_dir) if variant.method != "base" else None  # base: the model without adapter
    if adapter is not None and not adapter.is_dir():
        raise FileNotFoundError(f"variant {variant.label}: adapter folder {adapter} does not exist")
    tags = {"lsq.method": variant.method, "lsq.rank": str(variant.rank), "lsq.source_rank": str(variant.source_rank)}
    tags.update({f"lsq.{k}": v for k in ("worker", "device") if (v := getattr(variant, k, None))})
    created = found is None
    run_id = open_variant_run(uri, experiment_id, parent_run_id, variant.label, tags, dataset) if created \
        else found.info.run_id
    try:
        defaults = {"method": variant.method, "rank": variant.rank, "source_rank": variant.source_rank,
                    "steps": variant.steps, "learning_rate": variant.lr}
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in variant_run_metrics(variant, metrics).items()],
            params=_params({**defaults, **params}), tags=[RunTag(k, _tag(v)) for k, v in tags.items()],
        )
        if dataset is not None and not created:
            client.log_inputs(run_id, [dataset])
        if adapter is not None:
            client.log_artifacts(run_id, str(adapter), "adapter")
        for extra in (variant.report, variant.plot):
            if extra and Path(extra).is_file():
                client.log_artifact(run_id, extra)
        client.set_tag(run_id, LOGGED_TAG, "1")
    except BaseException:
        if created:
            client.set_terminated(run_id, "FAILED")
        raise
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, "FINISHED")
    return run_id


def log_study_record(uri: str, experiment_id: str, parent_run_id: str, record: Mapping[str, Any]) -> str:
    """One child run per study record (lsq/study.py): its settings as params, its numbers as metrics.

    Run name and tag ``lsq.study_key`` are the record's key; logging the same record under the same
    parent again returns the run that exists (a resumed study logs each job once).
    """
    client = client_for(uri)
    key = record["key"]
    found = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' AND tags.`lsq.study_key` = '{_quote(key)}'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    tags = {"mlflow.parentRunId": parent_run_id, "lsq.study_key": key, "lsq.method": str(record["method"]),
            "lsq.rank": str(record["rank"]), "lsq.task": str(record["task"])}
    run_id = client.create_run(experiment_id, run_name=key, tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in record.items()
               if k not in STUDY_PARAMS and isinstance(v, (int, float)) and not isinstance(v, bool)]
    client.log_batch(run_id, metrics=metrics, params=_params({k: record[k] for k in STUDY_PARAMS if record.get(k) is not None}))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def log_folder(uri: str, run_id: str, folder: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Every file of ``folder`` as artifacts of ``run_id`` (under ``artifact_path``)."""
    client_for(uri).log_artifacts(run_id, str(folder), artifact_path)
