"""MLflow adapter of the pipeline: runs, artifacts, registry, aliases, the Pareto plot.

- :mod:`.store`: the tracking URI, clients, experiments, retries on transient errors, :func:`redact_uri`;
- :mod:`.runs`: the parent run (with its process and heartbeat, its description, summary metrics and
  variants table), child runs (opened when a unit starts, with its training curves and dataset input),
  closing stale parents;
- :mod:`.registry`: registered versions (one per adapter and data, race-free), aliases, promotion;
- :mod:`.pareto`: the Pareto plot and table on the parent run.

Every function takes the tracking URI and the run ids it works on: MLflow's active run is
thread-local and Prefect runs tasks in worker threads, so nothing here reads or changes the caller's
active run. Layout in MLflow: one parent run per pipeline run; one child run per adapter variant
(params, metrics, ``adapter/`` folder unchanged, squeeze report and spectrum plot); one registered
model version per adapter and data (a models-from-code pyfunc, ``tasks/pyfunc_model.py``, tagged
``lsq.*``); promotion with aliases (``champion``/``challenger``), never stages.

Tests that shorten the retry delays patch ``tasks.tracking.store.RETRY_DELAYS`` (read there).
"""

from tasks.tracking.pareto import log_pareto
from tasks.tracking.registry import (
    adapter_digest,
    alias_version,
    champion,
    download_adapter,
    log_pyfunc,
    promote,
    register_variant,
    registry_lock,
    set_alias,
    versions_trained_on,
)
from tasks.tracking.runs import (
    ChildRuns,
    close_stale_runs,
    close_variant_run,
    dataset_input,
    describe_pipeline_run,
    finish_run,
    heartbeat,
    log_folder,
    log_study_record,
    log_variant_run,
    open_variant_run,
    share_runs_view,
    start_pipeline_run,
    variant_logger,
    variant_run_metrics,
)
from tasks.tracking.store import (
    artifact_root,
    client_for,
    default_tracking_uri,
    ensure_experiment,
    redact_uri,
    retry,
    transient,
)

__all__ = [
    "ChildRuns", "adapter_digest", "alias_version", "artifact_root", "champion", "client_for", "close_stale_runs",
    "close_variant_run", "dataset_input", "default_tracking_uri", "describe_pipeline_run", "download_adapter",
    "ensure_experiment", "finish_run", "heartbeat", "log_folder", "log_pareto", "log_pyfunc", "log_study_record",
    "log_variant_run", "open_variant_run", "promote", "redact_uri", "register_variant", "registry_lock", "retry",
    "set_alias", "share_runs_view", "start_pipeline_run", "transient", "variant_logger", "variant_run_metrics",
    "versions_trained_on",
]
