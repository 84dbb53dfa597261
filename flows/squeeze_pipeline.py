"""The squeeze pipeline, as its story.

    python -m flows.squeeze_pipeline configs/demo.yaml [key=value ...]

prepare data -> train the high-rank source -> squeeze it to every target rank -> recover each
(Cont-Squeeze) -> In-Squeeze run -> baselines when asked -> evaluate every adapter -> register each
in MLflow -> promote one -> report. Parameters are a config file path or a dict.

Adapters go to ``<output_dir>/<data fingerprint>-<code version>/``: new data or new lsq code gets a
fresh folder (training resumes from checkpoints in its folder, so a shared folder would "resume" a
finished run on other data); the same data and code reuse it, and the cached tasks skip the work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.server import boot_temporary_server

if __name__ == "__main__":  # before the heavy imports below: that is the point
    _BOOT = boot_temporary_server()

from lsq.pipeline_config import Orchestration, PipelineConfig, load_pipeline_config  # noqa: E402
from tasks import tracking  # noqa: E402
from tasks import registry, steps  # noqa: E402
from tasks.registry import log_and_register, promote, report, start_run  # noqa: E402
from tasks.steps import COMPUTE_TAG, code_version, prepare_data  # noqa: E402


def limited(*compute_tasks):
    """The compute tasks as this run should submit them: with the ``lsq-compute`` tag on a real
    Prefect server, where ``deployments.setup`` limits it to one run per device across every flow
    run; without it on the temporary per-process server, which has no limit to honour and no other
    flow runs to share a device with, while each tagged run still pays a slot request and a lease
    (about 1.8 s per task run on 2 cores: 32 s of the demo's 50 s of overhead)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return compute_tasks
    return tuple(t.with_options(tags={tag for tag in t.tags if tag != COMPUTE_TAG}) for t in compute_tasks)


# log_prints stays off: prints inside tasks would go to the logger, and dill (datasets' hashing of
# map functions) captures `dis` output through print, which then floods the log with bytecode.
@flow(name="lsq-squeeze-pipeline", log_prints=False, task_runner=ThreadPoolTaskRunner(max_workers=1))
def squeeze_pipeline(config: str | dict[str, Any] | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    cfg: PipelineConfig = load_pipeline_config(config, overrides or [])  # a bad config stops here
    log = get_run_logger()
    code = code_version()
    uri = tracking.default_tracking_uri(cfg.tracking)

    train_adapter, squeeze_source, evaluate_variant, champion_score = limited(
        steps.train_adapter, steps.squeeze_source, steps.evaluate_variant, registry.champion_score)

    fingerprint = prepare_data(cfg.data, code)
    out = Path(cfg.output_dir) / f"{fingerprint}-{code[:8]}"
    cfg = cfg.model_copy(update={"output_dir": str(out)})
    parent = start_run(uri, cfg, fingerprint, flow_run.get_name() or "local")
    try:
        source = train_adapter(cfg.step_config("source", cfg.source_rank), code)
        post = squeeze_source(source, cfg.target_ranks, cfg.squeeze, str(out / "post"), code)
        futures = []
        if cfg.recover.enabled:
            futures += [train_adapter.submit(cfg.step_config("cont", v.rank, v.adapter_dir), code, v) for v in post]
        if cfg.insqueeze.enabled:
            futures.append(train_adapter.submit(cfg.step_config("in", cfg.insqueeze.rank), code))
        for k in cfg.target_ranks:
            if cfg.baselines.direct:
                futures.append(train_adapter.submit(cfg.step_config("direct", k), code))
            if cfg.baselines.adalora:
                futures.append(train_adapter.submit(cfg.step_config("adalora", k), code))
        variants = [source, *post, *(f.result() for f in futures)]

        evaluations = [
            evaluate_variant.submit(v, cfg.model, cfg.data, cfg.eval_split, cfg.train.eval_batch_size, code)
            for v in variants
        ]
        evaluated = [e.result() for e in evaluations]  # every score first: a failure registers nothing
        champion = champion_score(uri, cfg)
        rows = [log_and_register(uri, cfg, parent, v, e, fingerprint) for v, e in zip(variants, evaluated)]
        decision = promote(uri, cfg, rows, champion)
        report(uri, cfg, parent, rows, decision)
    except BaseException:
        tracking.finish_run(uri, parent, "FAILED")
        raise
    tracking.finish_run(uri, parent, "FINISHED")
    log.info("%s -> %s: %s", decision.winner, decision.alias, decision.reason)
    return {"parent_run_id": parent, "tracking_uri": uri, "experiment": cfg.tracking.experiment,
            "registered_model": cfg.registered_model,
            "decision": {"winner": decision.winner, "alias": decision.alias, "reason": decision.reason},
            "variants": rows}


def task_runner(orchestration: Orchestration):
    """Threads by default; Dask (prefect-dask) on a local cluster or an existing scheduler's address."""
    if orchestration.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if orchestration.dask_address:
            return DaskTaskRunner(address=orchestration.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": orchestration.max_workers, "threads_per_worker": 1})
    return ThreadPoolTaskRunner(max_workers=orchestration.max_workers)


def run(config: str | dict[str, Any] | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline with the task runner its config asks for (the decorator's default is threads)."""
    cfg = load_pipeline_config(config, overrides or [])
    return squeeze_pipeline.with_options(task_runner=task_runner(cfg.orchestration))(config, overrides)


if __name__ == "__main__":
    if _BOOT is not None:
        _BOOT.join()  # the flow run below then finds the server up (SubprocessASGIServer is one per process)
    args = sys.argv[1:]
    config = args[0] if args and "=" not in args[0] else None
    result = run(config, args[1:] if config else args)
    uri, name, decision = result["tracking_uri"], result["registered_model"], result["decision"]
    print(f"\nwinner: {decision['winner']} -> {name}@{decision['alias']}\n  {decision['reason']}")
    print(f"MLflow: {uri} (experiment {result['experiment']!r}, registered model {name!r})")
    if uri.startswith("sqlite:"):
        print(f"  UI: mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000")
    if os.environ.get("PREFECT_API_URL"):
        print(f"Prefect UI: {os.environ['PREFECT_API_URL'].removesuffix('/api')}")
    else:
        print("Prefect: this run used a temporary server, gone with it. To keep flow runs and see them in the UI:\n"
              "  prefect server start --host 127.0.0.1   and   export PREFECT_API_URL=http://127.0.0.1:4200/api")
