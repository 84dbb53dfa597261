"""The budget sweep: the study (:mod:`experiments.study`) at several step budgets, to see whether the
methods' order changes as training gets longer.

For each budget ``T`` in ``budgets`` the sweep runs one :class:`~experiments.study.Study` with ``steps=T``
and ``recover_steps = round(recover_fraction * T)`` (Cont-Squeeze's recovery inside the budget).
Every choice is made per budget on validation data, exactly as in a single study: each method's
learning rate per rank from its grid, then In-Squeeze's first-stage share (``in_fractions``) at
that rate. The test split is read only for the report.

Resuming: every adapter is made by the pipeline's steps in ``<root>/steps`` (shared by all budgets),
so a sweep run again reuses every finished step and resumes the cut one from its last checkpoint.
Steps are keyed by the version of the lsq code that makes adapters and scores
(:func:`lsq.steps.code_version`: a change to the command line, the reports or this harness keeps every finished
step); the sweep pins the version it started with in ``<root>/sweep.json`` and refuses to go on under code that
could change its adapters or scores (one sweep, one engine). Budgets run from the smallest up, so an
interrupted sweep has whole budgets to show.

Pure lsq: no prefect, no mlflow. ``benchmarks/budget_sweep.py`` is the command and
``flows/study.py`` (``sweep_flow``) logs every record to MLflow.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from experiments.study import (Job, Study, StudyConfig, job_record, job_train_config, source_of, train_variant,
                               variant_scores)
from lsq.api import squeeze_adapter
from lsq.config import SqueezeConfig
from lsq.config_files import load_config
from lsq.errors import LsqError
from lsq.evaluate import evaluate_splits
from lsq.records import StudyRecord, Variant
from lsq.steps import code_version
from lsq.train import train

SWEEP_FILE = "sweep.json"


class SweepConfig(BaseModel):
    """Budgets and the study run at each. ``study.steps`` and ``study.recover_steps`` are set per budget."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    budgets: tuple[int, ...] = Field((50, 200, 600), description="Step budgets T, every method's optimizer steps.")
    recover_fraction: float = Field(0.2, gt=0, lt=1, description="Cont-Squeeze recovery steps as a share of T.")
    seeds_at: dict[int, tuple[int, ...]] = Field(
        default_factory=dict, description="Seeds of a budget other than the study's (fewer where a budget is long).")
    study: StudyConfig = Field(default_factory=StudyConfig, description="The study run at each budget.")
    ladder_budget: int | None = Field(
        200, ge=4, description="The ladder: every rank of ladder_ranks trained directly for this many steps, against "
                               "one source squeezed to all of them and recovered (Cont-Squeeze); None: no ladder.")
    ladder_ranks: tuple[int, ...] = Field((1, 2, 4, 8, 16), description="Ranks of the ladder.")
    ladder_tasks: tuple[str, ...] | None = Field(None, description="Tasks of the ladder; None: the study's tasks.")
    ladder_seeds: tuple[int, ...] | None = Field(None, description="Seeds of the ladder; None: its budget's seeds.")

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if not self.budgets or any(t < 4 for t in self.budgets) or len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"budgets: {list(self.budgets)} must be distinct step counts of at least 4")
        for budget, seeds in self.seeds_at.items():
            if budget not in self.budgets or not seeds or self.study.select_seed not in seeds:
                raise ValueError(f"seeds_at: {budget}: {list(seeds)} must be seeds of one of the budgets "
                                 f"{list(self.budgets)}, with select_seed {self.study.select_seed}")
        if self.ladder_tasks is not None and not set(self.ladder_tasks) <= set(self.study.tasks):
            raise ValueError(f"ladder_tasks: {list(self.ladder_tasks)} must be among the study's tasks "
                             f"{list(self.study.tasks)}")
        if self.ladder_seeds is not None and self.study.select_seed not in self.ladder_seeds:
            raise ValueError(f"ladder_seeds: {list(self.ladder_seeds)} must include select_seed {self.study.select_seed}")
        bad = [k for k in self.ladder_ranks if not 1 <= k < self.study.source_rank]
        if bad or not self.ladder_ranks:
            raise ValueError(f"ladder_ranks: {list(self.ladder_ranks)} must be ranks in 1..{self.study.source_rank - 1}")
        return self

    def ladder(self) -> StudyConfig | None:
        """The study of the ladder: direct and cont at every ladder rank, rates chosen as at the sweep's
        budgets (at ``select_rank`` when it is one of the ladder's ranks)."""
        if self.ladder_budget is None:
            return None
        c = self.at(self.ladder_budget)
        select = c.select_rank if c.select_rank in self.ladder_ranks else None
        tasks = self.ladder_tasks or c.tasks
        seeds = self.ladder_seeds or c.seeds
        return c.model_copy(update={"methods": ("direct", "cont"), "ranks": self.ladder_ranks, "select_rank": select,
                                    "seeds": seeds,
                                    "in_fractions": None, "in_first_fraction": None, "tasks": tasks,
                                    "select_task": c.select_task if c.select_task in tasks else None})

    def at(self, budget: int) -> StudyConfig:
        """The study config of one budget."""
        recover = min(max(1, round(self.recover_fraction * budget)), budget - 1)
        return self.study.model_copy(update={"steps": budget, "recover_steps": recover,
                                             "seeds": self.seeds_at.get(budget, self.study.seeds)})


class Ladder(BaseModel):
    """What the ladder made (:meth:`Sweep.run_ladder`): its chosen records, the sources of its cont records, the
    squeeze's seconds (timed once per source) and what each route cost (:func:`ladder_costs`: rows and means)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    records: tuple[StudyRecord, ...]
    sources: tuple[StudyRecord, ...]
    squeeze_seconds: float
    costs: dict[str, Any] = Field(description="{'rows': [per task and seed], 'mean': {...}} (ladder_costs)")


PRESETS: dict[str, SweepConfig] = {
    # 2 tasks x ranks 1, 8 x direct/post/cont/in at 50, 200 and 600 steps of batch 8, 3 seeds (about 90 min
    # on a quiet 2-core CPU; `seeds_at={600: [0, 1]}` saves about 17 of them): rates from three-point grids chosen per
    # method and budget at rank 8 on movie's validation split (the first round found no rank dependence),
    # In-Squeeze's share per rank; the ladder (ranks 1-16 at 200 steps) on movie
    "full": SweepConfig(ladder_tasks=("movie",), study=StudyConfig(
        tasks=("movie", "tweets"), methods=("direct", "post", "cont", "in"), ranks=(1, 8), seeds=(0, 1, 2),
        lrs=(3e-4, 1e-3, 3e-3), method_lrs={"post": (1e-4, 3e-4, 1e-3), "cont": (1e-4, 3e-4, 1e-3),
                                             "in": (1e-4, 3e-4, 1e-3)},
        in_fractions=(None, 0.5), select_rank=8, max_train=4000, max_eval=250, max_length=32, batch_size=8)),
    # issue 24, the paper's setting in miniature: SmolLM2-135M-Instruct (builtin:smollm2) fine-tuned on two SFT tasks,
    # addition scored by exact match of the greedy answer, tweets' sentiment by choice accuracy (metric auto); ranks 1
    # and 8 from 64, direct/post/cont/in, 100 steps of batch 4, 2 seeds; rates from two-point grids and In-Squeeze's
    # share from (equal stages, 0.5) chosen at rank 8 on addition's validation split, seed 0; the ladder (ranks 1-16)
    # on addition, seed 0. 2.8 hours on a quiet 2-core CPU (--plan --measure estimates it; docs/RESULTS.md).
    "decoder": SweepConfig(budgets=(100,), ladder_budget=100, ladder_tasks=("addition",), ladder_seeds=(0,), study=StudyConfig(
        model="builtin:smollm2", model_task="causal_lm", metric="auto", max_new_tokens=5,
        tasks=("addition", "tweets"), methods=("direct", "post", "cont", "in"), ranks=(1, 8), seeds=(0, 1),
        lrs=(1e-3, 3e-3), method_lrs={"post": (3e-4, 1e-3), "cont": (3e-4, 1e-3), "in": (3e-4, 1e-3)},
        in_fractions=(None, 0.5), select_rank=8, max_train=2000, max_eval=100, max_length=128, batch_size=4)),
    # the same machinery in a few minutes: one task, one rank, one seed, tiny budgets, one rate per method
    "quick": SweepConfig(budgets=(8, 16), recover_fraction=0.25, ladder_budget=16, ladder_ranks=(1, 2, 4),
                         study=StudyConfig(
        tasks=("movie",), methods=("direct", "post", "cont", "in"), ranks=(1,), seeds=(0,), lrs=(2e-3,),
        method_lrs={"post": (1e-3,), "cont": (1e-3,), "in": (1e-3,)}, in_fractions=(None, 0.5),
        max_train=500, max_eval=60, max_length=32, batch_size=16)),
}


class Sweep:
    """Runs the study at every budget, smallest first, with one steps folder and one pinned code version."""

    def __init__(self, config: SweepConfig, root: str | os.PathLike, log: Callable[[str], None] = print,
                 on_record: Callable[[StudyRecord], None] | None = None, pinned: str | None = None):
        self.config = config
        self.root = Path(root)
        self.log = log
        self.on_record = on_record
        self.code = pinned or self._pin_code()  # ``pinned``: the code of a Sweep already checked in this run
        self._data: dict[str, Any] = {}  # one task's data shared by the budgets' studies

    def _pin_code(self) -> str:
        """The code version the sweep's steps are keyed by: the one it started with."""
        self.root.mkdir(parents=True, exist_ok=True)
        path, now = self.root / SWEEP_FILE, code_version()
        if path.exists():
            pinned = json.loads(path.read_text())
            try:  # read with today's defaults: a setting added since, at its default, is the same sweep
                same = SweepConfig.model_validate(pinned.get("config") or {}) == self.config
            except ValidationError:
                same = False
            if not same:
                raise LsqError(f"{self.root}: holds a sweep of other settings ({path}); use another --out")
            if pinned["code"] != now:
                raise LsqError(f"{self.root}: the sweep started with lsq code {pinned['code']}, this is {now} (a change "
                               "that can change adapters or scores); finish it with that code, or use another --out")
            return now
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"code": now, "config": self.config.model_dump(mode="json")}, indent=1) + "\n")
        os.replace(tmp, path)
        return now

    def study(self, budget: int) -> Study:
        return Study(self.config.at(budget), self.root / f"T{budget}", log=self.log, on_record=self.on_record,
                     steps_root=self.root / "steps", code=self.code, key_prefix=f"T{budget}/", data_cache=self._data)

    def ladder_study(self) -> Study | None:
        c = self.config.ladder()
        if c is None:
            return None
        return Study(c, self.root / f"ladder-T{c.steps}", log=self.log, on_record=self.on_record,
                     steps_root=self.root / "steps", code=self.code, key_prefix=f"ladder-T{c.steps}/",
                     data_cache=self._data)

    def run_all(self) -> list[StudyRecord]:
        """Every budget's chosen records (``chosen: True``), each with its ``budget``."""
        records: list[StudyRecord] = []
        for budget in sorted(self.config.budgets):
            self.log(f"budget {budget} steps")
            records += self.study(budget).run_all()
        return records

    def zero_shot(self) -> list[StudyRecord]:
        """The base model without an adapter, scored on every task's validation and test split as the methods are: the
        floor they are read against. Causal LM only (a classifier's new head is untrained). Greedy scoring has no seed:
        one record per task, method ``base``, rank 0, kept in the steps folder like every score."""
        study = self.study(min(self.config.budgets))
        c = study.config
        if c.model_task != "causal_lm":
            return []
        base = Variant.base_model(c.source_rank)
        return [job_record(job, study, variant_scores(study, base, job))
                for job in (Job(task, c.select_seed, "base", 0, 0.0) for task in c.tasks)]

    def run_ladder(self) -> Ladder | None:
        """The ladder (:meth:`SweepConfig.ladder`): its chosen records and what each route cost
        (:func:`ladder_costs`); the squeeze is timed here, once per source, on this machine."""
        study = self.ladder_study()
        if study is None:
            return None
        self.log(f"ladder: ranks {list(self.config.ladder_ranks)} at {study.config.steps} steps")
        records = study.run_all()
        sources = [r for r in study.records.values() if r.method == "source-cont"]
        squeeze = time_squeeze(study, sources[0])
        return Ladder(records=records, sources=sources, squeeze_seconds=squeeze,
                      costs=ladder_costs(records, sources, squeeze, study.config))

    def measure(self, steps: int = 6) -> dict[str, dict[str, float]]:
        """This machine's costs per task, for :meth:`plan_of`: training seconds per optimizer step at the lowest rank
        and at the source rank (``steps`` steps each, in a temporary folder, model loading excluded) and the seconds of
        one scoring of validation and test (the base model's, not kept), about a minute per task on a 2-core CPU."""
        study = self.study(min(self.config.budgets))
        c = study.config
        out: dict[str, dict[str, float]] = {}
        for task in c.tasks:
            times = {}
            for name, method, rank in (("step_low", "direct", min(c.ranks)), ("step_source", "source", c.source_rank)):
                job = Job(task, c.select_seed, method, rank, c.grid(method)[0])
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = job_train_config(study, job, method, rank, steps).model_copy(update={"output_dir": tmp})
                    times[name] = train(cfg, data=study.data(task)).train_seconds / steps
            started = time.perf_counter()
            evaluate_splits(None, c.base_model(), c.data(task), ("validation", "test"), 64, study.data(task))
            out[task] = {**times, "scoring": time.perf_counter() - started}
            self.log(f"measured {task}: " + ", ".join(f"{k} {v:.2f} s" for k, v in out[task].items()))
        return out

    @staticmethod
    def plan_of(config: SweepConfig, times: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
        """What a run will train, before it trains: jobs and optimizer steps per budget, counting every
        candidate of the validation choices (sources shared between post and cont counted once); with ``times``
        (:meth:`measure`) also the minutes it will take: each job's steps at its rank's seconds per step, plus
        one scoring per job."""
        out: dict[Any, Any] = {}
        parts = [(budget, config.at(budget), planned_jobs(config.at(budget))) for budget in sorted(config.budgets)]
        ladder = config.ladder()
        if ladder is not None:  # less the jobs the sweep runs at the same budget (one steps folder)
            jobs = planned_jobs(ladder)
            if ladder.steps in config.budgets:
                jobs -= planned_jobs(config.at(ladder.steps))
            parts.append((f"ladder-{ladder.steps}", ladder, jobs))
        for name, c, jobs in parts:
            out[name] = {"jobs": len(jobs), "optimizer_steps": sum(_job_steps(j, c) for j in jobs)}
            if times:
                out[name]["estimated_minutes"] = round(sum(_job_seconds(j, c, times[j.task]) for j in jobs) / 60, 1)
        out["total_steps"] = sum(v["optimizer_steps"] for v in out.values())
        if times:
            out["total_estimated_minutes"] = round(sum(v["estimated_minutes"] for v in out.values()
                                                       if isinstance(v, dict)), 1)
        return out


def time_squeeze(study: Study, source_record: StudyRecord) -> float:
    """Seconds of one squeeze of a ladder source to every ladder rank (median of 3, in this process,
    into a temporary folder: the step's own folder holds its finished result)."""
    c = study.config
    job = Job(source_record.task, source_record.seed, "source-cont", c.source_rank, source_record.lr)
    source = train_variant(study, job, "source", c.source_rank, c.steps - c.recover_steps)  # finished: reused
    times = []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            squeeze_adapter(source.adapter_dir, Path(tmp) / "out", SqueezeConfig(ranks=list(c.ranks)), plot=False)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def ladder_costs(records: Sequence[StudyRecord], sources: Sequence[StudyRecord], squeeze_seconds: float,
                 c: StudyConfig) -> dict[str, Any]:
    """Per seed and task, what the ladder of ``c.ranks`` costs (a) trained rank by rank (direct) and (b)
    from one source: optimizer steps, steps x rank (the GPU-side proxy: LoRA's extra work grows with
    the rank) and measured training seconds (b: the source, the squeeze, every recovery); then means."""
    direct = [r for r in records if r.method == "direct"]
    cont = [r for r in records if r.method == "cont"]
    src = {(r.task, r.seed): r for r in sources}
    rows = []
    for (task, seed), s in sorted(src.items()):
        d = [r for r in direct if (r.task, r.seed) == (task, seed)]
        q = [r for r in cont if (r.task, r.seed) == (task, seed)]
        if len(d) != len(c.ranks) or len(q) != len(c.ranks):
            continue
        source_steps = c.steps - c.recover_steps
        rows.append({
            "task": task, "seed": seed,
            "direct_steps": c.steps * len(c.ranks), "direct_step_rank": c.steps * sum(c.ranks),
            "direct_seconds": sum(r.train_seconds for r in d),
            "squeeze_steps": source_steps + c.recover_steps * len(c.ranks),
            "squeeze_step_rank": source_steps * c.source_rank + c.recover_steps * sum(c.ranks),
            # a cont record's train_seconds include its source's: count the source once
            "squeeze_seconds": s.train_seconds + squeeze_seconds + sum(r.train_seconds - s.train_seconds for r in q),
        })
    mean = {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k not in ("task", "seed")} if rows else {}
    return {"rows": rows, "mean": mean}


def planned_jobs(c: StudyConfig) -> set:
    """Every job a study of ``c`` runs (an upper bound: each choice's candidates at every rank)."""
    jobs = set()
    sel_ranks = [c.select_rank] if c.select_rank else list(c.ranks)
    for m in c.methods:
        for k in sel_ranks:
            for lr in c.grid(m):
                jobs.add(Job(c.selection_task, c.select_seed, m, k, lr))
        for t in c.tasks:
            for s in c.seeds:
                for k in c.ranks:
                    jobs.add(Job(t, s, m, k, c.grid(m)[0]))
        if m == "in":
            for k in c.ranks:
                for f in c.fraction_grid:
                    jobs.add(Job(c.selection_task, c.select_seed, "in", k, c.grid("in")[0], f))
    for t in c.tasks:
        for s in c.seeds:
            if "post" in c.methods:
                jobs.add(Job(t, s, "source", c.source_rank, c.grid("source")[0]))
    jobs |= {src for j in list(jobs) if (src := source_of(j, c)) is not None}
    return jobs


def _job_steps(job: Job, c: StudyConfig) -> int:
    if job.method in ("post",):
        return 0  # its source is its own job
    if job.method == "cont":
        return c.recover_steps
    if job.method == "source-cont":
        return c.steps - c.recover_steps
    return c.steps


def _job_seconds(job: Job, c: StudyConfig, times: Mapping[str, float]) -> float:
    """A job's estimated seconds: its steps at the seconds per step of its (mean) rank, interpolated between the
    measured lowest and source ranks, plus one scoring (:meth:`Sweep.measure`)."""
    low, high = min(c.ranks), c.source_rank
    if job.method == "in":  # the rank halves in stages from the source rank down to the job's
        stages = [high >> i for i in range(high.bit_length()) if high >> i > job.rank] + [job.rank]
        rank = sum(stages) / len(stages)
    else:
        rank = high if job.method.startswith("source") or job.method == "post" else job.rank
    per_step = times["step_low"] + (times["step_source"] - times["step_low"]) * (rank - low) / max(high - low, 1)
    return _job_steps(job, c) * per_step + times["scoring"]


def load_sweep_config(preset: str, overrides: list[str]) -> SweepConfig:
    """A preset with ``key=value`` overrides; study fields may be given bare (``seeds=[0]``) or as ``study.seeds``."""
    if preset not in PRESETS:
        raise LsqError(f"--preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    own = set(SweepConfig.model_fields) - {"study"}
    qualified = [o if o.split("=", 1)[0].split(".")[0] in own | {"study"} else f"study.{o}" for o in overrides]
    return load_config(SweepConfig, PRESETS[preset], qualified)
