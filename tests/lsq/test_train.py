"""lsq.train end to end on tiny local models: every method, Cont-Squeeze from a squeezed source, causal-LM
labels, resuming a killed run (In-Squeeze past a boundary too; a checkpoint killed while being saved, in
process and with a real ``kill -9``; SIGTERM), bad input refused before any training, the ``lsq train``
command, and one real run: MiniLM on the built-in movie sentences."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lsq.api import squeeze_adapter
from lsq.cli import main
from lsq.config import SqueezeConfig
from lsq.data import DataConfig, fingerprint, load_data
from lsq.errors import LsqError
from lsq.objectives import IGNORE, PadCollator, _sft_ids, tokenize_causal_lm
from lsq.checkpoints import COMPLETE_MARK
from lsq.train import SUMMARY_NAME, train
from lsq.train_config import TrainConfig
from tests.lsq.tiny import cls_config, cls_csv, lm_jsonl, tiny_bert, tiny_llama  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def run(raw: dict, logs: list | None = None):
    cfg = TrainConfig.model_validate(raw)
    return cfg, train(cfg, log=(lambda m, s: logs.append((s, dict(m)))) if logs is not None else None)


def lora_ranks(adapter_dir, base_dir) -> dict[str, int]:
    """``{module: r}`` of an adapter loaded by PEFT itself onto a fresh base model."""
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return {n: m.r["default"] for n, m in model.named_modules() if hasattr(m, "r") and "default" in m.r}


def check_summary(out, cfg: TrainConfig, result, method: str, steps: int) -> dict:
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["method"] == method and summary["steps"] == steps
    assert summary["adapter_dir"] == str(out / "adapter")
    assert math.isfinite(summary["train_loss"]) and summary["train_seconds"] > 0
    assert summary["dataset_fingerprint"] == fingerprint(load_data(cfg.data))
    assert TrainConfig.model_validate(summary["config"]) == cfg
    assert summary == json.loads(json.dumps(result.to_json())) | {"config": summary["config"]}
    return summary


@pytest.mark.parametrize(
    "method, changes, ranks",
    [
        ("direct", {}, {4}),
        ("source", {}, {16}),
        ("in", {"train__steps": 6}, {4}),  # 16 -> 8 -> 4 in three stages of two steps
    ],
)
def test_lora_methods_end_to_end(method, changes, ranks, tiny_bert, cls_csv, tmp_path):
    out = tmp_path / method
    cfg, result = run(cls_config(tiny_bert, cls_csv, out, method=method, **changes))
    assert result.adapter_dir == out / "adapter" and (out / "adapter" / "adapter_model.safetensors").is_file()
    loaded = lora_ranks(out / "adapter", tiny_bert)
    assert set(loaded.values()) == ranks and len(loaded) == 13  # 2 layers x 6 + pooler
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in weights  # the new head is saved with the adapter
    summary = check_summary(out, cfg, result, method, cfg.train.steps)
    assert summary["rank"] == max(ranks)
    assert [e["rank"] for e in summary["rank_events"]] == ([8, 4] if method == "in" else [])
    assert (out / "adapter" / "tokenizer_config.json").is_file()


def test_validation_curves_while_training(tiny_bert, cls_csv, tmp_path):
    """train.eval_steps scores the validation split during training: eval_loss, eval_accuracy and
    eval_macro_f1 reach the log callback at every N steps; the last one is lsq's own scoring of the saved
    adapter on validation, and evaluating changes nothing in the adapter."""
    from lsq.evaluate import evaluate_adapter
    from lsq.models import ModelConfig

    logs: list = []
    cfg, _ = run(cls_config(tiny_bert, cls_csv, tmp_path / "curves", train__eval_steps=3), logs)
    evals = [(step, m) for step, m in logs if "eval_accuracy" in m]
    assert [step for step, _ in evals] == [3, 6]
    assert all({"eval_loss", "eval_accuracy", "eval_macro_f1"} <= set(m) for _, m in evals)
    final = evaluate_adapter(tmp_path / "curves" / "adapter", ModelConfig(name=str(tiny_bert), device="cpu"),
                             cfg.data, split="validation")
    assert evals[-1][1]["eval_accuracy"] == pytest.approx(final["accuracy"], abs=1e-9)
    assert evals[-1][1]["eval_macro_f1"] == pytest.approx(final["macro_f1"], abs=1e-9)
    run(cls_config(tiny_bert, cls_csv, tmp_path / "plain"))
    with_eval = load_file(tmp_path / "curves" / "adapter" / "adapter_model.safetensors")
    plain = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    assert with_eval.keys() == plain.keys()
    worst = max((with_eval[k] - plain[k]).abs().max().item() for k in plain)
    assert worst <= 1e-6, worst


def test_adalora_baseline(tiny_bert, cls_csv, tmp_path):
    out = tmp_path / "adalora"
    cfg, result = run(cls_config(tiny_bert, cls_csv, out, method="adalora", train__steps=10))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["init_r"], config["target_r"], config["total_step"]) == ("ADALORA", 16, 4, 10)
    # the final budget: at most `rank` singular values kept per module on average
    kept = [sum(mask) for mask in config["rank_pattern"].values()]
    assert len(kept) == 13 and 0 < sum(kept) <= 4 * len(kept)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    PeftModel.from_pretrained(base, str(out / "adapter"))
    check_summary(out, cfg, result, "adalora", 10)


@pytest.fixture
def source_adapter(tiny_bert, cls_csv, tmp_path):
    _, result = run(cls_config(tiny_bert, cls_csv, tmp_path / "source", method="source", train__steps=8))
    return result.adapter_dir


def test_cont_squeeze_from_a_squeezed_source(source_adapter, tiny_bert, cls_csv, tmp_path):
    squeezed = squeeze_adapter(source_adapter, tmp_path / "squeezed", SqueezeConfig(ranks=(4,)), plot=False)["r4"].folder
    start = load_file(squeezed / "adapter_model.safetensors")
    out = tmp_path / "cont"
    # rank 8 in the config on purpose: the summary reports the rank of the adapter it continued from
    cfg, result = run(cls_config(tiny_bert, cls_csv, out, method="cont", rank=8,
                                 cont={"adapter": str(squeezed), "steps": 4, "lr": 1e-3, "warmup_steps": 0}))
    assert set(lora_ranks(out / "adapter", tiny_bert).values()) == {4}
    summary = check_summary(out, cfg, result, "cont", 4)
    assert summary["rank"] == 4
    end = load_file(out / "adapter" / "adapter_model.safetensors")
    assert set(end) == set(start)
    # it started from the squeezed factors (a fresh LoRA init would be far away) and trained them
    for key in start:
        change = float((end[key] - start[key]).norm() / start[key].norm())
        assert 0 < change < (0.5 if key.endswith("weight") else 10), (key, change)  # a bias starts near 0


def test_cont_refuses_a_missing_adapter_before_training(tiny_bert, cls_csv, tmp_path):
    raw = cls_config(tiny_bert, cls_csv, tmp_path / "out", method="cont", cont={"adapter": str(tmp_path / "nope")})
    with pytest.raises(LsqError, match=r"^cont\.adapter: .*nope.*not found"):
        run(raw)
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------- causal LM labels


def test_causal_lm_labels_mask_the_prompt(tiny_llama, lm_jsonl):
    data = load_data(DataConfig(source=str(lm_jsonl), task="causal_lm", choices_column="choices"))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tokens = tokenize_causal_lm(data["train"], tok, max_length=24)
    assert tokens.column_names == ["input_ids", "attention_mask", "labels"]
    for i in (0, 1, 7):
        row, ex = data["train"][i], tokens[i]
        prompt = tok(row["prompt"])["input_ids"]  # [CLS] the colour of the ... is [SEP]
        answer = tok(row["answer"], add_special_tokens=False)["input_ids"]
        assert ex["input_ids"] == prompt + answer
        assert ex["labels"] == [IGNORE] * len(prompt) + answer
        assert ex["attention_mask"] == [1] * len(prompt + answer)
        assert tok.decode([t for t in ex["labels"] if t != IGNORE]) == row["answer"]
    short = {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [IGNORE, 6]}
    batch = PadCollator(tok.pad_token_id)([tokens[0], short])
    width = len(tokens[0]["input_ids"])
    assert batch["labels"].shape == (2, width)
    assert batch["labels"][1].tolist() == [IGNORE, 6] + [IGNORE] * (width - 2)
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (width - 2)


def test_truncation_keeps_the_answer(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = "one two three four five six seven eight nine ten"
    ids, labels = _sft_ids(tok, prompt, "blue sky", max_length=6)
    answer = tok("blue sky", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and ids[-len(answer):] == answer
    assert labels == [IGNORE] * (6 - len(answer)) + answer
    assert ids[: 6 - len(answer)] == tok(prompt)["input_ids"][-(6 - len(answer)):]  # the prompt's end survives


# ---------------------------------------------------------------------------------------- resume


class Killed(KeyboardInterrupt):
    pass


def killer(logs: list, at: int):
    def log(metrics, step):
        logs.append((step, dict(metrics)))
        if "loss" in metrics and step >= at:
            raise Killed
    return log


def whole_checkpoints(out: Path) -> list[str]:
    """The checkpoint folders of a run, in step order, each checked to carry the whole-checkpoint mark."""
    folders = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert all((p / COMPLETE_MARK).is_file() for p in folders), [p.name for p in folders]
    return [p.name for p in folders]


@pytest.mark.parametrize("method", ["direct", "in"])
def test_resume_after_an_interruption(method, tiny_bert, cls_csv, tmp_path):
    changes = dict(method=method, train__steps=10, train__save_steps=2,
                   insqueeze={"stage_steps": [3, 3, 4]} if method == "in" else {})
    out = tmp_path / "run"
    cfg = TrainConfig.model_validate(cls_config(tiny_bert, cls_csv, out, **changes))
    first: list = []
    with pytest.raises(Killed):
        train(cfg, log=killer(first, at=5))
    assert [s for s, m in first if "loss" in m] == [1, 2, 3, 4, 5]
    assert whole_checkpoints(out) == ["checkpoint-2", "checkpoint-4"]  # the last two, both marked whole
    assert not (out / "adapter").exists() and not (out / SUMMARY_NAME).exists()
    if method == "in":  # the checkpoint is past the 16 -> 8 boundary at step 3
        assert json.loads((out / "checkpoints" / "checkpoint-4" / "adapter_config.json").read_text())["r"] == 8

    second: list = []
    result = train(cfg, log=lambda m, s: second.append((s, dict(m))))
    assert [s for s, m in second if "loss" in m] == [5, 6, 7, 8, 9, 10]  # the global step went on
    assert first[-1] == second[0]  # step 5 again, from the same state and the same batch
    assert [(e["step"], e["rank"]) for e in result.rank_events] == ([(6, 4)] if method == "in" else [])
    assert (out / SUMMARY_NAME).is_file()

    # the same adapter as a run that was never interrupted
    whole = TrainConfig.model_validate(cls_config(tiny_bert, cls_csv, tmp_path / "whole", **changes))
    reference = train(whole)
    resumed, straight = load_file(result.adapter_dir / "adapter_model.safetensors"), load_file(
        reference.adapter_dir / "adapter_model.safetensors")
    assert set(resumed) == set(straight)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-6)


def test_resume_skips_a_checkpoint_killed_while_saving(tiny_bert, cls_csv, tmp_path):
    """kill -9 while the Trainer writes checkpoint-6 leaves it partial and unmarked: the rerun resumes from
    checkpoint-4 (the Trainer alone would pick checkpoint-6 and fail on every rerun) and ends with the
    adapter of a run that was never interrupted."""
    raw = cls_config(tiny_bert, cls_csv, tmp_path / "run", train__steps=10, train__save_steps=2)
    cfg, out = TrainConfig.model_validate(raw), tmp_path / "run"
    with pytest.raises(Killed):
        train(cfg, log=killer([], at=5))
    partial = out / "checkpoints" / "checkpoint-6"
    shutil.copytree(out / "checkpoints" / "checkpoint-4", partial)
    for name in (COMPLETE_MARK, "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
        (partial / name).unlink(missing_ok=True)  # written so far: the config, the README, the RNG state

    logs: list = []
    result = train(cfg, log=lambda m, s: logs.append((s, dict(m))))
    assert [s for s, m in logs if "loss" in m] == [5, 6, 7, 8, 9, 10]  # from checkpoint-4
    assert whole_checkpoints(out) == ["checkpoint-8", "checkpoint-10"]
    reference = train(TrainConfig.model_validate({**raw, "output_dir": str(tmp_path / "whole")}))
    resumed = load_file(result.adapter_dir / "adapter_model.safetensors")
    straight = load_file(reference.adapter_dir / "adapter_model.safetensors")
    assert set(resumed) == set(straight)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-4, atol=1e-6)


def test_no_resume_deletes_the_old_checkpoints(tiny_bert, cls_csv, tmp_path):
    """resume=false starts over: a later resume must not find a checkpoint of the abandoned run (the new
    run would also write its checkpoint-2 into a folder that still holds the old mark)."""
    out = tmp_path / "run"
    raw = cls_config(tiny_bert, cls_csv, out, train__steps=6, train__save_steps=2)
    with pytest.raises(Killed):
        train(TrainConfig.model_validate(raw), log=killer([], at=5))
    assert whole_checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(Killed):
        train(TrainConfig.model_validate({**raw, "resume": False}), log=killer([], at=3))
    assert whole_checkpoints(out) == ["checkpoint-2"]  # checkpoint-4 of the abandoned run is gone
    logs: list = []
    train(TrainConfig.model_validate(raw), log=lambda m, s: logs.append((s, dict(m))))
    assert [s for s, m in logs if "loss" in m] == [3, 4, 5, 6]


LSQ = Path(sys.executable).parent / "lsq"


def lsq_train(tiny_bert, cls_csv, out: Path, steps: int) -> list[str]:
    """``lsq train`` on the tiny BERT, a checkpoint every 2 steps."""
    return [str(LSQ), "train", f"model.name={tiny_bert}", "model.device=cpu", f"data.source={cls_csv}",
            "data.max_length=16", "method=direct", "rank=4", f"train.steps={steps}", "train.save_steps=2",
            "train.batch_size=16", "train.lr=5e-3", "train.warmup_steps=0", "train.logging_steps=1",
            f"output_dir={out}"]


def wait_for_unmarked_checkpoint(proc: subprocess.Popen, out: Path, after: int, timeout: float = 180) -> Path:
    """Poll (fast) for a ``checkpoint-N`` (N > after) the Trainer is still writing (no whole mark yet)."""
    deadline = time.monotonic() + timeout
    while True:
        for path in (out / "checkpoints").glob("checkpoint-*"):
            if int(path.name.split("-")[1]) > after and not (path / COMPLETE_MARK).exists():
                return path
        assert proc.poll() is None, f"lsq train exited {proc.returncode} before a checkpoint was caught"
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.0002)


def test_kill_9_while_saving_a_checkpoint_then_rerun(tiny_bert, cls_csv, tmp_path):
    """A real ``lsq train`` killed with SIGKILL while the Trainer writes a checkpoint: the rerun of the same
    command resumes from the last whole checkpoint and ends with an adapter (exit 0)."""
    out = tmp_path / "run"
    command = lsq_train(tiny_bert, cls_csv, out, steps=40)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        caught = wait_for_unmarked_checkpoint(proc, out, after=2)  # checkpoint-2 is whole by then
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL and not (out / "adapter").exists()
    print(f"killed while writing {caught.name}: {sorted(p.name for p in caught.iterdir())}")

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout)
    assert result["steps"] == 40 and result["adapter_dir"] == str(out / "adapter")
    assert set(lora_ranks(out / "adapter", tiny_bert).values()) == {4}
    assert whole_checkpoints(out) == ["checkpoint-38", "checkpoint-40"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_sigterm_during_lsq_train(tiny_bert, cls_csv, tmp_path):
    """SIGTERM mid-training: exit 143, a line on stderr says so (among the Trainer's), no adapter and no temporary folder;
    the whole checkpoints stay for the next run."""
    out = tmp_path / "run"
    proc = subprocess.Popen(lsq_train(tiny_bert, cls_csv, out, steps=40), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_unmarked_checkpoint(proc, out, after=2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "lsq: terminated\n" in stderr and "Traceback" not in stderr and stdout == ""  # after a progress bar
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "checkpoints.config.sha256"]
    assert (out / "checkpoints" / "checkpoint-2" / COMPLETE_MARK).is_file()


def test_resume_refuses_checkpoints_of_another_config(tiny_bert, cls_csv, tmp_path):
    out = tmp_path / "run"
    raw = cls_config(tiny_bert, cls_csv, out, train__steps=4, train__save_steps=2)
    with pytest.raises(Killed):
        train(TrainConfig.model_validate(raw), log=killer([], at=3))
    changed = {**raw, "train": {**raw["train"], "lr": raw["train"]["lr"] * 2}}
    with pytest.raises(LsqError, match="checkpoints of a different config"):
        train(TrainConfig.model_validate(changed))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]  # nothing lost


def test_no_resume_starts_over(tiny_bert, cls_csv, tmp_path):
    out = tmp_path / "run"
    raw = cls_config(tiny_bert, cls_csv, out, train__steps=4, train__save_steps=2)
    with pytest.raises(Killed):
        train(TrainConfig.model_validate(raw), log=killer([], at=3))
    logs: list = []
    run({**raw, "resume": False}, logs)
    assert [s for s, m in logs if "loss" in m] == [1, 2, 3, 4]


# ------------------------------------------------------------------------ bad input, before training


THREE_LABELS = "text,label\n" + "".join(f"w{i},{i % 3}\n" for i in range(30))


def _write(path, text):
    path.write_text(text)
    return path


BAD_INPUT = {
    # name: (config changes given tmp_path, words of the message)
    "unknown model folder": (lambda t: {"model": {"name": str(t / "no-model"), "device": "cpu"}},
                             ["model.name", "no-model"]),
    "unknown built-in model": (lambda t: {"model": {"name": "builtin:gpt5"}}, ["model.name", "builtin:gpt5"]),
    "missing text column": (lambda t: {"data__text_column": "sentence"}, ["text_column", "'sentence'"]),
    "missing label column": (lambda t: {"data__label_column": "stars"}, ["label_column", "'stars'"]),
    "labels out of range": (
        lambda t: {"data__source": str(_write(t / "r.csv", THREE_LABELS)),
                   "data__label_names": ["neg", "pos"]},
        ["label_column", "label 2", "0..1"]),
    "empty split": (lambda t: {"data__source": str(_write(t / "e.csv", "text,label\n"))}, ["e.csv", "has only its header line", "no rows"]),
    "missing data file": (lambda t: {"data__source": str(t / "gone.csv")}, ["source", "gone.csv"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_refused_before_training(case, tiny_bert, cls_csv, tmp_path):
    changes, words = BAD_INPUT[case]
    out = tmp_path / "out"
    with pytest.raises(LsqError) as info:
        run(cls_config(tiny_bert, cls_csv, out, **changes(tmp_path)))
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not out.exists()


# ----------------------------------------------------------------------------------- the command


def test_lsq_train_quick_preset_with_overrides(tiny_bert, cls_csv, tmp_path, capsys):
    out = tmp_path / "quick"
    argv = ["train", str(REPO / "configs" / "quick.yaml"), f"model.name={tiny_bert}", "model.device=cpu",
            f"data.source={cls_csv}", "data.max_length=16", "method=in", "train.steps=6", "train.save_steps=100",
            f"output_dir={out}"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out.splitlines()
    # the result is the last JSON object printed (the Trainer's own log lines come first, on stdout too)
    start = len(stdout) - 1 - stdout[::-1].index("{")
    printed = json.loads("\n".join(stdout[start:]))
    assert (printed["method"], printed["rank"], printed["steps"]) == ("in", 4, 6)
    # it ends with its score on the validation split, in the JSON and in the summary file
    validation = printed["validation"]
    assert validation["split"] == "validation" and validation["data"] == str(cls_csv)
    assert 0 <= validation["accuracy"] <= 1 and validation["examples"] > 0
    assert json.loads((out / SUMMARY_NAME).read_text())["validation"] == validation
    assert [e["rank"] for e in printed["rank_events"]] == [8, 4]
    config = json.loads((out / SUMMARY_NAME).read_text())["config"]
    assert config["train"]["batch_size"] == 16 and config["train"]["lr"] == 1e-3  # kept from the file
    assert config["data"]["max_train"] == 512 and config["source_rank"] == 16
    assert config["model"]["name"] == str(tiny_bert) and config["output_dir"] == str(out)  # overridden


def test_lsq_train_refuses_a_bad_model_with_one_line(cls_csv, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["train", f"model.name={tmp_path / 'missing-model'}", f"data.source={cls_csv}", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("lsq: error: model.name: ")
    assert "missing-model" in err and not out.exists()


# ------------------------------------------------------------------------------ the real model


def test_minilm_learns_movie_sentiment(tmp_path):
    """MiniLM (22.7M, offline) with a rank-16 LoRA learns the real movie sentences in 80 steps (about a
    minute on 2 quiet cores); a held-out accuracy well above chance (0.5) shows the whole path works."""
    from lsq.evaluate import evaluate_adapter

    raw = {
        "method": "source", "source_rank": 16,
        "model": {"name": "builtin:minilm", "device": "cpu"},
        "data": {"source": "builtin:movie", "max_train": 2000, "max_eval": 400, "max_length": 48},
        "train": {"steps": 80, "batch_size": 32, "lr": 2e-3, "warmup_steps": 6, "logging_steps": 10,
                  "save_steps": 1000, "seed": 0},
        "output_dir": str(tmp_path / "minilm"),
    }
    logs: list = []
    cfg, result = run(raw, logs)
    losses = [m["loss"] for s, m in logs if "loss" in m]
    assert len(losses) == 8 and losses[-1] < losses[0]
    metrics = evaluate_adapter(result.adapter_dir, cfg.model, cfg.data, split="test")
    print(f"MiniLM movie: test accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, "
          f"train {result.train_seconds:.0f} s")
    assert metrics["examples"] == 400
    assert metrics["accuracy"] >= 0.7 and metrics["macro_f1"] >= 0.65
