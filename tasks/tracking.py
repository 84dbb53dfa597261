"""MLflow adapter of the pipeline: runs, artifacts, registry, aliases, the Pareto plot.

Every function takes the tracking URI and the run ids it works on: MLflow's active run is
thread-local and Prefect runs tasks in worker threads, so nothing here reads or changes the caller's
active run. The one fluent call (``Model.log`` for the pyfunc model) gets the run id explicitly and
runs under a lock with the tracking URI set for its duration.

Layout in MLflow: one parent run per pipeline run; one child run per adapter variant (params,
``test_*`` metrics, size metrics, ``adapter/`` folder unchanged, squeeze report and spectrum plot);
one registered model version per variant (a models-from-code pyfunc, ``tasks/pyfunc_model.py``,
tagged ``lsq.*``); promotion with aliases (``champion``/``challenger``), never stages. Registry
writes retry on transient database errors ("database is locked").
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from lsq.report import PLOT_LOCK
from lsq.models import ModelConfig
from lsq.pipeline_config import Tracking
from lsq.variants import Decision, Variant, pareto_front

log = logging.getLogger(__name__)
T = TypeVar("T")

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
RETRY_DELAYS: tuple[float, ...] = (0.5, 2.0)  # 3 tries; tests shorten it
SIZE_METRICS = ("trainable_params", "lora_params", "adapter_bytes")
VARIANT_METRICS = ("retained_energy", "relative_error", "train_seconds")
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_MAX_TAG = 5000  # MLflow's limit on a tag value
# MLflow code that reads the process-global tracking URI (Model.log; the registry resolving a
# models:/m-... source) runs inside _tracking_uri(uri); model logging is also serialised.
_LOG_LOCK = threading.Lock()
_URI_CHANGE = threading.Condition()
_uri_users, _uri_active, _uri_previous = 0, None, None


# ---------------------------------------------------------------------------------------- store
def default_tracking_uri(tracking: Tracking, root: Path | None = None) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlruns/mlflow.db``.

    The default store keeps artifacts in ``<root>/mlruns/artifacts`` (set per experiment by
    :func:`ensure_experiment`). ``root`` defaults to the current directory.
    """
    if tracking.tracking_uri:
        return tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = (root if root is not None else Path.cwd()).resolve() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def artifact_root(uri: str) -> Path | None:
    """``<folder of the database>/artifacts`` for a sqlite URI; None for other stores (server-side default)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = unquote(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if not db or db == ":memory:":
        return None
    return Path(db).resolve().parent / "artifacts"


def client_for(uri: str) -> mlflow.MlflowClient:
    """A client whose tracking and registry stores are both ``uri`` (never the process-global ones)."""
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing (artifacts beside a sqlite database)."""
    client = client_for(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise MlflowException(f"experiment {name!r} is deleted; restore it or pick another tracking.experiment")
        return found.experiment_id
    root = artifact_root(uri)
    location = (root / _slug(name)).as_uri() if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:  # created meanwhile by a concurrent pipeline
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


# ----------------------------------------------------------------------------------------- runs
def start_pipeline_run(uri: str, experiment: str, run_name: str, params: Mapping[str, Any],
                       tags: Mapping[str, Any]) -> str:
    """Create the parent run of one pipeline run (left RUNNING) and return its id."""
    client = client_for(uri)
    run = client.create_run(ensure_experiment(uri, experiment), run_name=run_name,
                            tags={k: _tag(v) for k, v in tags.items()})
    client.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def variant_run_metrics(variant: Variant, metrics: Mapping[str, Any]) -> dict[str, float]:
    """The fixed metric names of a variant run: ``test_<metric>``, sizes, squeeze numbers, train seconds.

    ``metrics`` is an evaluation (``accuracy``, ``macro_f1``, sizes, ...) or already prefixed; strings and
    None are dropped. The variant's own numbers (when set) fill what ``metrics`` lacks.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        fixed = key in SIZE_METRICS or key in VARIANT_METRICS or key.startswith("test_")
        out[key if fixed else f"test_{key}"] = float(value)
    for key in VARIANT_METRICS:
        if getattr(variant, key, None) is not None:
            out.setdefault(key, float(getattr(variant, key)))
    return out


def log_variant_run(uri: str, experiment_id: str, parent_run_id: str, variant: Variant,
                    params: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """One child run per variant: params, metrics (see :func:`variant_run_metrics`), artifacts; ends FINISHED.

    Artifacts: the adapter folder unchanged under ``adapter/``, ``squeeze_report.json`` and
    ``spectrum.png`` when the variant has them. A retry with the same parent and variant returns the
    run that already finished; a failure marks the new run FAILED.
    """
    client = client_for(uri)
    done = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' AND tags.`lsq.variant` = '{variant.label}' "
        "AND attributes.status = 'FINISHED'",
        max_results=1,
    )
    if done:
        return done[0].info.run_id
    adapter = Path(variant.adapter_dir)
    if not adapter.is_dir():
        raise FileNotFoundError(f"variant {variant.label}: adapter folder {adapter} does not exist")
    tags = {"mlflow.parentRunId": parent_run_id, "lsq.variant": variant.label, "lsq.method": variant.method,
            "lsq.rank": str(variant.rank), "lsq.source_rank": str(variant.source_rank)}
    run_id = client.create_run(experiment_id, run_name=variant.label, tags=tags).info.run_id
    try:
        defaults = {"method": variant.method, "rank": variant.rank, "source_rank": variant.source_rank,
                    "steps": variant.steps, "learning_rate": variant.lr}
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in variant_run_metrics(variant, metrics).items()],
            params=_params({**defaults, **params}),
        )
        client.log_artifacts(run_id, str(adapter), "adapter")
        for extra in (variant.report, variant.plot):
            if extra and Path(extra).is_file():
                client.log_artifact(run_id, extra)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


STUDY_PARAMS = ("task", "method", "rank", "seed", "lr", "steps")


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
    client.log_batch(run_id, metrics=metrics, params=_params({k: record[k] for k in STUDY_PARAMS if k in record}))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """End ``run_id`` (the parent run) as FINISHED, FAILED or KILLED."""
    if status not in RUN_STATUSES:
        raise ValueError(f"status: {status!r} is not one of {', '.join(RUN_STATUSES)}")
    client_for(uri).set_terminated(run_id, status)


# ------------------------------------------------------------------------------------- registry
def register_variant(uri: str, model_name: str, run_id: str, variant: Variant, model_cfg: ModelConfig,
                     extra_tags: Mapping[str, Any] | None = None, label_names: Sequence[str] | None = None) -> str:
    """Log ``variant`` as a pyfunc model in ``run_id``, register it under ``model_name``; the version number.

    Version tags: ``lsq.method``, ``lsq.rank``, ``lsq.source_rank``, ``lsq.run_id`` and ``extra_tags``.
    ``label_names`` (classification) name the predicted classes; without them they are ``"0".."n-1"``,
    n read from the adapter's saved head. Idempotent per run: an existing version of ``run_id`` is
    returned (its tags re-applied). The same adapter (tag ``lsq.adapter_sha256``, a digest of its
    files) scored on the same data (``lsq.dataset_fingerprint`` in ``extra_tags``) is not registered
    twice: a re-run of a cached pipeline gets the version it registered before, tagged
    ``lsq.last_run_id``. A failure after the version exists deletes it again.
    """
    client = client_for(uri)
    tags = {"lsq.method": variant.method, "lsq.rank": str(variant.rank),
            "lsq.source_rank": str(variant.source_rank), "lsq.run_id": run_id,
            "lsq.adapter_sha256": adapter_digest(variant.adapter_dir),
            **{k: _tag(v) for k, v in (extra_tags or {}).items()}}
    existing = _retry(_version_of_run, client, model_name, run_id)
    if existing is not None:
        _set_version_tags(client, model_name, existing, tags)
        return existing
    data = tags.get("lsq.dataset_fingerprint")  # without it, "the same scores" cannot be told: register anew
    same = None if data is None else _retry(_version_of_adapter, client, model_name, tags["lsq.adapter_sha256"], data)
    if same is not None:
        _retry(client.set_model_version_tag, model_name, same, "lsq.last_run_id", run_id)
        return same
    info = log_pyfunc(uri, run_id, variant, model_cfg, label_names)
    _retry(_ensure_registered_model, client, model_name)
    created = _retry(_create_version, client, model_name, run_id, info.model_uri, info.model_id)
    try:
        _set_version_tags(client, model_name, created, tags)
    except BaseException:
        log.warning("registering %s for run %s failed after version %s was created; deleting it",
                    model_name, run_id, created)
        try:
            _retry(client.delete_model_version, model_name, created)
        except Exception:  # keep the original error; the next call re-tags the version it finds
            log.exception("could not delete half-registered version %s of %s", created, model_name)
        raise
    return created


def log_pyfunc(uri: str, run_id: str, variant: Variant, model_cfg: ModelConfig,
               label_names: Sequence[str] | None = None, max_length: int = 256):
    """Log the adapter of ``variant`` as a models-from-code pyfunc in ``run_id``; MLflow's ``ModelInfo``.

    The caller's active run (if any, in this thread) is neither used nor changed.
    """
    from mlflow.models import Model

    client = client_for(uri)
    run = client.get_run(run_id)
    if model_cfg.task == "classification" and not label_names:
        label_names = [str(i) for i in range(_num_labels(Path(variant.adapter_dir)))]
    config = {  # MLflow also logs these as run params (model/name, model/task, ..., label_names)
        "model": {**model_cfg.model_dump(mode="json"), "device": "auto"},
        "label_names": list(label_names or []), "max_length": max_length, "max_new_tokens": 16,
    }
    # Our own LoggedModel, in the run's experiment: Model.log would take the experiment of the
    # caller's active run, if there is one.
    logged = client.create_logged_model(run.info.experiment_id, name=_slug(variant.label), source_run_id=run_id,
                                        tags={"lsq.variant": variant.label})
    with _LOG_LOCK, _tracking_uri(uri):
        return Model.log(
            artifact_path=None, name=_slug(variant.label), flavor=mlflow.pyfunc, run_id=run_id,
            model_id=logged.model_id, python_model=str(PYFUNC_CODE),
            artifacts={"adapter": str(variant.adapter_dir)}, model_config=config,
            pip_requirements=_requirements(),  # explicit: inference would load the model in a subprocess
        )


def champion(uri: str, model_name: str, alias: str = "champion", dst_path: str | None = None) -> dict[str, Any] | None:
    """The version behind ``alias`` (version, run_id, adapter_path, tags, metrics), or None if unset.

    ``adapter_path`` is a local copy of the run's ``adapter/`` folder (``dst_path`` or a temp folder).
    """
    client = client_for(uri)
    try:
        mv = client.get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        # no such model: RESOURCE_DOES_NOT_EXIST; no such alias: INVALID_PARAMETER_VALUE "... not found"
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower():
            return None
        raise
    path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="adapter", dst_path=dst_path,
                                               tracking_uri=uri)
    return {"version": str(mv.version), "run_id": mv.run_id, "adapter_path": path, "tags": dict(mv.tags),
            "metrics": dict(client.get_run(mv.run_id).data.metrics), "source": mv.source}


def set_alias(uri: str, model_name: str, version: str, alias: str, decision: Decision) -> None:
    """Point ``alias`` at ``version`` and record why (version tags ``lsq.decision``, ``lsq.reason``)."""
    client = client_for(uri)
    _set_version_tags(client, model_name, str(version), {"lsq.decision": decision.alias, "lsq.reason": decision.reason,
                                                         "lsq.winner": decision.winner})
    _retry(client.set_registered_model_alias, model_name, alias, str(version))


# ---------------------------------------------------------------------------------------- report
def log_pareto(uri: str, parent_run_id: str, rows: Sequence[Mapping[str, Any]], metric_name: str,
               greater_is_better: bool = True) -> list[str]:
    """Plot ``metric`` against ``adapter_bytes`` for every row, Pareto front highlighted; log plot and table.

    Artifacts of ``parent_run_id``: ``pareto/pareto.png``, ``pareto/variants.json``, ``pareto/variants.csv``.
    Rows need ``label``, ``method``, ``rank``, ``adapter_bytes``, ``metric``. Returns the front's labels.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state

    scored = [r for r in rows if r.get("metric") is not None]
    front = pareto_front([(r["label"], int(r["adapter_bytes"]), float(r["metric"])) for r in scored], greater_is_better)
    table = [{"label": r["label"], "method": r["method"], "rank": int(r["rank"]), "adapter_bytes": int(r["adapter_bytes"]),
              metric_name: None if r.get("metric") is None else float(r["metric"]), "on_front": r["label"] in front}
             for r in rows]
    client = client_for(uri)
    with PLOT_LOCK:  # matplotlib text layout is not thread-safe (shared with lsq.report)
        fig = Figure(figsize=(6.4, 4.4))
        ax = fig.subplots()
        for on in (False, True):
            pts = [r for r in scored if (r["label"] in front) == on]
            ax.scatter([r["adapter_bytes"] for r in pts], [r["metric"] for r in pts], s=60 if on else 30,
                       c="tab:red" if on else "tab:gray", label="Pareto front" if on else "dominated", zorder=3)
            for r in pts:
                ax.annotate(r["label"], (r["adapter_bytes"], r["metric"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        line = sorted((r for r in scored if r["label"] in front), key=lambda r: r["adapter_bytes"])
        ax.plot([r["adapter_bytes"] for r in line], [r["metric"] for r in line], c="tab:red", lw=1, zorder=2)
        if scored and max(r["adapter_bytes"] for r in scored) > 10 * min(max(r["adapter_bytes"], 1) for r in scored):
            ax.set_xscale("log")
        ax.set(xlabel="adapter size (bytes)", ylabel=metric_name, title=f"{metric_name} vs adapter size")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        client.log_figure(parent_run_id, fig, "pareto/pareto.png")
    client.log_dict(parent_run_id, {"metric": metric_name, "greater_is_better": greater_is_better,
                                    "front": front, "variants": table}, "pareto/variants.json")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]) if table else ["label"])
    writer.writeheader()
    writer.writerows(table)
    client.log_text(parent_run_id, buf.getvalue(), "pareto/variants.csv")
    return front


# -------------------------------------------------------------------------------------- helpers
def _retry(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args)``, tried again after a transient database error (len(RETRY_DELAYS) + 1 tries, jittered)."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if delay is None or not _transient(exc):
                raise
            log.warning("%s: transient error (%s); retrying in %.1f s", getattr(fn, "__name__", fn), exc, delay)
            time.sleep(delay * (1 + 0.5 * random.random()))
    raise AssertionError("unreachable")


def _transient(exc: BaseException | None) -> bool:
    while exc is not None:
        text = str(exc).lower()
        if isinstance(exc, MlflowException) and exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        if isinstance(exc, (MlflowException, sqlite3.OperationalError)) and ("database is locked" in text or "busy" in text):
            return True
        if type(exc).__name__ == "OperationalError" and "locked" in text:  # sqlalchemy's wrapper
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _version_of_run(client: mlflow.MlflowClient, model_name: str, run_id: str) -> str | None:
    found = client.search_model_versions(f"name = '{_quote(model_name)}' AND run_id = '{run_id}'")
    return str(min(int(v.version) for v in found)) if found else None


def adapter_digest(folder: str | os.PathLike) -> str:
    """sha256 over an adapter folder's config and weights: equal for the same adapter, bit for bit."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = Path(folder) / name
        if path.is_file():
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _version_of_adapter(client: mlflow.MlflowClient, model_name: str, digest: str, data: str) -> str | None:
    query = (f"name = '{_quote(model_name)}' AND tags.`lsq.adapter_sha256` = '{digest}' "
             f"AND tags.`lsq.dataset_fingerprint` = '{_quote(data)}'")
    found = client.search_model_versions(query)
    return str(min(int(v.version) for v in found)) if found else None


def _ensure_registered_model(client: mlflow.MlflowClient, model_name: str) -> None:
    try:
        client.create_registered_model(model_name, description="LoRA adapters from the lsq pipeline (pyfunc)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _create_version(client: mlflow.MlflowClient, model_name: str, run_id: str, source: str, model_id: str) -> str:
    """Find-or-create, so that a retry after a commit that reported an error does not duplicate."""
    existing = _version_of_run(client, model_name, run_id)
    if existing is not None:
        return existing
    with _tracking_uri(client.tracking_uri):  # the sqlite registry resolves models:/m-... with MlflowClient()
        return str(client.create_model_version(model_name, source, run_id=run_id, model_id=model_id).version)


def _set_version_tags(client: mlflow.MlflowClient, model_name: str, version: str, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        _retry(client.set_model_version_tag, model_name, version, key, value)


@contextmanager
def _tracking_uri(uri: str):
    """Set the process-global tracking URI while MLflow code that reads it runs; put the previous one back.

    Callers with the same URI share it (they may overlap in threads); a caller with another URI waits.
    """
    global _uri_users, _uri_active, _uri_previous
    with _URI_CHANGE:
        while _uri_users and _uri_active != uri:
            _URI_CHANGE.wait()
        if not _uri_users:
            _uri_previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
            mlflow.set_tracking_uri(uri)
            _uri_active = uri
        _uri_users += 1
    try:
        yield
    finally:
        with _URI_CHANGE:
            _uri_users -= 1
            if not _uri_users:
                mlflow.set_tracking_uri(_uri_previous)
                _uri_active = None
                _URI_CHANGE.notify_all()


def _num_labels(adapter: Path) -> int:
    """Rows of the saved classification head (``classifier``/``score`` weight) of a PEFT adapter."""
    from safetensors import safe_open

    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                if re.search(r"(classifier|score)(\.modules_to_save)?(\.out_proj)?\.weight$", key):
                    return int(f.get_slice(key).get_shape()[0])
    raise ValueError(f"{adapter}: no saved classification head; pass label_names to register_variant")


def _requirements() -> list[str]:
    reqs = []
    for name in ("mlflow", "torch", "transformers", "peft", "safetensors", "pydantic", "pandas"):
        try:
            reqs.append(f"{name}=={package_version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def _params(params: Mapping[str, Any]) -> list[Param]:
    return [Param(k, _tag(v)[:6000]) for k, v in params.items() if v is not None]


def _tag(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text[:_MAX_TAG]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "lsq"


def _quote(text: str) -> str:
    return text.replace("'", "\\'")

