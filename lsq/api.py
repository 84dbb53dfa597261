"""Folder-level operations: squeeze an adapter folder into several adapter folders, inspect one.

Everything is written under a temporary name and renamed into place at the end, so a failure leaves
no half-written output and an existing output folder is replaced only when asked (``force``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lsq.adapter import (
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    AtomicFolder,
    find_modules,
    read_adapter,
    write_adapter,
)
from lsq.config import SqueezeConfig
from lsq.errors import LsqError
from lsq.linalg import NonFiniteFactor, factored_svd
from lsq.policies import SERVING_RANKS, energy_rank
from lsq.plotting import PlotProcess
from lsq.report import adapter_report, plot_spectra, spectra_lists
from lsq.squeeze import Progress, load_factors, squeeze_state_dict

REPORT_NAME = "squeeze_report.json"


@dataclass(frozen=True)
class Written:
    """One output adapter folder and its whole-adapter numbers (the totals of its ``squeeze_report.json``)."""

    folder: Path
    lora_params: int
    retained_energy: float  # share of sum_m ||dW_m||_F^2 kept
    relative_error: float  # sqrt(sum_m ||dW_m - dW_m,k||^2 / sum_m ||dW_m||^2)

PLOT_NAME = "spectrum.png"
_ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME}


def squeeze_adapter(
    src: str | os.PathLike,
    out: str | os.PathLike,
    config: SqueezeConfig,
    *,
    force: bool = False,
    plot: bool = True,
    plotter: PlotProcess | None = None,
    workers: int = 1,
    progress: Progress = lambda it: it,
) -> dict[str, Written]:
    """Squeeze the PEFT adapter folder ``src`` into ``out/<name>`` for every target of ``config``.

    Each ``out/<name>`` is a standard PEFT adapter folder (``PeftModel.from_pretrained`` loads it)
    with ``squeeze_report.json`` and ``spectrum.png`` beside the weights; other files of ``src``
    (model card, tokenizer) are copied. Returns ``{name: Written}`` (folder and totals).

    ``plotter`` (a started :class:`lsq.plotting.PlotProcess`) draws the plot in a child process while
    the adapters are written; without it the plot is drawn here. ``workers`` > 1 decomposes modules in
    that many threads (:func:`lsq.squeeze.squeeze_state_dict`).
    """
    src = Path(src)
    if Path(out).resolve() in (src.resolve(), *src.resolve().parents):  # --force would delete the source
        raise LsqError(f"{out}: output folder is or contains the source adapter {src}; choose another --out")
    atomic = AtomicFolder(out, force=force)  # refuses an existing folder before any work
    source_config, weights = read_adapter(src)
    result = squeeze_state_dict(weights, source_config, config, progress=progress, workers=workers)
    settings = config.model_dump(mode="json", exclude={"ranks", "energy", "budget"})
    extras = [p for p in src.iterdir() if p.is_file() and p.name not in _ADAPTER_FILES]
    totals = {}
    # leaving the block stops the plot's child, which writes into tmp, before tmp is removed
    with atomic as tmp, plotter if plotter is not None else contextlib.nullcontext():
        if plot:
            marks = {a.name: next(iter(a.ranks.values())) for a in result.adapters if len(set(a.ranks.values())) == 1}
            if plotter is not None:
                plotter.submit(spectra_lists(result), tmp / PLOT_NAME, marks)  # drawn while we write
            else:
                plot_spectra(result, tmp / PLOT_NAME, marks)
        for adapter in result.adapters:
            folder = tmp / adapter.name
            write_adapter(folder, adapter.config, adapter.weights)
            report = adapter_report(result, adapter, str(src), settings)
            totals[adapter.name] = report["totals"]
            (folder / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
            for extra in extras:
                shutil.copy2(extra, folder / extra.name)
        if plot:
            if plotter is not None:
                try:
                    plotter.wait()
                except RuntimeError as exc:
                    raise LsqError(str(exc)) from None
            for adapter in result.adapters:
                shutil.copy2(tmp / PLOT_NAME, tmp / adapter.name / PLOT_NAME)
    return {a.name: Written(folder=Path(out) / a.name, lora_params=int(totals[a.name]["lora_params"]),
                            retained_energy=float(totals[a.name]["retained_energy"]),
                            relative_error=float(totals[a.name]["relative_error"])) for a in result.adapters}


def inspect_adapter(src: str | os.PathLike, energies=(0.5, 0.8, 0.9, 0.95, 0.99), progress: Progress = lambda it: it) -> dict[str, Any]:
    """Spectrum summary of an adapter and the rank each policy would pick (no files written)."""
    config, weights = read_adapter(src)
    modules = find_modules(list(weights.keys()), config)
    rows, total_params = [], 0
    for m in progress(modules):
        A, B = load_factors(weights, m)
        try:
            S = factored_svd(A, B, m.scale, keep=0).S
        except NonFiniteFactor as exc:
            raise LsqError(f"module {m.name}: {exc}") from None
        total_params += m.rank * (A.shape[1] + B.shape[0])
        rows.append({
            "module": m.name,
            "source_rank": m.rank,
            "sigma_1": float(S[0]),
            "effective_rank": _effective_rank(S),
            **{f"energy_{tau:g}": energy_rank(S, tau) for tau in energies},
        })
    summary = {
        "source": str(src),
        "modules": len(modules),
        "source_ranks": sorted({m.rank for m in modules}),
        "use_rslora": bool(config.get("use_rslora", False)),
        "use_dora": bool(config.get("use_dora", False)),
        "lora_params": total_params,
    }
    for tau in energies:
        k = max(row[f"energy_{tau:g}"] for row in rows)
        summary[f"energy_{tau:g}"] = {
            "uniform_rank": k,
            **{f"{engine}_rank": next((v for v in ranks if v >= k), None) for engine, ranks in SERVING_RANKS.items()},
        }
    return {"summary": summary, "modules": rows}


def _effective_rank(S: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values."""
    p = S.double() / S.double().sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum())) if len(p) else 0.0
