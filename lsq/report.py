"""What people look at to choose a rank: a JSON report beside each output and a spectrum plot."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lsq.squeeze import SqueezedAdapter, SqueezeResult


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
            "singular_values": [float(x) for x in S],
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


# Matplotlib's text layout (pyparsing-based) is not thread-safe; every lsq plot takes this lock, so
# squeezes running in worker threads (Prefect's task runner) and the tracking code can share it.
PLOT_LOCK = threading.Lock()


def plot_spectra(result: SqueezeResult, path: Path, marks: Mapping[str, int] | None = None) -> None:
    """PNG: normalised singular values per module (left) and cumulative energy (right), with the
    uniform target ranks marked. Matplotlib is imported here only (object API, no pyplot state)."""
    with PLOT_LOCK:
        _plot_spectra(result, path, marks or {})


def _plot_spectra(result: SqueezeResult, path: Path, marks: Mapping[str, int]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ax_s, ax_e = fig.subplots(1, 2)
    alpha = max(0.08, min(0.8, 8 / max(len(result.singular_values), 1)))
    for S in result.singular_values.values():
        S = S.double()
        if float(S[0]) <= 0:
            continue
        ks = range(1, len(S) + 1)
        ax_s.semilogy(ks, (S / S[0]).clamp_min(1e-12).tolist(), color="tab:blue", alpha=alpha, lw=1)
        ax_e.plot(ks, (torch.cumsum(S**2, 0) / (S**2).sum()).tolist(), color="tab:blue", alpha=alpha, lw=1)
    for label, k in marks.items():
        for ax in (ax_s, ax_e):
            ax.axvline(k, color="tab:red", ls="--", lw=1)
        ax_e.annotate(label, (k, 0.02), color="tab:red", rotation=90, fontsize=8, ha="right")
    ax_s.set(xlabel="k", ylabel="sigma_k / sigma_1", title=f"Singular values ({len(result.singular_values)} modules)")
    ax_e.set(xlabel="rank k", ylabel="retained energy", title="Cumulative energy", ylim=(0, 1.02))
    for ax in (ax_s, ax_e):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
