"""The monitor, as its story: has the data changed since the champion was trained, has the champion degraded?

    python -m flows.monitor configs/demo.yaml [key=value ...]

fingerprint today's data -> fetch the registered champion and score it on fresh labelled data (the
config's eval split) -> emit ``lsq.dataset.updated`` when the fingerprint differs from the champion's
``lsq.dataset_fingerprint`` tag (or there is no champion), and ``lsq.model.degraded`` when its metric
falls more than ``margin`` below the ``test_<metric>`` recorded on its version. The retraining
deployment (``deployments/``) is triggered by either event. Same parameters as the pipeline, plus
``margin``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from lsq.monitoring import check_dataset, check_metric
from flows.server import prefect_api, start_unless_configured, terminate_on_sigterm
from lsq.errors import LsqError
from lsq.pipeline_config import PipelineConfig, load_pipeline_config, resolve_promotion
from lsq.records import Emitted, MonitorResult
from tasks import tracking
from tasks.monitoring import emit_finding, evaluate_champion, versions_trained_on
from tasks.steps import prepare_data


@flow(name="lsq-monitor", log_prints=False, persist_result=False)
def monitor(config: str | dict[str, Any] | None = None, overrides: list[str] | None = None,
            margin: float = 0.02) -> MonitorResult:
    given: PipelineConfig = load_pipeline_config(config, overrides or [])  # a bad config stops here
    if not margin >= 0:
        raise ValueError(f"margin: {margin} must be >= 0")
    log = get_run_logger()
    data = prepare_data(given.data)
    # promotion.metric=auto: the metric the pipeline chose on these labels
    cfg, _ = resolve_promotion(given, data)
    uri = tracking.default_tracking_uri(cfg.tracking)
    name, source = cfg.registered_model, str(Path(config).resolve()) if isinstance(config, str) else None

    fingerprint = data.fingerprint
    champion = evaluate_champion(uri, cfg)
    trained_on = versions_trained_on(uri, name, fingerprint)
    findings = [check_dataset(name, fingerprint, champion and champion.tags, champion and champion.version,
                              source, trained_on)]
    if champion is not None:
        findings.append(check_metric(name, cfg.promotion.metric, champion.recorded, champion.current, margin,
                                     cfg.promotion.higher_is_better, champion.version, source))
    findings = [f for f in findings if f is not None]
    events = [emit_finding(f) for f in findings]

    for f in findings:
        log.info("%s: %s", f.event, f.payload["reason"])
    if not findings:
        log.info("%s: data %s already trained on (versions %s), champion v%s holds up", name, fingerprint,
                 ", ".join(trained_on), champion.version)
    return MonitorResult(registered_model=name, tracking_uri=tracking.redact_uri(uri), fingerprint=fingerprint,
                         champion=champion, events=tuple(Emitted(event=f.event, resource=f.resource_id, id=i,
                                                                 payload=f.payload) for f, i in zip(findings, events)))


def main(argv: list[str]) -> int:
    config = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if config else argv
    terminate_on_sigterm()
    try:
        load_pipeline_config(config, overrides)  # one line for a bad config, before any server
        with prefect_api(start_unless_configured()):
            result = monitor(config, overrides)
    except LsqError as exc:
        print(f"lsq: error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{result.registered_model}: {[e.event for e in result.events] or 'no events'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
