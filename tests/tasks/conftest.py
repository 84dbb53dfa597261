"""Fixtures of the tasks/tracking/ tests: a fresh sqlite MLflow store per test, tiny real PEFT adapters.

``mlflow_uri`` is not autouse (tests/tasks/test_steps.py needs no store): the tracking test modules
ask for it with ``pytestmark = pytest.mark.usefixtures("mlflow_uri")``. The store is copied from a
schema-migrated template built once per session; the tiny BERT is built from a config (random
weights) with the MiniLM tokenizer beside it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest

from lsq.api import PLOT_NAME, REPORT_NAME
from lsq.variants import Variant
from tasks.tracking import store
from tests.lsq.tiny import built_once, save_tiny_bert
from tests.tasks.mlflow_store import build_template, save_adapter


@pytest.fixture
def mlflow_uri(tmp_path, tmp_path_factory, monkeypatch) -> str:
    """A fresh sqlite store per test (copied from a migrated template), artifacts in tmp_path."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setattr(store, "RETRY_DELAYS", (0.01, 0.02))
    template = built_once(tmp_path_factory, "mlflow-template", build_template)
    shutil.copy(template / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def base_dir(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "tiny-bert", save_tiny_bert)


@pytest.fixture
def variants(base_dir, tmp_path_factory) -> list[Variant]:
    """post-r2, post-r4, post-r8: three different adapters, built once per session."""
    out = []
    for rank in (2, 4, 8):
        folder = built_once(tmp_path_factory, f"adapter-r{rank}",
                            lambda d, r=rank: save_adapter(base_dir, d / "adapter", r, seed=r))
        out.append(Variant(method="post", rank=rank, source_rank=16, adapter_dir=str(folder / "adapter"),
                           steps=6, lr=0.005, train_seconds=1.5, retained_energy=0.9, relative_error=0.1,
                           report=str(folder / REPORT_NAME), plot=str(folder / PLOT_NAME)))
    return out
