"""Checks of a registered champion against today's data: has the dataset changed, has the model degraded?

Pure functions: the monitor flow (``flows/monitor.py``) gathers the numbers (the data fingerprint, the
champion's version tags, a fresh evaluation), these decide, and the flow emits each :class:`Finding`
as a Prefect event that a deployment trigger turns into a retraining run.

- ``lsq.dataset.updated`` (resource ``lsq.dataset.<registered model>``): the data's content fingerprint
  differs from the champion's ``lsq.dataset_fingerprint`` tag, or there is no champion yet;
- ``lsq.model.degraded`` (resource ``lsq.model.<registered model>``): the champion's ``test_<metric>``
  on fresh labelled data falls more than ``margin`` below (above, for losses) the value recorded when
  it was registered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DATASET_UPDATED = "lsq.dataset.updated"
MODEL_DEGRADED = "lsq.model.degraded"
FINGERPRINT_TAG = "lsq.dataset_fingerprint"


def dataset_resource(model_name: str) -> str:
    """Resource id of the dataset a registered model is trained on (what ``lsq.dataset.updated`` is about)."""
    return f"lsq.dataset.{model_name}"


def model_resource(model_name: str) -> str:
    """Resource id of a registered model (what ``lsq.model.degraded`` is about)."""
    return f"lsq.model.{model_name}"


@dataclass(frozen=True)
class Finding:
    """One event to emit: its name, the resource it concerns, and a JSON-able payload."""

    event: str
    resource_id: str
    model_name: str
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def resource(self) -> dict[str, str]:
        """The Prefect resource (labels are strings)."""
        return {"prefect.resource.id": self.resource_id, "prefect.resource.name": self.model_name,
                "lsq.registered_model": self.model_name}


def recorded_metric(tags: Mapping[str, str], run_metrics: Mapping[str, float], metric: str) -> float | None:
    """The champion's ``test_<metric>`` when it was registered: its version tag, else its run's metric.

    None when neither holds a finite number (a version registered by hand, a tag written as ``None``).
    """
    key = f"test_{metric}"
    for value in (tags.get(key), run_metrics.get(key)):
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            return number
    return None


def check_dataset(model_name: str, fingerprint: str, champion_tags: Mapping[str, str] | None,
                  champion_version: str | None = None, config: str | None = None,
                  trained_on: Sequence[str] = ()) -> Finding | None:
    """``lsq.dataset.updated`` when the data changed since the champion was trained, or no champion exists.

    ``trained_on``: versions already registered from data with this fingerprint. When there are any,
    the pipeline has seen this data and kept the champion (its winner was worse: a challenger), so
    no event: another retraining on the same data would only repeat that, every time the monitor runs.
    """
    if not fingerprint:
        raise ValueError("fingerprint: empty")
    old = None if champion_tags is None else champion_tags.get(FINGERPRINT_TAG)
    if champion_tags is not None and old == fingerprint:
        return None
    if champion_tags is not None and trained_on:
        return None
    if champion_tags is None:
        reason = "no champion registered yet"
    elif old is None:
        reason = f"the champion (version {champion_version}) has no {FINGERPRINT_TAG} tag"
    else:
        reason = f"data fingerprint {fingerprint} differs from the champion's {old} (version {champion_version})"
    payload = {"registered_model": model_name, "old_fingerprint": old, "new_fingerprint": fingerprint,
               "champion_version": champion_version, "reason": reason}
    if config is not None:
        payload["config"] = config
    return Finding(DATASET_UPDATED, dataset_resource(model_name), model_name, payload)


def check_metric(model_name: str, metric: str, recorded: float | None, current: float, margin: float,
                 greater_is_better: bool = True, champion_version: str | None = None,
                 config: str | None = None) -> Finding | None:
    """``lsq.model.degraded`` when ``current`` is worse than ``recorded`` by more than ``margin`` (absolute).

    No finding without a recorded value (nothing to compare with). A NaN score counts as degraded.
    """
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"margin: {margin} must be a finite number >= 0")
    if recorded is None:
        return None
    sign = 1.0 if greater_is_better else -1.0
    drop = sign * (recorded - current) if math.isfinite(current) else math.inf
    if drop <= margin + 1e-12:  # float noise: 0.90 - 0.88 is a hair above 0.02
        return None
    payload = {"registered_model": model_name, "metric": f"test_{metric}", "recorded": recorded,
               "current": current if math.isfinite(current) else None, "drop": drop if math.isfinite(drop) else None,
               "margin": margin, "greater_is_better": greater_is_better, "champion_version": champion_version,
               "reason": f"test_{metric} {current:.4f} is {drop:.4f} worse than the {recorded:.4f} recorded "
                         f"for version {champion_version} (margin {margin:g})"}
    if config is not None:
        payload["config"] = config
    return Finding(MODEL_DEGRADED, model_resource(model_name), model_name, payload)
