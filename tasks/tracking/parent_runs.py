"""The parent run of a pipeline (or a study): started with who runs it, kept beating while it works, ended
with its outcome, and made the page that compares its variants.

A parent run carries this process's identity and a heartbeat (:func:`.stale_runs.process_tags`), so that
the next pipeline can close it if its process dies without ending it (:func:`.stale_runs.close_stale_runs`).
:func:`parent_run` is the one way a flow holds it: heartbeat while the body runs, then FINISHED, FAILED
or KILLED by how the body ended.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from mlflow.entities import Metric, RunTag

from tasks.tracking.child_runs import RUN_STATUSES
from tasks.tracking.stale_runs import HEARTBEAT_TAG, process_tags
from tasks.tracking.store import _params, _tag, all_runs, client_for, ensure_experiment, retry

log = logging.getLogger(__name__)

__all__ = ["describe_pipeline_run", "finish_run", "heartbeat", "parent_run", "share_runs_view", "start_pipeline_run"]

HEARTBEAT_SECONDS = 60.0
KIND_TAG = "mlflow.experimentKind"
SHARED_VIEW_PREFIX, VIEW_KEY = "mlflow.sharedViewState.", "lsq"  # the runs view the pipeline's URL opens
NOTE_TAG, TABLE_FILE = "mlflow.note.content", "variants_table.json"


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
    for child in all_runs(client, experiment_id,
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


@contextmanager
def parent_run(uri: str, run_id: str, heartbeat_every: float | None = HEARTBEAT_SECONDS,
               terminating: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """Hold the parent run ``run_id`` while the body runs; yields it.

    Its heartbeat is refreshed every ``heartbeat_every`` seconds (None: never; a missed beat is a
    warning, not a failed pipeline), and it ends when the body does: FINISHED when the body returns,
    KILLED when it was interrupted (KeyboardInterrupt, SystemExit, Prefect's ``TerminationSignal``:
    any BaseException that is not an Exception, or any error at all once ``terminating()`` is true,
    e.g. after SIGTERM), else FAILED. Its RUNNING child runs end with it (:func:`finish_run`).
    """
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_every):
            try:
                heartbeat(uri, run_id)
            except Exception as exc:  # noqa: BLE001 - a missed beat is not a failed pipeline
                log.warning("heartbeat of run %s failed: %s", run_id, exc)

    beating = None
    if heartbeat_every is not None:
        beating = threading.Thread(target=beat, name="lsq-heartbeat", daemon=True)
        beating.start()
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    except BaseException as exc:
        if terminating() or not isinstance(exc, Exception):
            status = "KILLED"
        raise
    finally:
        stop.set()
        if beating is not None:
            beating.join(timeout=5)
        finish_run(uri, run_id, status)
