"""Thin Prefect tasks of the monitor flow: score the registered champion on today's data, emit events.

The decisions (has the data changed, has the model degraded) are pure functions in
:mod:`lsq.monitoring`; these tasks only fetch, evaluate and send.
"""

from __future__ import annotations

import tempfile
from typing import Any

from prefect import task
from prefect.events import emit_event

from lsq.evaluate import evaluate_adapter
from lsq.monitoring import FINGERPRINT_TAG, Finding, recorded_metric
from lsq.pipeline_config import PipelineConfig
from tasks import tracking
from tasks.steps import COMPUTE_TAG


@task(retries=1, retry_delay_seconds=5, tags=[COMPUTE_TAG])
def evaluate_champion(uri: str, cfg: PipelineConfig) -> dict[str, Any] | None:
    """The champion's version, tags and recorded ``test_<metric>``, and its metrics on ``cfg.eval_split`` now.

    None when the registered model has no champion. The adapter is downloaded to a temporary folder
    that is removed afterwards.
    """
    metric = cfg.promotion.metric
    with tempfile.TemporaryDirectory(prefix="lsq-champion-") as tmp:
        current = tracking.champion(uri, cfg.registered_model, cfg.promotion.champion_alias, dst_path=tmp)
        if current is None:
            return None
        evaluation = evaluate_adapter(current["adapter_path"], cfg.model, cfg.data, split=cfg.eval_split,
                                      batch_size=cfg.train.eval_batch_size)
    if metric not in evaluation:
        raise KeyError(f"promotion.metric: {metric!r} is not among the evaluation's metrics ({', '.join(evaluation)})")
    return {"version": current["version"], "run_id": current["run_id"], "tags": current["tags"],
            "recorded": recorded_metric(current["tags"], current["metrics"], metric),
            "current": float(evaluation[metric]), "examples": int(evaluation["examples"]), "split": cfg.eval_split}


@task(retries=2, retry_delay_seconds=[2, 5])
def versions_trained_on(uri: str, model_name: str, fingerprint: str) -> list[str]:
    """Registered versions of ``model_name`` whose ``lsq.dataset_fingerprint`` tag is ``fingerprint``."""
    found = tracking.client_for(uri).search_model_versions(
        f"name = '{model_name}' AND tags.`{FINGERPRINT_TAG}` = '{fingerprint}'")
    return sorted((str(v.version) for v in found), key=int)


@task(retries=2, retry_delay_seconds=2)
def emit_finding(finding: Finding) -> str | None:
    """Send ``finding`` as a Prefect event; its id (None when events are off, e.g. no API configured)."""
    event = emit_event(finding.event, resource=finding.resource, payload=finding.payload)
    return None if event is None else str(event.id)
