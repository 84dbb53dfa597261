"""Flow tests: one Prefect test server for the whole session, MLflow in each test's tmp_path.

``prefect_test_harness`` starts a temporary Prefect API on a free local port (about 10 s here), so it
is session-wide and started once. Task results (the cache) go to the session's temp folder, not to
``~/.prefect/storage``. Every test gets ``MLFLOW_TRACKING_URI=sqlite:///<tmp_path>/mlflow.db``; the
tiny pipeline config below names its store explicitly as well, so nothing lands in ``./mlruns``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from tests.lsq.tiny import built_once, save_tiny_bert, write_classification_csv


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(tmp_path_factory):
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("prefect-results")}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(autouse=True)
def mlflow_in_tmp(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def tiny_model(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "tiny-bert", save_tiny_bert)


@pytest.fixture
def tiny_csv(tmp_path) -> Path:
    """48 rows (33 train / 5 validation / 10 test after the seeded split); per test, so a test may edit it."""
    return write_classification_csv(tmp_path / "reviews.csv", n=48)


def tiny_pipeline(model_dir: Path, data_file: Path, root: Path, **changes) -> dict:
    """A pipeline config dict small enough for a test: ranks 8 -> 4, 2; a few steps per stage."""
    raw = {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {"source": str(data_file), "max_length": 16},
        "source_rank": 8,
        "target_ranks": [4, 2],
        "train": {"steps": 4, "batch_size": 8, "eval_batch_size": 32, "lr": 5e-3, "warmup_steps": 0,
                  "logging_steps": 1, "save_steps": 100, "seed": 0},
        "recover": {"steps": 2, "lr": 5e-3, "warmup_steps": 0},
        "insqueeze": {"rank": 2},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "registered_model": "lsq-tiny"},
        "output_dir": str(root / "runs"),
    }
    for key, value in changes.items():
        node = raw
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return raw


@pytest.fixture
def tiny_config(tiny_model, tiny_csv, tmp_path) -> dict:
    return tiny_pipeline(tiny_model, tiny_csv, tmp_path)
