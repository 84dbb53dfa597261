"""Orchestration overhead of the pipeline: wall time minus the lsq compute inside its tasks.

    python -m benchmarks.orchestration_overhead [CONFIG] [key=value ...]   # default configs/demo.yaml

Runs the Prefect flow in this process (temporary Prefect server start-up included) with a fresh
output folder and MLflow store, and times every lsq call the tasks make (data preparation,
training, squeezing, evaluation) by wrapping them. Overhead = wall - compute: Prefect (server,
task states), the steps' work folders (claims, digests, records), MLflow logging and registration,
artifacts. Target: <= 10%.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time


def main() -> None:
    args = sys.argv[1:]
    config = args[0] if args and "=" not in args[0] else "configs/demo.yaml"
    overrides = args[1:] if args and "=" not in args[0] else args
    work = tempfile.mkdtemp(prefix="lsq-orch-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    start = time.perf_counter()
    from flows.pipeline_command import preboot_server

    server = preboot_server()  # before the heavy imports, as `python -m flows.squeeze_pipeline` does
    import flows.squeeze_pipeline as pipeline
    import lsq.api
    import lsq.evaluate
    import lsq.pipeline_config
    import lsq.steps
    import lsq.train
    import tasks.steps as steps
    from flows.server import prefect_api
    from tasks import tracking
    from tasks.tracking import parent_runs

    imported = time.perf_counter() - start
    compute = {"seconds": 0.0, "calls": 0}
    parts = {"MLflow logging and registry writes": 0.0}
    first_task: list[float] = []

    def timed(fn, into=None):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            if not first_task:
                first_task.append(time.perf_counter() - start)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if into is None:
                    compute["seconds"] += time.perf_counter() - t
                    compute["calls"] += 1
                else:
                    parts[into] += time.perf_counter() - t
        return wrapper

    # one wrapper per lsq function, set where it lives and where lsq.steps imported it by name, so every call
    # is timed once (evaluate_adapter, for the champion, calls evaluate_splits; train loads its data inside)
    for module, name in ((lsq.train, "train"), (lsq.api, "squeeze_adapter"), (lsq.evaluate, "evaluate_splits")):
        wrapped = timed(getattr(module, name))
        setattr(module, name, wrapped)
        setattr(lsq.steps, name, wrapped)
    for module, name in ((steps, "load_data"), (lsq.pipeline_config, "fingerprint")):
        setattr(module, name, timed(getattr(module, name)))
    for name in ("log_variant_run", "register_variant", "log_pareto", "start_pipeline_run", "set_alias", "finish_run"):
        setattr(tracking, name, timed(getattr(tracking, name), "MLflow logging and registry writes"))
    parent_runs.finish_run = tracking.finish_run  # what tracking.parent_run calls to end the parent run
    with prefect_api(server):
        result = pipeline.squeeze_pipeline(config, [*overrides, f"output_dir={work}/runs"])
    wall = time.perf_counter() - start
    overhead = wall - compute["seconds"]
    command = " ".join(["python -m benchmarks.orchestration_overhead", *sys.argv[1:]])
    print(f"\n`{command}`  ({len(result.variants)} adapters registered; winner {result.decision.winner})\n")
    print("| wall (s) | lsq compute in tasks (s) | overhead (s) | overhead share |")
    print("|---|---|---|---|")
    print(f"| {wall:.1f} | {compute['seconds']:.1f} ({compute['calls']} calls) | {overhead:.1f} | {overhead / wall:.1%} |")
    print(f"\ntarget <= 10%: {'PASS' if overhead / wall <= 0.10 else 'FAIL'}")
    rest = overhead - imported - (first_task[0] - imported if first_task else 0.0) - sum(parts.values())
    print("\n| where the overhead goes | s |\n|---|---|")
    print(f"| imports (prefect, mlflow, torch, transformers, lsq) | {imported:.1f} |")
    if first_task:
        print(f"| flow start to first lsq call (Prefect server, config, data, MLflow run) | {first_task[0] - imported:.1f} |")
    for label, seconds in parts.items():
        print(f"| {label} | {seconds:.1f} |")
    print(f"| the rest (task states, work-folder claims and digests, plots, artifacts) | {rest:.1f} |")


if __name__ == "__main__":
    main()
