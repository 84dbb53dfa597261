"""The evidence study as a Prefect flow: every trained adapter is a child run in MLflow.

    python -m flows.study [--preset quick|full] [key=value ...]
    python -m flows.study --sweep [--preset quick|full] [key=value ...]   # the budget sweep

One Prefect task per method: it chooses the method's learning rate per rank on the validation split
of the first (or ``select_task``) task and trains every task, rank and seed (experiments/study.py holds the rules; ``benchmarks/study.py`` runs the same study without
Prefect and MLflow). Each record is logged as it lands, under one parent run per study, so the MLflow
UI compares methods, ranks and seeds (filter ``tags.lsq.method``, chart ``test_score`` (the study's metric) against
``lora_params``). The parent run gets the table (``study.md``) and the plot (``study.png``).
Every adapter is made by the pipeline's steps in ``runs/study/<preset>/steps`` (lsq/steps.py), so a
re-run reuses every finished step and logs every record again under its own parent run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.server import prefect_api, start_unless_configured, terminate_on_sigterm, terminating
from lsq.errors import LsqError
from lsq.pipeline_config import Tracking
from lsq.records import StudyRecord
from experiments.study import Study, StudyConfig, load_study_config
from experiments.study_report import write_report
from experiments.sweep import Ladder, Sweep, SweepConfig, load_sweep_config
from experiments.sweep_report import write_report as write_sweep_report
from tasks import tracking
from tasks.steps import COMPUTE_TAG


# The steps keep their finished work in their folders (lsq.steps); Prefect persists nothing.
@task(tags=[COMPUTE_TAG], cache_policy=NO_CACHE, persist_result=False, task_run_name="study {method}")
def run_method(config: StudyConfig, root: str, method: str, uri: str, experiment_id: str,
               parent_run_id: str) -> list[StudyRecord]:
    """One method: its learning rate chosen on validation, then every task, rank and seed."""
    log = get_run_logger()
    study = Study(config.model_copy(update={"methods": (method,)}), root, log=log.info,
                  on_record=lambda rec: tracking.log_study_record(uri, experiment_id, parent_run_id, rec.model_dump()))
    return study.run_all()


@flow(name="lsq-study", log_prints=False, persist_result=False)
def study_flow(preset: str = "quick", overrides: list[str] | None = None, out: str | None = None,
               tracking_uri: str | None = None, experiment: str = "lsq-study") -> str:
    """Run the study and log it to MLflow; returns the markdown table."""
    config = load_study_config(preset, overrides or [])
    root = out or str(Path("runs/study") / preset)
    uri = tracking_uri or tracking.default_tracking_uri(Tracking())
    experiment_id = tracking.ensure_experiment(uri, experiment)
    parent = tracking.start_pipeline_run(uri, experiment, f"study-{preset}", config.model_dump(mode="json"),
                                         {"lsq.kind": "study", "lsq.preset": preset})
    started = time.perf_counter()
    with tracking.parent_run(uri, parent, terminating=terminating):
        records: list[StudyRecord] = []
        for method in config.methods:
            records += run_method(config, root, method, uri, experiment_id, parent)
        study = Study(config, root, log=lambda _: None)
        with tempfile.TemporaryDirectory() as tmp:
            text = write_report(study, records, tmp, f"python -m flows.study --preset {preset}",
                                time.perf_counter() - started)
            tracking.log_folder(uri, parent, tmp)
        create_markdown_artifact(text, key="lsq-study", description=f"lsq study ({preset})")
        return text


@task(tags=[COMPUTE_TAG], cache_policy=NO_CACHE, persist_result=False, task_run_name="sweep {budget} steps")
def run_budget(config: SweepConfig, root: str, budget: int, pinned: str, uri: str,
               experiment_id: str, parent_run_id: str) -> list[StudyRecord]:
    """One budget of the sweep: its validation choices, then every task, method, rank and seed."""
    log = get_run_logger()
    sweep = Sweep(config, root, log=log.info, pinned=pinned,
                  on_record=lambda rec: tracking.log_study_record(uri, experiment_id, parent_run_id, rec.model_dump()))
    return sweep.study(budget).run_all()


@task(tags=[COMPUTE_TAG], cache_policy=NO_CACHE, persist_result=False, task_run_name="sweep ladder")
def run_ladder(config: SweepConfig, root: str, pinned: str, uri: str, experiment_id: str,
               parent_run_id: str) -> Ladder | None:
    """The ladder (every rank trained directly against one source squeezed to all): records and costs."""
    log = get_run_logger()
    sweep = Sweep(config, root, log=log.info, pinned=pinned,
                  on_record=lambda rec: tracking.log_study_record(uri, experiment_id, parent_run_id, rec.model_dump()))
    return sweep.run_ladder()


@task(tags=[COMPUTE_TAG], cache_policy=NO_CACHE, persist_result=False, task_run_name="sweep zero-shot")
def run_zero_shot(config: SweepConfig, root: str, pinned: str, uri: str, experiment_id: str,
                  parent_run_id: str) -> list[StudyRecord]:
    """The base model without an adapter on every task (decoders): the floor the methods are read against."""
    floor = Sweep(config, root, log=get_run_logger().info, pinned=pinned).zero_shot()
    for rec in floor:
        tracking.log_study_record(uri, experiment_id, parent_run_id, rec.model_dump())
    return floor


@flow(name="lsq-budget-sweep", log_prints=False, persist_result=False)
def sweep_flow(preset: str = "quick", overrides: list[str] | None = None, out: str | None = None,
               tracking_uri: str | None = None, experiment: str = "lsq-sweep") -> str:
    """The budget sweep (experiments/sweep.py), smallest budget first, every record a child run of one parent
    run; the parent gets ``sweep.md`` and ``sweep.png``. Returns the markdown."""
    config = load_sweep_config(preset, overrides or [])
    root = out or str(Path("runs/sweep") / preset)
    pinned = Sweep(config, root, log=lambda _: None).code  # pins or checks the code version; the tasks key by it
    uri = tracking_uri or tracking.default_tracking_uri(Tracking())
    experiment_id = tracking.ensure_experiment(uri, experiment)
    parent = tracking.start_pipeline_run(uri, experiment, f"sweep-{preset}", config.model_dump(mode="json"),
                                         {"lsq.kind": "sweep", "lsq.preset": preset})
    started = time.perf_counter()
    with tracking.parent_run(uri, parent, terminating=terminating):
        records: list[StudyRecord] = []
        for budget in sorted(config.budgets):
            records += run_budget(config, root, budget, pinned, uri, experiment_id, parent)
        ladder = run_ladder(config, root, pinned, uri, experiment_id, parent)
        floor = run_zero_shot(config, root, pinned, uri, experiment_id, parent)
        with tempfile.TemporaryDirectory() as tmp:
            text = write_sweep_report(config, records, tmp, f"python -m flows.study --sweep --preset {preset}",
                                      time.perf_counter() - started, ladder, floor)
            tracking.log_folder(uri, parent, tmp)
            for name in os.listdir(tmp):  # and beside the steps, where benchmarks.budget_sweep writes them
                shutil.copy2(Path(tmp) / name, Path(root) / name)
        create_markdown_artifact(text, key="lsq-sweep", description=f"lsq budget sweep ({preset})")
        return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.study", description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="the budget sweep (experiments/sweep.py) instead of the study")
    p.add_argument("--preset", default="quick")
    p.add_argument("--out")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    terminate_on_sigterm()
    try:
        if args.sweep:
            load_sweep_config(args.preset, args.overrides)  # one line for bad settings, before any server
            with prefect_api(start_unless_configured()):
                print(sweep_flow(preset=args.preset, overrides=args.overrides, out=args.out))
            return 0
        load_study_config(args.preset, args.overrides)
        with prefect_api(start_unless_configured()):
            print(study_flow(preset=args.preset, overrides=args.overrides, out=args.out))
    except LsqError as exc:
        print(f"lsq: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
