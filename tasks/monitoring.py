"""Thin Prefect tasks of the monitor flow: score the registered champion on today's data, emit events.

The decisions (has the data changed, has the model degraded) are pure functions in
:mod:`lsq.monitoring`; these tasks only fetch, evaluate and send.
"""

from __future__ import annotations

import tempfile

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from lsq.evaluate import evaluate_adapter
from lsq.monitoring import Finding, recorded_metric
from lsq.pipeline_config import PipelineConfig
from lsq.records import ChampionCheck
from tasks import tracking
from tasks.steps import COMPUTE_TAG


@task(retries=1, retry_delay_seconds=5, tags=[COMPUTE_TAG], cache_policy=NO_CACHE, persist_result=False)
def evaluate_champion(uri: str, cfg: PipelineConfig) -> ChampionCheck | None:
    """The champion's version, tags and recorded ``test_<metric>``, and its metrics on the test split now.

    None when the registered model has no champion. The adapter is downloaded to a temporary folder
    that is removed afterwards.
    """
    metric = cfg.promotion.metric
    with tempfile.TemporaryDirectory(prefix="lsq-champion-") as tmp:
        current = tracking.champion(uri, cfg.registered_model, cfg.promotion.champion_alias, dst_path=tmp)
        if current is None:
            return None
        evaluation = evaluate_adapter(current["adapter_path"], cfg.model, cfg.data, split="test",
                                      batch_size=cfg.train.eval_batch_size)
    if metric not in evaluation:
        raise KeyError(f"promotion.metric: {metric!r} is not among the evaluation's metrics ({', '.join(evaluation)})")
    return ChampionCheck(version=current["version"], run_id=current["run_id"], tags=current["tags"],
                         recorded=recorded_metric(current["tags"], current["metrics"], metric),
                         current=float(evaluation[metric]), examples=int(evaluation["examples"]), split="test")


@task(retries=2, retry_delay_seconds=[2, 5], cache_policy=NO_CACHE, persist_result=False)
def versions_trained_on(uri: str, model_name: str, fingerprint: str) -> list[str]:
    """Registered versions of ``model_name`` whose ``lsq.dataset_fingerprint`` tag is ``fingerprint``."""
    return tracking.versions_trained_on(uri, model_name, fingerprint)


@task(retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, persist_result=False)
def emit_finding(finding: Finding) -> str | None:
    """Send ``finding`` as a Prefect event; its id (None when events are off, e.g. no API configured)."""
    event = emit_event(finding.event, resource=finding.resource, payload=finding.payload)
    return None if event is None else str(event.id)
