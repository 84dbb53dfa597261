"""The registered model as users get it: label names from the data, the serving contract and metric tags on
the version, ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` (REST on 127.0.0.1) answering names."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from lsq.pipeline_config import load_pipeline_config
from lsq.records import Evaluation
from tasks import registry, tracking

pytestmark = pytest.mark.usefixtures("mlflow_uri")
REPO = Path(__file__).resolve().parents[2]
MODEL = "lsq-tiny-spam"
TEXTS = ["win a free prize now", "see you at lunch", "superb"]


@pytest.fixture
def champion(mlflow_uri, variants, base_dir, tmp_path) -> str:
    """One variant registered through the pipeline's task (``log_and_register``) on data labelled ham/spam."""
    data = tmp_path / "sms.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(40):
            w.writerow([f"message number {i}", "spam" if i % 5 == 0 else "ham"])
    cfg = load_pipeline_config({"model": {"name": str(base_dir), "device": "cpu"}, "data": {"source": str(data)},
                                "promotion": {"metric": "macro_f1"},
                                "tracking": {"tracking_uri": mlflow_uri, "registered_model": MODEL}})
    variant = variants[1]
    evaluations = tuple(Evaluation(label=variant.label, split=split, examples=8, scores={"accuracy": 0.8, "macro_f1": f1},
                                   trainable_params=10, lora_params=8, adapter_bytes=100)
                        for split, f1 in (("validation", 0.6), ("test", 0.55)))
    parent = tracking.start_pipeline_run(mlflow_uri, "lsq", "pipeline", {"seed": 0}, {})
    row = registry.log_and_register.fn(mlflow_uri, cfg, parent, variant, evaluations, "fp")
    assert (row.metric, row.test_metric) == (0.6, 0.55)
    tags = tracking.client_for(mlflow_uri).get_model_version(MODEL, row.version).tags
    assert tags["lsq.metric"] == "macro_f1" and tags["val_macro_f1"] == "0.6" and tags["test_macro_f1"] == "0.55"
    assert "test_accuracy" not in tags and "val_accuracy" not in tags  # only the promotion metric is a tag
    # a classification adapter saves its head: servers of the vLLM kind would not load it, and the tag says so
    assert tags["lsq.serving.vllm"].startswith("no: modules_to_save (classifier") and row.serving == tags["lsq.serving.vllm"]
    decision = registry.decide_promotion(cfg, [row], None)
    tracking.set_alias(mlflow_uri, MODEL, row.version, "champion", decision)
    return row.version


def test_pyfunc_predicts_the_label_names_of_the_data(champion):
    predicted = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(TEXTS)
    assert len(predicted) == len(TEXTS) and set(predicted) <= {"ham", "spam"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_rest_with_label_names(champion, mlflow_uri, tmp_path):
    """Started as the README says (the venv's bin on PATH, no activated venv), stopped with its whole group."""
    port = free_port()
    venv_bin = Path(sys.executable).parent  # .venv/bin in a checkout
    command = (f"PATH={venv_bin}:$PATH mlflow models serve -m models:/{MODEL}@champion --env-manager local "
               f"-h 127.0.0.1 -p {port}")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(MLFLOW_TRACKING_URI=mlflow_uri, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PATH="/usr/local/bin:/usr/bin:/bin")  # nothing of the venv on PATH but what the command adds
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(["bash", "-c", command], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline, answer = time.monotonic() + 150, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                                 data=json.dumps({"inputs": TEXTS}).encode(),
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                time.sleep(1)
        assert answer is not None, f"no answer (exit {server.poll()}): {(tmp_path / 'serve.log').read_text()[-3000:]}"
        assert len(answer["predictions"]) == len(TEXTS) and set(answer["predictions"]) <= {"ham", "spam"}
    finally:
        stop_group(server)
        log.close()
    with pytest.raises(ProcessLookupError):  # nothing of its process group is left behind
        os.killpg(server.pid, 0)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole process group (bash, mlflow, uvicorn and its workers), SIGKILL what outlives 20 s."""
    for sig, patience in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
