"""The Trainer's checkpoints, made safe to resume from: a mark written once a checkpoint is whole, the newest
marked one found, newer (partial or stale) ones deleted, a stamp of the config they belong to, and an
In-Squeeze model resized to a checkpoint's ranks before it is loaded."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

from lsq.adapter import find_modules, read_adapter
from lsq.errors import LsqError
from lsq.live import lora_layers, resize_lora_
from lsq.train_config import TrainConfig, key_config

COMPLETE_MARK = "lsq-complete"  # in checkpoint-N/ once the Trainer has written all of it
STAMP_NAME = "checkpoints.config.sha256"  # beside, not in, the Trainer's folder
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")  # the Trainer's PREFIX_CHECKPOINT_DIR-{global_step}


class CheckpointMarkCallback(TrainerCallback):
    """Mark ``checkpoint-N`` whole once the Trainer has saved it.

    ``Trainer._save_checkpoint`` writes the model, optimizer, scheduler, RNG and trainer state, then
    rotates old checkpoints; ``on_save`` runs after it returns. A kill before the mark leaves an
    unmarked folder that :func:`last_checkpoint` ignores (the Trainer's own choice, the highest
    number, would fail on it for good with "Can't find a valid checkpoint").
    """

    def __init__(self, on_checkpoint: Callable[[Path], None] | None = None):
        self.on_checkpoint = on_checkpoint

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        barrier()  # under data parallelism every rank writes its RNG state into the folder first
        if args.should_save and folder.is_dir():
            tmp = folder / f".{COMPLETE_MARK}.tmp"
            tmp.write_text(f"{state.global_step}\n")
            os.replace(tmp, folder / COMPLETE_MARK)  # the mark appears whole or not at all
            if self.on_checkpoint is not None:
                self.on_checkpoint(folder)


def barrier() -> None:
    """Wait for every data-parallel process (nothing outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoints(folder: Path) -> dict[int, Path]:
    """``{step: checkpoint-step folder}`` of the Trainer's output folder (empty when there is none)."""
    if not folder.is_dir():
        return {}
    return {int(m[1]): p for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()}


def last_checkpoint(folder: Path) -> Path | None:
    """The newest whole (marked) checkpoint in ``folder``, or None."""
    whole = {step: p for step, p in checkpoints(folder).items() if (p / COMPLETE_MARK).is_file()}
    return whole[max(whole)] if whole else None


def discard_checkpoints_after(folder: Path, checkpoint: Path | None) -> None:
    """Delete every checkpoint newer than ``checkpoint`` (all of them for None) before training.

    Those are partial (killed while saving) or stale (``resume=false``): the Trainer must neither
    pick them nor write a new checkpoint into a folder that still holds an old mark.
    """
    after = int(_CHECKPOINT.match(checkpoint.name)[1]) if checkpoint is not None else -1
    for step, path in sorted(checkpoints(folder).items()):
        if step > after:
            shutil.rmtree(path)


def match_checkpoint_ranks(model, checkpoint: Path) -> None:
    """An In-Squeeze checkpoint may be past a boundary: resize the fresh model to its ranks first."""
    config, weights = read_adapter(checkpoint)
    ranks = {m.name: m.rank for m in find_modules(list(weights.keys()), config)}
    current = {n: layer.r["default"] for n, layer in lora_layers(model).items()}
    smaller = {n: k for n, k in ranks.items() if k < current.get(n, k)}
    if smaller:
        resize_lora_(model, smaller)


def check_checkpoint_config(folder: Path, cfg: TrainConfig, resuming: bool, write: bool = True) -> None:
    """Resume only the same run: checkpoints of another config (lr, steps, data...) are refused.

    The number of processes is not part of it: the global batch, hence the run, is the same."""
    raw = {**key_config(cfg), "output_dir": cfg.output_dir}
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    stamp = folder.parent / STAMP_NAME
    if resuming and stamp.is_file() and stamp.read_text().strip() != digest:
        raise LsqError(f"{folder}: checkpoints of a different config; pass resume=false or another output_dir")
    if write:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest + "\n")
