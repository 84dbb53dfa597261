"""Aggregation and reporting of the study (experiments/study.py runs it): mean and standard error over
seeds, the markdown tables (accuracy; chosen learning rates), the accuracy-against-size plot, and
the files ``study.md``, ``study.png`` and ``summary.json``. It reads :class:`~lsq.records.StudyRecord` objects
(:func:`read_records` reads a finished study's). Pure lsq: no torch, prefect or mlflow.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from experiments.study import Study, StudyConfig
from lsq.plotting import PLOT_LOCK
from lsq.records import StudyRecord


def read_records(path: str | os.PathLike) -> list[StudyRecord]:
    """The records of a records file (``<root>/records.jsonl``), also one written before ``metric``/``val_score``."""
    with open(path) as fh:
        return [StudyRecord.model_validate(json.loads(line)) for line in fh if line.strip()]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def scores_of(records: Iterable[StudyRecord]) -> dict[str, str]:
    """``{task: score}``: the metric each task's records were scored by (``metric: auto`` differs per task)."""
    return {r.task: r.metric for r in records}


def one_score(records: Iterable[StudyRecord]) -> bool:
    """Whether every record has the same metric, so that a mean over tasks means something."""
    return len({r.metric for r in records}) <= 1


def score_names(records: Iterable[StudyRecord]) -> str:
    """The score in words: "exact match", or per task "exact match (addition), choice accuracy (tweets)"."""
    named = {t: m.replace("_", " ") for t, m in scores_of(records).items()}
    if len(set(named.values())) <= 1:
        return next(iter(named.values()), "score")
    return ", ".join(f"{m} ({t})" for t, m in named.items())


def summarize(records: Iterable[StudyRecord], metric: str = "test_score") -> dict[tuple[str, str, int], dict[str, Any]]:
    """``{(task, method, rank): {mean, se, n, lr, lora_params}}`` over seeds of the records' ``metric`` field,
    plus task ``"mean"`` rows (per seed, the mean over tasks; then mean and standard error over seeds)."""
    records = list(records)
    groups: dict[tuple[str, str, int], list[StudyRecord]] = {}
    for r in records:
        groups.setdefault((r.task, r.method, r.rank), []).append(r)
    out = {}
    for key, rows in groups.items():
        m, se = mean_se([getattr(r, metric) for r in rows])
        out[key] = {"mean": m, "se": se, "n": len(rows), "lr": rows[0].lr, "lora_params": rows[0].lora_params}
    tasks = sorted({k[0] for k in groups})
    if not one_score(records):
        return out  # no mean over tasks scored differently (exact match on one, choice accuracy on another)
    for method, rank in sorted({(k[1], k[2]) for k in groups}):
        per_seed: dict[int, list[float]] = {}
        for task in tasks:
            for r in groups.get((task, method, rank), []):
                per_seed.setdefault(r.seed, []).append(getattr(r, metric))
        complete = [statistics.fmean(v) for v in per_seed.values() if len(v) == len(tasks)]
        if complete:
            m, se = mean_se(complete)
            params = statistics.fmean(out[(t, method, rank)]["lora_params"] for t in tasks if (t, method, rank) in out)
            out[("mean", method, rank)] = {"mean": m, "se": se, "n": len(complete), "lr": None, "lora_params": params}
    return out


def markdown_table(summary: Mapping[tuple[str, str, int], Mapping[str, Any]], methods: Sequence[str],
                   ranks: Sequence[int], scale: float = 100.0) -> str:
    """Rows: task x rank; columns: methods; cells ``mean ± se`` (accuracy in %), the best mean in bold."""
    tasks = [t for t in dict.fromkeys(k[0] for k in summary) if t != "mean"] + ["mean"]
    lines = ["| task | rank | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    for task in tasks:
        for rank in ranks:
            cells = {m: summary.get((task, m, rank)) for m in methods}
            if not any(cells.values()):
                continue
            best = max((v["mean"] for v in cells.values() if v), default=None)
            row = []
            for m in methods:
                v = cells[m]
                if v is None:
                    row.append("")
                    continue
                text = f"{v['mean'] * scale:.1f} ± {v['se'] * scale:.1f}"
                row.append(f"**{text}**" if v["mean"] == best else text)
            lines.append(f"| {task} | {rank} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_summary(summary: Mapping[tuple[str, str, int], Mapping[str, Any]], methods: Sequence[str], path: str | Path,
                 source: Mapping[str, Any] | None = None) -> None:
    """Mean test accuracy over tasks (± standard error over seeds) against LoRA parameters, per method."""
    # x: the LoRA parameters in each method's own adapter file, mean over tasks (AdaLoRA saves the
    # ranks its budget kept, module by module, so its size is close to but not exactly rank k's)
    with PLOT_LOCK:
        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        for method in methods:
            pts = sorted((v["lora_params"], v["mean"] * 100, v["se"] * 100)
                         for (t, m, k), v in summary.items() if t == "mean" and m == method)
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        if source:
            ax.axhline(source["mean"] * 100, color="grey", ls=":", label=f"source r{source['rank']}")
        ax.set(xscale="log", xlabel="LoRA parameters (log)", ylabel="test accuracy, mean over tasks (%)",
               title="Accuracy against adapter size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)


def report(study: Study, records: Sequence[StudyRecord], command: str, seconds: float) -> str:
    """The markdown the study prints and writes: table, source reference, chosen learning rates."""
    c = study.config
    reported = [r for r in records if r.method in c.methods]
    summary = summarize(reported)
    sources = summarize([r for r in records if r.method == "source"])
    where = f"{c.selection_task}, seed {c.select_seed}" + (f", rank {c.select_rank}" if c.select_rank else ", at each rank")
    lines = [
        f"Test {score_names(reported)} (%), mean ± standard error over {len(c.seeds)} seeds; bold: best method per row. "
        f"Budget {c.steps} steps of batch {c.batch_size} for every method (cont: {c.steps - c.recover_steps} at "
        f"rank {c.source_rank} + {c.recover_steps} recovery steps; post: {c.steps} at rank {c.source_rank}, then squeezed).",
        "",
        markdown_table(summary, c.methods, c.ranks),
        "",
        "Source adapters (rank {}, {} steps, rate chosen on their own validation accuracy): ".format(c.source_rank, c.steps)
        + ", ".join(f"{t} {v['mean'] * 100:.1f} ± {v['se'] * 100:.1f}" for (t, _, _), v in sorted(sources.items())),
        "",
        f"Learning rates chosen on validation ({where}):",
        "",
        lr_table(records, c),
        "",
        f"Command: `{command}`; wall time {seconds / 60:.1f} min on {os.cpu_count()} CPUs "
        f"({len(study.records)} jobs in {study.root}/records.jsonl).",
    ]
    return "\n".join(lines)


def lr_table(records: Iterable[StudyRecord], config: StudyConfig) -> str:
    """Markdown: the rate of the records (chosen ones) per method (rows) and rank (columns), with each method's grid; a
    choice at the low or high end of a grid of three or more rates is marked (the grid may be too narrow)."""
    chosen = {(r.method, r.rank): r.lr for r in records}
    methods = [m for m in (*config.methods, "source") if any(k[0] == m for k in chosen)]
    ranks = sorted({k for m, k in chosen})
    lines = ["| method | grid | " + " | ".join(f"r{k}" for k in ranks) + " |", "|---|---|" + "---:|" * len(ranks)]
    edges = 0
    for m in methods:
        grid = sorted(config.grid(m))
        cells = []
        for k in ranks:
            lr = chosen.get((m, k))
            edge = lr is not None and len(grid) >= 3 and lr in (grid[0], grid[-1])
            edges += edge
            cells.append("" if lr is None else f"{lr:g}" + (" (edge)" if edge else ""))
        lines.append(f"| {m} | {', '.join(f'{x:g}' for x in grid)} | " + " | ".join(cells) + " |")
    if edges:
        lines += ["", f"{edges} choice(s) at the end of their grid: the best rate may lie outside it."]
    return "\n".join(lines)


def write_report(study: Study, records: Sequence[StudyRecord], folder: str | os.PathLike, command: str,
                 seconds: float) -> str:
    """``study.md`` (:func:`report`), ``study.png`` (:func:`plot_summary`, with the sources' mean as a
    reference line) and ``summary.json`` in ``folder``; returns the markdown."""
    c = study.config
    folder = Path(folder)
    summary = summarize([r for r in records if r.method in c.methods])
    sources = summarize([r for r in records if r.method == "source"])
    source = next((dict(v, rank=c.source_rank) for (t, _, _), v in sources.items() if t == "mean"), None)
    text = report(study, records, command, seconds)
    plot_summary(summary, c.methods, folder / "study.png", source=source)
    (folder / "study.md").write_text(text + "\n")
    (folder / "summary.json").write_text(json.dumps(
        {"config": c.model_dump(mode="json"), "seconds": seconds, "command": command,
         "summary": [{"task": t, "method": m, "rank": k, **v} for (t, m, k), v in summary.items()]}, indent=1) + "\n")
    return text
