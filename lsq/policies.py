"""Rank policies: which rank each LoRA module gets in a squeezed adapter.

A policy sees the singular values of every module (descending, from one decomposition) and returns
``{module name: rank}``. Uniform ranks need no spectrum; the energy threshold is per module; the
parameter budget is global; serving snaps a result to one rank that an inference engine accepts.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lsq.errors import LsqError

# vLLM's accepted max_lora_rank values; vLLM applies one scale alpha/r and ignores rank_pattern.
SERVING_RANKS: dict[str, tuple[int, ...]] = {"vllm": (1, 8, 16, 32, 64, 128, 256, 320, 512)}


@dataclass(frozen=True)
class Target:
    """One output adapter: a policy and its value, optionally snapped to a serving engine's ranks."""

    policy: Literal["rank", "energy", "budget"]
    value: float
    serving: str | None = None

    @property
    def needs_spectrum(self) -> bool:
        return self.policy != "rank"

    def folder_name(self, uniform_rank: int | None = None) -> str:
        """``r8``, ``energy0.95``, ``budget1000000``; with serving ``r8-vllm``, ``energy0.95-vllm-r32``."""
        # budgets are ints (":g" would write 1000000 as "1e+06"); energies keep 12 significant digits
        # (":g" keeps 6: 0.9999999 would be "1", and two close thresholds would share a folder)
        if self.policy == "energy":
            base = f"energy{self.value:.12g}"
        else:
            base = f"{'r' if self.policy == 'rank' else 'budget'}{int(self.value)}"
        if self.serving is None:
            return base
        if self.policy == "rank":
            return f"r{uniform_rank}-{self.serving}"
        return f"{base}-{self.serving}-r{uniform_rank}"


def energy_rank(S: torch.Tensor, tau: float) -> int:
    """Smallest k whose first k squared singular values hold at least ``tau`` of their sum."""
    sq = S.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(sq, 0) / total
    # a relative slack of 1e-12 keeps tau=1.0 from asking for a rank that rounding makes unreachable
    return min(int((cum < tau - 1e-12).sum()) + 1, len(S))


def budget_ranks(
    spectra: Mapping[str, torch.Tensor], widths: Mapping[str, int], budget: int, max_ranks: Mapping[str, int]
) -> dict[str, int]:
    """Ranks that fit ``sum(rank * width) <= budget`` (width = d_in + d_out), greedy by gain per parameter.

    Every module starts at rank 1; then the next singular triplet with the largest ``sigma^2 / width``
    is added while it fits. Gains are non-increasing within a module, so the greedy choice is the
    optimal allocation of the squared Frobenius norm kept for this budget, up to the last item.
    """
    ranks = {name: 1 for name in spectra}
    used = sum(widths.values())
    if used > budget:
        raise LsqError(f"--budget {budget} is below the minimum of {used} parameters (rank 1 for every module)")
    heap = [(-float(S[1]) ** 2 / widths[n], n) for n, S in spectra.items() if max_ranks[n] > 1 and len(S) > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        if used + widths[name] > budget:
            continue  # a narrower module may still fit
        ranks[name] += 1
        used += widths[name]
        k, S = ranks[name], spectra[name]
        if k < min(max_ranks[name], len(S)):
            heapq.heappush(heap, (-float(S[k]) ** 2 / widths[name], name))
    return ranks


def snap_up(rank: int, serving: str) -> int:
    """Smallest rank the serving engine accepts that is at least ``rank``."""
    allowed = SERVING_RANKS[serving]
    for value in allowed:
        if value >= rank:
            return value
    raise LsqError(f"rank {rank} exceeds the largest rank {serving} accepts ({allowed[-1]})")


def resolve_ranks(
    target: Target,
    source_ranks: Mapping[str, int],
    spectra: Mapping[str, torch.Tensor] | None = None,
    widths: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """``{module: rank}`` for one target. Uniform ranks must be below every module's source rank."""
    if target.policy == "rank":
        k = int(target.value)
        if target.serving:
            k = snap_up(k, target.serving)
        ranks = {name: k for name in source_ranks}
    else:
        if spectra is None or widths is None:
            raise ValueError(f"the {target.policy} policy needs the spectra and widths of every module")
        if target.policy == "energy":
            ranks = {n: min(energy_rank(spectra[n], target.value), source_ranks[n]) for n in source_ranks}
        else:
            ranks = budget_ranks(spectra, widths, int(target.value), source_ranks)
        if target.serving:
            return _serving_uniform(target, ranks, source_ranks, widths)
        return ranks
    smallest = min(source_ranks, key=source_ranks.get)
    if k < 1 or k >= source_ranks[smallest]:
        what = f"rank {k}" + (f" (snapped up for {target.serving})" if target.serving else "")
        raise LsqError(
            f"target {what} is not below the source rank {source_ranks[smallest]} of module {smallest}; "
            "a squeeze must reduce the rank (copy the adapter instead)"
        )
    return ranks


def _serving_uniform(
    target: Target, ranks: Mapping[str, int], source_ranks: Mapping[str, int], widths: Mapping[str, int]
) -> dict[str, int]:
    """One serving rank from a per-module result: energy snaps the largest rank up (every module meets
    the threshold); budget takes the largest accepted rank whose uniform adapter fits the budget."""
    smallest_source = min(source_ranks.values())
    if target.policy == "energy":
        need = max(ranks.values())
        k = snap_up(need, target.serving)
        if k > smallest_source:
            module = max(ranks, key=ranks.get)
            raise LsqError(
                f"--energy {target.value:g}: module {module} needs rank {need}; the {target.serving} rank that covers "
                f"it ({k}) exceeds the source rank {smallest_source}"
            )
    else:  # budget_ranks already refused a budget below rank 1 everywhere, and 1 is a serving rank
        width = sum(widths.values())
        k = max(v for v in SERVING_RANKS[target.serving] if v <= smallest_source and v * width <= target.value)
    return {name: min(k, source_ranks[name]) for name in source_ranks}


def parse_targets(
    ranks: Sequence[int] = (), energy: Sequence[float] = (), budget: Sequence[int] = (), serving: str | None = None
) -> list[Target]:
    """Targets from the CLI's ``--ranks``, ``--energy`` and ``--budget`` values, in that order."""
    targets = [Target("rank", k, serving) for k in ranks]
    targets += [Target("energy", t, serving) for t in energy]
    targets += [Target("budget", b, serving) for b in budget]
    return targets
