"""The study behind lsq's claim: train high and squeeze vs training at the small rank directly.

On each built-in task, for each target rank k (1, 2, 4, 8 from a source rank of 64), with equal step
budgets ``T``:

=========  ====================================================================================
direct     LoRA trained at rank k for T steps (today's practice).
post       Post-Squeeze: LoRA at the source rank for T steps, squeezed to k (no recovery).
cont       Cont-Squeeze: source for ``T - R`` steps, squeezed to k, ``R`` recovery steps at k.
in         In-Squeeze: one run of T steps, the rank halved in stages from the source rank to k
           (equal stages, or ``in_first_fraction`` of T at the source rank first).
adalora    PEFT's AdaLoRA from the source rank to an average of k, T steps.
=========  ====================================================================================

Learning rates are chosen on the *validation* split of one task and seed (``select_task``,
``select_seed``), per method and per target rank as the paper does (or at one ``select_rank`` for
all ranks), from the method's grid (``lrs``, or its own in ``method_lrs``: AdaLoRA's singular
values start at zero and want larger rates). Post and cont choose the learning rate of their source
run by the validation accuracy of their own rank-k adapter; the reference source row chooses by its
own. The chosen rate then serves every task and seed; test numbers are never looked at before that.
A choice at the edge of its grid is flagged in the report.

Every adapter is made by the pipeline's own steps (:mod:`lsq.steps`), each in a work folder named by its whole
input under ``<root>/steps``: a study run again reuses every finished step and resumes a cut one from its checkpoint.
``records.jsonl`` is a log for people (one :class:`~lsq.records.StudyRecord` a line), never read back by a study.

This module is the engine and ``experiments/study_report.py`` aggregates and reports. ``benchmarks/study.py``
is the command and ``flows/study.py`` the Prefect flow that logs every record to MLflow. Pure lsq:
no prefect, no mlflow.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lsq.config import SqueezeConfig
from lsq.config_files import load_config
from lsq.data import DataConfig, fingerprint, load_data
from lsq.errors import LsqError, TrainingDiverged
from lsq.models import ModelConfig
from lsq.records import StudyRecord, Variant
from lsq.steps import code_version, evaluate_step, squeeze_step, train_step
from lsq.train_config import TrainConfig, split_evenly

TASKS = ("movie", "amazon", "nyt", "tweets")
METHODS = ("direct", "post", "cont", "in", "adalora")
RECORDS_NAME = "records.jsonl"

Method = Literal["direct", "post", "cont", "in", "adalora"]


class StudyConfig(BaseModel):
    """Sizes of one study. ``PRESETS`` holds the full (about an hour on 2 cores) and quick ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: tuple[str, ...] = Field(TASKS, description="Built-in tasks (builtin:NAME).")
    methods: tuple[Method, ...] = Field(METHODS, description="Methods compared.")
    ranks: tuple[int, ...] = Field((1, 2, 4, 8), description="Target ranks.")
    source_rank: int = Field(64, ge=2, description="Rank of the source (post, cont) and of the start of in/adalora.")
    seeds: tuple[int, ...] = Field((0, 1, 2), description="Training seeds (initialisation, data order).")
    steps: int = Field(50, ge=4, description="Step budget T of every method.")
    recover_steps: int = Field(10, ge=1, description="Cont-Squeeze recovery steps R, inside the budget.")
    in_first_fraction: float | None = Field(
        None, gt=0, lt=1, description="In-Squeeze: share of the budget at the source rank, the rest split evenly "
                                      "over the later stages; None: all stages equal.")
    in_fractions: tuple[float | None, ...] | None = Field(
        None, description="In-Squeeze: first-stage shares tried on validation (null: equal stages) at the rate "
                          "chosen with equal stages, per rank; None: in_first_fraction only.")
    batch_size: int = Field(16, ge=1)
    lrs: tuple[float, ...] = Field((1e-3, 3e-3, 1e-2), description="Learning rates tried on validation, per method.")
    method_lrs: dict[Method, tuple[float, ...]] = Field(
        default_factory=lambda: {"post": (3e-4, 1e-3, 3e-3), "cont": (3e-4, 1e-3, 3e-3), "in": (3e-4, 1e-3, 3e-3),
                                 "adalora": (1e-2, 3e-2, 1e-1)},
        description="A method's own grid instead of lrs (rank-64 training collapses at rates rank-1 LoRA needs).")
    select_rank: int | None = Field(
        None, ge=1, description="Rank at which learning rates are chosen for every rank; None: chosen at each rank.")
    select_seed: int = Field(0, description="Seed at which learning rates are chosen.")
    select_task: str | None = Field(None, description="Task whose validation split chooses the rates; default the first.")
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    max_train: int | None = Field(1000, ge=1, description="Cap on training rows per task.")
    max_eval: int = Field(250, ge=10, description="Cap on validation and on test rows per task.")
    max_length: int = Field(40, ge=4, description="Tokens per example.")
    model: str = Field("builtin:minilm", description="Base model (classification head added per task).")
    model_task: Literal["classification", "causal_lm"] = Field(
        "classification", description="classification (a head per task) or causal_lm (SFT of a decoder on the "
        "tasks' prompt/answer data, e.g. model builtin:smollm2 with tasks addition and movie).")
    metric: str = Field("accuracy", description="The score that chooses rates on validation and is reported on test: "
                        "accuracy | macro_f1 (classification); exact_match | choice_accuracy | answer_accuracy | auto "
                        "(causal LM; auto: choice_accuracy on a task whose data has choices, else exact_match).")
    max_new_tokens: int = Field(8, ge=1, description="causal_lm: most tokens generated per answer (exact_match).")
    sources: dict[str, str] = Field(default_factory=dict, description="Data source per task name; default builtin:NAME.")

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        bad = [k for k in self.ranks if not 1 <= k < self.source_rank]
        if bad:
            raise ValueError(f"ranks: {bad} not in 1..{self.source_rank - 1}")
        if self.select_rank is not None and self.select_rank not in self.ranks:
            raise ValueError(f"select_rank: {self.select_rank} is not one of ranks {list(self.ranks)}")
        if self.select_seed not in self.seeds:
            raise ValueError(f"select_seed: {self.select_seed} is not one of seeds {list(self.seeds)}")
        if self.select_task is not None and self.select_task not in self.tasks:
            raise ValueError(f"select_task: {self.select_task!r} is not one of tasks {list(self.tasks)}")
        if self.recover_steps >= self.steps:
            raise ValueError(f"recover_steps: {self.recover_steps} must be below steps {self.steps}")
        if self.in_fractions is not None:
            if not self.in_fractions or any(f is not None and not 0 < f < 1 for f in self.in_fractions):
                raise ValueError(f"in_fractions: {list(self.in_fractions)} must be shares in (0, 1) or null")
            if self.in_first_fraction is not None:
                raise ValueError("in_fractions: give either in_fractions (a grid) or in_first_fraction (one share)")
        allowed = {"classification": ("accuracy", "macro_f1"),
                   "causal_lm": ("exact_match", "choice_accuracy", "answer_accuracy", "auto")}[self.model_task]
        if self.metric not in allowed:
            raise ValueError(f"metric: {self.metric!r} is not a {self.model_task} score; use one of {', '.join(allowed)}")
        if not self.lrs or not all(self.method_lrs.values()):
            raise ValueError("lrs: give at least one learning rate (also in each method_lrs grid)")
        return self

    @property
    def selection_task(self) -> str:
        """The task whose validation split chooses the learning rates."""
        return self.select_task or self.tasks[0]

    @property
    def fraction_grid(self) -> tuple[float | None, ...]:
        """In-Squeeze first-stage shares chosen from on validation (one: nothing to choose)."""
        return self.in_fractions if self.in_fractions is not None else (self.in_first_fraction,)

    def grid(self, method: str) -> tuple[float, ...]:
        """The learning rates ``method`` is tuned over (sources: their squeezed method's grid)."""
        return self.method_lrs.get({"source": "post", "source-cont": "cont"}.get(method, method), self.lrs)

    def data(self, task: str) -> DataConfig:
        return DataConfig(source=self.sources.get(task, f"builtin:{task}"), task=self.model_task, max_train=self.max_train,
                          max_eval=self.max_eval, max_length=self.max_length, max_new_tokens=self.max_new_tokens)

    def base_model(self) -> ModelConfig:
        return ModelConfig(name=self.model, task=self.model_task)


PRESETS: dict[str, StudyConfig] = {
    # every task, rank and method, 3 seeds, 3 learning rates per method and rank on validation
    "full": StudyConfig(),
    # one task, two ranks, two seeds, one learning rate per method, short budget: a few minutes
    "quick": StudyConfig(tasks=("movie",), ranks=(1, 4), seeds=(0, 1), steps=16, recover_steps=4, lrs=(2e-3,),
                         method_lrs={"adalora": (2e-2,)}, max_eval=100, max_train=1000),
}


@dataclass(frozen=True)
class Job:
    """One trained (or squeezed) adapter of the study, evaluated on validation and test.

    ``method`` is one of :data:`METHODS` or ``source`` (T steps at the source rank, feeding post) or
    ``source-cont`` (``T - R`` steps, feeding cont); sources have ``rank`` = the source rank.
    ``fraction`` (in only): the share of the budget at the source rank (None: the config's own).
    """

    task: str
    seed: int
    method: str
    rank: int
    lr: float
    fraction: float | None = None

    @property
    def key(self) -> str:
        key = f"{self.task}/s{self.seed}/{self.method}-r{self.rank}/lr{self.lr:g}"
        return key if self.fraction is None else f"{key}/f{self.fraction:g}"


class Study:
    """Runs each job once per study (steps reuse finished work across studies), chooses learning rates."""

    def __init__(self, config: StudyConfig, root: str | os.PathLike, log: Callable[[str], None] = print,
                 on_record: Callable[[StudyRecord], None] | None = None, *, steps_root: str | os.PathLike | None = None,
                 code: str | None = None, key_prefix: str = "", data_cache: dict[str, Any] | None = None):
        self.config = config
        self.root = Path(root)
        self.log = log
        self.on_record = on_record
        self.records: dict[str, StudyRecord] = {}
        self._data: dict[str, Any] = {} if data_cache is None else data_cache
        self._fingerprints: dict[str, str] = {}
        self.code = code or code_version()
        self.key_prefix = key_prefix
        # where the steps work (shared by every job: the same step of two jobs is done once)
        self.steps_root = Path(steps_root) if steps_root is not None else self.root / "steps"
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ jobs

    def data(self, task: str):
        if task not in self._data:
            self._data.clear()  # one task in memory at a time
            self._data[task] = load_data(self.config.data(task))
        if task not in self._fingerprints:
            self._fingerprints[task] = fingerprint(self._data[task])
        return self._data[task]

    def metric(self, task: str) -> str:
        """The score of ``task``: the config's, or with ``auto`` choice accuracy where the data has choices."""
        if self.config.metric != "auto":
            return self.config.metric
        return "choice_accuracy" if "choices" in self.data(task)["validation"].column_names else "exact_match"

    def fingerprint(self, task: str) -> str:
        self.data(task)
        return self._fingerprints[task]

    def run(self, job: Job) -> StudyRecord:
        """The record of ``job``: its steps run, or their finished results are reused (:mod:`lsq.steps`)."""
        if job.key in self.records:
            return self.records[job.key]
        source = source_of(job, self.config)
        if source is not None:
            self.run(source)  # first, so that this job's wall time is its own
        rec = run_job(job, self)
        with open(self.root / RECORDS_NAME, "a") as fh:
            fh.write(json.dumps(rec.model_dump(mode="json")) + "\n")  # diverged: NaN scores, as json writes them
        self.records[job.key] = rec
        self.log(f"{self.key_prefix}{job.key}: val {rec.val_score:.3f} test {rec.test_score:.3f} "
                 f"({rec.wall_seconds:.0f} s){' DIVERGED' if rec.diverged else ''}")
        if self.on_record:
            self.on_record(rec)
        return rec

    def choose_lr(self, method: str, rank: int | None = None) -> float:
        """The learning rate of ``method`` at target ``rank``: best validation accuracy on the selection
        task and seed, at ``rank`` (or ``select_rank`` when set); ties go to the smaller rate. It then
        serves every task and seed."""
        c = self.config
        grid = c.grid(method)
        if len(grid) == 1:
            return grid[0]
        at = c.source_rank if method == "source" else c.select_rank or rank
        if at is None:
            raise LsqError(f"choose_lr({method!r}): give the rank (select_rank is per rank)")
        scores = {lr: self.run(Job(c.selection_task, c.select_seed, method, at, lr)).val_score for lr in grid}
        finite = {lr: v for lr, v in scores.items() if math.isfinite(v)} or scores  # a diverged run never wins
        return max(sorted(finite), key=lambda lr: finite[lr])

    def choose_fraction(self, rank: int, lr: float) -> float | None:
        """In-Squeeze's first-stage share at target ``rank``: best validation accuracy on the selection
        task and seed at the rate chosen with the config's own stages (``fraction_grid``; ties go to the
        earlier entry)."""
        c = self.config
        grid = c.fraction_grid
        if len(grid) == 1:
            return grid[0]
        scores = {f: self.run(Job(c.selection_task, c.select_seed, "in", rank, lr, f)).val_score for f in grid}
        finite = [f for f in grid if math.isfinite(scores[f])] or list(grid)
        return max(finite, key=lambda f: (scores[f], -finite.index(f)))

    def chosen_fractions(self, lrs: dict[tuple[str, int], float]) -> dict[int, float | None]:
        """``{rank: share}`` of In-Squeeze (empty when ``in`` is not studied)."""
        c = self.config
        return {k: self.choose_fraction(k, lrs[("in", k)]) for k in c.ranks} if "in" in c.methods else {}

    def chosen_lrs(self) -> dict[tuple[str, int], float]:
        """``{(method, rank): rate}`` for every method and rank, plus ``("source", source_rank)`` when
        post runs (the reference row, chosen on its own validation accuracy)."""
        c = self.config
        lrs = {(m, k): self.choose_lr(m, k) for m in c.methods for k in c.ranks}
        if "post" in c.methods:
            lrs[("source", c.source_rank)] = self.choose_lr("source")
        return lrs

    def run_all(self) -> list[StudyRecord]:
        """Every (task, method, seed, rank) with its chosen learning rate; returns their records (``chosen``)."""
        c = self.config
        chosen = []
        lrs = self.chosen_lrs()
        fractions = self.chosen_fractions(lrs)
        for task in c.tasks:
            for method in (*c.methods, "source"):
                for seed in c.seeds:
                    for rank in ([c.source_rank] if method == "source" else c.ranks):
                        if (method, rank) in lrs:
                            fraction = fractions.get(rank) if method == "in" else None
                            rec = self.run(Job(task, seed, method, rank, lrs[(method, rank)], fraction))
                            chosen.append(rec.model_copy(update={"chosen": True}))
        return chosen


def job_train_config(study: Study, job: Job, method: str, rank: int, steps: int) -> TrainConfig:
    """The step config of one training of ``job`` (its folder: :func:`lsq.steps.train_folder`)."""
    c = study.config
    train = {"steps": steps, "batch_size": c.batch_size, "lr": job.lr, "seed": job.seed,
             "warmup_steps": int(c.warmup_fraction * steps),
             # long runs keep whole checkpoints, so that an interrupted study resumes inside them
             "save_steps": steps + 1 if steps <= 100 else steps // 4, "logging_steps": max(steps, 1)}
    raw: dict[str, Any] = {
        "method": method, "rank": rank, "source_rank": c.source_rank, "model": {"name": c.model, "task": c.model_task},
        "data": c.data(job.task).model_dump(), "train": train, "output_dir": str(study.steps_root),
    }
    if method == "cont":
        raw["cont"] = {"adapter": "(the squeezed parent)", "steps": steps, "lr": job.lr,
                       "warmup_steps": int(c.warmup_fraction * steps)}
    cfg = TrainConfig.model_validate(raw)
    first = job.fraction if job.fraction is not None else c.in_first_fraction
    if method == "in" and first is not None:
        raw["insqueeze"] = {"stage_steps": front_loaded(steps, len(cfg.stage_ranks), first)}
        cfg = TrainConfig.model_validate(raw)
    return cfg


def front_loaded(steps: int, stages: int, first: float) -> list[int]:
    """``first`` of ``steps`` in the first stage, the rest split evenly (earlier stages get the
    remainder), every stage at least one step."""
    if stages == 1:
        return [steps]
    head = min(max(round(first * steps), 1), steps - (stages - 1))
    return [head] + split_evenly(steps - head, stages - 1)


def source_of(job: Job, config: StudyConfig) -> Job | None:
    """The source job a post or cont job squeezes (``None`` for the others)."""
    if job.method not in ("post", "cont"):
        return None
    return Job(job.task, job.seed, "source" if job.method == "post" else "source-cont", config.source_rank, job.lr)


def train_variant(study: Study, job: Job, method: str, rank: int, steps: int, parent: Variant | None = None) -> Variant:
    return train_step(job_train_config(study, job, method, rank, steps), study.fingerprint(job.task), study.code,
                      parent=parent, data=study.data(job.task))


def variant_scores(study: Study, variant: Variant, job: Job) -> dict[str, Any]:
    """Validation and test scores of ``variant`` (one model load, the evaluate step's own folder)."""
    c = study.config
    val, test = evaluate_step(variant, c.base_model(), c.data(job.task), ("validation", "test"), 64,
                              study.fingerprint(job.task), study.steps_root, study.code, data=study.data(job.task))
    classified = {"val_accuracy": val.scores["accuracy"], "test_accuracy": test.scores["accuracy"],
                  "test_macro_f1": test.scores["macro_f1"]} if c.model_task == "classification" else {}
    metric = study.metric(job.task)
    return {"metric": metric, "val_score": val.scores[metric], "test_score": test.scores[metric], **classified,
            "lora_params": test.lora_params,
            "trainable_params": test.trainable_params, "adapter_bytes": test.adapter_bytes,
            "test_examples": test.examples, "steps": variant.steps, "train_seconds": variant.total_train_seconds}


def run_job(job: Job, study: Study) -> StudyRecord:
    """The record of one job: its adapter made by the pipeline's steps (after its source, for post and cont),
    scored, timed (this job's own wall time: :meth:`Study.run` runs the source first).

    A run whose loss went non-finite (:class:`TrainingDiverged`) is a result too: kept, never chosen.
    """
    started = time.perf_counter()
    return job_record(job, study, _job_scores(job, study), time.perf_counter() - started)


def job_record(job: Job, study: Study, scores: Mapping[str, Any], wall_seconds: float = 0.0) -> StudyRecord:
    """The record of ``job`` from its scores and sizes (:func:`run_job`), the job's and study's settings: validated once."""
    return StudyRecord.model_validate({**scores, "key": study.key_prefix + job.key, "budget": study.config.steps,
                                       "wall_seconds": round(wall_seconds, 2), **asdict(job)})


def _job_scores(job: Job, study: Study) -> dict[str, Any]:
    c = study.config
    recover = c.recover_steps if job.method in ("cont", "source-cont") else 0
    try:
        if job.method in ("direct", "in", "adalora"):
            return variant_scores(study, train_variant(study, job, job.method, job.rank, c.steps), job)
        source = train_variant(study, job, "source", c.source_rank, c.steps - recover)  # source, source-cont, post, cont
        if job.method in ("source", "source-cont"):
            return variant_scores(study, source, job)
        squeezed = squeeze_step(source, SqueezeConfig(ranks=c.ranks), study.steps_root, study.code, plot=False)
        variant = next(v for v in squeezed.variants if v.rank == job.rank)
        if job.method == "cont":
            variant = train_variant(study, job, "cont", job.rank, c.recover_steps, parent=variant)
        return {**variant_scores(study, variant, job), "retained_energy": variant.retained_energy,
                "relative_error": variant.relative_error}
    except TrainingDiverged:
        return diverged_scores(c.steps, study.metric(job.task))


def diverged_scores(steps: int, metric: str) -> dict[str, Any]:
    """The scores of a run whose loss went non-finite: kept (it is a result), never chosen, NaN scores."""
    nan = float("nan")
    return {"diverged": True, "metric": metric, "val_score": nan, "test_score": nan, "val_accuracy": nan,
            "test_accuracy": nan, "test_macro_f1": nan, "lora_params": 0,
            "trainable_params": 0, "adapter_bytes": 0, "test_examples": 0, "steps": steps, "train_seconds": nan}


def load_study_config(preset: str, overrides: list[str]) -> StudyConfig:
    if preset not in PRESETS:
        raise LsqError(f"--preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    return load_config(StudyConfig, PRESETS[preset], overrides)
