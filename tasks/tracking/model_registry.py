"""The model registry: one version per adapter and data, its tags and description, aliases, downloads.

Two pipeline runs may register the same adapter on the same data at the same moment, from threads of
one process or from separate processes on one store: registration needs no lock (see
:func:`register_variant`). Moving an alias safely under concurrency is :mod:`.promotion_lock`'s job.
Registry writes retry on transient database errors (:func:`.store.retry`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from lsq.models import ModelConfig
from lsq.monitoring import FINGERPRINT_TAG
from lsq.variants import Decision, Variant
from lsq.workdir import adapter_digest
from tasks.tracking.store import _quote, _slug, _tag, client_for, retry, tracking_uri

log = logging.getLogger(__name__)

__all__ = ["adapter_digest", "alias_version", "champion", "download_adapter", "log_pyfunc", "register_variant",
           "set_alias", "version_description", "versions_trained_on"]

PYFUNC_CODE = Path(__file__).resolve().parents[1] / "pyfunc_model.py"
DIGEST_TAG, RUN_TAG, LAST_RUN_TAG = "lsq.adapter_sha256", "lsq.run_id", "lsq.last_run_id"
SIZE_TAG = "adapter_bytes"  # the weights file's size, as the runs' metric of the same name
_LOG_LOCK = threading.Lock()  # Model.log reads the process-global tracking URI: one at a time


# ---------------------------------------------------------------------------------- registration
def register_variant(uri: str, model_name: str, run_id: str, variant: Variant, model_cfg: ModelConfig,
                     extra_tags: Mapping[str, Any] | None = None, label_names: Sequence[str] | None = None) -> str:
    """Log ``variant`` as a pyfunc model in ``run_id``, register it under ``model_name``; the version number.

    Version tags: ``lsq.method``, ``lsq.rank``, ``lsq.source_rank``, ``lsq.run_id``,
    ``lsq.adapter_sha256`` (:func:`lsq.workdir.adapter_digest` of the files logged; a variant whose
    recorded digest differs from its folder is refused), ``adapter_bytes`` and ``extra_tags``; a new
    version's description says what it is (:func:`version_description`). ``label_names``
    (classification, required there) name the predicted classes, id = position.

    Idempotent per run: an existing version of ``run_id`` is returned (its tags re-applied). The
    same adapter scored on the same data (``lsq.dataset_fingerprint`` in ``extra_tags``) is one
    version, whoever registers it and however many do at once: a cached re-run gets the version
    registered before, tagged ``lsq.last_run_id``. Without a fingerprint every run registers anew.

    Why concurrent registrations of one adapter on one data converge, without a lock: a version is
    created with its identifying tags in the same call (one transaction: it never exists untagged);
    then its creator searches all versions with that digest and fingerprint, and the smallest number
    is canonical; a creator whose version is not the smallest deletes its own and returns the
    canonical one. The store numbers versions ``max + 1`` inside the creating transaction, so a
    smaller number was committed before a larger one was even assigned: the creator of the larger
    number searches after both exist, sees both, and deletes its own; the creator of the smallest
    finds no smaller one and keeps it. Every racer thus returns the smallest number and exactly one
    version stays. (Deleted numbers are never reused: MLflow deletes versions softly.)

    A failure after this call created its version deletes it again, so a retry starts clean. (A racer that saw
    it as canonical in that instant would return a number that is then gone: the price of keeping
    half-finished registrations out; its promotion fails and its retry registers anew.)
    """
    client = client_for(uri)
    digest = adapter_digest(variant.adapter_dir)
    recorded = getattr(variant, "adapter_sha256", "")
    if recorded and recorded != digest:
        raise ValueError(f"variant {variant.label}: adapter folder {variant.adapter_dir} has digest {digest}, "
                         f"not the {recorded} its record names; refusing to register other files")
    tags = {"lsq.method": variant.method, "lsq.rank": str(variant.rank),
            "lsq.source_rank": str(variant.source_rank), RUN_TAG: run_id, DIGEST_TAG: digest,
            SIZE_TAG: str(_adapter_bytes(variant.adapter_dir)),
            **{k: _tag(v) for k, v in (extra_tags or {}).items()}}
    data = tags.get(FINGERPRINT_TAG)  # without it, "the same scores" cannot be told: register anew
    existing = retry(_version_of_run, client, model_name, run_id)
    if existing is not None:
        _set_version_tags(client, model_name, existing, tags)
        if data is None:
            return existing
        return _canonical_for(client, model_name, existing, digest, data, run_id, created_now=False)
    if data is not None:
        same = retry(_versions_of_adapter, client, model_name, digest, data)
        if same:
            retry(client.set_model_version_tag, model_name, same[0], LAST_RUN_TAG, run_id)
            return same[0]
    info = log_pyfunc(uri, run_id, variant, model_cfg, label_names)
    retry(_ensure_registered_model, client, model_name)
    created = retry(_create_version, client, model_name, run_id, info.model_uri, info.model_id, tags,
                    version_description(variant, tags))
    if data is None:
        return created
    return _canonical_for(client, model_name, created, digest, data, run_id, created_now=True)


def _canonical_for(client: mlflow.MlflowClient, model_name: str, ours: str, digest: str, data: str, run_id: str,
                   created_now: bool) -> str:
    """The smallest version of (digest, data): ours is kept if it is that one, else deleted.

    On a failure, ours is deleted only if this call created it (one found by run id may be canonical).
    """
    leave_alone = not created_now  # set once ours is gone too
    try:
        same = retry(_versions_of_adapter, client, model_name, digest, data)
        canonical = same[0] if same else ours
        if int(canonical) >= int(ours):
            return ours
        log.info("%s: version %s duplicates version %s (same adapter, same data); deleting it",
                 model_name, ours, canonical)
        retry(client.delete_model_version, model_name, ours)
        leave_alone = True
        retry(client.set_model_version_tag, model_name, canonical, LAST_RUN_TAG, run_id)
        return canonical
    except BaseException:
        if not leave_alone:
            log.warning("registering %s for run %s failed after version %s was created; deleting it",
                        model_name, run_id, ours)
            try:
                retry(client.delete_model_version, model_name, ours)
            except Exception:  # keep the original error; the next call finds what is left
                log.exception("could not delete version %s of %s", ours, model_name)
        raise


def log_pyfunc(uri: str, run_id: str, variant: Variant, model_cfg: ModelConfig,
               label_names: Sequence[str] | None = None, max_length: int = 256):
    """Log the adapter of ``variant`` as a models-from-code pyfunc in ``run_id``; MLflow's ``ModelInfo``.

    The caller's active run (if any, in this thread) is neither used nor changed.
    """
    from mlflow.models import Model

    client = client_for(uri)
    run = client.get_run(run_id)
    if model_cfg.task == "classification" and not label_names:
        raise ValueError(f"variant {variant.label}: a classification model needs its label_names (the data's class "
                         "names, id = position: lsq.records.PreparedData.class_names)")
    config = {  # MLflow also logs these as run params (model/name, model/task, ..., label_names)
        "model": {**model_cfg.model_dump(mode="json"), "device": "auto"},
        "label_names": list(label_names or []), "max_length": max_length, "max_new_tokens": 16,
    }
    # Our own LoggedModel, in the run's experiment: Model.log would take the experiment of the
    # caller's active run, if there is one.
    logged = client.create_logged_model(run.info.experiment_id, name=_slug(variant.label), source_run_id=run_id,
                                        tags={"lsq.variant": variant.label})
    with _LOG_LOCK, tracking_uri(uri):
        return Model.log(
            artifact_path=None, name=_slug(variant.label), flavor=mlflow.pyfunc, run_id=run_id,
            model_id=logged.model_id, python_model=str(PYFUNC_CODE),
            artifacts={"adapter": str(variant.adapter_dir)}, model_config=config,
            pip_requirements=_requirements(),  # explicit: inference would load the model in a subprocess
        )


def versions_trained_on(uri: str, model_name: str, fingerprint: str) -> list[str]:
    """Registered versions of ``model_name`` whose ``lsq.dataset_fingerprint`` tag is ``fingerprint``, ascending."""
    found = client_for(uri).search_model_versions(
        f"name = '{_quote(model_name)}' AND tags.`{FINGERPRINT_TAG}` = '{_quote(fingerprint)}'")
    return sorted((str(v.version) for v in found), key=int)


# ------------------------------------------------------------------------------ aliases, downloads
def alias_version(uri: str, model_name: str, alias: str) -> str | None:
    """The version behind ``alias``, or None when the model or the alias does not exist."""
    mv = _by_alias(client_for(uri), model_name, alias)
    return None if mv is None else str(mv.version)


def champion(uri: str, model_name: str, alias: str = "champion", dst_path: str | None = None) -> dict[str, Any] | None:
    """The version behind ``alias`` (version, run_id, adapter_path, tags, metrics, source), or None if unset.

    ``adapter_path`` is a local copy of the run's ``adapter/`` folder (``dst_path`` or a temp folder).
    """
    client = client_for(uri)
    mv = _by_alias(client, model_name, alias)
    if mv is None:
        return None
    path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="adapter", dst_path=dst_path,
                                               tracking_uri=uri)
    return {"version": str(mv.version), "run_id": mv.run_id, "adapter_path": path, "tags": dict(mv.tags),
            "metrics": dict(client.get_run(mv.run_id).data.metrics), "source": mv.source}


def download_adapter(uri: str, model_name: str, version: str, dst_path: str | None = None) -> str:
    """A local copy of the ``adapter/`` folder of the run behind ``version`` (in ``dst_path`` or a temp folder)."""
    mv = client_for(uri).get_model_version(model_name, str(version))
    return mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="adapter", dst_path=dst_path,
                                               tracking_uri=uri)


def set_alias(uri: str, model_name: str, version: str, alias: str, decision: Decision) -> None:
    """Point ``alias`` at ``version`` and record why (version tags ``lsq.decision``, ``lsq.reason``,
    ``lsq.winner`` and, when the decision names one, ``lsq.compared_to``)."""
    client = client_for(uri)
    tags = {"lsq.decision": decision.alias, "lsq.reason": _tag(decision.reason), "lsq.winner": decision.winner}
    if getattr(decision, "compared_to", None) is not None:
        tags["lsq.compared_to"] = str(decision.compared_to)
    _set_version_tags(client, model_name, str(version), tags)
    retry(client.set_registered_model_alias, model_name, alias, str(version))


def _by_alias(client: mlflow.MlflowClient, model_name: str, alias: str):
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        # no such model: RESOURCE_DOES_NOT_EXIST; no such alias: INVALID_PARAMETER_VALUE "... not found"
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower():
            return None
        raise


# --------------------------------------------------------------------------------------- helpers
def _version_of_run(client: mlflow.MlflowClient, model_name: str, run_id: str) -> str | None:
    found = client.search_model_versions(f"name = '{_quote(model_name)}' AND run_id = '{run_id}'")
    return str(min(int(v.version) for v in found)) if found else None


def _versions_of_adapter(client: mlflow.MlflowClient, model_name: str, digest: str, data: str) -> list[str]:
    """Live versions with this adapter digest and data fingerprint, smallest first."""
    query = (f"name = '{_quote(model_name)}' AND tags.`{DIGEST_TAG}` = '{digest}' "
             f"AND tags.`{FINGERPRINT_TAG}` = '{_quote(data)}'")
    return [str(n) for n in sorted(int(v.version) for v in client.search_model_versions(query))]


def _ensure_registered_model(client: mlflow.MlflowClient, model_name: str) -> None:
    try:
        client.create_registered_model(model_name, description="LoRA adapters from the lsq pipeline (pyfunc)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _create_version(client: mlflow.MlflowClient, model_name: str, run_id: str, source: str, model_id: str,
                    tags: Mapping[str, str], description: str | None = None) -> str:
    """Find-or-create, so that a retry after a commit that reported an error does not duplicate."""
    existing = _version_of_run(client, model_name, run_id)
    if existing is not None:
        return existing
    with tracking_uri(client.tracking_uri):  # the sqlite registry resolves models:/m-... with MlflowClient()
        return str(client.create_model_version(model_name, source, run_id=run_id, tags=dict(tags),
                                               model_id=model_id, description=description).version)


def version_description(variant: Variant, tags: Mapping[str, str]) -> str:
    """What a version is, in one line for the registry's version page: method, rank, size, metrics.

    ``cont-r4: cont at rank 4 from the rank-8 source; 12,345 bytes; val_accuracy 0.8125, test_accuracy 0.7500``
    (the metrics are the ``val_*`` / ``test_*`` tags of the version)."""
    made = {"source": f"the rank-{variant.rank} source", "post": f"squeezed from the rank-{variant.source_rank} source",
            "cont": f"squeezed from the rank-{variant.source_rank} source, then recovered",
            "in": f"In-Squeeze from rank {variant.source_rank}", "direct": "trained directly at this rank",
            "adalora": "AdaLoRA with this rank budget"}.get(variant.method, variant.method)
    scores = ", ".join(f"{k} {_number(v)}" for k, v in tags.items() if k.startswith(("val_", "test_")))
    size = tags.get(SIZE_TAG)
    return "; ".join(part for part in (f"{variant.label}: {made}", f"rank {variant.rank}",
                                       f"{int(size):,} bytes" if size and size.isdigit() else "", scores) if part)


def _number(text: str) -> str:
    try:
        return f"{float(text):.4f}"
    except ValueError:
        return text


def _adapter_bytes(adapter: str) -> int:
    """Size of the adapter's weights file on disk: ``adapter_bytes``, from :func:`lsq.evaluate.adapter_size`."""
    from lsq.evaluate import adapter_size  # torch and the scoring code: only when registering

    return adapter_size(adapter)["adapter_bytes"]


def _set_version_tags(client: mlflow.MlflowClient, model_name: str, version: str, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        retry(client.set_model_version_tag, model_name, version, key, value)


def _requirements() -> list[str]:
    reqs = []
    for name in ("mlflow", "torch", "transformers", "peft", "safetensors", "pydantic", "pandas"):
        try:
            reqs.append(f"{name}=={package_version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs
