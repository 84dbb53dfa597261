"""The pipeline on a decoder (causal LM SFT): the base model's zero-shot child run, exact match beside the
other metrics, promotion.metric=auto on decoder data, servable versions."""

from __future__ import annotations

import json

from flows.squeeze_pipeline import squeeze_pipeline, variants_table
from tests.flows.conftest import tiny_pipeline
from tests.flows.test_pipeline import all_runs, client_of, versions
from tests.lsq.tiny import save_tiny_llama, write_causal_jsonl


def test_decoder_pipeline_scores_the_base_model_zero_shot_and_registers_only_adapters(tmp_path):
    save_tiny_llama(tmp_path / "llama")
    data = write_causal_jsonl(tmp_path / "colours.jsonl", n=60)
    cfg = tiny_pipeline(tmp_path / "llama", data, tmp_path, model__task="causal_lm", data__task="causal_lm",
                        data__choices_column="choices", data__max_length=24, data__max_new_tokens=3,
                        target_ranks=[4], insqueeze__enabled=False)
    result = squeeze_pipeline(cfg)

    assert result.promotion_metric == "choice_accuracy"  # auto: the rows carry choices
    runs = {r.data.tags.get("mlflow.runName"): r for r in all_runs(cfg)}
    base = runs["base"]
    assert base.data.params["method"] == "base" and base.info.status == "FINISHED"
    assert base.data.tags["mlflow.parentRunId"] == result.parent_run_id
    for split in ("val", "test"):
        assert {f"{split}_exact_match", f"{split}_choice_accuracy", f"{split}_loss",
                f"{split}_answer_accuracy"} <= set(base.data.metrics)
    assert base.data.metrics["adapter_bytes"] == 0
    assert not client_of(cfg).list_artifacts(base.info.run_id, "adapter")  # no adapter, nothing to serve
    assert result.reference is not None and result.reference.run_id == base.info.run_id
    assert result.reference.test_metric == base.data.metrics["test_choice_accuracy"]

    registered = versions(cfg)
    assert sorted(v.tags["lsq.method"] for v in registered) == ["cont", "post", "source"]  # base never registered
    for v in registered:
        assert v.tags["lsq.serving.vllm"].startswith("yes: --max-lora-rank ")
        run = client_of(cfg).get_run(v.run_id)
        assert {"val_exact_match", "test_exact_match", "val_choice_accuracy"} <= set(run.data.metrics)

    parent = client_of(cfg).get_run(result.parent_run_id)
    assert parent.data.metrics["base_test_choice_accuracy"] == result.reference.test_metric
    assert "Base model zero-shot" in parent.data.tags["mlflow.note.content"]
    table = variants_table(result).splitlines()
    assert table[1].split()[:2] == ["base", "(zero-shot)"]

    plain = tiny_pipeline(tmp_path / "llama", data, tmp_path / "plain", model__task="causal_lm",
                          data__task="causal_lm", data__max_length=24, data__max_new_tokens=3, target_ranks=[4],
                          insqueeze__enabled=False, recover__enabled=False, baselines__zero_shot=False)
    answered = squeeze_pipeline(plain)
    assert answered.promotion_metric == "exact_match"  # auto: answers to generate, no choices
    assert answered.reference is None and "base" not in {r.data.tags.get("mlflow.runName") for r in all_runs(plain)}
    assert json.loads(json.dumps(answered.model_dump(mode="json")))["promotion_metric"] == "exact_match"
