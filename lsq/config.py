"""Typed, frozen configuration of a squeeze (the CLI flags map one to one onto these fields)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lsq.policies import SERVING_RANKS, Target, parse_targets

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SqueezeConfig(BaseModel):
    """How to squeeze one LoRA adapter into one or more smaller ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ranks: tuple[int, ...] = Field((), description="Uniform target ranks; one output adapter each (folder rK).")
    energy: tuple[float, ...] = Field(
        (), description="Per-module energy thresholds tau in (0, 1]: each module keeps the smallest rank "
        "retaining at least tau of its squared singular values (rank_pattern). Folder energyTAU."
    )
    budget: tuple[int, ...] = Field(
        (), description="Global LoRA parameter budgets: ranks chosen across modules, greedy by squared "
        "singular value per parameter (rank_pattern). Folder budgetN."
    )
    serving: Literal["vllm"] | None = Field(
        None, description="Snap every target to one uniform rank that this serving engine accepts."
    )
    alpha_policy: Literal["keep-scale", "rank", "fixed"] = Field(
        "keep-scale",
        description="New lora_alpha: keep-scale keeps each module's scale s (alpha*k/r, or alpha*sqrt(k/r) "
        "with rsLoRA, as a float); rank sets alpha=k; fixed sets alpha to --alpha. The update is the "
        "best rank-k approximation in every case.",
    )
    alpha: float | None = Field(None, description="lora_alpha for --alpha-policy fixed.")
    method: Literal["exact", "rsvd"] = Field(
        "exact", description="exact: SVD from the factors (Gram/QR + r x r core); rsvd: randomized SVD "
        "on the implicit operator (the paper's choice), for large source ranks."
    )
    oversample: int = Field(10, ge=0, description="rsvd: extra sketch columns beyond the largest target rank.")
    power_iters: int = Field(2, ge=0, description="rsvd: subspace (power) iterations.")
    seed: int = Field(0, description="rsvd: seed of the random sketch.")
    compute_dtype: Literal["float64", "float32"] = Field("float64", description="dtype of the maths.")
    out_dtype: Literal["source", "float32", "float16", "bfloat16"] = Field(
        "source", description="dtype of the written factors (source: that of each source tensor)."
    )
    device: str = Field("cpu", description="torch device for the maths: auto (cuda when present), cpu, cuda, cuda:1, ...")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value == "auto":
            return value
        try:
            device = torch.device(value)
        except RuntimeError:
            raise ValueError(f"unknown torch device {value!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{value} asked for but torch sees no CUDA device (use cpu or auto)")
        return value

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @model_validator(mode="after")
    def _check(self) -> SqueezeConfig:
        if not (self.ranks or self.energy or self.budget):
            raise ValueError("no target given: pass --ranks, --energy or --budget")
        for k in self.ranks:
            if k < 1:
                raise ValueError(f"ranks: target rank {k} is below 1")
        for tau in self.energy:
            if not 0 < tau <= 1:
                raise ValueError(f"energy: threshold {tau} is outside (0, 1]")
        for b in self.budget:
            if b < 1:
                raise ValueError(f"budget: {b} parameters is below 1")
        if (self.alpha_policy == "fixed") != (self.alpha is not None):
            raise ValueError("alpha: give --alpha exactly when --alpha-policy is fixed")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"alpha: {self.alpha} is not positive")
        if self.serving is not None and self.serving not in SERVING_RANKS:
            raise ValueError(f"serving: unknown engine {self.serving!r}")
        return self

    @property
    def targets(self) -> list[Target]:
        return parse_targets(self.ranks, self.energy, self.budget, self.serving)

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return _DTYPES[self.compute_dtype]

    def torch_out_dtype(self, source: torch.dtype) -> torch.dtype:
        return source if self.out_dtype == "source" else _DTYPES[self.out_dtype]
