"""The pipeline's steps as plain functions: frozen configs and records in, a record out.

Each step works in its own folder under a root (:mod:`lsq.workdir`): named by a digest of
everything that determines its output, claimed while it works, and left with a ``record.json``
when done. Calling a step whose folder holds a verified record returns that record without doing
the work again, which is how a re-run, a retry after a kill, and a second run of the same config
reuse finished work; different inputs (another seed, other data, other code) get other folders.

The Prefect tasks (``tasks/steps.py``) and the study (``experiments/study.py``) both call these: one engine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lsq.api import PLOT_NAME, REPORT_NAME, squeeze_adapter
from lsq.checkpoints import last_checkpoint
from lsq.config import SqueezeConfig
from lsq.data import DataConfig
from lsq.errors import LsqError
from lsq.evaluate import evaluate_splits
from lsq.models import ModelConfig
from lsq.records import Evaluation, Evaluations, Squeezed, UnitResult, Variant
from lsq.storage import Storage
from lsq.train import train
from lsq.train_config import TrainConfig, key_config
from lsq.workdir import adapter_digest, claimed, finished, publish, step_key

Log = Callable[[Mapping[str, float], int], None]


PACKAGE = Path(__file__).resolve().parent
# The modules whose code can change an adapter or a score: every step key holds a digest of their sources, so
# editing one re-runs the steps it could change. Editing any other module (the command line, reports, plots,
# storage, processes, config parsing: a parsed config is keyed by its values) keeps finished steps reusable, as
# does any change outside lsq/ (tasks/, flows/, the experiments/ harness, docs). A new module must join one of
# the two lists (tests/lsq/test_steps.py checks that every module of the package is in exactly one).
KEYED_MODULES = (
    "adapter", "api", "builtin_data", "builtin_models", "builtin_tasks", "checkpoints", "config", "data",
    "data_files", "data_sources", "distributed", "evaluate", "insqueeze", "linalg", "live", "loading", "models",
    "objectives",
    "policies", "records", "squeeze", "steps", "train", "train_config", "train_worker", "workdir",
)
UNKEYED_MODULES = (
    "__init__", "__main__", "cli", "commands", "config_files", "errors", "harness", "monitoring", "pipeline_config",
    "plotting", "processes", "report", "serving", "storage", "variants",
)


def code_version(package: Path = PACKAGE) -> str:
    """Digest of the sources of :data:`KEYED_MODULES` in ``package``: part of every step key."""
    digest = hashlib.sha256()
    for name in KEYED_MODULES:
        path = package / f"{name}.py"
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def trained_label(cfg: TrainConfig, parent: Variant | None = None) -> str:
    rank = cfg.source_rank if cfg.method == "source" else parent.rank if parent else cfg.rank
    return f"{cfg.method}-r{rank}"


def train_folder(cfg: TrainConfig, data_fingerprint: str, code: str, parent: Variant | None = None) -> Path:
    """``<cfg.output_dir>/<label>-<key>``; the key covers the whole config except where it goes and
    how many processes train it (the same global batch, the same run), the data, the code and (cont)
    the digest of the adapter it starts from, not that adapter's path."""
    config = key_config(cfg)
    config["cont"].pop("adapter", None)
    key = step_key({"step": "train", "config": config, "data": data_fingerprint, "code": code,
                    "parent": parent.adapter_sha256 if parent else None})
    return Path(cfg.output_dir) / f"{trained_label(cfg, parent)}-{key}"


def train_step(cfg: TrainConfig, data_fingerprint: str, code: str, parent: Variant | None = None,
               data=None, log: Log | None = None, storage: Storage | None = None) -> Variant:
    """Train one adapter (source, cont from ``parent``, in, direct, adalora), or reuse the finished one.

    A killed run resumes from its last whole checkpoint in the same folder, or, with a shared
    ``storage`` root, from the last one any machine kept there. ``data`` (the loaded DatasetDict)
    saves re-reading it; it must be the data ``data_fingerprint`` describes.
    """
    if cfg.method == "cont" and parent is None:
        raise LsqError("cont step: needs the squeezed variant it recovers (parent)")
    if parent is not None:
        cfg = cfg.model_copy(update={"cont": cfg.cont.model_copy(update={"adapter": parent.adapter_dir})})
    folder = train_folder(cfg, data_fingerprint, code, parent)
    with claimed(folder):
        done = finished(folder, Variant)
        if done is not None:
            return done
        on_checkpoint = None
        if storage is not None and storage.shared:
            if cfg.resume and last_checkpoint(folder / "checkpoints") is None:
                storage.pull_checkpoint(folder.name, folder / "checkpoints")

            def on_checkpoint(checkpoint: Path) -> None:
                try:
                    storage.push_checkpoint(folder.name, checkpoint)
                except Exception as exc:  # a checkpoint not shared costs a restart elsewhere, not this run
                    logging.getLogger(__name__).warning("checkpoint %s not kept in %s: %s", checkpoint.name,
                                                        storage.root, exc)
        result = train(cfg.model_copy(update={"output_dir": str(folder)}), log=log, data=data,
                       on_checkpoint=on_checkpoint)
        if result.dataset_fingerprint != data_fingerprint:
            raise LsqError(f"data.source: the data changed while {folder.name} trained "
                           f"({data_fingerprint} -> {result.dataset_fingerprint}); run again")
        before = parent.total_train_seconds if parent else 0.0
        variant = Variant(
            method=cfg.method, rank=result.rank, source_rank=cfg.source_rank, adapter_dir=str(result.adapter_dir),
            adapter_sha256=adapter_digest(result.adapter_dir), seed=cfg.train.seed,
            steps=result.steps + (parent.steps if parent else 0),
            lr=cfg.cont.lr if cfg.method == "cont" else cfg.train.lr,
            train_seconds=result.train_seconds, total_train_seconds=before + result.train_seconds,
            train_loss=result.train_loss,
            retained_energy=parent.retained_energy if parent else 1.0 if cfg.method == "source" else
            (result.rank_events[-1]["mean_retained_energy"] if result.rank_events else None),
            relative_error=parent.relative_error if parent else 0.0 if cfg.method == "source" else None,
            report=parent.report if parent else None, plot=parent.plot if parent else None,
        )
        publish(folder, variant)
        return variant


def squeeze_step(source: Variant, config: SqueezeConfig, root: str | Path, code: str, plot: bool = True) -> Squeezed:
    """Post-Squeeze: one decomposition of ``source``, one adapter per rank of ``config.ranks``, in
    ``<root>/post-<key>``."""
    if not config.ranks or config.energy or config.budget:
        raise LsqError("squeeze step: needs uniform ranks only (config.ranks), not energy or budget targets")
    ranks = config.ranks
    key = step_key({"step": "squeeze", "source": source.adapter_sha256, "config": config.model_dump(mode="json"),
                    "code": code, "plot": plot})
    folder = Path(root) / f"post-from-{source.label}-{key}"
    with claimed(folder):
        done = finished(folder, Squeezed)
        if done is not None:
            return done
        written = squeeze_adapter(source.adapter_dir, folder / "adapters", config, force=True, plot=plot)
        variants = []
        for k in ranks:
            out = written[f"r{k}"]
            variants.append(Variant(
                method="post", rank=k, source_rank=source.rank, adapter_dir=str(out.folder),
                adapter_sha256=adapter_digest(out.folder), seed=source.seed, steps=source.steps, lr=source.lr,
                train_seconds=0.0, total_train_seconds=source.total_train_seconds,
                retained_energy=out.retained_energy, relative_error=out.relative_error,
                report=str(out.folder / REPORT_NAME), plot=str(out.folder / PLOT_NAME) if plot else None,
            ))
        squeezed = Squeezed(source=source, variants=tuple(variants))
        publish(folder, squeezed)
        return squeezed


def evaluate_step(variant: Variant, model, data_cfg, splits: tuple[str, ...], batch_size: int,
                  data_fingerprint: str, root: str | Path, code: str, data=None) -> tuple[Evaluation, ...]:
    """Scores of ``variant`` on each of ``splits`` (one model load), kept in ``<root>/eval-<label>-<key>``."""
    base = variant.method == "base"  # the model without adapter: its zero-shot scores
    key = step_key({"step": "evaluate", "adapter": "base" if base else variant.adapter_sha256 or variant.adapter_dir,
                    "model": model.model_dump(mode="json"), "data": data_cfg.model_dump(mode="json"),
                    "fingerprint": data_fingerprint, "splits": list(splits), "batch": batch_size, "code": code})
    folder = Path(root) / f"eval-{variant.label}-{key}"
    with claimed(folder):
        done = finished(folder, Evaluations)
        if done is not None:
            return done.evaluations
        scores = evaluate_splits(None if base else variant.adapter_dir, model, data_cfg, tuple(splits), batch_size, data)
        evaluations = tuple(Evaluation.from_metrics(variant.label, scores[s]) for s in splits)
        publish(folder, Evaluations(evaluations=evaluations))
        return evaluations


class Unit(BaseModel):
    """One independent piece of the pipeline after the source: train one adapter and score it, or score
    one that exists (a squeezed variant). Everything it needs is in here, so it runs the same in a
    thread of the pipeline's flow run or as a flow run on another machine (``flows/unit.py``), which
    shares nothing with the pipeline but ``storage_root``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["train", "evaluate"]
    train: TrainConfig | None = Field(None, description="kind train: the step's config")
    parent: Variant | None = Field(None, description="kind train: the adapter a cont step recovers; "
                                   "kind evaluate: the adapter to score")
    model: ModelConfig
    data: DataConfig
    splits: tuple[Literal["train", "validation", "test"], ...]
    eval_batch_size: int = Field(ge=1)
    data_fingerprint: str
    code: str = Field(description="lsq code version of the pipeline; a worker running other code refuses the unit")
    storage_root: str | None = None
    output_dir: str = Field(description="work folder, relative to the worker's own folder when relative")
    cache: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Unit:
        if self.kind == "train" and self.train is None:
            raise ValueError("a train unit needs its train config")
        if self.kind == "evaluate" and self.parent is None:
            raise ValueError("an evaluate unit needs the variant it scores (parent)")
        return self

    @property
    def label(self) -> str:
        return trained_label(self.train, self.parent) if self.kind == "train" else self.parent.label

    @property
    def name(self) -> str:
        """``<label>-<digest>`` of everything that determines the result, not where it is kept."""
        inputs = self.model_dump(mode="json", exclude={"storage_root", "output_dir", "cache"})
        if inputs["train"]:
            inputs["train"].pop("output_dir", None)
            inputs["train"]["cont"].pop("adapter", None)
        if inputs["parent"]:  # the parent by its digest, wherever it is kept
            inputs["parent"] = {k: inputs["parent"][k] for k in ("method", "rank", "source_rank", "adapter_sha256")}
        return f"{self.label}-{step_key(inputs)}"

    def storage(self) -> Storage:
        return Storage(self.storage_root, self.output_dir, self.cache)

    def here(self) -> Unit:
        """This unit with a relative ``output_dir`` placed under ``$LSQ_WORKDIR`` (a worker's own folder;
        a Prefect process worker otherwise runs each flow run in a new temporary folder)."""
        base = os.environ.get("LSQ_WORKDIR")
        if base and not Path(self.output_dir).is_absolute():
            return self.model_copy(update={"output_dir": str(Path(base) / self.output_dir)})
        return self


def where() -> tuple[str, str]:
    """(worker, device) of this process: ``$LSQ_WORKER`` or the host name, and the one device it sees."""
    worker = os.environ.get("LSQ_WORKER") or socket.gethostname()
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        device = f"cuda:{index} ({torch.cuda.get_device_name(index)}" + (
            f", CUDA_VISIBLE_DEVICES={visible})" if visible else ")")
    else:
        device = "cpu"
    return worker, device


def run_unit(unit: Unit, data=None, log: Log | None = None) -> UnitResult:
    """Do ``unit`` (or return its finished result) and keep the result in its storage.

    The record others read names the adapter by its storage location (a URI under a shared root), and
    says which worker and device made it. A unit finished before is returned as it was kept.
    """
    if unit.code != code_version():
        raise LsqError(f"unit {unit.label}: this worker runs lsq code {code_version()}, the pipeline "
                       f"{unit.code}; install the same lsq version on every worker")
    unit = unit.here()
    storage = unit.storage()
    done = storage.get(unit.name, UnitResult)
    if done is not None:
        return done
    started = time.perf_counter()
    parent = storage.localize(unit.parent) if unit.parent is not None else None
    fetched = time.perf_counter() - started
    if unit.kind == "train":
        cfg = unit.train.model_copy(update={"output_dir": unit.output_dir})
        variant = train_step(cfg, unit.data_fingerprint, unit.code, parent, data=data, log=log, storage=storage)
    else:
        variant = parent
    evaluations = evaluate_step(variant, unit.model, unit.data, unit.splits, unit.eval_batch_size,
                                unit.data_fingerprint, unit.output_dir, unit.code, data)
    worker, device = where()
    publishing = time.perf_counter()
    result = UnitResult(name=unit.name, variant=variant.model_copy(update={"worker": worker, "device": device}),
                        evaluations=evaluations)
    result = storage.put_adapters(result)  # uploads first, so the record can say how long they took
    ended = time.perf_counter()
    result = result.model_copy(update={"wall_seconds": ended - started,
                                       "exchange_seconds": fetched + (ended - publishing)})
    return storage.put(unit.name, result)


def squeeze_unit(source: Variant, config: SqueezeConfig, storage: Storage, code: str, plot: bool = True) -> Squeezed:
    """Post-Squeeze of ``source`` wherever it is kept, its outputs kept in ``storage`` (cheap: no model)."""
    name = f"post-from-{source.label}-" + step_key({"source": source.adapter_sha256,
                                                   "config": config.model_dump(mode="json"), "code": code,
                                                   "plot": plot})
    done = storage.get(name, Squeezed)
    if done is not None:
        return done
    squeezed = squeeze_step(storage.localize(source), config, storage.local, code, plot)
    return storage.put(name, squeezed)
