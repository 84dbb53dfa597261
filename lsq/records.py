"""The records that pass between pipeline steps: small, frozen, JSON-serialisable.

A step returns one of these and the next step receives it; nothing else crosses a step boundary
(no live models, no dicts whose keys the next step must know, no tuples read by index). Each record
round-trips through JSON (``model_dump_json`` / ``model_validate_json``), which is how a finished
step is kept on disk (:mod:`lsq.workdir`) and how Prefect sees it: a results folder holds data,
never code.

Metric names are decided here, once: an :class:`Evaluation` of split ``test`` logs ``test_accuracy``,
of split ``validation`` ``val_accuracy``; sizes and squeeze numbers keep their own names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Method = Literal["source", "post", "cont", "in", "direct", "adalora", "base"]  # base: the model without adapter
_RECORD = ConfigDict(frozen=True, extra="forbid")

SIZE_METRICS = ("trainable_params", "lora_params", "adapter_bytes")
SPLIT_PREFIX = {"test": "test", "validation": "val", "train": "train"}


class TrainResult(BaseModel):
    """What one training run made (``lsq.train.train``): the adapter folder and how it got there. It also
    crosses processes: a data-parallel worker sends rank 0's as JSON to the launcher."""

    model_config = _RECORD

    adapter_dir: Path
    method: str
    rank: int
    steps: int
    train_seconds: float
    train_loss: float
    dataset_fingerprint: str
    rank_events: list[dict[str, Any]] = []  # In-Squeeze's rank cuts, in order
    processes: int = 1
    replica_digests: list[str] = []  # per process, at the end (data parallelism)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Variant(BaseModel):
    """One adapter the pipeline made: where it is, its digest, and how it was made (never a live model)."""

    model_config = _RECORD

    method: Method
    rank: int = Field(ge=0, description="LoRA rank (0: the base model itself, method base)")
    source_rank: int = Field(ge=1)
    adapter_dir: str = Field(description="PEFT adapter folder ('' for the base model)")
    adapter_sha256: str = Field("", description="digest of adapter_config.json + weights (lsq.workdir.adapter_digest)")
    seed: int = 0
    steps: int = Field(0, description="optimizer steps behind this adapter, the source's included")
    lr: float | None = None
    train_seconds: float = Field(0.0, description="training seconds of this step alone (0 for post)")
    total_train_seconds: float = Field(0.0, description="training seconds behind this adapter, the source's included")
    train_loss: float | None = None
    retained_energy: float | None = Field(None, description="share of the source update kept (squeezed variants)")
    relative_error: float | None = Field(None, description="relative Frobenius error of the squeeze")
    report: str | None = Field(None, description="squeeze_report.json of a squeezed adapter")
    plot: str | None = Field(None, description="spectrum.png of a squeezed adapter")
    worker: str | None = Field(None, description="the worker (machine) whose unit made this adapter")
    device: str | None = Field(None, description="the one device that unit saw: cpu, cuda:0 (NVIDIA H100 ...)")

    @property
    def label(self) -> str:
        return "base" if self.method == "base" else f"{self.method}-r{self.rank}"

    @classmethod
    def base_model(cls, source_rank: int) -> Variant:
        """The base model without any adapter: scored zero-shot as the floor every adapter is read against."""
        return cls(method="base", rank=0, source_rank=source_rank, adapter_dir="")


class Squeezed(BaseModel):
    """Post-Squeeze of one source: one variant per target rank, in the order of the ranks asked for."""

    model_config = _RECORD

    source: Variant
    variants: tuple[Variant, ...]


class Evaluation(BaseModel):
    """Scores and size of one adapter on one split."""

    model_config = _RECORD

    label: str
    split: Literal["train", "validation", "test"]
    examples: int = Field(ge=0)
    scores: dict[str, float] = Field(description="accuracy, macro_f1 (classification); eval_loss, ... (causal LM)")
    trainable_params: int = Field(ge=0)
    lora_params: int = Field(ge=0)
    adapter_bytes: int = Field(ge=0)

    @classmethod
    def from_metrics(cls, label: str, metrics: Mapping[str, object]) -> Evaluation:
        """From :func:`lsq.evaluate.evaluate_adapter`'s mapping (numbers beside ``split`` and ``examples``)."""
        sizes = {k: int(metrics[k]) for k in SIZE_METRICS}
        scores = {k: float(v) for k, v in metrics.items()
                  if k not in (*SIZE_METRICS, "examples", "split") and isinstance(v, (int, float))
                  and not isinstance(v, bool)}
        return cls(label=label, split=metrics["split"], examples=int(metrics["examples"]), scores=scores, **sizes)

    def metric(self, name: str) -> str:
        """The logged name of score ``name`` on this split: ``test_accuracy``, ``val_macro_f1``, ..."""
        return f"{SPLIT_PREFIX[self.split]}_{name}"

    def logged(self) -> dict[str, float]:
        """Every number of this evaluation under its logged name."""
        out = {self.metric(k): v for k, v in self.scores.items()}
        out.update(trainable_params=float(self.trainable_params), lora_params=float(self.lora_params),
                   adapter_bytes=float(self.adapter_bytes))
        return out


class Evaluations(BaseModel):
    """The evaluations of one adapter on several splits, as one evaluate step keeps them."""

    model_config = _RECORD

    evaluations: tuple[Evaluation, ...]


def variant_metrics(variant: Variant, *evaluations: Evaluation) -> dict[str, float]:
    """The metrics of a variant's MLflow run: its evaluations (``val_*`` and ``test_*``), training seconds
    and squeeze numbers."""
    out = {}
    for evaluation in evaluations:
        out.update(evaluation.logged())
    out.update(train_seconds=variant.train_seconds, total_train_seconds=variant.total_train_seconds)
    if variant.retained_energy is not None:
        out["retained_energy"] = variant.retained_energy
    if variant.relative_error is not None:
        out["relative_error"] = variant.relative_error
    return out


class UnitResult(BaseModel):
    """What one unit left (:func:`lsq.steps.run_unit`): its adapter, the adapter's scores, where it ran."""

    model_config = _RECORD

    name: str = Field(description="<label>-<digest of the unit's whole input>")
    variant: Variant
    evaluations: tuple[Evaluation, ...] = Field(description="one per split asked for, in that order")
    wall_seconds: float = Field(0.0, description="the unit's wall time on its worker, fetching included")
    exchange_seconds: float = Field(0.0, description="of which: fetching its input and publishing its adapter and "
                                    "record (0 without a shared storage root)")


class Registered(BaseModel):
    """A variant logged as an MLflow child run and registered as a model version."""

    model_config = _RECORD

    label: str
    method: Method
    rank: int
    run_id: str
    version: str
    adapter_bytes: int
    metric: float | None = Field(description="the promotion metric of this variant (validation split: it chooses)")
    metrics: dict[str, float]
    test_metric: float | None = Field(None, description="the same metric on the test split (reported, never chooses)")
    serving: str = Field("", description="whether vLLM-style servers load it as is: 'yes ...' or 'no: <why>'")


class Reference(BaseModel):
    """The base model's zero-shot scores, logged as a child run (param ``method=base``), never registered."""

    model_config = _RECORD

    run_id: str
    metric: float | None = Field(description="the promotion metric on the validation split")
    test_metric: float | None = Field(None, description="the same metric on the test split")
    metrics: dict[str, float]


class Champion(BaseModel):
    """The version behind the champion alias and its promotion metric re-scored on this run's data."""

    model_config = _RECORD

    version: str | None = None
    score: float | None = None


class Decision(BaseModel):
    """Which variant wins, the alias it gets, and why (stored as version tags and a Prefect artifact)."""

    model_config = _RECORD

    winner: str = Field(description="variant label")
    alias: str = Field(description="champion or challenger")
    reason: str
    compared_to: str | None = Field(None, description="champion version the winner was compared with")


class PipelineResult(BaseModel):
    """What one pipeline run returns: where it logged, what it registered, what it promoted."""

    model_config = _RECORD

    parent_run_id: str
    tracking_uri: str = Field(description="with any password removed")
    experiment: str
    registered_model: str
    decision: Decision
    variants: tuple[Registered, ...]
    promotion_metric: str = Field("", description="the metric that chose (val_<it>), e.g. macro_f1")
    runs_url: str = Field("", description="the experiment's runs table in the MLflow UI")
    reference: Reference | None = Field(None, description="the base model's zero-shot scores (causal LM)")


class StudyRecord(BaseModel):
    """One job of the study (experiments/study.py): its settings, its adapter's size and its scores."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    key: str
    task: str
    method: str = Field(description="direct, post, cont, in, adalora, or source / source-cont (the sources)")
    rank: int
    seed: int
    lr: float
    steps: int
    train_seconds: float
    wall_seconds: float
    metric: str = Field("accuracy", description="the study's score: accuracy, macro_f1, exact_match, choice_accuracy...")
    val_score: float = Field(description="that score on validation (it chooses rates)")
    test_score: float = Field(description="that score on test (reported)")
    val_accuracy: float | None = Field(None, description="classification studies")
    test_accuracy: float | None = Field(None, description="classification studies")
    test_macro_f1: float | None = Field(None, description="classification studies")
    lora_params: int
    trainable_params: int
    adapter_bytes: int
    test_examples: int
    retained_energy: float | None = None
    relative_error: float | None = None
    diverged: bool = False
    chosen: bool = False
    budget: int | None = Field(None, description="the step budget T of the study the job belongs to")
    fraction: float | None = Field(None, description="in: share of the budget at the source rank (None: equal stages)")

    @model_validator(mode="before")
    @classmethod
    def _scores_of_old_records(cls, raw: Any) -> Any:
        """Records written before ``metric``/``val_score``/``test_score`` (classification studies): accuracy."""
        if isinstance(raw, dict) and "val_score" not in raw and "val_accuracy" in raw:
            raw = {**raw, "metric": "accuracy", "val_score": raw["val_accuracy"], "test_score": raw["test_accuracy"]}
        return raw


class ChampionCheck(BaseModel):
    """The monitor's look at the champion: its version and tags, the metric recorded when it was
    registered, and the same metric on today's data."""

    model_config = _RECORD

    version: str
    run_id: str
    tags: dict[str, str]
    recorded: float | None
    current: float
    examples: int
    split: str


class Emitted(BaseModel):
    """One event the monitor sent."""

    model_config = _RECORD

    event: str
    resource: str
    id: str | None
    payload: dict[str, object]


class MonitorResult(BaseModel):
    """What one monitor run found: the data fingerprint, the champion's check, the events sent."""

    model_config = _RECORD

    registered_model: str
    tracking_uri: str = Field(description="with any password removed")
    fingerprint: str
    champion: ChampionCheck | None
    events: tuple[Emitted, ...]


class PreparedData(BaseModel):
    """The data of one pipeline run as the steps after its preparation need it (``tasks.steps.prepare_data``):
    what identifies it, and what promotion and registration read from it, so that neither loads it again."""

    model_config = _RECORD

    fingerprint: str = Field(description="content digest of every split (lsq.data.fingerprint)")
    class_names: tuple[str, ...] | None = Field(None, description="classification: the class names, id = position "
                                                "(what the registered model predicts); None for causal LM data")
    label_shares: tuple[float, ...] | None = Field(None, description="classification: each class's share of the "
                                                   "training split, by id (0.0: absent from it)")
    has_choices: bool = Field(False, description="causal LM: the training rows carry choices (multiple choice)")
    splits: dict[str, int] = Field(default_factory=dict, description="rows per split")

    @property
    def num_labels(self) -> int | None:
        """The number of classes (None for causal LM data)."""
        return None if self.class_names is None else len(self.class_names)
