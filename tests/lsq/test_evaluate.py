"""lsq.evaluate: metrics and sizes of trained adapters, each checked against an independent computation
(PEFT's own loading, the Hugging Face model's own loss, the layer shapes of the base model, the file size)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lsq.api import squeeze_adapter
from lsq.cli import main
from lsq.config import SqueezeConfig
from lsq.data import load_data
from lsq.errors import LsqError
from lsq.evaluate import adapter_size, evaluate_adapter
from lsq.train import train
from lsq.train_config import TrainConfig
from tests.lsq.tiny import built_once, cls_config, cls_csv, lm_config, tiny_bert, tiny_llama  # noqa: F401

BERT_TARGETS = ("query", "key", "value", "dense")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A direct rank-4 LoRA trained for 30 steps on the tiny BERT (the toy task is learnable)."""
    from tests.lsq.tiny import save_tiny_bert, write_classification_csv

    model = built_once(tmp_path_factory, "tiny-bert", save_tiny_bert)
    data = built_once(tmp_path_factory, "cls-data", lambda d: write_classification_csv(d / "train.csv")) / "train.csv"
    cfg = TrainConfig.model_validate(cls_config(model, data, tmp_path_factory.mktemp("eval") / "cls",
                                                train__steps=30))
    return cfg, train(cfg)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A direct rank-4 LoRA SFT run of 20 steps on the tiny Llama."""
    from tests.lsq.tiny import save_tiny_llama, write_causal_jsonl

    model = built_once(tmp_path_factory, "tiny-llama", save_tiny_llama)
    data = built_once(tmp_path_factory, "lm-data", lambda d: write_causal_jsonl(d / "train.jsonl")) / "train.jsonl"
    cfg = TrainConfig.model_validate(lm_config(model, data, tmp_path_factory.mktemp("eval") / "lm",
                                               train__steps=20, train__lr=2e-2))
    return cfg, train(cfg)


def peft_model(adapter_dir, base_dir, causal: bool = False):
    base = (AutoModelForCausalLM.from_pretrained(base_dir) if causal
            else AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2))
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def expected_lora_params(adapter_dir, base_dir) -> int:
    """sum of r * (d_in + d_out) over the adapted layers, from PEFT's loaded layers and the base shapes."""
    model = peft_model(adapter_dir, base_dir)
    total = 0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "r", {}):
            base = module.get_base_layer()
            assert name.split(".")[-1] in BERT_TARGETS
            total += module.r["default"] * (base.in_features + base.out_features)
    return total


def macro_f1(labels: list[int], preds: list[int]) -> float:
    scores = []
    for c in sorted(set(labels) | set(preds)):
        tp = sum(1 for y, p in zip(labels, preds) if y == c and p == c)
        fp = sum(1 for y, p in zip(labels, preds) if y != c and p == c)
        fn = sum(1 for y, p in zip(labels, preds) if y == c and p != c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def test_classification_metrics_and_size(cls_run, tiny_bert):
    cfg, result = cls_run
    metrics = evaluate_adapter(result.adapter_dir, cfg.model, cfg.data, split="test", batch_size=7)
    assert set(metrics) == {"accuracy", "macro_f1", "trainable_params", "lora_params", "adapter_bytes", "split",
                            "examples"}

    # the metrics, recomputed: PEFT loads the adapter, one batch at a time, plain argmax
    test = load_data(cfg.data)["test"]
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = peft_model(result.adapter_dir, tiny_bert)
    with torch.no_grad():
        enc = tok(list(test["text"]), truncation=True, max_length=cfg.data.max_length, padding=True,
                  return_tensors="pt")
        preds = model(**enc).logits.argmax(-1).tolist()
    labels = list(test["label"])
    assert metrics["examples"] == len(test) == 48 and metrics["split"] == "test"
    assert metrics["accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / len(labels))
    assert metrics["macro_f1"] == pytest.approx(macro_f1(labels, preds))
    assert metrics["accuracy"] >= 0.8  # 30 steps learn the toy task (chance is 0.5)

    # the size: every tensor of the file, the LoRA factors alone, and the bytes on disk
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert metrics["trainable_params"] == sum(t.numel() for t in weights.values())
    assert metrics["lora_params"] == expected_lora_params(result.adapter_dir, tiny_bert)
    assert metrics["trainable_params"] - metrics["lora_params"] == 2 * 32 + 2  # the classifier head
    assert metrics["adapter_bytes"] == os.path.getsize(result.adapter_dir / "adapter_model.safetensors")


def test_size_of_a_squeezed_adapter_with_per_module_ranks(cls_run, tiny_bert, tmp_path):
    _, result = cls_run
    written = squeeze_adapter(result.adapter_dir, tmp_path / "sq", SqueezeConfig(energy=(0.6,), ranks=(2,)), plot=False)
    out = {name: w.folder for name, w in written.items()}
    for name, folder in out.items():
        report = json.loads((folder / "squeeze_report.json").read_text())["totals"]
        assert written[name].retained_energy == report["retained_energy"]
        assert written[name].lora_params == report["lora_params"]
        size = adapter_size(folder)
        assert size["lora_params"] == expected_lora_params(folder, tiny_bert)
        assert size["adapter_bytes"] == os.path.getsize(folder / "adapter_model.safetensors")
    ranks = json.loads((out["r2"] / "adapter_config.json").read_text())["r"]
    assert ranks == 2 and adapter_size(out["r2"])["lora_params"] * 2 == adapter_size(result.adapter_dir)["lora_params"]


def test_causal_lm_metrics(lm_run, tiny_llama, tmp_path):
    cfg, result = lm_run
    summary = json.loads((result.adapter_dir.parent / "train_summary.json").read_text())
    assert (summary["method"], summary["rank"], summary["steps"]) == ("direct", 4, 20)
    metrics = evaluate_adapter(result.adapter_dir, cfg.model, cfg.data, split="test")
    assert {"loss", "answer_accuracy", "choice_accuracy", "lora_params", "adapter_bytes"} <= set(metrics)
    test = load_data(cfg.data)["test"]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = peft_model(result.adapter_dir, tiny_llama, causal=True)

    def scored(prompt: str, answer: str):
        p, a = tok(prompt)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + a])
        labels = torch.tensor([[-100] * len(p) + a])
        return ids, labels, len(a)

    # the loss: the Hugging Face model's own (shifted, prompt-masked) loss over all answer tokens
    nll = tokens = 0.0
    choice_hits = 0
    with torch.no_grad():
        for row in test:
            ids, labels, n = scored(row["prompt"], row["answer"])
            nll += float(model(input_ids=ids, labels=labels).loss) * n
            tokens += n
            sums = [-float(model(input_ids=i, labels=l).loss) * k for i, l, k in
                    (scored(row["prompt"], c) for c in row["choices"])]
            choice_hits += row["choices"][sums.index(max(sums))] == row["answer"]
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-4)
    assert metrics["choice_accuracy"] == pytest.approx(choice_hits / len(test))
    assert 0 <= metrics["answer_accuracy"] <= 1

    # SFT learned the answers: far better than the same LoRA untrained (B = 0: the base model)
    untrained = tmp_path / "untrained"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=4, target_modules=["q_proj"])
                   ).save_pretrained(untrained)
    before = evaluate_adapter(untrained, cfg.model, cfg.data, split="test")
    assert metrics["loss"] < 0.5 * before["loss"]
    assert metrics["choice_accuracy"] >= 0.6 and metrics["answer_accuracy"] > before["answer_accuracy"]


def test_adalora_adapter_is_scored(tiny_bert, cls_csv, tmp_path):
    raw = cls_config(tiny_bert, cls_csv, tmp_path / "ada", method="adalora", train__steps=10)
    cfg = TrainConfig.model_validate(raw)
    result = train(cfg)
    metrics = evaluate_adapter(result.adapter_dir, cfg.model, cfg.data, split="validation")
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert metrics["split"] == "validation" and 0 <= metrics["accuracy"] <= 1
    assert metrics["lora_params"] == sum(t.numel() for k, t in weights.items() if ".lora_" in k)
    assert any(".lora_E" in k for k in weights)


def test_refusals(cls_run, lm_run, tmp_path):
    cfg, result = cls_run
    with pytest.raises(LsqError, match="missing: adapter folder not found"):
        evaluate_adapter(tmp_path / "missing", cfg.model, cfg.data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LsqError, match="empty: no adapter_model.safetensors"):
        evaluate_adapter(tmp_path / "empty", cfg.model, cfg.data)
    lm_cfg, lm_result = lm_run
    with pytest.raises(LsqError, match="cannot load the adapter"):  # a Llama adapter onto the BERT
        evaluate_adapter(lm_result.adapter_dir, cfg.model, cfg.data)
    data = load_data(cfg.data)
    empty = data.copy()
    empty["test"] = data["test"].select([])
    with pytest.raises(LsqError, match="split 'test' is missing or empty"):
        evaluate_adapter(result.adapter_dir, cfg.model, cfg.data, data=empty)


def test_lsq_evaluate_command(cls_run, tmp_path, capsys):
    cfg, result = cls_run
    preset = tmp_path / "preset.yaml"
    preset.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    assert main(["evaluate", str(result.adapter_dir), str(preset), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    direct = evaluate_adapter(result.adapter_dir, cfg.model, cfg.data)
    assert printed.pop("data") == str(cfg.data.source) and printed == pytest.approx(direct)
    assert main(["evaluate", str(result.adapter_dir), str(preset), "--split", "validation"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"data={cfg.data.source}  accuracy=") and "split=validation" in line
    assert main(["evaluate", str(tmp_path / "nope"), str(preset)]) == 2
    err = capsys.readouterr().err  # refused before any model is loaded: no progress bars, one line
    assert err.startswith("lsq: error: ") and err.count("\n") == 1 and "nope: adapter folder not found" in err


def test_lsq_evaluate_refuses_to_guess_the_data(cls_run, tmp_path, capsys):
    cfg, result = cls_run
    preset = tmp_path / "model-only.yaml"
    preset.write_text(json.dumps({"model": cfg.model.model_dump(mode="json")}))  # names the model, not the data
    for argv in (["evaluate", str(result.adapter_dir)], ["evaluate", str(result.adapter_dir), str(preset)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("lsq: error: evaluate: name the data to score on") and err.count("\n") == 1, err
        # the training summary beside the adapter says what it was trained on
        assert f"trained on data.source={cfg.data.source}" in err
