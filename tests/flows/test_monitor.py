"""The monitor flow under the Prefect test harness: which events it emits, and when it stays quiet.

``emit_event`` is replaced by a recorder (the real emission to a running server, and the deployment
trigger it fires, are covered by test_e2e_servers.py).
"""

from __future__ import annotations

import uuid

import pytest
import yaml
from mlflow import MlflowClient

import tasks.monitoring as monitoring_tasks
from flows.monitor import monitor
from flows.squeeze_pipeline import squeeze_pipeline
from lsq.data import DataConfig, fingerprint, load_data
from tests.lsq.tiny import write_classification_csv


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event, resource, payload=None, **kwargs):
        self.events.append({"event": event, "resource": dict(resource), "payload": dict(payload or {})})
        return type("Event", (), {"id": uuid.uuid4()})()

    def names(self):
        return [e["event"] for e in self.events]


@pytest.fixture
def emitted(monkeypatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(monitoring_tasks, "emit_event", recorder)
    return recorder


def test_no_champion_emits_dataset_updated(tiny_config, emitted, tmp_path):
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config))
    result = monitor(str(config_file))
    fp = fingerprint(load_data(DataConfig(**tiny_config["data"])))
    [event] = emitted.events
    assert event["event"] == "lsq.dataset.updated"
    assert event["resource"]["prefect.resource.id"] == "lsq.dataset.lsq-tiny"
    assert event["payload"]["old_fingerprint"] is None and event["payload"]["new_fingerprint"] == fp
    assert event["payload"]["config"] == str(config_file.resolve())
    assert result.champion is None and [e.event for e in result.events] == ["lsq.dataset.updated"]


def test_monitor_loop_quiet_degraded_updated_retrained(tiny_config, tiny_csv, emitted):
    cfg = tiny_config
    first = squeeze_pipeline(cfg)
    uri = cfg["tracking"]["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("lsq-tiny", "champion")
    recorded = float(champion.tags["test_accuracy"])

    # same data, same model: nothing to say
    result = monitor(cfg, margin=0.02)
    assert emitted.events == []
    assert result.champion.version == str(champion.version)
    assert result.champion.current == pytest.approx(recorded)  # scored again, deterministically

    # the champion once scored much better than it does now: degraded, unless the margin allows it
    client.set_model_version_tag("lsq-tiny", champion.version, "test_accuracy", str(recorded + 0.25))
    monitor(cfg, margin=0.1)
    [event] = emitted.events
    assert event["event"] == "lsq.model.degraded" and event["resource"]["prefect.resource.id"] == "lsq.model.lsq-tiny"
    assert event["payload"]["recorded"] == pytest.approx(recorded + 0.25)
    assert event["payload"]["current"] == pytest.approx(recorded) and event["payload"]["margin"] == 0.1
    assert event["payload"]["champion_version"] == str(champion.version)
    emitted.events.clear()
    monitor(cfg, margin=0.3)
    assert emitted.events == []
    client.set_model_version_tag("lsq-tiny", champion.version, "test_accuracy", str(recorded))

    # new rows in the same file: the dataset changed
    old_fp = champion.tags["lsq.dataset_fingerprint"]
    write_classification_csv(tiny_csv, n=48, seed=7)
    new_fp = fingerprint(load_data(DataConfig(**cfg["data"])))
    monitor(cfg, margin=1.0)
    assert emitted.names() == ["lsq.dataset.updated"]
    payload = emitted.events[0]["payload"]
    assert (payload["old_fingerprint"], payload["new_fingerprint"]) == (old_fp, new_fp) != (old_fp, old_fp)
    emitted.events.clear()

    # what the triggered deployment does: retrain on the new data; afterwards the monitor is quiet again
    second = squeeze_pipeline(cfg)
    assert second.parent_run_id != first.parent_run_id
    monitor(cfg, margin=1.0)
    assert emitted.events == []
    trained = client.search_model_versions(f"name = 'lsq-tiny' AND tags.`lsq.dataset_fingerprint` = '{new_fp}'")
    assert len(trained) == len(first.variants)


@pytest.mark.parametrize("config, margin, message", [
    ({"target_ranks": []}, 0.02, "target_ranks"),
    (None, -0.5, "margin"),
])
def test_monitor_refuses_bad_input_before_any_work(tiny_config, emitted, config, margin, message):
    state = monitor({**tiny_config, **(config or {})}, margin=margin, return_state=True)
    assert state.is_failed() and message in state.message
    assert emitted.events == []
