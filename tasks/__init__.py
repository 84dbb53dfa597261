"""Thin Prefect tasks over lsq, and the MLflow adapter code (``tasks.tracking``).

``COMPUTE_TAG`` lives here, importable without torch: ``deployments.setup`` limits it."""

COMPUTE_TAG = "lsq-compute"  # tag of the task runs that hold a device (training, squeezing, scoring)
