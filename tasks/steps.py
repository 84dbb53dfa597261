"""Thin Prefect tasks over :mod:`lsq.steps`: frozen configs and records in, a record out.

No maths and no caching logic here: each step keeps its finished result as a verified JSON record
in its own work folder (:mod:`lsq.workdir`), so a re-run, a retry and a second run of the same
config reuse finished work, and different inputs never share a folder. Prefect therefore persists
nothing (``persist_result=False``, no cache policy): no result file, hence nothing on disk that
Prefect would unpickle. Training-like tasks carry the ``lsq-compute`` tag, which a tag concurrency
limit (``deployments/setup.py``) holds to one run per device. Bad input (``LsqError``) is not retried.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from lsq import steps
from lsq.data import DataConfig, fingerprint, load_data
from lsq.errors import LsqError
from lsq.models import ModelConfig
from lsq.pipeline_config import SqueezeStep
from lsq.records import Evaluation, Squeezed, Variant
from lsq.steps import code_version
from lsq.train_config import TrainConfig

__all__ = ["COMPUTE_TAG", "code_version", "evaluate_variant", "prepare_data", "squeeze_source", "train_adapter"]

COMPUTE_TAG = "lsq-compute"
_NO_RESULTS = {"cache_policy": NO_CACHE, "persist_result": False}


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient failures, never an ``LsqError`` (same input, same error)."""
    try:
        state.result()
    except LsqError:
        return False
    except BaseException:
        return True
    return True


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_bad_input, **_NO_RESULTS)
def prepare_data(data: DataConfig) -> str:
    """Fetch, parse and split the data as it is now; return its content fingerprint."""
    return fingerprint(load_data(data))


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_bad_input, tags=[COMPUTE_TAG],
      task_run_name="train {cfg.method}-r{cfg.rank}", **_NO_RESULTS)
def train_adapter(cfg: TrainConfig, data_fingerprint: str, code: str, parent: Variant | None = None) -> Variant:
    """Train one adapter (source, cont from ``parent``, in, direct, adalora) in its own work folder."""
    return steps.train_step(cfg, data_fingerprint, code, parent)


@task(retries=1, retry_condition_fn=retry_unless_bad_input, tags=[COMPUTE_TAG],
      task_run_name="squeeze {source.label}", **_NO_RESULTS)
def squeeze_source(source: Variant, ranks: tuple[int, ...], step: SqueezeStep, root: str, code: str) -> Squeezed:
    """Post-Squeeze: one decomposition of the source, one adapter per target rank."""
    return steps.squeeze_step(source, ranks, step.model_dump(), root, code)


@task(retries=1, retry_condition_fn=retry_unless_bad_input, tags=[COMPUTE_TAG],
      task_run_name="evaluate {variant.method}-r{variant.rank}", **_NO_RESULTS)
def evaluate_variant(variant: Variant, model: ModelConfig, data: DataConfig, split: str, batch_size: int,
                     data_fingerprint: str, root: str, code: str) -> Evaluation:
    """Scores and size of one adapter on ``split``."""
    [evaluation] = steps.evaluate_step(variant, model, data, (split,), batch_size, data_fingerprint, root, code)
    return evaluation
