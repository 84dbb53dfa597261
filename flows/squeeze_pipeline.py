"""The squeeze pipeline, as its story.

    python -m flows.squeeze_pipeline configs/demo.yaml [key=value ...]

prepare data -> (decoders: score the base model zero-shot) -> train the high-rank source -> squeeze it
to every target rank -> recover each (Cont-Squeeze) -> In-Squeeze run -> baselines when asked ->
evaluate every adapter -> register each in MLflow -> promote one -> report.

Every step works in its own folder under ``output_dir``, named by a digest of its whole input
(config with seed, data fingerprint, code version, the adapters it starts from): two runs of
different settings never share a folder, and a re-run (or a second run of the same settings) reuses
the finished steps (:mod:`lsq.steps`). Steps exchange frozen records (:mod:`lsq.records`), and
Prefect persists no results.
"""

from __future__ import annotations

import argparse
import sys

PROG = "squeeze_pipeline"

_EPILOG = """\
examples:
  python -m flows.squeeze_pipeline configs/demo.yaml                # what make demo runs (~5 min on 2 CPU cores)
  python -m flows.squeeze_pipeline configs/demo.yaml train.seed=1 target_ranks=[8,4]
  python -m flows.squeeze_pipeline configs/demo.yaml promotion.metric=macro_f1 promotion.tolerance=0.02
  python -m flows.squeeze_pipeline source_rank=32 baselines.direct=true   # the built-in defaults, overridden
  python -m flows.squeeze_pipeline configs/demo.yaml --settings     # every key with its value and meaning
  python -m flows.squeeze_pipeline --schema                         # the JSON schema of pipeline configs

overrides: key=value with dotted keys for nested settings; values are read as YAML (8, true, [8,4], null).

promotion.metric (chooses on the validation split as val_<metric>; test_<metric> is reported beside it):
  auto              the default: macro_f1 when the rarest class is under 30% of the training split, else
                    accuracy; causal LM: choice_accuracy when the data has choices, else exact_match
  accuracy, macro_f1                                      classification
  exact_match, choice_accuracy, answer_accuracy, loss     causal LM (exact_match: greedy generation, normalised;
                                                          choice_accuracy: data with choices; loss: lower is better)
promotion.servable_only=true promotes only adapters vLLM-style servers load as is (tag lsq.serving.vllm).

Without PREFECT_API_URL the run uses a temporary Prefect server of its own, gone when it ends."""


def command_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.squeeze_pipeline", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train high, squeeze, recover, evaluate, register in MLflow, promote one: the pipeline as a "
                    "Prefect flow.")
    parser.add_argument("config", nargs="?", help="pipeline YAML (configs/demo.yaml); omitted: the built-in defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings that differ from the file")
    parser.add_argument("--settings", action="store_true",
                        help="print every setting (dotted key=value, then its meaning) of the config and exit")
    parser.add_argument("--schema", action="store_true", help="print the JSON schema of pipeline configs and exit")
    parser.error = lambda message: parser.exit(2, f"{PROG}: error: {message} (see --help)\n")  # one line
    return parser


def parse_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """The command line as (config file, overrides), checked before any server starts: ``--help`` and
    ``--settings`` answer and exit 0, bad input (no such file, a malformed override, an unknown key,
    a bad value) prints one line ``squeeze_pipeline: error: ...`` and exits 2. Imports no Prefect."""
    parser = command_parser()
    args = parser.parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    from lsq.errors import LsqError
    from lsq.pipeline_config import PipelineConfig, load_pipeline_config

    if args.schema:
        import json

        print(json.dumps(PipelineConfig.model_json_schema(), indent=2))
        parser.exit(0)

    try:
        cfg = load_pipeline_config(config, overrides)
    except LsqError as exc:
        parser.exit(2, f"{PROG}: error: {_one_line(exc)}\n")
    if args.settings:
        from lsq.cli import settings_lines

        print("\n".join(settings_lines(cfg)))
        parser.exit(0)
    return config, overrides


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


if __name__ == "__main__":
    # Entry point only. The command line is checked first (help, settings and bad input never start a
    # server), then the temporary Prefect server starts before the imports below (prefect,
    # transformers, mlflow: about 6 s on 2 cores) and boots on the other core meanwhile. Measured with
    # benchmarks/orchestration_overhead.py: flow start 0.5 s this way, about 10 s after the imports.
    _COMMAND = parse_command(sys.argv[1:])
    from flows.server import start_unless_configured

    _SERVER = start_unless_configured()

import logging  # noqa: E402
import threading  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

from prefect import flow, get_run_logger  # noqa: E402
from prefect.exceptions import TerminationSignal  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows.server import is_temporary, prefect_api, terminate_on_sigterm, terminating  # noqa: E402
from lsq.errors import LsqError  # noqa: E402
from lsq.pipeline_config import Orchestration, PipelineConfig, load_pipeline_config  # noqa: E402
from lsq.records import PipelineResult, Variant  # noqa: E402
from tasks import registry, steps, tracking  # noqa: E402
from tasks.preflight import preflight  # noqa: E402
from tasks.registry import log_and_register, log_reference, promote, report, start_run  # noqa: E402
from tasks.steps import COMPUTE_TAG, code_version, make_unit, prepare_data  # noqa: E402

HEARTBEAT_SECONDS = 60.0


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


@contextmanager
def heartbeat(uri: str, run_id: str, every: float = HEARTBEAT_SECONDS):
    """Refresh the parent run's heartbeat while the body runs: a later run closes it when it stops beating."""
    stop = threading.Event()

    def beat():
        while not stop.wait(every):
            try:
                tracking.heartbeat(uri, run_id)
            except Exception as exc:  # a missed beat is not a failed pipeline
                logging.getLogger(__name__).warning("heartbeat of run %s failed: %s", run_id, exc)

    thread = threading.Thread(target=beat, name="lsq-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@flow(name="lsq-pipeline-run", log_prints=False, persist_result=False)
def pipeline_run(cfg: PipelineConfig) -> PipelineResult:
    """The story, on the task runner the config asks for (see :func:`squeeze_pipeline`)."""
    log = get_run_logger()
    code = code_version()
    uri = tracking.default_tracking_uri(cfg.tracking)
    run_unit, squeeze_source, champion_score = limited(steps.run_unit, steps.squeeze_source, registry.champion_score)
    o = cfg.orchestration
    if o.runner == "work-pool":  # each unit a flow run on the pool; its workers hold the devices

        def run(unit):
            return steps.dispatch_unit.submit(unit, o.unit_deployment, o.unit_attempts, children)
    else:

        def run(unit):
            return run_unit.submit(unit, children)

    data = prepare_data(cfg.data)
    parent = start_run(uri, cfg, data, flow_run.get_name() or "local")
    # each unit opens its variant's child run when it starts and logs its training curves there
    children = tracking.ChildRuns(tracking_uri=uri, experiment_id=tracking.ensure_experiment(uri, cfg.tracking.experiment),
                                  parent_run_id=parent)
    status = "FAILED"
    try:
        with heartbeat(uri, parent):
            cfg = registry.choose_metric(uri, cfg, parent)  # promotion.metric=auto resolved on the training labels
            zero_shot = cfg.model.task == "causal_lm" and cfg.baselines.zero_shot
            base = run(make_unit(cfg, data, code, parent=Variant.base_model(cfg.source_rank))) if zero_shot else None
            source = run(make_unit(cfg, data, code, "source", cfg.source_rank)).result()
            post = squeeze_source(source.variant, cfg.target_ranks, cfg.squeeze, cfg, code).variants
            units = [make_unit(cfg, data, code, parent=v) for v in post]  # each squeezed adapter scored as it is
            if cfg.recover.enabled:
                units += [make_unit(cfg, data, code, "cont", v.rank, v) for v in post]
            if cfg.insqueeze.enabled:
                units.append(make_unit(cfg, data, code, "in", cfg.insqueeze.rank))
            for k in cfg.target_ranks:
                if cfg.baselines.direct:
                    units.append(make_unit(cfg, data, code, "direct", k))
                if cfg.baselines.adalora:
                    units.append(make_unit(cfg, data, code, "adalora", k))
            futures = [run(u) for u in units]
            results = [source, *(f.result() for f in futures)]  # every unit first: a failure registers nothing
            log.info("units: %s", ", ".join(f"{r.variant.label} on {r.variant.worker} ({r.variant.device})"
                                            for r in results))
            reference = log_reference(uri, cfg, parent, base.result(), data) if base is not None else None
            champion = champion_score(uri, cfg)
            rows = [log_and_register(uri, cfg, parent, r.variant, r.evaluations, data) for r in results]
            decision = promote(uri, cfg, rows, champion)
            report(uri, cfg, parent, rows, decision, reference)
        status = "FINISHED"
    except BaseException as exc:
        # Prefect's engine turns SIGTERM into TerminationSignal while a flow runs; ours, outside it, into SystemExit
        if terminating() or isinstance(exc, (KeyboardInterrupt, SystemExit, TerminationSignal)):
            status = "KILLED"
        raise
    finally:
        tracking.finish_run(uri, parent, status)
    log.info("%s -> %s: %s", decision.winner, decision.alias, decision.reason)
    return PipelineResult(parent_run_id=parent, tracking_uri=tracking.redact_uri(uri),
                          experiment=cfg.tracking.experiment, registered_model=cfg.registered_model,
                          decision=decision, variants=tuple(rows), promotion_metric=cfg.promotion.metric,
                          runs_url=registry.runs_url(uri, children.experiment_id), reference=reference)


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


# log_prints stays off: prints inside tasks would go to the logger, and dill (datasets' hashing of
# map functions) captures `dis` output through print, which then floods the log with bytecode.
@flow(name="lsq-squeeze-pipeline", log_prints=False, persist_result=False)
def squeeze_pipeline(config: str | dict[str, Any] | None = None, overrides: list[str] | None = None) -> PipelineResult:
    """Validate the config and check that every store it names answers (a bad one stops here, before
    any work), then run the story as a sub-flow on the task runner of ``orchestration.*``: the same
    for ``make demo``, ``deployments.serve``, ``prefect deploy`` and ``deployments.team_demo``, which
    all start this flow."""
    cfg = load_pipeline_config(config, overrides or [])
    # before any training: the tracking server, its artifact store and the storage root answer
    preflight(tracking.default_tracking_uri(cfg.tracking), cfg.storage.root)
    return pipeline_run.with_options(task_runner=task_runner(cfg.orchestration))(cfg)


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


def main(command: tuple[str | None, list[str]], server=None) -> int:
    """Run ``command`` (:func:`parse_command`'s answer) against ``server`` (started by the caller) or
    the configured Prefect API, and print where to look at the result."""
    config, overrides = command
    terminate_on_sigterm()
    try:
        cfg = load_pipeline_config(config, overrides)  # already checked by parse_command
        # the flow checks the stores again (deployments start it directly); checked here too, a bad one
        # is one line, before any Prefect log line or traceback and before waiting for the server
        preflight(tracking.default_tracking_uri(cfg.tracking), cfg.storage.root)
        with prefect_api(server) as api_url:
            result = squeeze_pipeline(config, overrides)
    except LsqError as exc:  # e.g. preflight: a store that does not answer
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
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
    sys.exit(main(_COMMAND, _SERVER))
