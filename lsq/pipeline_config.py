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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lsq.data import DataConfig
from lsq.errors import LsqError
from lsq.models import ModelConfig
from lsq.train_config import (
    AdaLoraSettings,
    ContSettings,
    InSqueezeSettings,
    LoraSettings,
    OptimSettings,
    TrainConfig,
    apply_overrides,
    read_yaml_mapping,
    validation_message,
)

_FROZEN = ConfigDict(frozen=True, extra="forbid")


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


class Promotion(BaseModel):
    model_config = _FROZEN

    metric: str = Field("accuracy", description="Test metric that ranks adapters (logged as test_<metric>).")
    greater_is_better: bool = Field(True, description="False for losses.")
    tolerance: float = Field(0.01, ge=0, description="Smallest adapter whose metric is within this of the best wins.")
    champion_alias: str = Field("champion", description="Alias of the promoted version.")
    challenger_alias: str = Field("challenger", description="Alias when the winner does not beat the champion.")


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
    eval_split: Literal["validation", "test"] = Field("test", description="Split every adapter is scored on.")
    promotion: Promotion = Field(default_factory=Promotion)
    tracking: Tracking = Field(default_factory=Tracking)
    orchestration: Orchestration = Field(default_factory=Orchestration)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    output_dir: str = Field("runs/pipeline", description="Working folder for adapters and reports.")

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
            raise ValueError(f"{method} step: {validation_message(exc)}") from None


def load_pipeline_config(source: str | Path | dict[str, Any] | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """A pipeline config from a YAML file, a dict or the defaults, with ``key=value`` overrides."""
    if isinstance(source, dict):
        raw = dict(source)
    elif source is None:
        raw = {}
    else:
        raw = read_yaml_mapping(source)
    try:
        return PipelineConfig.model_validate(apply_overrides(raw, list(overrides)))
    except ValidationError as exc:
        raise LsqError(validation_message(exc)) from None
