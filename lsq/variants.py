"""Adapter variants of one pipeline run, and the promotion rule that picks one of them.

A variant is one adapter folder with how it was made (method, rank, steps) and, after evaluation,
its metrics. The rule: among the variants, the smallest adapter whose metric is within ``tolerance``
of the best wins; it replaces the current champion only if it is not worse on the same test data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lsq.records import Decision, Method, Variant

__all__ = ["Decision", "Method", "Variant", "choose", "decide", "pareto_front"]


def choose(
    scores: Mapping[str, float],
    sizes: Mapping[str, int],
    tolerance: float,
    greater_is_better: bool = True,
) -> tuple[str, str]:
    """``(label, reason)``: the smallest adapter whose score is within ``tolerance`` of the best.

    Ties in size go to the better score, then to the label (deterministic).
    """
    if not scores:
        raise ValueError("no variant to choose from")
    sign = 1.0 if greater_is_better else -1.0
    best_label = max(scores, key=lambda k: (sign * scores[k], -sizes[k], k))
    best = scores[best_label]
    eligible = [k for k in scores if sign * (best - scores[k]) <= tolerance + 1e-12]
    winner = min(eligible, key=lambda k: (sizes[k], -sign * scores[k], k))
    reason = (
        f"{winner}: {scores[winner]:.4f} within {tolerance:g} of the best {best:.4f} ({best_label}), "
        f"smallest such adapter ({sizes[winner]:,} bytes vs {sizes[best_label]:,})"
        if winner != best_label
        else f"{winner}: best score {best:.4f} and no smaller adapter within {tolerance:g}"
    )
    return winner, reason


def decide(
    scores: Mapping[str, float],
    sizes: Mapping[str, int],
    tolerance: float,
    champion_score: float | None,
    greater_is_better: bool = True,
    champion_alias: str = "champion",
    challenger_alias: str = "challenger",
) -> Decision:
    """The run's winner and whether it becomes champion (not worse than the current one) or challenger."""
    winner, reason = choose(scores, sizes, tolerance, greater_is_better)
    if champion_score is None:
        return Decision(winner=winner, alias=champion_alias, reason=reason + "; no current champion")
    sign = 1.0 if greater_is_better else -1.0
    if sign * (scores[winner] - champion_score) >= -1e-12:
        return Decision(winner=winner, alias=champion_alias,
                        reason=reason + f"; not worse than the champion's {champion_score:.4f}")
    return Decision(winner=winner, alias=challenger_alias,
                    reason=reason + f"; worse than the champion's {champion_score:.4f}, kept as challenger")


def pareto_front(points: Sequence[tuple[str, int, float]], greater_is_better: bool = True) -> list[str]:
    """Labels of the (size, score) points no other point beats in both."""
    sign = 1.0 if greater_is_better else -1.0
    front = []
    for label, size, score in points:
        dominated = any(
            s2 <= size and sign * sc2 >= sign * score and (s2 < size or sign * sc2 > sign * score)
            for l2, s2, sc2 in points if l2 != label
        )
        if not dominated:
            front.append(label)
    return front
