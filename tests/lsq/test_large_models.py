"""Options for large models on CPU: gradient checkpointing gives the same adapter, the chat template of an
instruction-tuned decoder shapes SFT examples (loss on the reply only), the SFT presets load and train."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from lsq.data import DataConfig, load_data
from lsq.objectives import IGNORE, _sft_ids, tokenize_causal_lm
from lsq.train import train
from lsq.train_config import TrainConfig, load_train_config
from tests.lsq.test_distributed import bert_no_dropout, relative_difference, updates  # noqa: F401  (fixture)
from tests.lsq.tiny import built_once, cls_config, cls_csv, lm_jsonl, tiny_llama  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture
def chat_llama(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama with a chat template in its tokenizer (as instruction-tuned models ship)."""
    def build(folder: Path) -> None:
        shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
        tok = AutoTokenizer.from_pretrained(folder)
        tok.chat_template = TEMPLATE
        tok.save_pretrained(folder)
    return built_once(tmp_path_factory, "tiny-llama-chat", build)


def test_gradient_checkpointing_gives_the_same_adapter(bert_no_dropout, cls_csv, tmp_path):
    plain = train(TrainConfig.model_validate(cls_config(bert_no_dropout, cls_csv, tmp_path / "a", train__steps=5)))
    saved = train(TrainConfig.model_validate(cls_config(bert_no_dropout, cls_csv, tmp_path / "b", train__steps=5,
                                                        train__gradient_checkpointing=True)))
    assert relative_difference(updates(plain.adapter_dir), updates(saved.adapter_dir)) < 1e-6


def test_chat_template_shapes_the_sft_example(chat_llama):
    tok = AutoTokenizer.from_pretrained(chat_llama)
    ids, labels = _sft_ids(tok, "the colour of the sky is", "blue", max_length=64)
    prompt_len = labels.count(IGNORE)
    # the prompt is the user turn and the assistant header, written by the template (no raw prompt)
    assert tok.decode(ids[:prompt_len]).replace(" ", "") == "<|user|>thecolouroftheskyis<|end|><|assistant|>"
    # the loss covers the reply and the template's end of turn, nothing of the prompt
    assert labels[prompt_len:] == ids[prompt_len:] and IGNORE not in labels[prompt_len:]
    assert tok.decode(ids[prompt_len:]).replace(" ", "").startswith("blue<|end|>")


def test_chat_template_off_uses_the_raw_prompt(chat_llama, lm_jsonl):
    from lsq.models import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig(name=str(chat_llama), task="causal_lm", chat_template="off"))
    ids, labels = _sft_ids(tok, "the colour of the sky is", "blue", max_length=64)
    raw = tok("the colour of the sky is")["input_ids"]
    assert ids[: len(raw)] == raw and labels.count(IGNORE) == len(raw)
    # tokenised datasets differ with the template on and off (the cache key includes it)
    data = load_data(DataConfig(source=str(lm_jsonl), task="causal_lm", choices_column="choices"))
    with_template = tokenize_causal_lm(data["train"], AutoTokenizer.from_pretrained(chat_llama), 48)
    without = tokenize_causal_lm(data["train"], tok, 48)
    assert with_template[0]["input_ids"] != without[0]["input_ids"]


TRAIN_PRESETS = sorted(p.name for p in (REPO / "configs").glob("sft-*.yaml") if p.name != "sft-demo.yaml")


@pytest.mark.parametrize("preset", TRAIN_PRESETS)
def test_sft_presets_load(preset):
    cfg = load_train_config(REPO / "configs" / preset)
    assert cfg.model.task == cfg.data.task == "causal_lm" and cfg.train.gradient_checkpointing


def test_the_sft_demo_is_the_whole_pipeline_on_the_built_in_decoder():
    """configs/sft-demo.yaml (make sft-demo): SmolLM2 on built-in addition, rank 64 -> 16, 8, 4, recovered, In-Squeeze."""
    from lsq.pipeline_config import load_pipeline_config

    cfg = load_pipeline_config(REPO / "configs" / "sft-demo.yaml")
    assert (cfg.model.name, cfg.model.task, cfg.data.source) == ("builtin:smollm2", "causal_lm", "builtin:addition")
    assert cfg.source_rank == 64 and cfg.target_ranks == (16, 8, 4)
    assert cfg.recover.enabled and cfg.insqueeze.enabled and cfg.baselines.zero_shot


def test_sft_preset_trains_a_chat_model(chat_llama, lm_jsonl, tmp_path):
    """The Qwen preset on the tiny chat Llama: an adapter whose saved tokenizer keeps the template, scored by
    the same template (loss on replies)."""
    cfg = load_train_config(REPO / "configs" / "sft-qwen2.5-0.5b.yaml", [
        f"model.name={chat_llama}", "model.device=cpu", f"data.source={lm_jsonl}", "data.choices_column=choices",
        "data.max_length=48", "train.steps=4", "train.batch_size=8", "train.warmup_steps=0", "rank=2",
        "source_rank=8", f"output_dir={tmp_path / 'run'}",
    ])
    result = train(cfg)
    assert result.steps == 4 and result.rank == 8
    saved = json.loads((result.adapter_dir / "tokenizer_config.json").read_text())
    template = saved.get("chat_template") or (result.adapter_dir / "chat_template.jinja").read_text()
    assert template == TEMPLATE
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in weights)
