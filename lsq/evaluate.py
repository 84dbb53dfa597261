"""Score any adapter folder (LoRA, squeezed, AdaLoRA) on a data split.

Returns the task metrics together with the adapter's size: ``trainable_params`` (every tensor in the
adapter file: LoRA factors plus saved heads), ``lora_params`` (the low-rank factors only) and
``adapter_bytes`` (the weights file on disk). The base model comes from the run's model config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open

from lsq.adapter import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from lsq.data import DataConfig, load_data, num_labels_of
from lsq.errors import LsqError
from lsq.models import ModelConfig, device_of, load_base_model, load_tokenizer
from lsq.objectives import (
    PadCollator,
    causal_lm_metrics,
    classification_metrics,
    tokenize_causal_lm,
    tokenize_classification,
)

_LORA_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_E")


def adapter_size(adapter_dir: str | os.PathLike) -> dict[str, int]:
    """Parameter counts and file size of an adapter folder, read from the safetensors header."""
    folder = Path(adapter_dir)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / LEGACY_WEIGHTS_NAME).is_file():
            raise LsqError(f"{folder}: only a pickled {LEGACY_WEIGHTS_NAME}; re-save it as safetensors")
        raise LsqError(f"{folder}: no {WEIGHTS_NAME}")
    total = lora = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            n = 1
            for dim in f.get_slice(key).get_shape():
                n *= dim
            total += n
            lora += n if any(m in key for m in _LORA_MARKERS) else 0
    return {"trainable_params": total, "lora_params": lora, "adapter_bytes": weights.stat().st_size}


def load_adapter_model(adapter_dir: str | os.PathLike, model_cfg: ModelConfig, num_labels: int | None = None):
    """Base model + adapter, in eval mode, on the configured device."""
    base = load_base_model(model_cfg, num_labels)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (OSError, ValueError, RuntimeError) as exc:
        raise LsqError(f"{adapter_dir}: cannot load the adapter onto {model_cfg.name} ({str(exc).splitlines()[0][:200]})") from None
    return model.eval()


def evaluate_adapter(
    adapter_dir: str | os.PathLike,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    split: str = "test",
    batch_size: int = 64,
    data=None,
) -> dict[str, Any]:
    """Metrics of one adapter on ``split``: accuracy/macro-F1 or loss/answer accuracy, plus its size.

    ``data`` (a loaded DatasetDict) saves re-reading the dataset when scoring many adapters.
    """
    return evaluate_splits(adapter_dir, model_cfg, data_cfg, (split,), batch_size, data)[split]


def evaluate_splits(
    adapter_dir: str | os.PathLike | None,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    splits: tuple[str, ...] = ("validation", "test"),
    batch_size: int = 64,
    data=None,
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_adapter` on several splits with one load of the model: ``{split: metrics}``.

    ``adapter_dir=None`` scores the base model itself (zero-shot; its size counts as 0)."""
    if adapter_dir is None:
        size = {"trainable_params": 0, "lora_params": 0, "adapter_bytes": 0}
    elif not Path(adapter_dir).is_dir():
        raise LsqError(f"{adapter_dir}: adapter folder not found")
    else:
        size = adapter_size(adapter_dir)  # refuses a folder without weights before any model is loaded
    data = data if data is not None else load_data(data_cfg)
    for split in splits:
        if split not in data or len(data[split]) == 0:
            raise LsqError(f"split {split!r} is missing or empty")
    tokenizer = load_tokenizer(model_cfg)
    is_cls = model_cfg.task == "classification"
    num_labels = num_labels_of(data) if is_cls else None
    model = (load_base_model(model_cfg, num_labels).eval() if adapter_dir is None
             else load_adapter_model(adapter_dir, model_cfg, num_labels))
    device = device_of(model_cfg)
    collator = PadCollator(tokenizer.pad_token_id)
    out = {}
    with torch.inference_mode():
        for split in splits:
            if is_cls:
                tokens = tokenize_classification(data[split], tokenizer, data_cfg.max_length)
                metrics = classification_metrics(model, tokens, collator, batch_size, device)
            else:
                tokens = tokenize_causal_lm(data[split], tokenizer, data_cfg.max_length)
                metrics = causal_lm_metrics(model, tokens, collator, batch_size, device, raw=data[split],
                                            tokenizer=tokenizer, max_length=data_cfg.max_length,
                                            max_new_tokens=data_cfg.max_new_tokens)
            out[split] = {**metrics, **size, "split": split, "examples": len(data[split])}
    return out
