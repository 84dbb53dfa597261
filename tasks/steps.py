"""Thin Prefect tasks over lsq: one task per pipeline step, paths and frozen configs in and out.

No maths here: every body calls one lsq function. Training-like tasks carry the ``lsq-compute`` tag,
which a tag concurrency limit (``deployments/setup.py``) holds to one run per device. Results are
persisted and cached on the task's inputs, its source and ``code_version()`` (a hash of the lsq
sources), so re-running a pipeline skips training that already finished with the same inputs.
``prepare_data`` is never cached: its fingerprint must describe the data as it is now (the flow puts
it in every working folder, hence in every training cache key). Bad input (``LsqError``) is not retried.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from collections.abc import Callable
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CachePolicy

from lsq.api import REPORT_NAME, PLOT_NAME, squeeze_adapter
from lsq.config import SqueezeConfig
from lsq.data import DataConfig, fingerprint, load_data
from lsq.errors import LsqError
from lsq.evaluate import evaluate_adapter
from lsq.models import ModelConfig
from lsq.pipeline_config import SqueezeStep
from lsq.train import train
from lsq.train_config import TrainConfig
from lsq.variants import Variant

COMPUTE_TAG = "lsq-compute"


@dataclass
class UnlessOutputMissing(CachePolicy):
    """INPUTS + TASK_SOURCE + a token kept beside the task's output folder (:func:`output_token`).

    A cached result must never point at a folder someone deleted: a missing output gets a new token,
    hence a new key and a cache miss, and the task rebuilds it. (Returning no key while the output is
    missing would also store nothing on the first run, so the second run would miss as well.)
    """

    output_of: Callable[[dict[str, Any]], str] = lambda inputs: "."

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        key = (INPUTS + TASK_SOURCE).compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        return None if key is None else f"{key}-{output_token(Path(self.output_of(inputs)))[:12]}"


def output_token(output: Path) -> str:
    """The token of this incarnation of ``output``, in ``<parent>/.<name>.cache-token``.

    Kept while ``output`` exists; made anew when there is none yet or ``output`` is missing.
    """
    token_file = output.parent / f".{output.name}.cache-token"
    if output.exists() and token_file.is_file():
        return token_file.read_text().strip()
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    tmp = token_file.with_name(f"{token_file.name}.{token}")
    tmp.write_text(token)
    tmp.replace(token_file)  # atomic: a concurrent reader sees one whole token
    return token


def _cached(output_of: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    return {"cache_policy": UnlessOutputMissing(output_of=output_of), "persist_result": True}


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry transient failures, never an ``LsqError`` (same input, same error)."""
    try:
        state.result()
    except LsqError:
        return False
    except BaseException:
        return True
    return True


def code_version() -> str:
    """Hash of the lsq package sources: part of every cache key, so a code change re-runs training."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parents[1].joinpath("lsq").rglob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_bad_input, cache_policy=NO_CACHE)
def prepare_data(data: DataConfig, code: str) -> str:
    """Fetch, parse and split the data as it is now; return its content fingerprint."""
    return fingerprint(load_data(data))


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless_bad_input, tags=[COMPUTE_TAG],
      **_cached(lambda i: f"{i['cfg'].output_dir}/adapter"))
def train_adapter(cfg: TrainConfig, code: str, parent: Variant | None = None) -> Variant:
    """Train one adapter (source, cont, in, direct, adalora) and describe it as a Variant."""
    result = train(cfg)
    energy = result.rank_events[-1]["mean_retained_energy"] if result.rank_events else None
    return Variant(
        method=cfg.method, rank=result.rank, source_rank=cfg.source_rank, adapter_dir=str(result.adapter_dir),
        steps=result.steps, lr=cfg.cont.lr if cfg.method == "cont" else cfg.train.lr,
        train_seconds=result.train_seconds,
        retained_energy=parent.retained_energy if parent else (1.0 if cfg.method == "source" else energy),
        relative_error=parent.relative_error if parent else (0.0 if cfg.method == "source" else None),
        report=parent.report if parent else None, plot=parent.plot if parent else None,
    )


@task(retries=1, tags=[COMPUTE_TAG], **_cached(lambda i: i["out"]))
def squeeze_source(source: Variant, ranks: tuple[int, ...], step: SqueezeStep, out: str, code: str) -> list[Variant]:
    """Post-Squeeze: one decomposition of the source, one adapter folder per target rank."""
    config = SqueezeConfig(ranks=ranks, alpha_policy=step.alpha_policy, method=step.method)
    folders = squeeze_adapter(source.adapter_dir, out, config, force=True)
    variants = []
    for k in ranks:
        folder = folders[f"r{k}"]
        totals = json.loads((folder / REPORT_NAME).read_text())["totals"]
        variants.append(Variant(
            method="post", rank=k, source_rank=source.rank, adapter_dir=str(folder), steps=source.steps,
            lr=source.lr, train_seconds=source.train_seconds, retained_energy=totals["retained_energy"],
            relative_error=totals["relative_error"], report=str(folder / REPORT_NAME), plot=str(folder / PLOT_NAME),
        ))
    return variants


@task(retries=1, tags=[COMPUTE_TAG], **_cached(lambda i: i["variant"].adapter_dir))
def evaluate_variant(variant: Variant, model: ModelConfig, data: DataConfig, split: str, batch_size: int, code: str) -> dict[str, Any]:
    """Test metrics and size of one adapter."""
    return evaluate_adapter(variant.adapter_dir, model, data, split=split, batch_size=batch_size)
