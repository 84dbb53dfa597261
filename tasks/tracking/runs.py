"""Runs: the parent run of a pipeline (with who runs it and a heartbeat), one child run per variant or
study record, and the closing of parents whose pipeline died without ending them.

A parent run carries ``lsq.host``, ``lsq.pid``, ``lsq.pid_started`` (the process's start time, so a
reused pid is told apart), ``lsq.pid_ns`` (its pid namespace, so two containers sharing a host name are
told apart) and ``lsq.heartbeat`` (unix seconds, refreshed by :func:`heartbeat`). A ``kill -9``
leaves such a run RUNNING; :func:`close_stale_runs`, called by the next pipeline, ends it as KILLED.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import DatasetInput, InputTag, Metric, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from pydantic import BaseModel, ConfigDict

from lsq.variants import Variant
from tasks.tracking.store import _params, _quote, _tag, client_for, ensure_experiment, retry

log = logging.getLogger(__name__)

SIZE_METRICS = ("trainable_params", "lora_params", "adapter_bytes")
VARIANT_METRICS = ("retained_energy", "relative_error", "train_seconds")
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
STUDY_PARAMS = ("task", "method", "rank", "seed", "lr", "steps", "budget", "fraction")
STALE_AFTER_S = 900.0
HOST_TAG, PID_TAG, STARTED_TAG, NS_TAG = "lsq.host", "lsq.pid", "lsq.pid_started", "lsq.pid_ns"
HEARTBEAT_TAG, CLOSED_BY_TAG, CLOSED_REASON_TAG = "lsq.heartbeat", "lsq.closed_by", "lsq.closed_reason"
KIND_TAG = "mlflow.experimentKind"
SHARED_VIEW_PREFIX, VIEW_KEY = "mlflow.sharedViewState.", "lsq"  # the runs view the pipeline's URL opens
NOTE_TAG, TABLE_FILE = "mlflow.note.content", "variants_table.json"
LOGGED_TAG = "lsq.logged"  # a child run whose params, metrics and artifacts are all logged


# ----------------------------------------------------------------------------------- parent runs
def start_pipeline_run(uri: str, experiment: str, run_name: str, params: Mapping[str, Any],
                       tags: Mapping[str, Any]) -> str:
    """Create the parent run of one pipeline run (left RUNNING) and return its id.

    Besides ``tags`` it carries this process's identity and a first heartbeat (see the module doc).
    """
    client = client_for(uri)
    experiment_id = ensure_experiment(uri, experiment)
    if KIND_TAG not in client.get_experiment(experiment_id).tags:  # the UI then opens on runs, not GenAI traces
        retry(client.set_experiment_tag, experiment_id, KIND_TAG, "custom_model_development")
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={**{k: _tag(v) for k, v in tags.items()}, **process_tags()})
    client.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def heartbeat(uri: str, run_id: str) -> None:
    """Refresh the ``lsq.heartbeat`` tag of ``run_id`` to now (unix seconds)."""
    retry(client_for(uri).set_tag, run_id, HEARTBEAT_TAG, str(int(time.time())))


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """End ``run_id`` (the parent run) as FINISHED, FAILED or KILLED; child runs still RUNNING (a unit
    whose worker was lost) end with the same status."""
    if status not in RUN_STATUSES:
        raise ValueError(f"status: {status!r} is not one of {', '.join(RUN_STATUSES)}")
    client = client_for(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    for child in _all_runs(client, experiment_id,
                           f"tags.mlflow.parentRunId = '{run_id}' AND attributes.status = 'RUNNING'"):
        retry(client.set_terminated, child.info.run_id, "KILLED" if status == "FINISHED" else status)
    client.set_terminated(run_id, status)


def describe_pipeline_run(uri: str, run_id: str, note: str, metrics: Mapping[str, float],
                          table: Sequence[Mapping[str, Any]], table_file: str = TABLE_FILE) -> None:
    """Make the parent run the comparison page: ``note`` as its description (``mlflow.note.content``,
    markdown, shown on the run page and in the runs table), summary ``metrics``, and one row per
    variant as an MLflow table (``table_file``, shown in the run's artifacts and the evaluation view).
    The table is written once: ``log_table`` appends to an existing file."""
    client = client_for(uri)
    now = int(time.time() * 1000)
    retry(client.log_batch, run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None],
          tags=[RunTag(NOTE_TAG, note)])
    folder, _, _ = table_file.rpartition("/")
    if table and table_file not in {f.path for f in client.list_artifacts(run_id, folder or None)}:
        client.log_table(run_id, {k: [row.get(k) for row in table] for k in table[0]}, table_file)


def share_runs_view(uri: str, experiment_id: str, metrics: Sequence[str], params: Sequence[str] = ("method", "rank"),
                    curves: Sequence[str] = ("loss", "learning_rate", "grad_norm"), key: str = VIEW_KEY) -> None:
    """A view of the experiment's runs that the MLflow UI opens with ``?viewStateShareKey=<key>``.

    MLflow 3.17's UI keeps its view state in the browser; a shared view is the one part of it stored
    on the server (experiment tag ``mlflow.sharedViewState.<key>``, JSON of the UI state). By default
    the table shows each pipeline run as one collapsed parent with no metric columns, and the charts
    draw only the first 10 runs (``runsHiddenMode`` FIRST_10_RUNS and ``runsCountToCompare`` 10 per
    chart): with the parent taking a row, the 10th variant of a demo run (the source, created first)
    was hidden. This view groups the runs by their parent (every variant a row, each pipeline run a
    group), shows ``metrics`` and ``params`` as columns, shows every run, and opens the charts on a
    section comparing the variants (rank, size and the first metric on parallel axes, size against
    that metric, one bar chart per metric) and one of their training ``curves``. (The UI's state format is not a documented API;
    ``docs/screenshots.py`` checks this view in a browser.)
    """
    m = metrics[0]
    base = {"runsCountToCompare": 100, "metricSectionId": "lsq-variants", "deleted": False, "isGenerated": False}
    charts = [
        {**base, "uuid": "lsq-parallel", "type": "PARALLEL", "selectedParams": list(params),
         "selectedMetrics": ["adapter_bytes", *metrics[:2]], "showAllRuns": True},
        {**base, "uuid": "lsq-size", "type": "SCATTER", "xaxis": {"key": "adapter_bytes", "type": "METRIC"},
         "yaxis": {"key": m, "type": "METRIC"}},
        *({**base, "uuid": f"lsq-bar-{k}", "type": "BAR", "metricKey": k, "displayName": k} for k in metrics),
        *({**base, "metricSectionId": "lsq-training", "uuid": f"lsq-line-{k}", "type": "LINE", "metricKey": k,
           "displayName": k, "xAxisKey": "step", "lineSmoothness": 0, "xAxisScaleType": "linear",
           "scaleType": "linear"} for k in curves),
    ]
    state = {
        "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "mlflow.parentRunId"}]},
        "useGroupedValuesInCharts": False, "runsHiddenMode": "SHOW_ALL",
        "selectedColumns": [*(f"metrics.`{k}`" for k in metrics), *(f"params.`{k}`" for k in params)],
        "compareRunCharts": charts,
        "compareRunSections": [{"uuid": "lsq-variants", "name": "Compare variants", "display": True, "isReordered": False},
                               {"uuid": "lsq-training", "name": "Training curves", "display": True, "isReordered": False}],
    }
    retry(client_for(uri).set_experiment_tag, experiment_id, f"{SHARED_VIEW_PREFIX}{key}", json.dumps(state))


def close_stale_runs(uri: str, experiment_id: str, tags: Mapping[str, str], stale_after_s: float = STALE_AFTER_S,
                     exclude: str | None = None) -> list[str]:
    """End as KILLED the RUNNING parent runs of ``experiment_id`` carrying ``tags`` whose pipeline is gone.

    A run is gone when it was started on this host (same host name and pid namespace) and its process
    is not alive, or is alive with another start time (the pid was reused); a run started elsewhere
    (or without a recorded pid) is gone when its heartbeat (else its start) is older than
    ``stale_after_s``. A live process on this host is never closed, whatever its heartbeat says:
    its own process still ends it. ``exclude`` (the caller's own run) is never closed; it is recorded
    as ``lsq.closed_by`` on every run closed (with ``lsq.closed_reason``). RUNNING child runs of a
    closed parent end as KILLED too. Returns the ids of the parents closed.
    """
    client = client_for(uri)
    query = " AND ".join(["attributes.status = 'RUNNING'",
                          *(f"tags.`{k}` = '{_quote(str(v))}'" for k, v in tags.items())])
    closer = exclude or f"{socket.gethostname()}:{os.getpid()}"
    closed = []
    for run in _all_runs(client, experiment_id, query):
        if run.info.run_id == exclude or "mlflow.parentRunId" in run.data.tags:
            continue
        reason = stale_reason(run.data.tags, run.info.start_time, stale_after_s)
        if reason is None:
            continue
        for child in _all_runs(client, experiment_id,
                               f"tags.mlflow.parentRunId = '{run.info.run_id}' AND attributes.status = 'RUNNING'"):
            _kill(client, child.info.run_id, closer, f"parent {run.info.run_id}: {reason}")
        if client.get_run(run.info.run_id).info.status == "RUNNING":  # not ended meanwhile by its own process
            _kill(client, run.info.run_id, closer, reason)
            closed.append(run.info.run_id)
            log.warning("closed stale run %s (%s) as KILLED", run.info.run_id, reason)
    return closed


def stale_reason(tags: Mapping[str, str], start_time_ms: int | None, stale_after_s: float = STALE_AFTER_S,
                 now: float | None = None) -> str | None:
    """Why the run with ``tags`` has no live pipeline behind it, or None while it may have one."""
    pid = tags.get(PID_TAG, "")
    if tags.get(HOST_TAG) == socket.gethostname() and pid.isdigit() and _same_pid_namespace(tags.get(NS_TAG)):
        if not pid_alive(int(pid)):
            return f"process {pid} on {tags[HOST_TAG]} is gone"
        started, now_started = tags.get(STARTED_TAG), process_start(int(pid))
        if started and now_started and started.split(":", 1)[0] == now_started.split(":", 1)[0] \
                and started != now_started:
            return f"process {pid} on {tags[HOST_TAG]} is gone (its pid now belongs to another process)"
        return None
    beat = tags.get(HEARTBEAT_TAG)
    try:
        last = float(beat) if beat else (start_time_ms or 0) / 1000
    except ValueError:
        last = (start_time_ms or 0) / 1000
    age = (time.time() if now is None else now) - last
    if age > stale_after_s:
        where = f" on {tags[HOST_TAG]}" if tags.get(HOST_TAG) else ""
        return f"no heartbeat{where} for {age:.0f} s (over {stale_after_s:g} s)"
    return None


def process_tags(pid: int | None = None) -> dict[str, str]:
    """``lsq.host``, ``lsq.pid``, ``lsq.pid_started``, ``lsq.pid_ns`` of ``pid`` (this process) and a heartbeat now."""
    pid = os.getpid() if pid is None else pid
    out = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), HEARTBEAT_TAG: str(int(time.time()))}
    started, namespace = process_start(pid), _pid_namespace()
    if started:
        out[STARTED_TAG] = started
    if namespace:
        out[NS_TAG] = namespace
    return out


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, as an opaque string (None when unknown or gone).

    ``proc:<boot id>:<clock ticks since boot>`` from ``/proc``; else ``psutil:<create time>`` when
    psutil is installed. Equal for one process, different for a later process with the same pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = stat.rpartition(")")[2].split()[19]  # field 22, counted after "pid (comm)"
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip() if Path(
            "/proc/sys/kernel/random/boot_id").is_file() else ""
        return f"proc:{boot}:{ticks}"
    except (OSError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    try:
        return f"psutil:{psutil.Process(pid).create_time():.3f}"
    except psutil.Error:
        return None


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists on this host and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _same_pid_namespace(recorded: str | None) -> bool:
    ours = _pid_namespace()
    return not recorded or not ours or recorded == ours


def _kill(client, run_id: str, closer: str, reason: str) -> None:
    retry(client.set_tag, run_id, CLOSED_BY_TAG, closer)
    retry(client.set_tag, run_id, CLOSED_REASON_TAG, _tag(reason))
    retry(client.set_terminated, run_id, "KILLED")


def _all_runs(client, experiment_id: str, query: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


# ------------------------------------------------------------------------------------ child runs
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
