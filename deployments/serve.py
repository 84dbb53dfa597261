"""Serve the lsq deployments from this process: a weekly pipeline, a retraining on events, a daily monitor.

    python -m deployments.serve configs/demo.yaml [--pipeline-cron "0 3 * * 1"] [--monitor-cron "0 6 * * *"]

Needs a Prefect server (``prefect server start``; PREFECT_API_URL=http://127.0.0.1:4200/api) and runs
each flow run as a subprocess of this one, from the current directory (run it from the repository
root). No work pool is involved; ``deployments/prefect.yaml`` holds the same deployments for workers.
Deployment names start with the config's registered model, so several configs can be served at once:

- ``lsq-squeeze-pipeline/<model>-weekly``: the pipeline on a cron schedule;
- ``lsq-squeeze-pipeline/<model>-retrain``: the pipeline, run when ``lsq.dataset.updated`` (resource
  ``lsq.dataset.<model>``) or ``lsq.model.degraded`` (``lsq.model.<model>``) arrives;
- ``lsq-monitor/<model>-daily``: the monitor, which emits those events.

The config path is a parameter of every deployment (an absolute path, resolved here); a run may
override it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

from flows.monitor import monitor
from flows.squeeze_pipeline import squeeze_pipeline
from lsq.monitoring import DATASET_UPDATED, MODEL_DEGRADED, dataset_resource, model_resource
from lsq.pipeline_config import load_pipeline_config

PIPELINE_CRON = "0 3 * * 1"  # Mondays 03:00
MONITOR_CRON = "0 6 * * *"  # every day 06:00


def retrain_trigger(model_name: str, config: str) -> DeploymentEventTrigger:
    """Run the pipeline on ``config`` once per ``lsq.dataset.updated`` / ``lsq.model.degraded`` about ``model_name``."""
    return DeploymentEventTrigger(
        name=f"retrain {model_name}",
        expect={DATASET_UPDATED, MODEL_DEGRADED},
        match={"prefect.resource.id": [dataset_resource(model_name), model_resource(model_name)]},
        parameters={"config": config},
    )


def build_deployments(config: str | Path, pipeline_cron: str = PIPELINE_CRON, monitor_cron: str = MONITOR_CRON,
                      margin: float = 0.02, timezone: str = "UTC") -> list[RunnerDeployment]:
    """The three deployments of one pipeline config (validated here, before anything is served)."""
    path = str(Path(config).resolve())
    cfg = load_pipeline_config(path)
    name = cfg.registered_model
    common = {"tags": ["lsq", name], "entrypoint_type": EntrypointType.MODULE_PATH}
    return [
        squeeze_pipeline.to_deployment(
            name=f"{name}-weekly", schedules=[Cron(pipeline_cron, timezone=timezone)], parameters={"config": path},
            concurrency_limit=1, description=f"Train, squeeze, register and promote {name} on a schedule.", **common),
        squeeze_pipeline.to_deployment(
            name=f"{name}-retrain", triggers=[retrain_trigger(name, path)], parameters={"config": path},
            concurrency_limit=1, description=f"Retrain {name} when its data changes or its champion degrades.",
            **common),
        monitor.to_deployment(
            name=f"{name}-daily", schedules=[Cron(monitor_cron, timezone=timezone)],
            parameters={"config": path, "margin": margin},
            description=f"Check {name}'s data fingerprint and champion; emit the retraining events.", **common),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="configs/demo.yaml", help="pipeline config (YAML)")
    parser.add_argument("--pipeline-cron", default=PIPELINE_CRON, help=f"pipeline schedule (default {PIPELINE_CRON!r})")
    parser.add_argument("--monitor-cron", default=MONITOR_CRON, help=f"monitor schedule (default {MONITOR_CRON!r})")
    parser.add_argument("--timezone", default="UTC", help="IANA time zone of both schedules")
    parser.add_argument("--margin", type=float, default=0.02, help="metric drop that counts as degraded")
    parser.add_argument("--limit", type=int, default=None, help="most flow runs at once in this process")
    args = parser.parse_args(argv)
    deployments = build_deployments(args.config, args.pipeline_cron, args.monitor_cron, args.margin, args.timezone)
    serve(*deployments, limit=args.limit)


if __name__ == "__main__":
    main()
