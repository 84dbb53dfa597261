"""tasks/tracking/ against a real MLflow (sqlite store in tmp_path) and a tiny real PEFT adapter.

What landed is read back through ``MlflowClient``; the registered pyfunc is loaded by alias in a new
process. Concurrency, stale runs and redaction have their own modules beside this one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

from lsq.api import PLOT_NAME, REPORT_NAME
from lsq.models import ModelConfig
from lsq.pipeline_config import Tracking
from lsq.variants import Decision, Variant
from lsq.workdir import adapter_digest
from tasks import tracking
from tasks.tracking import store
from tests.lsq.tiny import built_once, save_tiny_llama
from tests.tasks.mlflow_store import EVALUATION, LABELS, MODEL, PARAMS
from tests.tasks.mlflow_store import artifacts as _artifacts
from tests.tasks.mlflow_store import child_run as _child

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("mlflow_uri")


# ---------------------------------------------------------------------------------------- tests
def test_default_tracking_uri(tmp_path, monkeypatch, mlflow_uri):
    assert tracking.default_tracking_uri(Tracking(tracking_uri="http://mlflow:5000"), tmp_path) == "http://mlflow:5000"
    assert tracking.default_tracking_uri(Tracking(), tmp_path) == mlflow_uri  # $MLFLOW_TRACKING_URI
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    root = tmp_path / "project"
    uri = tracking.default_tracking_uri(Tracking(), root)
    assert uri == f"sqlite:///{root.resolve()}/mlruns/mlflow.db"
    assert (root / "mlruns").is_dir()
    shutil.copy(tmp_path / "mlflow.db", root / "mlruns" / "mlflow.db")  # skip the schema migration
    exp = tracking.ensure_experiment(uri, "my exp")
    assert tracking.ensure_experiment(uri, "my exp") == exp
    location = tracking.client_for(uri).get_experiment(exp).artifact_location
    assert Path(location.removeprefix("file://")) == (root / "mlruns" / "artifacts" / "my-exp").resolve()


def test_variant_run_lands_in_mlflow(mlflow_uri, variants, tmp_path):
    client = tracking.client_for(mlflow_uri)
    v = variants[1]
    parent = tracking.start_pipeline_run(mlflow_uri, "lsq-test", "pipeline-1", {"source_rank": 16, "ranks": [8, 4]},
                                         {"lsq.flow_run": "abc"})
    exp = tracking.ensure_experiment(mlflow_uri, "lsq-test")
    run_id = tracking.log_variant_run(mlflow_uri, exp, parent, v, PARAMS, EVALUATION)

    p = client.get_run(parent)
    assert p.info.status == "RUNNING" and p.data.params == {"source_rank": "16", "ranks": "8,4"}
    assert p.data.tags["lsq.flow_run"] == "abc"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "post-r4"
    assert run.info.experiment_id == exp and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params == {k: str(val) for k, val in PARAMS.items()}
    assert set(run.data.metrics) == {"test_accuracy", "test_macro_f1", "test_examples", "trainable_params",
                                     "lora_params", "adapter_bytes", "retained_energy", "relative_error",
                                     "train_seconds"}
    assert run.data.metrics["test_accuracy"] == 0.75 and run.data.metrics["train_seconds"] == 1.5
    files = sorted(p.name for p in Path(v.adapter_dir).iterdir())
    assert _artifacts(client, run_id) == {f"adapter/{f}" for f in files} | {REPORT_NAME, PLOT_NAME}
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter", dst_path=str(tmp_path / "dl"),
                                                tracking_uri=mlflow_uri)
    for f in files:  # the adapter folder, unchanged
        assert (Path(local) / f).read_bytes() == (Path(v.adapter_dir) / f).read_bytes()
    assert str(tmp_path / "artifacts") in run.info.artifact_uri  # artifacts beside the database

    # a retry (same parent, same variant) returns the finished run instead of a duplicate
    assert tracking.log_variant_run(mlflow_uri, exp, parent, v, PARAMS, EVALUATION) == run_id
    assert len(client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")) == 1

    tracking.finish_run(mlflow_uri, parent, "FAILED")
    assert client.get_run(parent).info.status == "FAILED"
    with pytest.raises(ValueError, match="DONE"):
        tracking.finish_run(mlflow_uri, parent, "DONE")


def test_variant_run_without_squeeze_files(mlflow_uri, variants):
    v = variants[0].model_copy(update={"method": "direct", "report": None, "plot": None, "retained_energy": None,
                                       "relative_error": None})
    _, run_id = _child(mlflow_uri, v)
    client = tracking.client_for(mlflow_uri)
    assert all(a.startswith("adapter/") for a in _artifacts(client, run_id))
    assert "retained_energy" not in client.get_run(run_id).data.metrics


def test_register_alias_champion_and_predict_in_new_process(mlflow_uri, variants, base_dir, tmp_path):
    client = tracking.client_for(mlflow_uri)
    v = variants[1]
    _, run_id = _child(mlflow_uri, v)
    assert tracking.champion(mlflow_uri, MODEL) is None  # no model yet
    extra = {"lsq.dataset_fingerprint": "abc123", "test_accuracy": 0.75}
    version = tracking.register_variant(mlflow_uri, MODEL, run_id, v, ModelConfig(name=str(base_dir), device="cpu"),
                                        extra, label_names=LABELS)
    assert version == "1"
    mv = client.get_model_version(MODEL, version)
    assert mv.run_id == run_id and mv.source.startswith("models:/m-")
    assert mv.tags == {"lsq.method": "post", "lsq.rank": "4", "lsq.source_rank": "16", "lsq.run_id": run_id,
                       "lsq.adapter_sha256": tracking.adapter_digest(v.adapter_dir),
                       "adapter_bytes": str((Path(v.adapter_dir) / "adapter_model.safetensors").stat().st_size),
                       "lsq.dataset_fingerprint": "abc123", "test_accuracy": "0.75"}
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert logged.source_run_id == run_id and logged.status == LoggedModelStatus.READY
    # idempotent: a retry returns the same version and adds none
    again = tracking.register_variant(mlflow_uri, MODEL, run_id, v, ModelConfig(name=str(base_dir)), extra, LABELS)
    assert again == "1" and len(client.search_model_versions(f"name = '{MODEL}'")) == 1
    assert len(client.get_run(run_id).outputs.model_outputs) == 1  # and logs no second model
    assert tracking.champion(mlflow_uri, MODEL) is None  # registered, not promoted

    decision = Decision(winner=v.label, alias="champion", reason="post-r4: best score 0.7500")
    tracking.set_alias(mlflow_uri, MODEL, version, "champion", decision)
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"  # an int from sqlite
    best = tracking.champion(mlflow_uri, MODEL, dst_path=str(tmp_path / "champ"))
    assert best["version"] == "1" and best["run_id"] == run_id
    assert best["tags"]["lsq.decision"] == "champion" and best["tags"]["lsq.reason"] == decision.reason
    assert best["metrics"]["test_accuracy"] == 0.75
    weights = "adapter_model.safetensors"
    assert (Path(best["adapter_path"]) / weights).read_bytes() == (Path(v.adapter_dir) / weights).read_bytes()
    assert tracking.champion(mlflow_uri, MODEL, alias="challenger") is None

    # the expected labels, computed here with lsq (base + adapter, argmax -> name)
    from lsq.evaluate import load_adapter_model
    from lsq.models import load_tokenizer

    texts = ["a sentence", "the film was really quite dull and boring", "superb"]
    cfg = ModelConfig(name=str(base_dir), device="cpu")
    model, tok = load_adapter_model(v.adapter_dir, cfg, len(LABELS)), load_tokenizer(cfg)
    with torch.inference_mode():
        ids = model(**tok(texts, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
    expected = [LABELS[i] for i in ids]

    probe = (
        "import json, sys, mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('models:/{MODEL}@champion')\n"
        "texts = json.loads(sys.argv[1])\n"
        "print(json.dumps({'list': list(m.predict(texts)), 'frame': list(m.predict(pd.DataFrame({'text': texts}))),"
        " 'modules': sorted(k for k in ('transformers', 'peft') if k in sys.modules)}))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", probe, json.dumps(texts)], capture_output=True, text=True, env=env,
                          check=False, cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["list"] == expected and out["frame"] == expected
    assert len(out["list"]) == len(texts) and set(out["list"]) <= set(LABELS)


def test_failure_after_version_creation_leaves_no_version(mlflow_uri, variants, base_dir, monkeypatch):
    client = tracking.client_for(mlflow_uri)
    v = variants[0]
    _, run_id = _child(mlflow_uri, v)
    data = {"lsq.dataset_fingerprint": "d1"}
    real_create = mlflow.MlflowClient.create_model_version
    real_search = mlflow.MlflowClient.search_model_versions
    created = []

    def create(self, *args, **kwargs):
        mv = real_create(self, *args, **kwargs)
        created.append(mv.version)
        return mv

    def search(self, filter_string=None, *args, **kwargs):
        if created and "adapter_sha256" in (filter_string or ""):  # the duplicate check after creation
            raise RuntimeError("disk full")
        return real_search(self, filter_string, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "create_model_version", create)
    monkeypatch.setattr(mlflow.MlflowClient, "search_model_versions", search)
    with pytest.raises(RuntimeError, match="disk full"):
        tracking.register_variant(mlflow_uri, MODEL, run_id, v, ModelConfig(name=str(base_dir)), data, LABELS)
    assert created == [1]
    monkeypatch.setattr(mlflow.MlflowClient, "search_model_versions", real_search)
    assert client.search_model_versions(f"name = '{MODEL}'") == []

    # a transient "database is locked" is retried, not fatal; the version is born with all its tags
    calls = {"n": 0}

    def locked_once(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise MlflowException("(sqlite3.OperationalError) database is locked", error_code="TEMPORARILY_UNAVAILABLE")
        return real_create(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "create_model_version", locked_once)
    version = tracking.register_variant(mlflow_uri, MODEL, run_id, v, ModelConfig(name=str(base_dir)), data, LABELS)
    assert calls["n"] == 2 and version == "2"  # deleted numbers are not reused
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert [str(mv.version) for mv in versions] == [version]
    assert client.get_model_version(MODEL, version).tags["lsq.rank"] == "2"

    real_tag = mlflow.MlflowClient.set_model_version_tag

    def tag_locked(self, name, version=None, key=None, value=None, stage=None):
        raise MlflowException("(sqlite3.OperationalError) database is locked", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(store, "RETRY_DELAYS", ())  # no retry left: the lock error surfaces
    monkeypatch.setattr(mlflow.MlflowClient, "set_model_version_tag", tag_locked)
    with pytest.raises(MlflowException, match="locked"):
        tracking.set_alias(mlflow_uri, MODEL, version, "champion",
                           Decision(winner="post-r2", alias="champion", reason="x"))
    monkeypatch.setattr(mlflow.MlflowClient, "set_model_version_tag", real_tag)


def test_a_recorded_digest_must_match_the_folder(mlflow_uri, variants, base_dir):
    v = variants[0].model_copy(update={"adapter_sha256": "0" * 64})
    _, run_id = _child(mlflow_uri, v)
    with pytest.raises(ValueError, match="refusing"):
        tracking.register_variant(mlflow_uri, MODEL, run_id, v, ModelConfig(name=str(base_dir)), {}, LABELS)
    ok = v.model_copy(update={"adapter_sha256": adapter_digest(v.adapter_dir)})
    assert tracking.register_variant(mlflow_uri, MODEL, run_id, ok, ModelConfig(name=str(base_dir)), {}, LABELS) == "1"


def test_caller_active_run_is_left_alone(mlflow_uri, variants, base_dir):
    client = tracking.client_for(mlflow_uri)
    other = tracking.ensure_experiment(mlflow_uri, "someone-else")
    with mlflow.start_run(experiment_id=other) as outer:
        parent, run_id = _child(mlflow_uri, variants[2])
        version = tracking.register_variant(mlflow_uri, MODEL, run_id, variants[2], ModelConfig(name=str(base_dir)),
                                            {}, LABELS)
        tracking.log_pareto(mlflow_uri, parent, [{"label": "a", "method": "post", "rank": 8, "adapter_bytes": 10,
                                                  "metric": 0.5}], "test_accuracy")
        tracking.finish_run(mlflow_uri, parent)
        assert mlflow.active_run().info.run_id == outer.info.run_id  # still the caller's run
    mv = client.get_model_version(MODEL, version)
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))
    exp = tracking.ensure_experiment(mlflow_uri, "lsq-test")
    assert mv.run_id == run_id and logged.source_run_id == run_id and logged.experiment_id == exp
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    caller = client.get_run(outer.info.run_id)
    assert caller.data.params == {} and caller.data.metrics == {} and not caller.outputs.model_outputs
    assert _artifacts(client, outer.info.run_id) == set()
    assert client.search_logged_models(experiment_ids=[other]) == []


def test_explicit_uri_wins_over_the_global_one(mlflow_uri, variants, base_dir, tmp_path):
    decoy_db = tmp_path / "decoy.db"
    shutil.copy(tmp_path / "mlflow.db", decoy_db)
    decoy = f"sqlite:///{decoy_db}"
    mlflow.set_tracking_uri(decoy)
    _, run_id = _child(mlflow_uri, variants[0])
    tracking.register_variant(mlflow_uri, MODEL, run_id, variants[0], ModelConfig(name=str(base_dir)), {}, LABELS)
    assert mlflow.get_tracking_uri() == decoy  # put back after the fluent call
    d = tracking.client_for(decoy)
    assert d.search_registered_models() == [] and d.get_experiment_by_name("lsq-test") is None
    assert len(tracking.client_for(mlflow_uri).search_model_versions(f"name = '{MODEL}'")) == 1


def test_concurrent_pipelines_register_into_one_model(mlflow_uri, variants, base_dir, monkeypatch):
    client = tracking.client_for(mlflow_uri)
    real = mlflow.MlflowClient.set_model_version_tag

    def slow(self, name, version=None, key=None, value=None, stage=None):
        if key == "lsq.method":  # widen the window between a version's creation and its tags
            time.sleep(0.6)
        return real(self, name, version, key, value)

    monkeypatch.setattr(mlflow.MlflowClient, "set_model_version_tag", slow)
    exp = tracking.ensure_experiment(mlflow_uri, "lsq-test")
    start = threading.Barrier(2)
    errors: list[BaseException] = []
    runs: dict[str, tuple[str, str]] = {}  # run_id -> (rank, pipeline)

    def pipeline(tag: str) -> None:
        try:
            parent = tracking.start_pipeline_run(mlflow_uri, "lsq-test", f"pipeline-{tag}", {}, {})
            children = [(v, tracking.log_variant_run(mlflow_uri, exp, parent, v, {**PARAMS, "rank": v.rank},
                                                     EVALUATION)) for v in variants]
            start.wait(timeout=60)
            for v, run_id in children:
                runs[run_id] = (str(v.rank), tag)
                tracking.register_variant(mlflow_uri, MODEL, run_id, v, ModelConfig(name=str(base_dir)),
                                          {"lsq.pipeline": tag}, LABELS)
            tracking.finish_run(mlflow_uri, parent)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pipeline, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(int(mv.version) for mv in versions) == list(range(1, 2 * len(variants) + 1))
    assert sorted(mv.run_id for mv in versions) == sorted(runs)  # one version per run
    for mv in versions:
        assert mv.tags["lsq.run_id"] == mv.run_id
        assert (mv.tags["lsq.rank"], mv.tags["lsq.pipeline"]) == runs[mv.run_id]
        assert client.get_run(mv.run_id).data.params["rank"] == mv.tags["lsq.rank"]
        assert mv.tags.keys() == {"lsq.method", "lsq.rank", "lsq.source_rank", "lsq.run_id", "lsq.pipeline",
                                  "lsq.adapter_sha256", "adapter_bytes"}


def test_causal_lm_pyfunc_answers_greedily(mlflow_uri, tmp_path_factory):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = built_once(tmp_path_factory, "tiny-llama", save_tiny_llama)
    adapter = tmp_path_factory.mktemp("lm-adapter") / "adapter"
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(adapter)
    v = Variant(method="direct", rank=4, source_rank=16, adapter_dir=str(adapter))
    _, run_id = _child(mlflow_uri, v)
    version = tracking.register_variant(mlflow_uri, "lsq-tiny-lm", run_id, v,
                                        ModelConfig(name=str(base), task="causal_lm", device="cpu"), {})
    tracking.set_alias(mlflow_uri, "lsq-tiny-lm", version, "champion",
                       Decision(winner=v.label, alias="champion", reason="only one"))

    prompts = ["the colour of the sky is", "the colour of the snow is"]
    tok = AutoTokenizer.from_pretrained(base)
    lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    expected = []
    for text in prompts:
        ids = tok(text, return_tensors="pt").input_ids  # no chat template: as SFT feeds prompts, special tokens in
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                          pad_token_id=tok.pad_token_id)
        expected.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    served = mlflow.pyfunc.load_model("models:/lsq-tiny-lm@champion").predict(prompts)
    assert list(served) == expected and len(served) == len(prompts)


def test_log_pareto(mlflow_uri, tmp_path):
    client = tracking.client_for(mlflow_uri)
    parent = tracking.start_pipeline_run(mlflow_uri, "lsq-test", "pipeline", {}, {})
    rows = [
        {"label": "source-r16", "method": "source", "rank": 16, "adapter_bytes": 4000, "metric": 0.90},
        {"label": "post-r8", "method": "post", "rank": 8, "adapter_bytes": 2000, "metric": 0.88},
        {"label": "direct-r8", "method": "direct", "rank": 8, "adapter_bytes": 2000, "metric": 0.80},  # dominated
        {"label": "post-r4", "method": "post", "rank": 4, "adapter_bytes": 1000, "metric": 0.70},
        {"label": "in-r4", "method": "in", "rank": 4, "adapter_bytes": 1100, "metric": 0.65},  # dominated
    ]
    front = tracking.log_pareto(mlflow_uri, parent, rows, "test_accuracy")
    assert sorted(front) == ["post-r4", "post-r8", "source-r16"]
    assert _artifacts(client, parent) == {"pareto/pareto.png", "pareto/variants.json", "pareto/variants.csv"}
    local = Path(mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="pareto",
                                                     dst_path=str(tmp_path), tracking_uri=mlflow_uri))
    assert (local / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((local / "variants.json").read_text())
    assert {r["label"]: r["on_front"] for r in table["variants"]} == {
        "source-r16": True, "post-r8": True, "direct-r8": False, "post-r4": True, "in-r4": False}
    assert table["variants"][1]["test_accuracy"] == 0.88
    csv_lines = (local / "variants.csv").read_text().strip().splitlines()
    assert csv_lines[0] == "label,method,rank,adapter_bytes,test_accuracy,on_front" and len(csv_lines) == 6

    assert table["champion"] is None

    # losses: smaller is better flips the front (post-r4 is the smallest, in-r4 the lowest value)
    front = tracking.log_pareto(mlflow_uri, parent, rows, "test_loss", greater_is_better=False)
    assert sorted(front) == ["in-r4", "post-r4"]

    # the pipeline's rows: label, size and metric only (None: not scored); the champion is named
    slim = [{"label": r["label"], "adapter_bytes": r["adapter_bytes"], "metric": r["metric"]} for r in rows]
    slim.append({"label": "adalora-r4", "adapter_bytes": 1000, "metric": None})
    front = tracking.log_pareto(mlflow_uri, parent, slim, "val_accuracy", champion_label="post-r8")
    assert sorted(front) == ["post-r4", "post-r8", "source-r16"]
    local = Path(mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="pareto",
                                                     dst_path=str(tmp_path / "slim"), tracking_uri=mlflow_uri))
    table = json.loads((local / "variants.json").read_text())
    assert table["champion"] == "post-r8" and table["variants"][-1] == {
        "label": "adalora-r4", "adapter_bytes": 1000, "val_accuracy": None, "on_front": False}
    assert (local / "variants.csv").read_text().splitlines()[0] == "label,adapter_bytes,val_accuracy,on_front"


def test_pareto_figure_marks_the_champion():
    from matplotlib.figure import Figure

    from lsq.report import pareto_figure

    rows = [{"label": "a", "adapter_bytes": 10, "metric": 0.9}, {"label": "b", "adapter_bytes": 5, "metric": 0.8},
            {"label": "c", "adapter_bytes": 20, "metric": 0.7}, {"label": "d", "adapter_bytes": 1, "metric": None}]
    fig = pareto_figure(rows, "test_accuracy", champion_label="b")
    assert isinstance(fig, Figure)
    [ax] = fig.axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["dominated", "Pareto front", "champion (b)"]
    assert sorted(t.get_text() for t in ax.texts) == ["a", "b", "c"]  # unscored rows are not drawn
    assert "champion (b)" not in [t.get_text() for t in pareto_figure(rows, "x").axes[0].get_legend().get_texts()]


def test_variant_run_metrics_names(variants):
    m = tracking.variant_run_metrics(variants[0], {"accuracy": 1, "test_loss": 0.5, "split": "test", "adapter_bytes": 9,
                                                   "bad": None, "retained_energy": 0.5})
    assert m == {"test_accuracy": 1.0, "test_loss": 0.5, "adapter_bytes": 9.0, "retained_energy": 0.5,
                 "relative_error": 0.1, "train_seconds": 1.5}


def test_the_same_adapter_on_the_same_data_is_one_version(mlflow_uri, variants, base_dir):
    """A cached re-run logs new runs but registers nothing new; other data, or no fingerprint, does."""
    client = tracking.client_for(mlflow_uri)
    v = variants[1]
    model = ModelConfig(name=str(base_dir))
    _, first_run = _child(mlflow_uri, v)
    _, second_run = _child(mlflow_uri, v)
    _, third_run = _child(mlflow_uri, v)
    first = tracking.register_variant(mlflow_uri, MODEL, first_run, v, model, {"lsq.dataset_fingerprint": "d1"}, LABELS)
    again = tracking.register_variant(mlflow_uri, MODEL, second_run, v, model, {"lsq.dataset_fingerprint": "d1"}, LABELS)
    assert again == first
    assert client.get_model_version(MODEL, first).tags["lsq.last_run_id"] == second_run
    other = tracking.register_variant(mlflow_uri, MODEL, third_run, v, model, {"lsq.dataset_fingerprint": "d2"}, LABELS)
    assert other != first
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2
    assert tracking.adapter_digest is adapter_digest  # the digest lsq.workdir checks its records with
    assert tracking.adapter_digest(v.adapter_dir) == tracking.adapter_digest(v.adapter_dir)
    assert tracking.adapter_digest(v.adapter_dir) != tracking.adapter_digest(variants[0].adapter_dir)
    assert tracking.versions_trained_on(mlflow_uri, MODEL, "d1") == [first]
    assert tracking.versions_trained_on(mlflow_uri, MODEL, "d2") == [other]
    assert tracking.versions_trained_on(mlflow_uri, MODEL, "d3") == []
