"""Typed, frozen configuration of one training run (``lsq train CONFIG.yaml key=value ...``).

Methods (the paper's names where it has them):
  direct   LoRA trained at ``rank`` for ``train.steps`` (today's practice: the baseline)
  source   LoRA trained at ``source_rank`` (the high-rank source that Post-/Cont-Squeeze compress)
  cont     Cont-Squeeze: start from a squeezed adapter (``cont.adapter``) and train ``cont.steps`` more
  in       In-Squeeze: start at ``source_rank``, resize in place at each stage boundary down to ``rank``
  adalora  PEFT's AdaLoRA from ``source_rank`` to an average of ``rank``, same steps (second baseline)
Post-Squeeze is not training: it is ``lsq squeeze`` on a source adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lsq.config_files import load_config
from lsq.data import DataConfig
from lsq.models import ModelConfig

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class LoraSettings(BaseModel):
    model_config = _FROZEN

    target_modules: list[str] | str | None = Field(None, description="Modules to adapt; default per architecture.")
    alpha_ratio: float = Field(2.0, gt=0, description="lora_alpha = alpha_ratio * r (scale alpha/r stays fixed across ranks).")
    use_rslora: bool = Field(False, description="Scale alpha/sqrt(r) instead of alpha/r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")


class OptimSettings(BaseModel):
    model_config = _FROZEN

    steps: int = Field(200, ge=1, description="Optimizer steps (the budget every method shares).")
    batch_size: int = Field(32, ge=1, description="Per-step batch size.")
    eval_batch_size: int = Field(64, ge=1, description="Batch size for evaluation.")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field("linear", description="LR schedule.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    optim: Literal["adamw_torch", "adafactor"] = Field("adamw_torch", description="Optimizer (the paper used Adafactor).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0 disables).")
    logging_steps: int = Field(10, ge=1, description="Log every N steps.")
    eval_steps: int | None = Field(
        None, ge=1, description="Score the validation split every N steps while training: eval_loss (and for "
        "classification eval_accuracy, eval_macro_f1) as curves beside the loss. None: scored once, after training.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N steps (a killed run resumes from the last).")
    seed: int = Field(0, description="Seed of initialisation, data order and dropout.")
    processes: int = Field(
        1, ge=1, description="Data-parallel processes (torchrun; gloo on CPU, NCCL on CUDA, one GPU each). "
        "The global batch stays batch_size: each process takes batch_size/processes rows per step.",
    )
    fsdp: bool = Field(
        False, description="Shard the base model over the processes with FSDP2 (fully_shard) when it does not fit one "
        "device; needs train.processes > 1. Not with method in or adalora (they resize or mask whole factors).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less memory, ~30% slower).")


class ContSettings(BaseModel):
    model_config = _FROZEN

    adapter: str | None = Field(None, description="Squeezed adapter folder to continue from (method cont).")
    # one set of recovery defaults for lsq train and the pipeline (recover.*): those the demo was tuned with
    steps: int = Field(30, ge=1, description="Recovery steps at the target rank.")
    lr: float = Field(1e-3, gt=0, description="Recovery learning rate.")
    warmup_steps: int = Field(3, ge=0, description="Recovery warm-up steps.")


class InSqueezeSettings(BaseModel):
    model_config = _FROZEN

    schedule: list[int] | None = Field(
        None, description="Ranks of the stages, decreasing, from source_rank to rank; default geometric halving."
    )
    stage_steps: list[int] | None = Field(None, description="Steps per stage (sums to train.steps); default equal.")
    optimizer_state: Literal["project", "reset"] = Field(
        "project", description="Adam moments at a rank change: projected onto the new factors, or reset to zero."
    )


class AdaLoraSettings(BaseModel):
    model_config = _FROZEN

    tinit: float = Field(0.1, ge=0, lt=1, description="Fraction of steps before pruning starts.")
    tfinal: float = Field(0.2, ge=0, lt=1, description="Fraction of final steps at the target budget.")
    delta_t: int = Field(5, ge=1, description="Steps between budget reallocations.")


class TrainConfig(BaseModel):
    """One training run: model, data, method, ranks and optimisation."""

    model_config = _FROZEN

    method: Literal["direct", "source", "cont", "in", "adalora"] = Field("source", description="What to train.")
    rank: int = Field(8, ge=1, description="Target rank (direct, cont, in, adalora).")
    source_rank: int = Field(64, ge=1, description="High source rank (source, in, adalora).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=lambda: DataConfig(source="builtin:movie"))
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: OptimSettings = Field(default_factory=OptimSettings)
    cont: ContSettings = Field(default_factory=ContSettings)
    insqueeze: InSqueezeSettings = Field(default_factory=InSqueezeSettings)
    adalora: AdaLoraSettings = Field(default_factory=AdaLoraSettings)
    output_dir: str = Field("runs/train", description="Where the adapter, checkpoints and summary go.")
    resume: bool = Field(
        True, description="Resume from the last whole checkpoint in output_dir; false starts over and deletes the old ones."
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.model.task != self.data.task:
            raise ValueError(f"data.task: {self.data.task!r} disagrees with model.task {self.model.task!r}")
        if self.method in ("in", "adalora") and self.rank >= self.source_rank:
            raise ValueError(f"rank: target rank {self.rank} must be below source_rank {self.source_rank}")
        if self.train.fsdp and self.train.processes < 2:
            raise ValueError("train.fsdp: sharding needs train.processes of 2 or more")
        if self.train.fsdp and self.method in ("in", "adalora"):
            raise ValueError(f"train.fsdp: method {self.method} resizes or masks whole LoRA factors, which FSDP shards; "
                             "use data parallelism without fsdp (the factors are small)")
        if self.method == "cont" and not self.cont.adapter:
            raise ValueError("cont.adapter: method cont needs the squeezed adapter folder to start from")
        if self.method == "adalora":  # PEFT's AdaLoraConfig refuses a schedule without a budgeting phase
            a, steps = self.adalora, self.train.steps
            if int(a.tinit * steps) >= steps - int(a.tfinal * steps):
                raise ValueError(
                    f"adalora.tinit: {a.tinit} with adalora.tfinal {a.tfinal} leaves no budgeting steps "
                    f"of train.steps {steps}"
                )
        if self.method == "in":
            ranks = self.stage_ranks
            if ranks[0] != self.source_rank or ranks[-1] != self.rank:
                raise ValueError(f"insqueeze.schedule: {ranks} must start at source_rank {self.source_rank} and end at rank {self.rank}")
            if any(b >= a for a, b in zip(ranks, ranks[1:])):
                raise ValueError(f"insqueeze.schedule: {ranks} does not strictly decrease")
            steps = self.stage_steps
            if len(steps) != len(ranks) or sum(steps) != self.train.steps or min(steps) < 1:
                raise ValueError(
                    f"insqueeze.stage_steps: {steps} must give {len(ranks)} stages of at least 1 step summing to train.steps {self.train.steps}"
                )
        return self

    @property
    def stage_ranks(self) -> list[int]:
        """In-Squeeze ranks: the explicit schedule, or halving from source_rank down to rank."""
        if self.insqueeze.schedule:
            return list(self.insqueeze.schedule)
        ranks = [self.source_rank]
        while ranks[-1] // 2 > self.rank:
            ranks.append(ranks[-1] // 2)
        return ranks + [self.rank]

    @property
    def stage_steps(self) -> list[int]:
        if self.insqueeze.stage_steps:
            return list(self.insqueeze.stage_steps)
        return split_evenly(self.train.steps, len(self.stage_ranks))

    @property
    def initial_rank(self) -> int:
        return self.rank if self.method in ("direct", "cont") else self.source_rank


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` integers that differ by at most one, the larger ones first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def key_config(cfg: TrainConfig) -> dict[str, Any]:
    """The training config as it enters step keys and checkpoint stamps: without where it goes, whether it
    resumes, and how many processes train it (the same global batch, the same run)."""
    return cfg.model_dump(mode="json", exclude={"output_dir": True, "resume": True, "train": {"processes"}})


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML preset, apply overrides, validate; errors name the key and the bad value."""
    return load_config(TrainConfig, path, overrides)
