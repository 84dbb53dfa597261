"""Thin Prefect tasks over :mod:`lsq.steps`: frozen configs and records in, a record out.

No maths and no caching logic here: each step keeps its finished result as a verified JSON record
(:mod:`lsq.workdir`, :mod:`lsq.storage`), so a re-run, a retry and a second run of the same config
reuse finished work, and different inputs never share a folder. Prefect therefore persists nothing
(``persist_result=False``, no cache policy): no result file, hence nothing on disk that Prefect would
unpickle. Compute tasks carry the ``lsq-compute`` tag, which a tag concurrency limit
(``deployments/setup.py``) holds to one run per device. Bad input (``LsqError``) is not retried.

A unit (one variant trained and scored, or one squeezed variant scored) runs either here, in a
thread or Dask worker of the pipeline's flow run (:func:`run_unit`), or as a flow run of the unit
deployment on a work pool (:func:`dispatch_unit`, team mode), whose workers own one device each.
Wherever it runs, the unit opens its variant's MLflow child run when it starts and logs its
training curves there through lsq's ``log(metrics, step)`` callback (:func:`tracked`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment

from lsq import steps
from lsq.data import DataConfig, load_data
from lsq.errors import LsqError
from lsq.pipeline_config import SCORED_SPLITS, PipelineConfig, prepared_data
from lsq.records import PreparedData, Squeezed, UnitResult, Variant
from lsq.steps import Log, Unit, code_version
from lsq.storage import Storage
from tasks import COMPUTE_TAG, tracking
from tasks.tracking import ChildRuns

__all__ = ["COMPUTE_TAG", "code_version", "dispatch_unit", "finished", "make_unit", "prepare_data", "run_unit",
           "squeeze_source", "storage_of", "tracked"]

_NO_RESULTS = {"cache_policy": NO_CACHE, "persist_result": False}


def finished(result: UnitResult) -> str:
    """One log line for a finished variant: its scores on every split asked for, its size, where it ran."""
    v, e = result.variant, result.evaluations[0]
    scores = " ".join(f"{x.metric(name)}={value:.4f}" for x in result.evaluations for name, value in x.scores.items())
    return (f"{v.label} finished: {scores}; {e.adapter_bytes:,} bytes ({e.lora_params:,} LoRA parameters); "
            f"{result.wall_seconds:.1f} s on {v.worker} ({v.device})")


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient failures, never an ``LsqError`` (same input, same error)."""
    try:
        state.result()
    except LsqError:
        return False
    except BaseException:
        return True
    return True


def storage_of(cfg: PipelineConfig) -> Storage:
    """Where this machine keeps and finds the results of ``cfg``'s units (:mod:`lsq.storage`)."""
    return Storage(cfg.storage.root, cfg.output_dir, cfg.storage.cache)


def make_unit(cfg: PipelineConfig, data_fingerprint: str, code: str, method: str | None = None, rank: int = 0,
              parent: Variant | None = None) -> Unit:
    """The unit that trains ``method`` at ``rank`` (from ``parent`` for cont) and scores it, or, with no
    method, the unit that scores ``parent`` as it is."""
    common = dict(model=cfg.model, data=cfg.data, splits=SCORED_SPLITS, eval_batch_size=cfg.train.eval_batch_size,
                  data_fingerprint=data_fingerprint, code=code, storage_root=cfg.storage.root,
                  output_dir=cfg.output_dir, cache=cfg.storage.cache)
    if method is None:
        return Unit(kind="evaluate", parent=parent, **common)
    adapter = parent.adapter_dir if parent is not None else None  # not part of the unit's name: its digest is
    return Unit(kind="train", train=cfg.step_config(method, rank, adapter), parent=parent, **common)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_bad_input, task_run_name="prepare data",
      **_NO_RESULTS)
def prepare_data(data: DataConfig) -> PreparedData:
    """Fetch, parse and split the data as it is now: its fingerprint, and what promotion and registration read
    of it (class names and shares, choices), so that they never load it again."""
    return prepared_data(load_data(data))


@contextmanager
def tracked(unit: Unit, runs: ChildRuns | None) -> Iterator[Log | None]:
    """The child run of ``unit``'s variant, open while the body works: yields the ``log(metrics, step)``
    callback that sends its training curves there (None without ``runs``).

    The run is found or created under ``runs.parent_run_id`` (a retry reopens it, never a second one),
    gets the data as a dataset input, and ends FINISHED, or FAILED when the body raises (KILLED when
    interrupted). A URI whose password was left out (a unit on another machine) is replaced by
    ``$MLFLOW_TRACKING_URI`` where set. Tracking that does not answer costs the curves, not the unit.
    """
    if runs is None:
        yield None
        return
    uri = runs.tracking_uri
    if "***" in uri and os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
    made = unit.train if unit.kind == "train" else unit.parent
    rank = str(made.rank) if unit.kind == "evaluate" else unit.label.rpartition("-r")[2]
    tags = {"lsq.method": made.method, "lsq.rank": rank,
            "lsq.source_rank": str(made.source_rank)}
    context = "training" if unit.kind == "train" else "evaluation"
    try:
        run_id = tracking.open_variant_run(uri, runs.experiment_id, runs.parent_run_id, unit.label, tags,
                                           tracking.dataset_input(str(unit.data.source), unit.data_fingerprint, context))
    except Exception as exc:  # noqa: BLE001 - the registration step logs the variant's run in any case
        logging.getLogger(__name__).warning("%s: child run not opened in MLflow (%s); no training curves", unit.label,
                                            exc)
        yield None
        return
    status = "FAILED"
    try:
        yield tracking.variant_logger(uri, run_id)
        status = "FINISHED"
    except BaseException as exc:  # Ctrl-C, SystemExit, Prefect's TerminationSignal (SIGTERM): KILLED
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        raise
    finally:
        try:
            tracking.close_variant_run(uri, run_id, status)
        except Exception as exc:  # noqa: BLE001 - the pipeline's end closes runs left RUNNING
            logging.getLogger(__name__).warning("%s: child run %s not closed (%s)", unit.label, run_id, exc)


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_bad_input, tags=[COMPUTE_TAG],
      task_run_name="{unit.kind} {unit.label}", **_NO_RESULTS)
def run_unit(unit: Unit, runs: ChildRuns | None = None) -> UnitResult:
    """One unit in this flow run (a thread or a Dask worker): train and score, or score, in its child run."""
    with tracked(unit, runs) as log:
        result = steps.run_unit(unit, log=log)
    get_run_logger().info(finished(result))
    return result


@task(retries=1, retry_condition_fn=retry_unless_bad_input, tags=[COMPUTE_TAG],
      task_run_name="squeeze {source.label}", **_NO_RESULTS)
def squeeze_source(source: Variant, cfg: PipelineConfig, code: str) -> Squeezed:
    """Post-Squeeze: one decomposition of the source, one adapter per target rank, kept in the storage; how it
    squeezes is :meth:`PipelineConfig.squeeze_config` (typed, never a dict)."""
    return steps.squeeze_unit(source, cfg.squeeze_config(), storage_of(cfg), code)


@task(retries=0, task_run_name="dispatch {unit.kind} {unit.label}", **_NO_RESULTS)
def dispatch_unit(unit: Unit, deployment: str, attempts: int = 3, runs: ChildRuns | None = None,
                  start_timeout: float = 300.0) -> UnitResult:
    """One unit as a flow run of ``deployment`` on its work pool: whichever worker is free takes it.

    The flow run keeps its result in the storage root, where this task reads it (Prefect moves no
    result between machines). A flow run that crashed (its worker lost: no heartbeat, see
    ``deployments/README.md``) is run again, up to ``attempts`` times in all, on whichever worker is
    free then; so is one that stayed Pending for ``start_timeout`` seconds (a worker took it and was lost
    before it started it: nothing else would ever end it), after it is deleted. A Scheduled run only waits:
    no worker is free yet, and dispatching it again would not make one free. One that failed is bad input
    or a bug, and stops the pipeline with its message. The flow run opens the variant's child run in
    ``runs`` itself (:func:`tracked`), given the tracking URI without its password: a worker connects with
    its own ``$MLFLOW_TRACKING_URI``.
    """
    log = get_run_logger()
    storage = unit.storage()
    done = storage.get(unit.name, UnitResult)
    if done is not None:
        return done
    parameters = {"unit": unit.model_dump(mode="json")}
    if runs is not None:  # a flow run's parameters are shown in Prefect's UI: no password there
        parameters["runs"] = runs.model_copy(update={"tracking_uri": tracking.redact_uri(runs.tracking_uri)}).model_dump()
    for attempt in range(1, attempts + 1):
        started = time.perf_counter()
        run = run_deployment(deployment, parameters=parameters, timeout=0,
                             flow_run_name=f"{unit.kind}-{unit.label}", tags=[f"lsq-unit:{unit.name}"])
        run, stuck = _until_final(run, start_timeout)
        state = run.state
        if stuck:
            message = (f"unit {unit.label}: flow run {run.name} stayed Pending for {start_timeout:g} s (the worker "
                       "that took it was lost before it started it); deleted")
        elif state is not None and state.is_completed():
            result = storage.get(unit.name, UnitResult)
            if result is None:
                raise LsqError(f"unit {unit.label}: flow run {run.name} completed but left no record in "
                               f"{storage.describe()}")
            log.info("%s; flow run %s, %.1f s from dispatch", finished(result), run.name, time.perf_counter() - started)
            return result
        else:
            message = f"unit {unit.label}: flow run {run.name} ended {state.name if state else 'without a state'}" + (
                f": {state.message}" if state is not None and state.message else "")
            if state is None or not state.is_crashed():
                raise RuntimeError(message)
        log.warning("%s (attempt %d of %d)%s", message, attempt, attempts,
                    "; running it again on whichever worker is free" if attempt < attempts else "")
    raise RuntimeError(f"unit {unit.label}: lost {attempts} times (crashed, or never started); see the flow runs "
                       f"tagged lsq-unit:{unit.name}")


def _until_final(run: FlowRun, start_timeout: float, poll: float = 2.0) -> tuple[FlowRun, bool]:
    """``(run as it ended, False)``; or ``(run, True)`` once it has stayed Pending longer than ``start_timeout``,
    then deleted (a flow-run process that starts it late finds no run and runs nothing)."""
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run.id)
            state = run.state
            if state is not None and state.is_final():
                return run, False
            if state is not None and state.is_pending() and state.timestamp is not None \
                    and (datetime.now(timezone.utc) - state.timestamp).total_seconds() > start_timeout:
                # deleted, not cancelled: Prefect lets a cancelled run be set Running again, so a flow-run process
                # that starts late after all (its worker lost, itself not) would run the unit a second time; a
                # deleted run it cannot find, and it exits
                client.delete_flow_run(run.id)
                return run, True
            time.sleep(poll)
