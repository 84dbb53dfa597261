"""Train one adapter: direct LoRA, high-rank source, Cont-Squeeze, In-Squeeze or AdaLoRA.

A recipe reads as its steps: load data and model, wrap the model with the method's adapter,
tokenise, train with the transformers ``Trainer`` (seeded, checkpointed, resumable), save the
adapter atomically, write a summary. Tracking reaches it only through ``log(metrics, step)``.

A checkpoint counts only once the Trainer has finished writing it (:class:`CheckpointMarkCallback`
leaves ``lsq-complete`` in it): a run killed while saving resumes from the previous whole one.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from sklearn.metrics import accuracy_score, f1_score
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from lsq import distributed
from lsq.adapter import AtomicFolder, find_modules, read_adapter
from lsq.checkpoints import (
    CheckpointMarkCallback,
    barrier,
    check_checkpoint_config,
    discard_checkpoints_after,
    last_checkpoint,
    match_checkpoint_ranks,
)
from lsq.data import fingerprint, load_data, num_labels_of
from lsq.errors import LsqError, TrainingDiverged, write_failure
from lsq.insqueeze import RankScheduleCallback, boundaries
from lsq.models import default_targets, device_of, load_base_model, load_tokenizer
from lsq.objectives import PadCollator, tokenize_causal_lm, tokenize_classification
from lsq.records import TrainResult
from lsq.train_config import TrainConfig
from lsq.workdir import atomic_write

Log = Callable[[Mapping[str, float], int], None]
SUMMARY_NAME = "train_summary.json"


def build_model(cfg: TrainConfig, base):
    """Wrap ``base`` with the method's adapter (trainable)."""
    task_type = "SEQ_CLS" if cfg.model.task == "classification" else "CAUSAL_LM"
    targets = cfg.lora.target_modules or default_targets(base)
    if cfg.method == "cont":
        return PeftModel.from_pretrained(base, cfg.cont.adapter, is_trainable=True)
    if cfg.method == "adalora":
        a = cfg.adalora
        peft_config = AdaLoraConfig(
            task_type=task_type, target_modules=targets, init_r=cfg.source_rank, target_r=cfg.rank,
            lora_alpha=cfg.lora.alpha_ratio * cfg.source_rank, lora_dropout=cfg.lora.dropout,
            tinit=int(a.tinit * cfg.train.steps), tfinal=int(a.tfinal * cfg.train.steps), deltaT=a.delta_t,
            total_step=cfg.train.steps,
        )
    else:
        r = cfg.initial_rank
        peft_config = LoraConfig(
            task_type=task_type, target_modules=targets, r=r, lora_alpha=cfg.lora.alpha_ratio * r,
            lora_dropout=cfg.lora.dropout, use_rslora=cfg.lora.use_rslora,
        )
    return get_peft_model(base, peft_config)


class LogCallback(TrainerCallback):
    """Forward the Trainer's logs (loss, learning rate, grad norm) to ``log(metrics, step)``."""

    def __init__(self, log: Log):
        self.log = log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        if numbers:
            self.log(numbers, state.global_step)


class AdaLoraCallback(TrainerCallback):
    """AdaLoRA's budget update needs the gradients: run it after the optimizer step, before zero_grad."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


class LsqTrainer(Trainer):
    """The ``Trainer``, stepping through ``self.model_wrapped`` rather than the training loop's local
    reference, so that a DDP wrapper rebuilt by In-Squeeze (:meth:`lsq.distributed.Replicas.sync`)
    is the one that runs. With one process both are the same object."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        return super().training_step(self.model_wrapped, inputs, num_items_in_batch)

    def _save_checkpoint(self, model, trial):
        """A checkpoint that cannot be written (disk full, no permission) is removed, then raised as
        :class:`lsq.errors.WriteFailed` naming its folder; the whole checkpoints before it stay."""
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            failure = write_failure(exc, folder)
            if failure is None:
                raise
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)  # unmarked: never resumed from, only in the way
            raise failure from None

    def evaluate(self, *args, **kwargs):
        """Scoring during training (``train.eval_steps``) leaves the training's random streams as they
        were: setting up the evaluation draws from them, which would change every later dropout mask and
        so the adapter. With the states restored, curves cost time only."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        states = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)


def _classification_scores(prediction) -> dict[str, float]:
    """Accuracy and macro-F1 of the Trainer's evaluation (logits and labels of the validation split)."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    preds = logits.argmax(-1)
    return {"accuracy": float(accuracy_score(prediction.label_ids, preds)),
            "macro_f1": float(f1_score(prediction.label_ids, preds, average="macro"))}


def _cont_ranks(cfg: TrainConfig) -> dict[str, int]:
    """``{module: rank}`` of the adapter method cont starts from; an LsqError naming cont.adapter otherwise."""
    try:
        config, weights = read_adapter(cfg.cont.adapter)
        return {m.name: m.rank for m in find_modules(list(weights.keys()), config)}
    except LsqError as exc:
        raise LsqError(f"cont.adapter: {exc}") from None


def _fsdp_arguments(cfg: TrainConfig) -> dict[str, Any]:
    """FSDP2 (``fully_shard``) through the Trainer: every decoder layer sharded over the processes."""
    if not cfg.train.fsdp:
        return {}
    config = {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
              # FSDP's own activation checkpointing: the Trainer's would add an all-gather to every backward
              "activation_checkpointing": cfg.train.gradient_checkpointing}
    return {"fsdp": True, "fsdp_config": config}


def check_resources(cfg: TrainConfig) -> None:
    """One-line LsqError, before any loading, when this machine cannot run ``cfg`` as asked."""

    device = device_of(cfg.model)
    if cfg.model.quantization == "4bit":
        if device.type != "cuda":
            raise LsqError(f"model.quantization: 4bit (QLoRA) needs a CUDA device; this run is on {device.type}")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise LsqError("model.quantization: 4bit needs the bitsandbytes package (pip install bitsandbytes)") from None
    if cfg.train.fsdp and device.type != "cuda":
        raise LsqError(f"train.fsdp: FSDP shards over CUDA devices; this run is on {device.type} (use train.fsdp=false)")
    if cfg.train.processes > 1 and not distributed.in_worker():
        cuda = torch.cuda.device_count() if device.type == "cuda" else 0
        distributed.check_processes(cfg.train.processes, cfg.train.batch_size, device.type, cuda)


def train(cfg: TrainConfig, log: Log | None = None, data=None,
          on_checkpoint: Callable[[Path], None] | None = None) -> TrainResult:
    """Run one training recipe and save its adapter to ``{output_dir}/adapter``.

    ``data`` (the DatasetDict of ``load_data(cfg.data)``) saves re-reading and re-splitting the data
    when one process trains many adapters on it. ``on_checkpoint`` is called with each whole
    checkpoint folder (e.g. to copy it where another machine can resume from it).

    With ``train.processes > 1`` it launches the data-parallel workers (:mod:`lsq.distributed`) and
    returns rank 0's result; ``data`` is then read again by each worker from ``cfg.data``.
    """
    check_resources(cfg)
    if cfg.train.processes > 1 and not distributed.in_worker():
        return distributed.launch(cfg, log=log, on_checkpoint=on_checkpoint)
    out = Path(cfg.output_dir)
    set_seed(cfg.train.seed)
    cont_ranks = _cont_ranks(cfg) if cfg.method == "cont" else {}
    data = data if data is not None else load_data(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    is_cls = cfg.model.task == "classification"
    base = load_base_model(cfg.model, num_labels_of(data) if is_cls else None)
    model = build_model(cfg, base)
    tokenize = tokenize_classification if is_cls else tokenize_causal_lm
    train_set = tokenize(data["train"], tokenizer, cfg.data.max_length)
    if len(train_set) < distributed.world()[1]:
        raise LsqError(f"train.processes: {distributed.world()[1]} processes but the training split has {len(train_set)} rows")

    eval_set, during = None, {}
    if cfg.train.eval_steps:  # curves on the validation split while training
        eval_set = tokenize(data["validation"], tokenizer, cfg.data.max_length)
        during = {"eval_strategy": "steps", "eval_steps": cfg.train.eval_steps,
                  "per_device_eval_batch_size": cfg.train.eval_batch_size}

    steps, lr, warmup = cfg.train.steps, cfg.train.lr, cfg.train.warmup_steps
    if cfg.method == "cont":
        steps, lr, warmup = cfg.cont.steps, cfg.cont.lr, cfg.cont.warmup_steps
    device = device_of(cfg.model)
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), max_steps=steps, per_device_train_batch_size=cfg.train.batch_size,
        learning_rate=lr, warmup_steps=warmup, lr_scheduler_type=cfg.train.scheduler,
        weight_decay=cfg.train.weight_decay, optim=cfg.train.optim, max_grad_norm=cfg.train.max_grad_norm,
        logging_steps=cfg.train.logging_steps, save_steps=cfg.train.save_steps, save_total_limit=2,
        seed=cfg.train.seed, data_seed=cfg.train.seed, report_to="none", use_cpu=device.type == "cpu",
        bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(), dataloader_num_workers=0,
        remove_unused_columns=False, save_only_model=False,
        # data parallelism: each of the N processes takes 1/N of the global batch (train.batch_size)
        accelerator_config={"split_batches": True}, ddp_find_unused_parameters=False,
        # token losses (SFT) are summed over the global batch's answer tokens and divided by their count, as
        # with one process; a classification loss is already a mean over equal shares of rows
        average_tokens_across_devices=not is_cls,
        activation_checkpointing=cfg.train.gradient_checkpointing and not cfg.train.fsdp,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.train.gradient_checkpointing else None,
        **_fsdp_arguments(cfg), **during,
    )  # save_total_limit=2: the last whole checkpoint survives while the next one is written
    callbacks: list[TrainerCallback] = [CheckpointMarkCallback(on_checkpoint), *([LogCallback(log)] if log else [])]
    schedule = None
    if cfg.method == "in":
        schedule = RankScheduleCallback(
            boundaries(cfg.stage_ranks, cfg.stage_steps), cfg.insqueeze.optimizer_state, log=log,
            replicas=distributed.Replicas(lambda: trainer) if distributed.world()[1] > 1 else None,
        )
        callbacks.append(schedule)
    if cfg.method == "adalora":
        callbacks.append(AdaLoraCallback())
    trainer = LsqTrainer(
        model=model, args=args, train_dataset=train_set, data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=callbacks, eval_dataset=eval_set,
        compute_metrics=_classification_scores if is_cls and eval_set is not None else None,
    )
    if cfg.train.fsdp and not trainer.is_fsdp_enabled:  # accelerate ignores the plugin where it cannot shard
        raise LsqError("train.fsdp: FSDP was not enabled on this machine (accelerate shards over CUDA devices only)")
    checkpoint = last_checkpoint(out / "checkpoints") if cfg.resume else None
    main = trainer.is_world_process_zero()  # under data parallelism rank 0 alone manages files
    check_checkpoint_config(out / "checkpoints", cfg, resuming=checkpoint is not None, write=main)
    if main:
        discard_checkpoints_after(out / "checkpoints", checkpoint)
    barrier()
    if checkpoint is not None and cfg.method == "in":
        match_checkpoint_ranks(model, checkpoint)
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - start
    world = distributed.world()[1]
    replica_digests = distributed.Replicas(lambda: trainer).check() if world > 1 else []
    loss = float(output.training_loss)
    if not torch.isfinite(torch.tensor(loss)):
        raise TrainingDiverged(f"training diverged: final loss {loss}; lower train.lr ({lr})")

    if main:
        with AtomicFolder(out / "adapter", force=True) as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
    result = TrainResult(
        adapter_dir=out / "adapter", method=cfg.method,
        rank=max(cont_ranks.values()) if cont_ranks else cfg.source_rank if cfg.method == "source" else cfg.rank,
        steps=steps, train_seconds=seconds, train_loss=loss, dataset_fingerprint=fingerprint(data),
        rank_events=schedule.events if schedule else [], processes=world, replica_digests=replica_digests,
    )
    if main:
        summary = {**result.to_json(), "config": cfg.model_dump(mode="json")}
        atomic_write(out / SUMMARY_NAME, (json.dumps(summary, indent=1) + "\n").encode())
    barrier()  # the adapter is whole before any rank reports the run done
    return result
