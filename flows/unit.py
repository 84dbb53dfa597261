"""One unit of the pipeline as its own flow run: what a worker of the team's work pool runs.

The pipeline (``flows/squeeze_pipeline.py`` with ``orchestration.runner=work-pool``) starts one flow
run of this flow's deployment per variant (``tasks.steps.dispatch_unit``). The worker that takes it
fetches the inputs it names from the storage root into its own cache, trains and scores the
variant on the one device it sees (inside the variant's MLflow child run, with its training
curves), publishes the adapter and the record back to the storage root, and returns nothing
through Prefect. Deploy it with ``python -m deployments.team`` (see
``deployments/README.md``).
"""

from __future__ import annotations


from prefect import flow, get_run_logger

from lsq.steps import Unit, run_unit
from tasks.steps import tracked
from tasks.tracking import ChildRuns


@flow(name="lsq-unit", log_prints=False, persist_result=False)
def lsq_unit(unit: Unit, runs: ChildRuns | None = None) -> str:
    """Run ``unit`` here and keep its result in its storage root; returns the record's name. With
    ``runs``, its variant's MLflow child run is open while it works and gets its training curves."""
    with tracked(unit, runs) as log:
        result = run_unit(unit, log=log)
    get_run_logger().info("%s: %s on %s (%s), %.1f s; record %s", unit.kind, unit.label, result.variant.worker,
                          result.variant.device, result.wall_seconds, result.name)
    return result.name
