"""Typed, frozen configuration of the whole pipeline, and the per-step configs derived from it.

The pipeline trains one source adapter at ``source_rank``, squeezes it to every ``target_ranks``
(Post-Squeeze), recovers each with a short fine-tune (Cont-Squeeze), optionally anneals a second
run down to ``insqueeze.rank`` (In-Squeeze) and trains baselines (direct LoRA, AdaLoRA) at the
target ranks, evaluates every adapter on the same split, registers each, and promotes one.
Nothing here imports prefect or mlflow: the orchestration layer reads these values.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lsq.config import SqueezeConfig
from lsq.config_files import load_config
from lsq.data import DataConfig, fingerprint
from lsq.errors import LsqError, one_line
from lsq.models import ModelConfig
from lsq.records import PreparedData
from lsq.train_config import (
    AdaLoraSettings,
    ContSettings,
    InSqueezeSettings,
    LoraSettings,
    OptimSettings,
    TrainConfig,
)

if TYPE_CHECKING:
    from datasets import DatasetDict

_FROZEN = ConfigDict(frozen=True, extra="forbid")
# every adapter is scored on both: validation chooses the winner, test is reported beside it (no leak)
SCORED_SPLITS = ("validation", "test")


class SqueezeStep(BaseModel):
    model_config = _FROZEN

    alpha_policy: Literal["keep-scale", "rank"] = Field("keep-scale", description="New lora_alpha (see lsq squeeze).")
    method: Literal["exact", "rsvd"] = Field("exact", description="Decomposition (see lsq squeeze).")


class RecoverStep(ContSettings):
    enabled: bool = Field(True, description="Run Cont-Squeeze recovery for every squeezed adapter.")


class InSqueezeStep(InSqueezeSettings):
    enabled: bool = Field(True, description="Run one In-Squeeze training down to rank.")
    rank: int = Field(4, ge=1, description="Final rank of the In-Squeeze run.")


class Baselines(BaseModel):
    model_config = _FROZEN

    direct: bool = Field(False, description="Train LoRA directly at every target rank.")
    adalora: bool = Field(False, description="Train AdaLoRA from source_rank to every target rank.")
    adalora_settings: AdaLoraSettings = Field(default_factory=AdaLoraSettings)
    zero_shot: bool = Field(True, description="causal_lm: score the base model without adapter on the same splits "
                            "(child run method=base, not registered): the floor every adapter is read against.")


# promotion.metric per model.task; "auto" resolves when the data is known (resolve_promotion)
PROMOTION_METRICS = {"classification": ("auto", "accuracy", "macro_f1"),
                     "causal_lm": ("auto", "exact_match", "choice_accuracy", "answer_accuracy", "loss")}
LOWER_IS_BETTER = frozenset({"loss"})
AUTO_MINORITY_SHARE = 0.3  # auto: macro_f1 when the rarest class holds less of the training split than this


class Promotion(BaseModel):
    model_config = _FROZEN

    metric: Literal["auto", "accuracy", "macro_f1", "exact_match", "choice_accuracy", "answer_accuracy", "loss"] = Field(
        "auto", description="Metric that picks the winner, on the validation split (val_<metric>; test_<metric> is "
        "reported beside it). classification: accuracy | macro_f1; causal LM: exact_match (greedy generation) | "
        "choice_accuracy | answer_accuracy | loss (lower is better). auto: macro_f1 when the rarest class is under "
        f"{AUTO_MINORITY_SHARE:g} of the training split, else accuracy; causal LM: choice_accuracy when the data has "
        "choices, else exact_match.")
    greater_is_better: bool | None = Field(None, description="Leave unset: true for every metric but loss.")
    servable_only: bool = Field(False, description="Promote only adapters that vLLM-style multi-LoRA servers load as "
                                "they are (tag lsq.serving.vllm; see lsq/serving.py).")
    tolerance: float = Field(0.01, ge=0, description="Smallest adapter whose metric is within this of the best wins.")
    champion_alias: str = Field("champion", description="Alias of the promoted version.")
    challenger_alias: str = Field("challenger", description="Alias when the winner does not beat the champion.")

    @model_validator(mode="after")
    def _direction(self) -> Promotion:
        lower = self.metric in LOWER_IS_BETTER
        if self.greater_is_better is not None and self.greater_is_better == lower:
            raise ValueError(f"greater_is_better: {self.metric} is {'lower' if lower else 'higher'} is better "
                             f"(got {self.greater_is_better}); leave it unset")
        return self

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER


class Tracking(BaseModel):
    model_config = _FROZEN

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db."
    )
    experiment: str = Field("lsq", description="MLflow experiment name.")
    registered_model: str | None = Field(None, description="Registry name; default lsq-<model>-<data>.")

    @field_validator("registered_model")
    @classmethod
    def _registrable(cls, name: str | None) -> str | None:
        """MLflow's rule for registered model names (``mlflow.utils.validation._validate_model_name``,
        plus the file store's '%'), checked here so a bad name fails before the training, not at
        registration after it. Restated, not imported: lsq never imports mlflow."""
        if name is None:
            return name
        if not name.strip():
            raise ValueError("may not be blank; leave it out for the default lsq-<model>-<data>")
        if any(c in name for c in "/:%"):
            raise ValueError("an MLflow registered model name may not contain '/', ':' or '%'")
        norm = posixpath.normpath(name)  # MLflow's path_not_unique: the name must not resolve to another
        if norm != name or norm == "." or norm.startswith(".."):
            raise ValueError("an MLflow registered model name may not be '.' or start with '..'")
        return name


class Orchestration(BaseModel):
    model_config = _FROZEN

    runner: Literal["threads", "dask", "work-pool"] = Field(
        "threads", description="Where the units (each variant's training and scoring) run: threads or Dask "
        "workers of this flow run, or flow runs of the unit deployment on a Prefect work pool (team mode).")
    max_workers: int = Field(1, ge=1, description="Units in flight at once (threads, local Dask workers, "
                             "or flow runs on the work pool).")
    dask_address: str | None = Field(None, description="Existing Dask scheduler address (runner dask).")
    unit_deployment: str = Field("lsq-unit/lsq-gpu", description="Deployment that runs one unit (runner work-pool): "
                                 "see deployments/README.md.")
    unit_attempts: int = Field(3, ge=1, description="Tries of a unit whose flow run crashed (its worker lost), "
                               "each on whichever worker is free (runner work-pool).")
    unit_start_timeout: float = Field(300.0, gt=0, description="Seconds a unit's flow run may stay Pending (taken "
                                      "by a worker, not started yet) before it is deleted and dispatched again, "
                                      "one of unit_attempts: its worker was lost as it took it (runner work-pool).")

    @model_validator(mode="after")
    def _check(self) -> Orchestration:
        if self.unit_deployment.count("/") != 1 or not all(self.unit_deployment.split("/")):
            raise ValueError(f"orchestration.unit_deployment: {self.unit_deployment!r} is not '<flow>/<deployment>'")
        return self


class StorageSettings(BaseModel):
    model_config = _FROZEN

    root: str | None = Field(
        None, description="Where units leave adapters and records for other machines: s3://bucket/prefix (or any "
        "fsspec URL, or a folder every machine mounts). Unset: output_dir, nothing copied (one machine).")
    cache: str | None = Field(None, description="This machine's folder for fetched adapters; default <output_dir>/cache.")

    @field_validator("root")
    @classmethod
    def _root(cls, root: str | None) -> str | None:
        if root is not None and not root.strip():
            raise ValueError("may not be blank; leave it out to keep results in output_dir")
        if root and "@" in root.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError("put credentials in the environment (AWS_ACCESS_KEY_ID, ...), not in the URL")
        return root


class PipelineConfig(BaseModel):
    """The squeeze pipeline: train high, squeeze, recover, anneal, evaluate, register, promote."""

    model_config = _FROZEN

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=lambda: DataConfig(source="builtin:movie"))
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: OptimSettings = Field(default_factory=OptimSettings)
    source_rank: int = Field(64, ge=2, description="Rank of the high-rank source adapter.")
    target_ranks: tuple[int, ...] = Field((16, 8, 4), description="Ranks to squeeze the source to.")
    squeeze: SqueezeStep = Field(default_factory=SqueezeStep)
    recover: RecoverStep = Field(default_factory=RecoverStep)
    insqueeze: InSqueezeStep = Field(default_factory=InSqueezeStep)
    baselines: Baselines = Field(default_factory=Baselines)
    promotion: Promotion = Field(default_factory=Promotion)
    tracking: Tracking = Field(default_factory=Tracking)
    orchestration: Orchestration = Field(default_factory=Orchestration)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    output_dir: str = Field("runs/pipeline", description="Working folder for adapters and reports.")

    @model_validator(mode="before")
    @classmethod
    def _metric_of_task(cls, raw: Any) -> Any:
        """promotion.metric checked against the model's task, before the training (a typo used to surface
        as a KeyError after all of it)."""
        promotion, model = (raw.get(k) if isinstance(raw, dict) else None for k in ("promotion", "model"))
        metric = promotion.get("metric") if isinstance(promotion, dict) else None
        task = (model.get("task") if isinstance(model, dict) else None) or "classification"
        allowed = PROMOTION_METRICS.get(task)
        if metric is not None and allowed and metric not in allowed:
            raise ValueError(f"promotion.metric: {metric!r} is not a {task} metric; use one of {', '.join(allowed)}")
        return raw

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if not self.target_ranks:
            raise ValueError("target_ranks: give at least one rank")
        for k in self.target_ranks:
            if not 1 <= k < self.source_rank:
                raise ValueError(f"target_ranks: {k} is not in 1..{self.source_rank - 1} (below source_rank)")
        if len(set(self.target_ranks)) != len(self.target_ranks):
            raise ValueError(f"target_ranks: {list(self.target_ranks)} repeats a rank")
        if self.insqueeze.enabled:
            self.step_config("in", self.insqueeze.rank)  # validates the schedule before any work
        if self.promotion.servable_only and self.model.task == "classification":
            raise ValueError("promotion.servable_only: classification adapters save their head (modules_to_save), "
                             "which vLLM-style servers do not load: no variant could be promoted")
        if self.orchestration.runner == "work-pool" and not self.storage.root:
            raise ValueError("orchestration.runner=work-pool: set storage.root (e.g. s3://bucket/lsq), "
                             "the place units on other machines leave their results")
        return self

    @property
    def registered_model(self) -> str:
        if self.tracking.registered_model:
            return self.tracking.registered_model
        model = Path(self.model.name.removeprefix("builtin:")).name
        data = self.data.source if isinstance(self.data.source, str) else self.data.source[0]
        data = Path(data.removeprefix("builtin:")).stem
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"lsq-{model}-{data}")

    def squeeze_config(self) -> SqueezeConfig:
        """How Post-Squeeze cuts the source: to every ``target_ranks``, with the ``squeeze`` settings."""
        return SqueezeConfig(ranks=self.target_ranks, **self.squeeze.model_dump())

    def step_config(self, method: str, rank: int, adapter: str | None = None) -> TrainConfig:
        """The :class:`TrainConfig` of one training step (``source``, ``cont``, ``in``, ``direct``, ``adalora``).

        Its ``output_dir`` is the pipeline's; :func:`lsq.steps.train_step` works in a folder inside it
        named by a digest of the step's whole input."""
        cont = ContSettings(**{**self.recover.model_dump(exclude={"enabled"}), "adapter": adapter})
        ins = InSqueezeSettings(**self.insqueeze.model_dump(exclude={"enabled", "rank"}))
        try:
            return TrainConfig(
                method=method, rank=rank, source_rank=self.source_rank, model=self.model, data=self.data,
                lora=self.lora, train=self.train, cont=cont, insqueeze=ins, adalora=self.baselines.adalora_settings,
                output_dir=self.output_dir,  # the step's own folder inside it: lsq.steps.train_folder
            )
        except ValidationError as exc:
            raise ValueError(f"{method} step: {one_line(exc)}") from None


def prepared_data(data: DatasetDict) -> PreparedData:
    """What the pipeline's later steps need of loaded ``data`` (:class:`PreparedData`): its fingerprint, and for
    promotion and registration the class names and their shares of the training split, or whether the rows
    carry choices."""
    from collections import Counter

    from datasets import ClassLabel

    train = data["train"]
    label = train.features.get("label")
    names = shares = None
    if isinstance(label, ClassLabel):
        names = tuple(str(n) for n in label.names)
        counts = Counter(int(x) for x in train["label"])
        total = sum(counts.values()) or 1
        shares = tuple(counts.get(i, 0) / total for i in range(max(len(names), max(counts, default=-1) + 1)))
    return PreparedData(fingerprint=fingerprint(data), class_names=names, label_shares=shares,
                        has_choices="choices" in train.column_names,
                        splits={str(name): len(split) for name, split in data.items()})


def resolve_promotion(cfg: PipelineConfig, data: PreparedData | DatasetDict) -> tuple[PipelineConfig, str]:
    """``cfg`` with a concrete ``promotion.metric``, and why it is that one (a sentence).

    ``auto`` reads the training split as :func:`prepared_data` describes it (``data``: that record, or the
    loaded DatasetDict it is made from); nothing is loaded here. Classification: macro-F1 when the rarest
    class holds less than :data:`AUTO_MINORITY_SHARE` of it (accuracy would reward predicting the majority
    class), else accuracy. Causal LM: choice accuracy when the rows carry choices (multiple choice, the
    paper's setup), else exact match of the generated answer.
    """
    metric = cfg.promotion.metric
    if metric != "auto":
        return cfg, f"promotion.metric={metric} (set in the config)"
    prepared = data if isinstance(data, PreparedData) else prepared_data(data)
    if cfg.model.task != "classification":
        choices = prepared.has_choices
        metric = "choice_accuracy" if choices else "exact_match"
        why = (f"promotion.metric=auto: {metric}, because the causal LM data "
               + ("has choices (multiple choice)" if choices else "has answers to generate and no choices"))
    else:
        if not prepared.label_shares:
            raise LsqError("promotion.metric=auto: the data has no class labels to choose the metric on")
        present = {i: share for i, share in enumerate(prepared.label_shares) if share > 0}
        rarest = min(present, key=present.get)
        share = present[rarest]
        names = prepared.class_names or ()
        name = names[rarest] if rarest < len(names) else str(rarest)
        metric = "macro_f1" if share < AUTO_MINORITY_SHARE else "accuracy"
        why = (f"promotion.metric=auto: {metric}, because the rarest class ({name}) is {share:.1%} of the training "
               f"split ({'below' if metric == 'macro_f1' else 'not below'} {AUTO_MINORITY_SHARE:.0%})")
    return cfg.model_copy(update={"promotion": cfg.promotion.model_copy(update={"metric": metric})}), why


def load_pipeline_config(source: str | Path | dict[str, Any] | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """A pipeline config from a YAML file, a dict or the defaults, with ``key=value`` overrides."""
    return load_config(PipelineConfig, source, overrides)
