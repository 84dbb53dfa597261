"""The monitor's decisions: dataset change and metric degradation, as pure functions."""

from __future__ import annotations

import math

import pytest

from lsq.monitoring import (
    DATASET_UPDATED,
    FINGERPRINT_TAG,
    MODEL_DEGRADED,
    check_dataset,
    check_metric,
    recorded_metric,
)


def test_no_champion_means_dataset_updated():
    f = check_dataset("m", "abc", None, config="cfg.yaml")
    assert f.event == DATASET_UPDATED and f.resource_id == "lsq.dataset.m"
    assert f.payload["old_fingerprint"] is None and f.payload["new_fingerprint"] == "abc"
    assert f.payload["config"] == "cfg.yaml" and "no champion" in f.payload["reason"]
    assert f.resource["prefect.resource.id"] == "lsq.dataset.m"


def test_same_fingerprint_is_quiet_and_a_new_one_is_not():
    assert check_dataset("m", "abc", {FINGERPRINT_TAG: "abc"}, "3") is None
    f = check_dataset("m", "def", {FINGERPRINT_TAG: "abc"}, "3")
    assert (f.payload["old_fingerprint"], f.payload["new_fingerprint"], f.payload["champion_version"]) == ("abc", "def", "3")
    assert "config" not in f.payload


def test_data_already_trained_on_is_quiet_unless_there_is_no_champion():
    # the pipeline ran on "def" and kept the old champion (its winner became challenger): no retrain loop
    assert check_dataset("m", "def", {FINGERPRINT_TAG: "abc"}, "3", trained_on=["5", "6"]) is None
    assert check_dataset("m", "def", None, trained_on=["5"]) is not None


def test_champion_without_fingerprint_tag_counts_as_changed():
    f = check_dataset("m", "abc", {}, "1")
    assert f is not None and "no lsq.dataset_fingerprint tag" in f.payload["reason"]
    with pytest.raises(ValueError, match="fingerprint"):
        check_dataset("m", "", None)


@pytest.mark.parametrize(
    "recorded, current, margin, greater, degraded",
    [
        (0.90, 0.89, 0.02, True, False),  # within the margin
        (0.90, 0.88, 0.02, True, False),  # exactly the margin: not more than it
        (0.90, 0.85, 0.02, True, True),
        (0.90, 0.99, 0.02, True, False),  # better
        (0.50, 0.60, 0.05, False, True),  # a loss went up
        (0.50, 0.40, 0.05, False, False),
        (0.90, math.nan, 0.02, True, True),
    ],
)
def test_degradation_rule(recorded, current, margin, greater, degraded):
    f = check_metric("m", "accuracy", recorded, current, margin, greater, "7")
    assert (f is not None) == degraded
    if f is not None:
        assert f.event == MODEL_DEGRADED and f.resource_id == "lsq.model.m"
        assert f.payload["metric"] == "test_accuracy" and f.payload["champion_version"] == "7"
        assert f.payload["recorded"] == recorded


def test_degradation_needs_a_recorded_value_and_a_sane_margin():
    assert check_metric("m", "accuracy", None, 0.1, 0.02) is None
    with pytest.raises(ValueError, match="margin"):
        check_metric("m", "accuracy", 0.9, 0.1, -0.1)


def test_recorded_metric_prefers_the_tag_then_the_run():
    assert recorded_metric({"test_accuracy": "0.75"}, {"test_accuracy": 0.5}, "accuracy") == 0.75
    assert recorded_metric({"test_accuracy": "None"}, {"test_accuracy": 0.5}, "accuracy") == 0.5
    assert recorded_metric({}, {}, "accuracy") is None
    assert recorded_metric({"test_accuracy": "nan"}, {}, "accuracy") is None
