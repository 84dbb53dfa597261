"""Pipeline config errors that must surface before any work: a malformed ``key=value`` override, and a
registered model name MLflow would refuse only at registration, after all the training."""

from __future__ import annotations

import pytest

from lsq.errors import LsqError
from lsq.pipeline_config import load_pipeline_config


def test_malformed_override_is_an_lsq_error():
    with pytest.raises(LsqError) as info:
        load_pipeline_config(None, ["source_rank=[1"])
    message = str(info.value)
    assert "\n" not in message and message.startswith("override 'source_rank=[1': value is not valid YAML (")


REFUSED = ["a/b", "a:b", "lsq/tiny", "..", "..x", ".", "", "  ", "50%"]
ACCEPTED = ["lsq-tiny-movie", "a..b", "x.", "My Model_2", " a"]


@pytest.mark.parametrize("name", REFUSED)
def test_registered_model_mlflow_refuses_is_refused_up_front(name):
    with pytest.raises(LsqError) as info:
        load_pipeline_config({"tracking": {"registered_model": name}})
    message = str(info.value)
    assert "\n" not in message and message.startswith("tracking.registered_model: ") and repr(name) in message


def test_registered_model_message_names_the_rule():
    with pytest.raises(LsqError, match=r"^tracking\.registered_model: .*may not contain '/', ':'.* \(got 'a/b'\)$"):
        load_pipeline_config(None, ["tracking.registered_model=a/b"])


@pytest.mark.parametrize("name", ACCEPTED)
def test_registered_model_mlflow_accepts_is_accepted(name):
    assert load_pipeline_config({"tracking": {"registered_model": name}}).registered_model == name


@pytest.mark.parametrize("name", REFUSED + ACCEPTED)
def test_the_rule_is_mlflows(name):
    """lsq restates MLflow's rule (it may not import mlflow): compare with MLflow's file store, the strictest."""
    file_store = pytest.importorskip("mlflow.store.model_registry.file_store")
    try:
        file_store._validate_model_name(name)
        mlflow_accepts = True
    except Exception:
        mlflow_accepts = False
    assert mlflow_accepts == (name in ACCEPTED)
