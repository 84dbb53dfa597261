"""The evidence study as a Prefect flow: every trained adapter is a child run in MLflow.

    python -m flows.study [--preset quick|full] [key=value ...]

One Prefect task per method: it chooses the method's learning rate per rank on the validation split
of the first (or ``select_task``) task and trains every task, rank and seed (lsq/study.py holds the rules; ``benchmarks/study.py`` runs the same study without
Prefect and MLflow). Each record is logged as it lands, under one parent run per study, so the MLflow
UI compares methods, ranks and seeds (filter ``tags.lsq.method``, chart ``test_accuracy`` against
``lora_params``). The parent run gets the table (``study.md``) and the plot (``study.png``).
Records live in ``runs/study/<preset>/records.jsonl`` as with the command, so a re-run resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

for _k, _v in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"), ("HF_HUB_OFFLINE", "1")):
    os.environ.setdefault(_k, _v)

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from lsq.pipeline_config import Tracking  # noqa: E402
from lsq.study import Study, StudyConfig, load_study_config  # noqa: E402
from lsq.study_report import write_report  # noqa: E402
from tasks import tracking  # noqa: E402
from tasks.steps import COMPUTE_TAG  # noqa: E402


@task(tags=[COMPUTE_TAG], cache_policy=NO_CACHE)  # lsq.study keeps its own records and resumes from them
def run_method(config: StudyConfig, root: str, method: str, uri: str, experiment_id: str, parent_run_id: str) -> list[dict]:
    """One method: its learning rate chosen on validation, then every task, rank and seed."""
    log = get_run_logger()
    study = Study(config.model_copy(update={"methods": (method,)}), root, log=log.info,
                  on_record=lambda rec: tracking.log_study_record(uri, experiment_id, parent_run_id, rec))
    return study.run_all()


@flow(name="lsq-study", log_prints=False)
def study_flow(preset: str = "quick", overrides: list[str] | None = None, out: str | None = None,
               tracking_uri: str | None = None, experiment: str = "lsq-study") -> str:
    """Run the study and log it to MLflow; returns the markdown table."""
    config = load_study_config(preset, overrides or [])
    root = out or str(Path("runs/study") / preset)
    uri = tracking_uri or tracking.default_tracking_uri(Tracking())
    experiment_id = tracking.ensure_experiment(uri, experiment)
    parent = tracking.start_pipeline_run(uri, experiment, f"study-{preset}", config.model_dump(mode="json"),
                                         {"lsq.kind": "study", "lsq.preset": preset})
    status = "FAILED"
    started = time.perf_counter()
    try:
        # records of an earlier (resumed) study, logged once under this parent; new ones as they land
        for rec in Study(config, root, log=lambda _: None).records.values():
            tracking.log_study_record(uri, experiment_id, parent, rec)
        records = []
        for method in config.methods:
            records += run_method(config, root, method, uri, experiment_id, parent)
        study = Study(config, root, log=lambda _: None)
        with tempfile.TemporaryDirectory() as tmp:
            text = write_report(study, records, tmp, f"python -m flows.study --preset {preset}",
                                time.perf_counter() - started)
            tracking.client_for(uri).log_artifacts(parent, tmp)
        create_markdown_artifact(text, key="lsq-study", description=f"lsq study ({preset})")
        status = "FINISHED"
        return text
    finally:
        tracking.finish_run(uri, parent, status)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="quick")
    p.add_argument("--out")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    print(study_flow(preset=args.preset, overrides=args.overrides, out=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
