"""What people look at to choose a rank: a JSON report beside each output and a spectrum plot."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lsq.plotting import PLOT_LOCK  # also taken by tasks.tracking.pareto
from lsq.plotting import plot_spectra as _plot
from lsq.squeeze import SqueezedAdapter, SqueezeResult
from lsq.variants import pareto_front


def _kept(S: torch.Tensor, k: int) -> tuple[float, float]:
    """(retained energy, relative Frobenius error) of the rank-k truncation of one spectrum."""
    sq = S.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1.0, 0.0
    kept = float(sq[:k].sum())
    return kept / total, math.sqrt(max(total - kept, 0.0) / total)


def adapter_report(result: SqueezeResult, adapter: SqueezedAdapter, source: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Per module: source rank, rank, alpha, retained energy, relative error, singular values; plus totals.

    Totals weight every module by its squared Frobenius norm: ``retained_energy`` is the fraction of
    ``sum_m ||dW_m||_F^2`` kept and ``relative_error`` is ``sqrt(sum_m ||dW_m - dW_m,k||^2 / sum_m ||dW_m||^2)``.
    """
    modules, total_sq, kept_sq, params, source_params = {}, 0.0, 0.0, 0, 0
    for m in result.modules:
        S, k, width = result.singular_values[m.name], adapter.ranks[m.name], result.widths[m.name]
        energy, error = _kept(S, k)
        modules[m.name] = {
            "source_rank": m.rank,
            "rank": k,
            "source_alpha": m.alpha,
            "alpha": adapter.alphas[m.name],
            "retained_energy": energy,
            "relative_error": error,
            "singular_values": S.double().tolist(),
        }
        sq = float((S.double() ** 2).sum())
        total_sq += sq
        kept_sq += energy * sq
        params += k * width
        source_params += m.rank * width
    return {
        "source": source,
        "name": adapter.name,
        "policy": {"kind": adapter.target.policy, "value": adapter.target.value, "serving": adapter.target.serving},
        "settings": dict(settings),
        "totals": {
            "modules": len(modules),
            "lora_params": params,
            "source_lora_params": source_params,
            "retained_energy": kept_sq / total_sq if total_sq else 1.0,
            "relative_error": math.sqrt(max(total_sq - kept_sq, 0.0) / total_sq) if total_sq else 0.0,
            "rank_counts": {str(k): n for k, n in sorted(Counter(adapter.ranks.values()).items())},
        },
        "modules": modules,
    }


def rank_summary(rank_counts: Mapping[str, int]) -> str:
    """The ranks of one output in a few characters: ``8`` when every module has rank 8, else the range
    and the mean over modules, ``1-13 (mean 9.6)``. ``rank_counts``: ``{rank: modules}`` as in the
    report's totals."""
    counts = {int(k): int(n) for k, n in rank_counts.items() if int(n) > 0}
    if not counts:
        return "-"
    if len(counts) == 1:
        return str(next(iter(counts)))
    mean = sum(k * n for k, n in counts.items()) / sum(counts.values())
    return f"{min(counts)}-{max(counts)} (mean {mean:.1f})"


SUMMARY_COLUMNS = ("output", "ranks", "retained energy", "relative error", "size (bytes)", "folder")


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The outputs of one squeeze as an aligned text table, one line per output under a header.

    ``rows``: mappings with ``name``, ``ranks`` (:func:`rank_summary`), ``retained_energy``,
    ``relative_error``, ``adapter_bytes`` and ``folder``. Numbers are right-aligned; the folder comes
    last, so a folder name with spaces stays readable."""
    cells = [SUMMARY_COLUMNS] + [
        (str(r["name"]), str(r["ranks"]), f"{r['retained_energy']:.4f}", f"{r['relative_error']:.4f}",
         f"{int(r['adapter_bytes']):,}", str(r["folder"])) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(SUMMARY_COLUMNS) - 1)]
    right = (False, False, True, True, True)
    return "\n".join(
        "  ".join(cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(row, widths, right)) + "  " + row[-1]
        for row in cells)


def spectra_lists(result: SqueezeResult) -> list[list[float]]:
    """Every module's singular values as plain floats (what :mod:`lsq.plotting` draws)."""
    return [S.double().tolist() for S in result.singular_values.values()]


def plot_spectra(result: SqueezeResult, path: Path, marks: Mapping[str, int] | None = None) -> None:
    """The spectrum plot of a squeeze, drawn in this process (see :mod:`lsq.plotting`)."""
    _plot(spectra_lists(result), path, marks)


def pareto_figure(rows: Sequence[Mapping[str, Any]], metric_name: str, greater_is_better: bool = True,
                  champion_label: str | None = None):
    """``metric`` against ``adapter_bytes`` for every row with a metric, the Pareto front highlighted.

    ``rows``: mappings with ``label``, ``adapter_bytes`` and ``metric`` (None: not drawn). The row
    labelled ``champion_label``, when given and drawn, is circled and named "champion". Returns a
    :class:`matplotlib.figure.Figure` (object API, no pyplot state), drawn under ``PLOT_LOCK``; save
    it under the same lock when other threads may be plotting.
    """
    from matplotlib.figure import Figure

    scored = [r for r in rows if r.get("metric") is not None]
    front = set(pareto_front([(r["label"], int(r["adapter_bytes"]), float(r["metric"])) for r in scored],
                             greater_is_better))
    with PLOT_LOCK:  # matplotlib text layout is not thread-safe
        fig = Figure(figsize=(6.4, 4.4))
        ax = fig.subplots()
        for on in (False, True):
            pts = [r for r in scored if (r["label"] in front) == on]
            ax.scatter([r["adapter_bytes"] for r in pts], [r["metric"] for r in pts], s=60 if on else 30,
                       c="tab:red" if on else "tab:gray", label="Pareto front" if on else "dominated", zorder=3)
            for r in pts:
                ax.annotate(r["label"], (r["adapter_bytes"], r["metric"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        line = sorted((r for r in scored if r["label"] in front), key=lambda r: r["adapter_bytes"])
        ax.plot([r["adapter_bytes"] for r in line], [r["metric"] for r in line], c="tab:red", lw=1, zorder=2)
        best = [r for r in scored if champion_label is not None and r["label"] == champion_label]
        if best:
            ax.scatter([best[0]["adapter_bytes"]], [best[0]["metric"]], s=220, facecolors="none",
                       edgecolors="tab:blue", linewidths=2, label=f"champion ({champion_label})", zorder=4)
        if scored and max(r["adapter_bytes"] for r in scored) > 10 * min(max(r["adapter_bytes"], 1) for r in scored):
            ax.set_xscale("log")
        ax.set(xlabel="adapter size (bytes)", ylabel=metric_name, title=f"{metric_name} vs adapter size")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    return fig
