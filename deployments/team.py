"""Team mode on a Prefect server: the GPU work pool, the unit deployment, and lost-worker detection.

    python -m deployments.team [--pool lsq-gpu] [--heartbeat-timeout 450]

Creates (idempotent; talks to ``PREFECT_API_URL``):

- work pool ``lsq-gpu`` (type process), served by one ``prefect worker start --pool lsq-gpu --limit 1``
  per GPU, each started with ``CUDA_VISIBLE_DEVICES`` set to its GPU (see deployments/README.md);
- deployment ``lsq-unit/lsq-gpu`` of ``flows.unit:lsq_unit``, by module path: a worker imports the
  installed lsq, so machines need the same lsq version installed, not a shared folder;
- automation ``lsq: crash flow runs without heartbeats``: a flow run whose heartbeats stop
  (``prefect.flow-run.heartbeat`` events, every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds, 180
  by default) for ``--heartbeat-timeout`` seconds is set Crashed; the pipeline then runs that unit
  again on whichever worker is free (``tasks.steps.dispatch_unit``). This is Prefect's documented
  zombie-flow automation ("How to detect and respond to zombie flows").

A pipeline uses them with ``orchestration.runner=work-pool`` and ``storage.root=s3://...``.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

from deployments.setup import create_pool

UNIT_POOL = "lsq-gpu"
ZOMBIES = "lsq: crash flow runs without heartbeats"


def deploy_unit(pool: str = UNIT_POOL) -> str:
    """The deployment that runs one unit on ``pool``; its full name ``lsq-unit/<pool>``."""
    from prefect.deployments.runner import EntrypointType

    from flows.unit import lsq_unit

    deployment = lsq_unit.to_deployment(
        name=pool, entrypoint_type=EntrypointType.MODULE_PATH, work_pool_name=pool,
        description="One lsq unit (train and score one variant, or score one) on one device; results to storage.root",
        tags=["lsq"])
    deployment.apply(work_pool_name=pool)
    return f"{lsq_unit.name}/{pool}"


def deploy_pipeline(name: str, config: dict[str, Any], pool: str, cron: str | None = None) -> str:
    """A deployment of the pipeline with ``config`` (the whole mapping: no shared config file), on ``pool``."""
    from prefect.deployments.runner import EntrypointType

    from flows.squeeze_pipeline import squeeze_pipeline

    deployment = squeeze_pipeline.to_deployment(
        name=name, entrypoint_type=EntrypointType.MODULE_PATH, work_pool_name=pool, parameters={"config": config},
        cron=cron, concurrency_limit=1, tags=["lsq"],
        description="The squeeze pipeline; its units run as flow runs of lsq-unit on the GPU pool")
    deployment.apply(work_pool_name=pool)
    return f"{squeeze_pipeline.name}/{name}"


def crash_silent_runs(timeout: float) -> str:
    """(Re)create the automation that sets a flow run Crashed after ``timeout`` s without a heartbeat."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        Automation.read(name=ZOMBIES).delete()
    except ValueError:  # none yet
        pass
    automation = Automation(
        name=ZOMBIES,
        description="A flow run whose worker was lost stops beating: mark it Crashed so lsq runs its unit again.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=timeout)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {timeout:g} s: its worker was lost")],
    ).create()
    return str(automation.id)


def setup(pool: str = UNIT_POOL, heartbeat_timeout: float = 450.0) -> dict[str, object]:
    created = create_pool(pool, "lsq units: one worker per GPU (`prefect worker start --pool "
                                f"{pool} --limit 1` with CUDA_VISIBLE_DEVICES set)")
    return {"pool": pool, "pool_created": created, "deployment": deploy_unit(pool),
            "automation": crash_silent_runs(heartbeat_timeout)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments.team", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", default=UNIT_POOL, help=f"work pool of the units (default {UNIT_POOL})")
    parser.add_argument("--heartbeat-timeout", type=float, default=450.0,
                        help="seconds without a flow-run heartbeat before it counts as crashed (default 450: "
                             "2.5 x the default PREFECT_FLOWS_HEARTBEAT_FREQUENCY of 180)")
    args = parser.parse_args(argv)
    state = setup(args.pool, args.heartbeat_timeout)
    print(f"work pool {state['pool']} ({'created' if state['pool_created'] else 'exists'}); "
          f"deployment {state['deployment']}; automation {ZOMBIES!r}")


if __name__ == "__main__":
    main()
