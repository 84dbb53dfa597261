"""The budget sweep: direct LoRA vs Post-, Cont- and In-Squeeze at 50, 200 and 600 optimizer steps.

    python -m benchmarks.budget_sweep                  # full preset (docs/RESULTS.md, second round)
    python -m benchmarks.budget_sweep --plan           # jobs and optimizer steps per budget, nothing trained
    python -m benchmarks.budget_sweep --preset decoder --plan --measure   # and the minutes, timed on this machine
    python -m benchmarks.budget_sweep --preset quick   # the same machinery in a few minutes (a smoke check)
    python -m benchmarks.budget_sweep budgets=[50,200] seeds=[0,1]   # SweepConfig / StudyConfig fields
    python -m flows.study --sweep                      # the same sweep as a Prefect flow, every run in MLflow

Each budget is one study (experiments/study.py) with its own validation choices (learning rate per method,
In-Squeeze's first-stage share); experiments/sweep.py holds the rules. Interrupted, the same command
resumes: every finished step in ``OUT/steps`` is reused, the cut one resumes from its checkpoint.
At the end it writes ``OUT/sweep.md``, ``OUT/sweep.png`` (accuracy against budget, one panel per
rank) and ``OUT/sweep_summary.json``; ``--docs DIR`` copies the table and plot there.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

for _k, _v in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"), ("HF_HUB_OFFLINE", "1"),
               ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

from experiments.sweep import PRESETS, Sweep, load_sweep_config  # noqa: E402 - after the environment above
from experiments.sweep_report import ladder_section, write_report  # noqa: E402
from lsq.errors import LsqError  # noqa: E402


def command_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="full", help=f"one of {', '.join(PRESETS)} (default full)")
    p.add_argument("--out", type=Path, help="working folder (default runs/sweep/PRESET); an existing one resumes")
    p.add_argument("--plan", action="store_true", help="print the jobs and optimizer steps per budget and exit")
    p.add_argument("--measure", action="store_true",
                   help="with --plan: time a few steps per task on this machine and print the estimated minutes")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="SweepConfig or StudyConfig fields (YAML values)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = command_parser("python -m benchmarks.budget_sweep")
    p.add_argument("--docs", type=Path, help="also write the table and plot to DIR/sweep-PRESET.{md,png}")
    p.add_argument("--ladder", action="store_true",
                   help="only the ladder (every ladder rank trained directly vs one source squeezed to all): OUT/ladder.md")
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.budget_sweep", *(argv if argv is not None else sys.argv[1:])])
    try:
        config = load_sweep_config(args.preset, args.overrides)
        out = args.out or Path("runs/sweep") / args.preset
        if args.plan:
            times = Sweep(config, out, log=lambda line: print(line, file=sys.stderr)).measure() if args.measure else None
            print(json.dumps(Sweep.plan_of(config, times), indent=1))
            return 0
        started = time.perf_counter()
        sweep = Sweep(config, out, log=lambda line: print(line, flush=True))
        if args.ladder:
            return write_ladder(config, sweep, out, args.docs, args.preset, command)
        records = sweep.run_all()
        ladder = sweep.run_ladder()
        floor = sweep.zero_shot()
    except LsqError as exc:
        print(f"lsq sweep: error: {exc}", file=sys.stderr)
        return 2
    text = write_report(config, records, out, command, time.perf_counter() - started, ladder, floor)
    print("\n" + text + f"\n\nplot: {out / 'sweep.png'}")
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "sweep.md", args.docs / f"sweep-{args.preset}.md")
        shutil.copy2(out / "sweep.png", args.docs / f"sweep-{args.preset}.png")
        shutil.copy2(out / "sweep_summary.json", args.docs / f"sweep-{args.preset}.json")
        print(f"copied to {args.docs}/sweep-{args.preset}.{{md,png,json}}")
    return 0


def write_ladder(config, sweep: Sweep, out: Path, docs: Path | None, preset: str, command: str) -> int:
    """Run (or reuse) the ladder alone; ``OUT/ladder.md`` and ``OUT/ladder.json`` (and DIR/ladder-PRESET.md)."""
    ladder = sweep.run_ladder()
    if ladder is None:
        print("lsq sweep: error: ladder_budget is null: no ladder to run", file=sys.stderr)
        return 2
    text = ladder_section(ladder, config) + f"\n\nCommand: `{command}`."
    (out / "ladder.md").write_text(text + "\n")
    (out / "ladder.json").write_text(json.dumps({"costs": ladder.costs, "squeeze_seconds": ladder.squeeze_seconds},
                                                indent=1) + "\n")
    print("\n" + text)
    if docs:
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "ladder.md", docs / f"ladder-{preset}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
