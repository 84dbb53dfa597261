"""Report of the budget sweep (experiments/sweep.py): accuracy against budget per method, one panel per rank;
tables (mean over tasks, and per task) with standard errors over seeds; where the methods' order
changes between budgets; the choices made on validation. It reads :class:`~lsq.records.StudyRecord` objects and
the sweep's :class:`~experiments.sweep.Ladder`. Pure lsq: no torch, prefect or mlflow.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from experiments.study_report import one_score, score_names, summarize
from experiments.sweep import Ladder, SweepConfig
from lsq.plotting import PLOT_LOCK
from lsq.records import StudyRecord

# (a, b): the pairs whose order the report follows across budgets
PAIRS = (("in", "cont"), ("direct", "cont"), ("direct", "in"), ("post", "cont"))


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def by_budget(records: Iterable[StudyRecord], methods: Sequence[str]) -> dict[int, dict]:
    """``{budget: summarize(...)}`` over the records of the compared methods."""
    groups: dict[int, list[StudyRecord]] = {}
    for r in records:
        if r.method in methods:
            groups.setdefault(int(r.budget), []).append(r)
    return {t: summarize(rows) for t, rows in sorted(groups.items())}


def budget_table(summaries: Mapping[int, Mapping], methods: Sequence[str], ranks: Sequence[int], task: str = "mean") -> str:
    """Rows: rank x budget; columns: methods; ``mean ± se`` in %, the best in each row bold."""
    lines = ["| rank | steps | " + " | ".join(methods) + " |", "|---:|---:|" + "---:|" * len(methods)]
    for k in ranks:
        for t, summary in summaries.items():
            cells = {m: summary.get((task, m, k)) for m in methods}
            if not any(cells.values()):
                continue
            best = max(v["mean"] for v in cells.values() if v)
            row = []
            for m in methods:
                v = cells[m]
                text = "" if v is None else f"{v['mean'] * 100:.1f} ± {v['se'] * 100:.1f}"
                row.append(f"**{text}**" if v is not None and v["mean"] == best else text)
            lines.append(f"| {k} | {t} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def crossings(summaries: Mapping[int, Mapping], ranks: Sequence[int], pairs=PAIRS, task: str = "mean") -> list[str]:
    """For each rank and pair (a, b): the sign of mean(a) - mean(b) at every budget, and where it
    changes ("a overtakes b between 200 and 600 steps"), or that it does not. A gap within the two
    standard errors combined is called a tie, and a change to or from a tie is not a crossing."""
    out = []
    budgets = list(summaries)
    for k in ranks:
        for a, b in pairs:
            signs, gaps = [], []
            for t in budgets:
                va, vb = summaries[t].get((task, a, k)), summaries[t].get((task, b, k))
                if va is None or vb is None:
                    break
                gap = va["mean"] - vb["mean"]
                noise = (va["se"] ** 2 + vb["se"] ** 2) ** 0.5
                signs.append(0 if abs(gap) <= noise else (1 if gap > 0 else -1))
                gaps.append(gap)
            else:
                if not signs:
                    continue
                trail = ", ".join(f"{g * 100:+.1f}" for g in gaps)
                flips = [(budgets[i], budgets[j]) for i in range(len(signs)) for j in range(i + 1, len(signs))
                         if signs[i] and signs[j] and signs[i] != signs[j] and not any(signs[i + 1:j])]
                if flips:
                    lo, hi = flips[0]
                    who = (a, b) if signs[budgets.index(hi)] > 0 else (b, a)
                    verdict = f"{who[0]} overtakes {who[1]} between {lo} and {hi} steps"
                elif len(signs) == 1:  # one budget: who is ahead there
                    verdict = {1: f"{a} ahead", -1: f"{b} ahead", 0: "a tie"}[signs[0]]
                else:
                    verdict = "no crossing in this range"
                out.append(f"rank {k}, {a} - {b} (points, at {'/'.join(map(str, budgets))} steps): {trail}: {verdict}")
    return out


def choices_table(records: Iterable[StudyRecord], methods: Sequence[str]) -> str:
    """The rate (and In-Squeeze share) each budget chose on validation, per method and rank."""
    chosen: dict[tuple[int, str, int], str] = {}
    for r in records:
        if r.method in (*methods, "source"):
            text = f"{r.lr:g}"
            if r.method == "in":
                text += f", first {r.fraction:g}" if r.fraction is not None else ", equal stages"
            chosen[(int(r.budget), r.method, r.rank)] = text
    budgets = sorted({t for t, _, _ in chosen})
    cols = sorted({(m, k) for _, m, k in chosen}, key=lambda mk: ((*methods, "source").index(mk[0]), mk[1]))
    lines = ["| steps | " + " | ".join(f"{m} r{k}" for m, k in cols) + " |", "|---:|" + "---|" * len(cols)]
    for t in budgets:
        lines.append(f"| {t} | " + " | ".join(chosen.get((t, m, k), "") for m, k in cols) + " |")
    return "\n".join(lines)


def plot_budgets(summaries: Mapping[int, Mapping], methods: Sequence[str], ranks: Sequence[int],
                 path: str | Path, sources: Mapping[int, Mapping] | None = None, tasks: Sequence[str] = ("mean",),
                 floor: Mapping[str, float] | None = None, ylabel: str = "test accuracy, mean over tasks (%)") -> None:
    """Test score (± standard error over seeds) against the step budget: one panel per task (``"mean"``: the mean over
    tasks) and rank; methods side by side at each budget; the source (dotted) and the base model's zero-shot score
    (``floor``, dashed) as references."""
    budgets = list(summaries)
    with PLOT_LOCK:
        fig = Figure(figsize=(4.2 * len(ranks), 3.8 * len(tasks)))
        grid = fig.subplots(len(tasks), len(ranks), sharey="row", squeeze=False)
        for row, task in zip(grid, tasks):
            for ax, k in zip(row, ranks):
                for i, m in enumerate(methods):
                    pts = [(t, s[(task, m, k)]) for t, s in summaries.items() if (task, m, k) in s]
                    if pts:  # each method a little apart, so that one budget's points do not hide each other
                        shift = 1.06 ** (i - (len(methods) - 1) / 2)
                        ax.errorbar([t * shift for t, _ in pts], [v["mean"] * 100 for _, v in pts],
                                    yerr=[v["se"] * 100 for _, v in pts], marker="o", capsize=3, label=m,
                                    ls="-" if len(pts) > 1 else "none")
                if sources and task == "mean":
                    pts = [(t, v) for t, v in sources.items() if v]
                    if pts:
                        ax.plot([t for t, _ in pts], [v["mean"] * 100 for _, v in pts], color="grey", ls=":",
                                marker=".", label="source r64")
                if floor and task in floor:
                    ax.axhline(floor[task] * 100, color="black", ls="--", lw=1, label="base, zero-shot")
                ax.set(xscale="log", xlabel="optimizer steps (budget)", title=f"rank {k}" if task == "mean" else f"{task}, rank {k}")
                ax.minorticks_off()
                ax.set_xticks(budgets, [str(t) for t in budgets])
                ax.set_xlim(min(budgets) / 1.3, max(budgets) * 1.3)
                ax.grid(alpha=0.3)
            row[0].set_ylabel(ylabel if task == "mean" else f"test score, {task} (%)")
        grid[0][-1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)


def ladder_section(ladder: Ladder, config: SweepConfig) -> str:
    """The ladder: test accuracy per rank of each route, then what each route cost."""
    c = config.ladder()
    summary = summarize(ladder.records)
    task = "mean" if len(c.tasks) > 1 else c.tasks[0]
    lines = [
        f"A ladder of adapters at ranks {', '.join(map(str, c.ranks))} on {', '.join(c.tasks)} ({_n(len(c.seeds), 'seed')}): "
        f"(a) each rank trained directly for {c.steps} steps; (b) one rank-{c.source_rank} source of "
        f"{c.steps - c.recover_steps} steps, one squeeze to every rank, {c.recover_steps} recovery steps per rank "
        f"(Cont-Squeeze, the same per-adapter budget). Test {score_names(ladder.records)} (%)"
        + (", mean ± standard error over seeds:" if len(c.seeds) > 1 else ", one seed:"),
        "",
        "| rank | (a) direct | (b) one source, squeezed |",
        "|---:|---:|---:|",
    ]
    for k in c.ranks:
        cells = []
        for m in ("direct", "cont"):
            v = summary.get((task, m, k))
            spread = f" ± {v['se'] * 100:.1f}" if v is not None and len(c.seeds) > 1 else ""
            cells.append("" if v is None else f"{v['mean'] * 100:.1f}{spread}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    mean = ladder.costs["mean"]
    if mean:
        lines += [
            "",
            "| cost of the whole ladder | (a) direct | (b) one source | (a) / (b) |",
            "|---|---:|---:|---:|",
            f"| optimizer steps | {mean['direct_steps']:,.0f} | {mean['squeeze_steps']:,.0f} | "
            f"{mean['direct_steps'] / mean['squeeze_steps']:.2f}x |",
            f"| optimizer steps x rank | {mean['direct_step_rank']:,.0f} | {mean['squeeze_step_rank']:,.0f} | "
            f"{mean['direct_step_rank'] / mean['squeeze_step_rank']:.2f}x |",
            f"| training seconds here (b: with the squeeze, {ladder.squeeze_seconds:.2f} s) | "
            f"{mean['direct_seconds']:.0f} | {mean['squeeze_seconds']:.0f} | "
            f"{mean['direct_seconds'] / mean['squeeze_seconds']:.2f}x |",
        ]
    return "\n".join(lines)


def floor_line(floor: Sequence[StudyRecord]) -> str:
    """The base model's zero-shot scores, the floor every method is read against."""
    return ("The base model without an adapter (zero-shot, the same splits and scoring), test (validation): " +
            ", ".join(f"{r.task} {r.test_score * 100:.1f} ({r.val_score * 100:.1f})" for r in floor) + ".")


def report(config: SweepConfig, records: Sequence[StudyRecord], command: str, seconds: float,
           ladder: Ladder | None = None, floor: Sequence[StudyRecord] = ()) -> str:
    """The sweep's markdown: score against budget (mean over tasks when they share a score, then per task), crossings,
    choices, the zero-shot floor (decoders)."""
    s = config.study
    summaries = by_budget(records, s.methods)
    seeds = {t: len({r.seed for r in records if int(r.budget) == t}) for t in summaries}
    counts = sorted(set(seeds.values()))
    over = _n(counts[0], "seed") if len(counts) == 1 else "seeds (" + ", ".join(
        f"{n} at {'/'.join(str(t) for t in summaries if seeds[t] == n)} steps" for n in counts) + ")"
    mean = one_score(records)
    rows = min((r.test_examples for r in records if not r.diverged), default=0)
    lines = [
        f"Test {score_names(records)} (%), " + (f"mean over {_n(len(s.tasks), 'task')} ({', '.join(s.tasks)}) " if mean
                                               else "per task ") + f"± standard error over "
        f"{over}; bold: best method per row. Every method has the same optimizer-step budget; "
        f"cont spends {config.recover_fraction:.0%} of it on recovery at the target rank; post trains the whole "
        f"budget at rank {s.source_rank} and is squeezed." + (
            f" A score on {rows} test rows also has its own sampling error, up to ±{50 / rows ** 0.5:.1f} points "
            "(binomial, at 50%), which seeds do not show." if s.model_task == "causal_lm" and rows else ""),
    ]
    if floor:
        lines += ["", floor_line(floor)]
    for task in ["mean"] if mean else s.tasks:
        lines += ["", *([] if mean else [f"{task}:", ""]), budget_table(summaries, s.methods, s.ranks, task=task), "",
                  "Where the order changes (gap in points at each budget; within the combined standard errors = a tie):",
                  "", *[f"- {line}" for line in crossings(summaries, s.ranks, task=task)]]
    lines += ["", "Chosen on validation (learning rate; In-Squeeze: share of the budget at the source rank):", "",
              choices_table(records, s.methods)]
    if ladder:
        lines += ["", "## What one run saves", "", ladder_section(ladder, config)]
    if mean:
        lines += ["", "## Per task"]
        for task in s.tasks:
            lines += ["", f"{task}:", "", budget_table(summaries, s.methods, s.ranks, task=task)]
    lines += ["", f"Command: `{command}`; {seconds / 60:.1f} min of wall time in this invocation on {os.cpu_count()} CPUs"
              f" ({len(records)} chosen records)."]
    return "\n".join(lines)


def write_report(config: SweepConfig, records: Sequence[StudyRecord], folder: str | os.PathLike, command: str,
                 seconds: float, ladder: Ladder | None = None, floor: Sequence[StudyRecord] = ()) -> str:
    """``sweep.md``, ``sweep.png`` and ``sweep_summary.json`` (the summary and every chosen record, so
    the numbers outlive the run folder) in ``folder``; returns the markdown."""
    folder = Path(folder)
    s = config.study
    summaries = by_budget(records, s.methods)
    sources = {t: v.get(("mean", "source", s.source_rank)) for t, v in by_budget(records, ("source",)).items()}
    text = report(config, records, command, seconds, ladder, floor)
    mean = one_score(records)
    plot_budgets(summaries, s.methods, s.ranks, folder / "sweep.png", sources=sources,
                 tasks=("mean",) if mean else s.tasks, floor=floor_of(floor, mean),
                 ylabel=f"test {score_names(records)}, mean over tasks (%)")
    (folder / "sweep.md").write_text(text + "\n")
    (folder / "sweep_summary.json").write_text(json.dumps(
        {"config": config.model_dump(mode="json"), "seconds": seconds, "command": command,
         "summary": [{"budget": t, "task": task, "method": m, "rank": k, **v}
                     for t, summary in summaries.items() for (task, m, k), v in summary.items()],
         "records": _dumped(records), "floor": _dumped(floor),
         "ladder": None if ladder is None else {"costs": ladder.costs, "squeeze_seconds": ladder.squeeze_seconds,
                                                "summary": [{"task": task, "method": m, "rank": k, **v} for (task, m, k), v
                                                            in summarize(ladder.records).items()],
                                                "records": _dumped(ladder.records), "sources": _dumped(ladder.sources)}},
        indent=1) + "\n")
    return text


def floor_of(floor: Sequence[StudyRecord], mean: bool) -> dict[str, float]:
    """``{task: test score}`` of the zero-shot records, plus ``"mean"`` when the tasks share a score."""
    out = {r.task: r.test_score for r in floor}
    if mean and out:
        out["mean"] = sum(out.values()) / len(out)
    return out


def _dumped(records: Iterable[StudyRecord]) -> list[dict[str, Any]]:
    """Records as the summary file keeps them (JSON values; a diverged record's NaN scores stay NaN)."""
    return [r.model_dump(mode="json") for r in records]
