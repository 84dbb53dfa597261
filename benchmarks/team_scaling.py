"""The variant stage on 2 workers against 1, each worker pinned to one core; artifact exchange cost.

    python -m benchmarks.team_scaling [--config configs/team-demo.yaml] [key=value ...]

Starts the team stack once (PostgreSQL, S3, MLflow server, Prefect server), then runs the pipeline
twice from this process with ``orchestration.runner=work-pool``: with one unit worker pinned to
core 0, then with two pinned to cores 0 and 1 (``taskset``, ``OMP_NUM_THREADS=1``). Each run gets a
new storage root, new worker folders and a new registered model, so nothing is reused.

Prints, side by side in one run:

- the variant stage's wall time (from the first unit dispatched after the squeeze to the last one
  back) on 1 and 2 workers, and the ratio (target >= 1.6x);
- artifact exchange: per unit, the seconds spent fetching its input from and publishing its adapter
  and record to the object store, and their share of the unit's wall time (target <= 5%);
- a model of N GPUs: critical path = source + squeeze + the longest-first schedule of the measured
  unit times on N workers (N -> infinity: source + longest unit).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path


def schedule(durations: list[float], workers: int) -> float:
    """Makespan of the longest-first assignment of ``durations`` to ``workers`` (a greedy LPT schedule)."""
    loads = [0.0] * workers
    for d in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += d
    return max(loads)


def run_once(servers, api_url: str, folder: Path, config: str, overrides: list[str], cores: list[str]) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from deployments import team
    from deployments.processes import Worker
    from deployments.team_demo import team_config
    from flows.squeeze_pipeline import squeeze_pipeline
    from lsq.records import UnitResult
    from lsq.storage import Storage

    tag = uuid.uuid4().hex[:8]
    root = f"s3://{servers.object_store.bucket}/bench-{tag}"
    cfg = team_config(config, [*overrides, f"tracking.registered_model=lsq-bench-{tag}",
                               "tracking.experiment=lsq-bench"], servers.tracking_uri, root)
    env = {"MLFLOW_TRACKING_URI": servers.tracking_uri, **servers.object_store.env()}
    os.environ.update(servers.object_store.env())  # this process is the control machine: it squeezes
    workers = [Worker(f"w{i}-{tag}", folder / f"w{i}", team.UNIT_POOL, api_url, env=env, cpus=core).start()
               for i, core in enumerate(cores)]
    try:
        with temporary_settings({PREFECT_API_URL: api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
            since = time.time()
            started = time.perf_counter()
            state = squeeze_pipeline(cfg, return_state=True)
            wall = time.perf_counter() - started
            if not state.is_completed():
                raise SystemExit(f"pipeline failed: {state.message}")
            with get_client(sync_client=True) as client:
                from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

                dispatched = client.read_task_runs(task_run_filter=TaskRunFilter(
                    name=TaskRunFilterName(like_="dispatch")), limit=200)
        mine = [t for t in dispatched if t.start_time and t.end_time and t.start_time.timestamp() >= since]
        variants = [t for t in mine if "source" not in t.name]
        stage = max(t.end_time for t in variants) - min(t.start_time for t in variants)
        source = [t for t in mine if "source" in t.name]
    finally:
        for w in workers:
            w.stop()
    storage = Storage(root, folder / "reader")
    units = [u for u in (storage.get(p.rsplit("/", 1)[-1].removesuffix(".json"), UnitResult)
                         for p in storage.fs.ls(f"{root}/units") if not p.rsplit("/", 1)[-1].startswith("post-from"))
             if u is not None]
    return {"wall": wall, "stage": stage.total_seconds(), "units": units,
            "source": (source[0].end_time - source[0].start_time).total_seconds() if source else 0.0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.team_scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/team-demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.team_scaling " + shlex.join(sys.argv[1:] if argv is None else argv)

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments import team
    from deployments.processes import PrefectServer
    from deployments.stack import TeamServers

    base = Path(tempfile.mkdtemp(prefix="lsq-bench-team-"))
    with TeamServers(base / "servers") as servers, PrefectServer(base / "prefect") as prefect:
        with temporary_settings({PREFECT_API_URL: prefect.api_url}):
            team.setup(team.UNIT_POOL, heartbeat_timeout=120)
        one = run_once(servers, prefect.api_url, base / "one", args.config, args.overrides, ["0"])
        two = run_once(servers, prefect.api_url, base / "two", args.config, args.overrides, ["0", "1"])

    print(f"\n$ {command}")
    print(f"variant stage, 1 worker (core 0):      {one['stage']:7.1f} s   (pipeline {one['wall']:.0f} s)")
    print(f"variant stage, 2 workers (cores 0, 1): {two['stage']:7.1f} s   (pipeline {two['wall']:.0f} s)")
    print(f"speed-up: {one['stage'] / two['stage']:.2f}x (target >= 1.6x)")
    print("\nartifact exchange through the object store, per unit (2-worker run):")
    print(f"  {'unit':12s} {'worker':12s} {'wall s':>8s} {'exchange s':>11s} {'share':>7s}")
    total_wall = total_exchange = 0.0
    for u in sorted(two["units"], key=lambda u: u.variant.label):
        total_wall += u.wall_seconds
        total_exchange += u.exchange_seconds
        print(f"  {u.variant.label:12s} {u.variant.worker.split('-')[0]:12s} {u.wall_seconds:8.1f} "
              f"{u.exchange_seconds:11.2f} {u.exchange_seconds / u.wall_seconds:7.1%}")
    print(f"  all units: {total_exchange:.2f} s of {total_wall:.1f} s = {total_exchange / total_wall:.1%} (target <= 5%)")
    variant_units = [u.wall_seconds for u in one["units"] if not u.variant.label.startswith("source")]
    print("\nmodel for N GPUs (unit times of the 1-worker run; the flow-run start-up of each unit is in the stage, "
          "not in these):")
    for n in (1, 2, 4, 8):
        print(f"  N={n}: variant stage >= {schedule(variant_units, n):6.1f} s; critical path source + stage = "
              f"{one['source'] + schedule(variant_units, n):6.1f} s")
    print(f"  N>={len(variant_units)}: source + longest unit = {one['source'] + max(variant_units):.1f} s")


if __name__ == "__main__":
    main()
