"""MLflow adapter of the pipeline: runs, artifacts, registry, aliases, the Pareto plot.

- :mod:`.store`: the tracking URI, clients, experiments, retries on transient errors, :func:`redact_uri`;
- :mod:`.parent_runs`: the parent run (with its process and heartbeat, its description, summary metrics
  and variants table), held by :func:`parent_run` (heartbeat, then FINISHED, FAILED or KILLED);
- :mod:`.stale_runs`: closing the parents whose pipeline died without ending them;
- :mod:`.child_runs`: child runs (opened when a unit starts, with its training curves and dataset input),
  study records, folders as artifacts;
- :mod:`.model_registry`: registered versions (one per adapter and data, race-free), aliases, downloads;
- :mod:`.promotion_lock`: moving the champion alias safely when pipelines promote at once;
- :mod:`.pareto`: the Pareto plot and table on the parent run.

Every function takes the tracking URI and the run ids it works on: MLflow's active run is
thread-local and Prefect runs tasks in worker threads, so nothing here reads or changes the caller's
active run. Layout in MLflow: one parent run per pipeline run; one child run per adapter variant
(params, metrics, ``adapter/`` folder unchanged, squeeze report and spectrum plot); one registered
model version per adapter and data (a models-from-code pyfunc, ``tasks/pyfunc_model.py``, tagged
``lsq.*``); promotion with aliases (``champion``/``challenger``), never stages.

Tests that shorten the retry delays patch ``tasks.tracking.store.RETRY_DELAYS`` (read there).
"""

from tasks.tracking.child_runs import (
    ChildRuns,
    close_variant_run,
    dataset_input,
    log_folder,
    log_study_record,
    log_variant_run,
    open_variant_run,
    variant_logger,
    variant_run_metrics,
)
from tasks.tracking.model_registry import (
    adapter_digest,
    alias_version,
    champion,
    download_adapter,
    log_pyfunc,
    register_variant,
    set_alias,
    versions_trained_on,
)
from tasks.tracking.parent_runs import (
    VIEW_KEY,
    describe_pipeline_run,
    finish_run,
    heartbeat,
    parent_run,
    share_runs_view,
    start_pipeline_run,
)
from tasks.tracking.pareto import log_pareto
from tasks.tracking.promotion_lock import promote_alias, registry_lock
from tasks.tracking.stale_runs import close_stale_runs
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
    "VIEW_KEY", "ChildRuns", "adapter_digest", "alias_version", "artifact_root", "champion", "client_for",
    "close_stale_runs", "close_variant_run", "dataset_input", "default_tracking_uri", "describe_pipeline_run",
    "download_adapter", "ensure_experiment", "finish_run", "heartbeat", "log_folder", "log_pareto", "log_pyfunc",
    "log_study_record", "log_variant_run", "open_variant_run", "parent_run", "promote_alias", "redact_uri",
    "register_variant", "registry_lock", "retry", "set_alias", "share_runs_view", "start_pipeline_run", "transient",
    "variant_logger", "variant_run_metrics", "versions_trained_on",
]
