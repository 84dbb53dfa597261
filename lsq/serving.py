"""The serving contract: can a vLLM-style multi-LoRA server load an adapter as it is?

Written against vLLM's documented LoRA limits (its LoRA docs and engine arguments, as summarised in
this project's reference notes): the server starts with one ``--max-lora-rank`` from
{1, 8, 16, 32, 64, 128, 256, 320, 512} and refuses an adapter whose rank exceeds it; it reads one
``r`` and one ``lora_alpha`` per adapter (``rank_pattern``/``alpha_pattern`` are dropped, so a
per-module adapter is served with the wrong ranks and scales); it rejects DoRA and does not load
``modules_to_save`` (whole saved modules, such as a classification head). rsLoRA is supported.
SGLang and LoRAX batch adapters the same way (S-LoRA/Punica kernels: one rank and alpha per adapter).

Pure: a function of ``adapter_config.json`` and the weight names (no tensors, no server).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsq.policies import SERVING_RANKS

VLLM_MAX_LORA_RANKS = SERVING_RANKS["vllm"]
_LORA_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclass(frozen=True)
class ServingCheck:
    """The contract's answer: ``servable``, the ``--max-lora-rank`` it needs, why not, and what lsq can do."""

    servable: bool
    max_lora_rank: int | None = None
    reasons: tuple[str, ...] = ()
    remedy: str = ""

    def tag(self) -> str:
        """``yes: --max-lora-rank 8`` or ``no: <why>; <remedy>`` (the ``lsq.serving.vllm`` version tag)."""
        if self.servable:
            return f"yes: --max-lora-rank {self.max_lora_rank}"
        return "no: " + "; ".join(self.reasons) + (f"; {self.remedy}" if self.remedy else "")


def vllm_contract(config: Mapping[str, Any], weight_names: Iterable[str]) -> ServingCheck:
    """Check a PEFT adapter (its ``adapter_config.json`` as a mapping, its weight names) against vLLM's limits."""
    names = list(weight_names)
    reasons, fixable = [], True
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        return ServingCheck(False, reasons=(f"peft_type {peft_type}: vLLM loads plain LoRA adapters only",),
                            remedy="train a LoRA adapter (lsq squeeze refuses this type too)")
    r = int(config.get("r", 8))
    ranks = {r, *(int(v) for v in (config.get("rank_pattern") or {}).values())}
    if config.get("use_dora") or any("lora_magnitude_vector" in n for n in names):
        reasons.append("DoRA (use_dora): vLLM rejects DoRA adapters")
        fixable = False
    saved = sorted(config.get("modules_to_save") or []) or sorted(
        {n.rsplit(".", 1)[0] for n in names if not any(m in n for m in _LORA_MARKERS)})
    if saved:
        reasons.append(f"modules_to_save ({', '.join(saved[:3])}{', ...' if len(saved) > 3 else ''}): "
                       "vLLM does not load whole saved modules")
        fixable = False
    if len(ranks) > 1:
        reasons.append(f"per-module ranks (rank_pattern, {min(ranks)}-{max(ranks)}): vLLM reads one r")
    if config.get("alpha_pattern"):
        reasons.append("per-module alphas (alpha_pattern): vLLM applies one lora_alpha / r")
    if max(ranks) > VLLM_MAX_LORA_RANKS[-1]:
        reasons.append(f"rank {max(ranks)} above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")
    if not reasons:
        return ServingCheck(True, max_lora_rank=next(v for v in VLLM_MAX_LORA_RANKS if v >= r))
    if not fixable:
        return ServingCheck(False, reasons=tuple(reasons),
                            remedy="lsq squeeze keeps DoRA and modules_to_save, so no squeeze makes it servable")
    below = [v for v in VLLM_MAX_LORA_RANKS if v < min(ranks)]
    remedy = (f"lsq squeeze ADAPTER --ranks {below[-1]} --serving vllm --out OUT writes OUT/r{below[-1]}-vllm "
              f"(one rank {below[-1]}, one alpha)" if below else "")
    return ServingCheck(False, reasons=tuple(reasons), remedy=remedy)


def check_adapter(folder: str | Path) -> ServingCheck:
    """:func:`vllm_contract` of a PEFT adapter folder (``adapter_config.json`` + the safetensors header)."""
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"
    names: list[str] = []
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            names = list(f.keys())
    return vllm_contract(config, names)
