"""The evidence study: direct LoRA vs Post-, Cont-, In-Squeeze and AdaLoRA on the four built-in tasks.

    python -m benchmarks.study                     # full preset: 4 tasks x ranks 1,2,4,8 x 5 methods x 3 seeds
    python -m benchmarks.study --preset quick      # one task, two ranks, two seeds: a few minutes
    python -m benchmarks.study steps=100 seeds=[0,1,2,3]   # any StudyConfig field as key=value (YAML values)
    python -m flows.study --preset quick           # the same study as a Prefect flow, every run logged to MLflow

What it does (experiments/study.py holds the engine and its rules): learning rates are chosen per method
and rank on the validation split of the first task at one seed, from each method's grid (``lrs``,
``method_lrs``); every method then runs at every task, rank and seed with the same step budget;
every adapter is scored on the test split. Every adapter is made by the pipeline's steps in
``OUT/steps`` (lsq/steps.py), so a killed study, run again, resumes: finished steps are reused and
the cut one resumes from its checkpoint. Records are logged to ``OUT/records.jsonl``; at the end it prints and writes the
table (mean ± standard error over seeds), ``OUT/study.png`` (accuracy against adapter size) and
``OUT/summary.json``. ``--docs DIR`` also copies the table and plot there (docs/RESULTS.md uses them).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

for _k, _v in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"), ("HF_HUB_OFFLINE", "1"),
               ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

from lsq.errors import LsqError  # noqa: E402
from experiments.study import PRESETS, Study, load_study_config  # noqa: E402
from experiments.study_report import write_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="full", help=f"one of {', '.join(PRESETS)} (default full)")
    p.add_argument("--out", type=Path, help="working folder (default runs/study/PRESET); an existing one resumes")
    p.add_argument("--docs", type=Path, help="also write the table and plot to DIR/study-PRESET.{md,png}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="StudyConfig fields (YAML values)")
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.study", *(argv if argv is not None else sys.argv[1:])])
    try:
        config = load_study_config(args.preset, args.overrides)
        out = args.out or Path("runs/study") / args.preset
        started = time.perf_counter()
        study = Study(config, out, log=lambda line: print(line, flush=True))
        records = study.run_all()
    except LsqError as exc:
        print(f"lsq study: error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    text = write_report(study, records, out, command, seconds)
    print("\n" + text + f"\n\nplot: {out / 'study.png'}")
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "study.md", args.docs / f"study-{args.preset}.md")
        shutil.copy2(out / "study.png", args.docs / f"study-{args.preset}.png")
        print(f"copied to {args.docs}/study-{args.preset}.{{md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
