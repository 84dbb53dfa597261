"""The squeeze pipeline, as its story.

    python -m flows.squeeze_pipeline configs/demo.yaml [key=value ...]

prepare data -> (decoders: score the base model zero-shot) -> train the high-rank source -> squeeze it
to every target rank -> recover each (Cont-Squeeze) -> In-Squeeze run -> baselines when asked ->
evaluate every adapter -> register each in MLflow -> promote one -> report.

Every step works in its own folder under ``output_dir``, named by a digest of its whole input
(config with seed, data fingerprint, code version, the adapters it starts from): two runs of
different settings never share a folder, and a re-run (or a second run of the same settings) reuses
the finished steps (:mod:`lsq.steps`). Steps exchange frozen records (:mod:`lsq.records`), and
Prefect persists no results. The data is loaded once, by ``prepare data``: the record it returns
(:class:`lsq.records.PreparedData`) is what the metric choice and registration read.

As a command, the config is parsed once and the stores are checked once, before the flow starts
(:func:`main`); the command line is answered, and the temporary Prefect server started, by
:mod:`flows.pipeline_command` before this module's imports below run (its first import).
"""

from __future__ import annotations

from flows.pipeline_command import LAUNCHED, PROG, Command, command_parser, launch, parse_command  # first: its doc

import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.server import TemporaryServer, is_temporary, prefect_api, terminate_on_sigterm, terminating
from lsq.errors import LsqError, one_line
from lsq.pipeline_config import Orchestration, PipelineConfig, load_pipeline_config
from lsq.records import PipelineResult, PreparedData, Variant
from tasks import promotion, steps, tracking
from tasks.preflight import preflight
from tasks.promotion import choose_metric, log_and_register, log_reference, promote, report, start_run
from tasks.steps import COMPUTE_TAG, code_version, make_unit, prepare_data

__all__ = ["Command", "PROG", "command_parser", "main", "parse_command", "pipeline_run", "squeeze_pipeline",
           "variants_table"]

FLOW_NAME = "lsq-squeeze-pipeline"


def limited(*compute_tasks):
    """The compute tasks as this run should submit them: with the ``lsq-compute`` tag on a real
    Prefect server, where ``deployments.setup`` limits it to one run per device across every flow
    run; without it on a temporary per-process server, which has no limit to honour and no other
    flow runs to share a device with, while each tagged run still pays a slot request and a lease
    (about 1.8 s per task run on 2 cores: 32 s of the demo's 50 s of overhead)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url and not is_temporary(url):
        return compute_tasks
    return tuple(t.with_options(tags={tag for tag in t.tags if tag != COMPUTE_TAG}) for t in compute_tasks)


@flow(name="lsq-pipeline-run", log_prints=False, persist_result=False)
def pipeline_run(cfg: PipelineConfig) -> PipelineResult:
    """The story, on the task runner the config asks for (see :func:`squeeze_pipeline`): the data prepared
    once, the parent run started and held (heartbeat; FINISHED, FAILED or KILLED at the end:
    :func:`tasks.tracking.parent_run`), the promotion metric chosen, then :func:`variants_and_promotion`."""
    uri = tracking.default_tracking_uri(cfg.tracking)
    data = prepare_data(cfg.data)
    parent = start_run(uri, cfg, data, flow_run.get_name() or "local")
    with tracking.parent_run(uri, parent, terminating=terminating):
        chosen = choose_metric(uri, cfg, data, parent)  # promotion.metric=auto resolved on the training labels
        result = variants_and_promotion(uri, chosen, data, parent)
    d = result.decision
    get_run_logger().info("%s -> %s: %s", d.winner, d.alias, d.reason)
    return result


def variants_and_promotion(uri: str, cfg: PipelineConfig, data: PreparedData, parent: str) -> PipelineResult:
    """Inside :func:`pipeline_run`, ``cfg`` with its promotion metric chosen: every variant trained (or squeezed)
    and scored in its unit, then each logged and registered, one promoted, the run reported."""
    log = get_run_logger()
    code = code_version()
    run_unit, squeeze_source, champion_score = limited(steps.run_unit, steps.squeeze_source, promotion.champion_score)
    # each unit opens its variant's child run when it starts and logs its training curves there
    children = tracking.ChildRuns(tracking_uri=uri, experiment_id=tracking.ensure_experiment(uri, cfg.tracking.experiment),
                                  parent_run_id=parent)
    o = cfg.orchestration
    if o.runner == "work-pool":  # each unit a flow run on the pool; its workers hold the devices

        def run(unit):
            return steps.dispatch_unit.submit(unit, o.unit_deployment, o.unit_attempts, children,
                                                start_timeout=o.unit_start_timeout)
    else:

        def run(unit):
            return run_unit.submit(unit, children)

    fp = data.fingerprint
    zero_shot = cfg.model.task == "causal_lm" and cfg.baselines.zero_shot
    base = run(make_unit(cfg, fp, code, parent=Variant.base_model(cfg.source_rank))) if zero_shot else None
    source = run(make_unit(cfg, fp, code, "source", cfg.source_rank)).result()
    post = squeeze_source(source.variant, cfg, code).variants
    units = [make_unit(cfg, fp, code, parent=v) for v in post]  # each squeezed adapter scored as it is
    if cfg.recover.enabled:
        units += [make_unit(cfg, fp, code, "cont", v.rank, v) for v in post]
    if cfg.insqueeze.enabled:
        units.append(make_unit(cfg, fp, code, "in", cfg.insqueeze.rank))
    for k in cfg.target_ranks:
        if cfg.baselines.direct:
            units.append(make_unit(cfg, fp, code, "direct", k))
        if cfg.baselines.adalora:
            units.append(make_unit(cfg, fp, code, "adalora", k))
    futures = [run(u) for u in units]
    results = [source, *(f.result() for f in futures)]  # every unit first: a failure registers nothing
    log.info("units: %s", ", ".join(f"{r.variant.label} on {r.variant.worker} ({r.variant.device})" for r in results))
    reference = log_reference(uri, cfg, parent, base.result(), data) if base is not None else None
    champion = champion_score(uri, cfg)
    rows = [log_and_register(uri, cfg, parent, r.variant, r.evaluations, data) for r in results]
    decision = promote(uri, cfg, rows, champion)
    report(uri, cfg, parent, rows, decision, reference)
    return PipelineResult(parent_run_id=parent, tracking_uri=tracking.redact_uri(uri),
                          experiment=cfg.tracking.experiment, registered_model=cfg.registered_model,
                          decision=decision, variants=tuple(rows), promotion_metric=cfg.promotion.metric,
                          runs_url=promotion.runs_url(uri, children.experiment_id), reference=reference)


def task_runner(orchestration: Orchestration):
    """Threads by default; Dask (prefect-dask) on a local cluster or an existing scheduler's address;
    for a work pool, threads that only wait on the units' flow runs."""
    if orchestration.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if orchestration.dask_address:
            return DaskTaskRunner(address=orchestration.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": orchestration.max_workers, "threads_per_worker": 1})
    if orchestration.runner == "work-pool":  # threads that wait on flow runs: the pool's workers limit the work
        return ThreadPoolTaskRunner(max_workers=max(orchestration.max_workers, 32))
    return ThreadPoolTaskRunner(max_workers=orchestration.max_workers)


def check_stores(cfg: PipelineConfig) -> None:
    """Before any work: the tracking server, its artifact store and the storage root answer (else one LsqError line)."""
    preflight(tracking.default_tracking_uri(cfg.tracking), cfg.storage.root)


def run_story(cfg: PipelineConfig) -> PipelineResult:
    """:func:`pipeline_run` as a sub-flow on the task runner of ``orchestration.*``."""
    return pipeline_run.with_options(task_runner=task_runner(cfg.orchestration))(cfg)


# log_prints stays off: prints inside tasks would go to the logger, and dill (datasets' hashing of
# map functions) captures `dis` output through print, which then floods the log with bytecode.
@flow(name=FLOW_NAME, log_prints=False, persist_result=False)
def squeeze_pipeline(config: str | dict[str, Any] | None = None, overrides: list[str] | None = None) -> PipelineResult:
    """Validate the config and check that every store it names answers (a bad one stops here, before
    any work), then run the story as a sub-flow on the task runner of ``orchestration.*``: what
    ``deployments.serve``, ``prefect deploy``, ``deployments.team_demo`` and Python callers start. The
    command (``make demo``) runs the same flow as :func:`command_pipeline`."""
    cfg = load_pipeline_config(config, overrides or [])
    check_stores(cfg)
    return run_story(cfg)


@flow(name=FLOW_NAME, log_prints=False, persist_result=False)
def command_pipeline(cfg: PipelineConfig) -> PipelineResult:
    """:func:`squeeze_pipeline` as ``python -m flows.squeeze_pipeline`` runs it: the config was parsed, and its
    stores checked, by the command itself (:func:`main`), before any server; neither happens again here."""
    return run_story(cfg)


def variants_table(result: PipelineResult) -> str:
    """Every variant of the run, one row each: rank, the promotion metric on validation (it chooses) and on
    test (reported), adapter bytes, and whether vLLM-style servers load it as is; the winner marked."""
    m = result.promotion_metric or "metric"
    header = ("variant", "rank", f"val_{m}", f"test_{m}", "bytes", "vLLM")
    rows = [(("* " if r.label == result.decision.winner else "  ") + r.label, str(r.rank),
             "-" if r.metric is None else f"{r.metric:.4f}", "-" if r.test_metric is None else f"{r.test_metric:.4f}",
             f"{r.adapter_bytes:,}", r.serving.split(":")[0] or "-") for r in result.variants]
    if result.reference is not None:  # the floor: the base model without adapter, zero-shot
        ref = result.reference
        rows.insert(0, ("  base (zero-shot)", "-", "-" if ref.metric is None else f"{ref.metric:.4f}",
                        "-" if ref.test_metric is None else f"{ref.test_metric:.4f}", "0", "-"))
    widths = [max(len(row[i]) for row in [("  " + header[0], *header[1:]), *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 or i == 5 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [("  " + header[0], *header[1:]), *rows]]
    return "\n".join(line.rstrip() for line in lines)


def main(command: Command, server: TemporaryServer | None = None) -> int:
    """Run ``command`` (:func:`parse_command`'s answer) against ``server`` (started by the caller) or
    the configured Prefect API, and print where to look at the result."""
    terminate_on_sigterm()
    try:
        # the stores are checked here, once: a bad one is one line, before any Prefect log line or
        # traceback and before waiting for the server
        check_stores(command.cfg)
        with prefect_api(server) as api_url:
            result = command_pipeline(command.cfg)
    except (LsqError, OSError) as exc:  # preflight: a store that does not answer; a write that failed for good
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)  # (disk full, no permission: the path and why)
        return 2
    finally:
        if server is not None:
            server.stop()
    d = result.decision
    print("\n" + variants_table(result))
    print(f"\nwinner: {d.winner} -> {result.registered_model}@{d.alias}\n  {d.reason}")
    print(f"MLflow: {result.tracking_uri} (experiment {result.experiment!r}, registered model {result.registered_model!r})")
    if result.tracking_uri.startswith("sqlite:"):
        print(f"  UI: mlflow ui --backend-store-uri {result.tracking_uri}   then open {result.runs_url}")
    elif result.runs_url:
        print(f"  UI: {result.runs_url}")
    if server is None and api_url:
        print(f"Prefect UI: {api_url.removesuffix('/api')}")
    else:
        print("Prefect: this run used a temporary server, gone with it. To keep flow runs and see them in the UI:\n"
              "  prefect server start --host 127.0.0.1   and   export PREFECT_API_URL=http://127.0.0.1:4200/api")
    return 0


if __name__ == "__main__":
    sys.exit(main(*(LAUNCHED or launch(sys.argv[1:]))))  # LAUNCHED: unless run by path, not with -m
