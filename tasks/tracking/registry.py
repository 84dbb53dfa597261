"""The model registry: one version per adapter and data, aliases for promotion, safe under concurrency.

Two pipeline runs may register the same adapter on the same data and promote at the same moment,
from threads of one process or from separate processes on one store. Registration needs no lock
(see :func:`register_variant`); promotion reads the champion, decides and moves the alias under
:func:`registry_lock` (see :func:`promote`). Registry writes retry on transient database errors.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import mlflow
from mlflow.exceptions import MlflowException

from lsq.models import ModelConfig
from lsq.monitoring import FINGERPRINT_TAG
from lsq.variants import Decision, Variant
from lsq.workdir import adapter_digest
from tasks.tracking.store import _quote, _slug, _tag, client_for, redact_uri, retry, sqlite_path, tracking_uri

log = logging.getLogger(__name__)

__all__ = ["adapter_digest", "alias_version", "champion", "download_adapter", "log_pyfunc", "promote",
           "register_variant", "registry_lock", "set_alias", "versions_trained_on"]

PYFUNC_CODE = Path(__file__).resolve().parents[1] / "pyfunc_model.py"
DIGEST_TAG, RUN_TAG, LAST_RUN_TAG = "lsq.adapter_sha256", "lsq.run_id", "lsq.last_run_id"
SIZE_TAG = "adapter_bytes"  # the weights file's size, as the runs' metric of the same name
LOCK_TIMEOUT_S = 1800.0  # a promotion may re-score a champion under the lock
PROMOTE_TRIES = 5  # compare-and-set rounds when no lock is shared between the promoters
CAS_SETTLE_S = 1.0  # compare-and-set: wait this long after moving the alias before checking it stayed
_LOG_LOCK = threading.Lock()  # Model.log reads the process-global tracking URI: one at a time


# ---------------------------------------------------------------------------------- registration
def register_variant(uri: str, model_name: str, run_id: str, variant: Variant, model_cfg: ModelConfig,
                     extra_tags: Mapping[str, Any] | None = None, label_names: Sequence[str] | None = None) -> str:
    """Log ``variant`` as a pyfunc model in ``run_id``, register it under ``model_name``; the version number.

    Version tags: ``lsq.method``, ``lsq.rank``, ``lsq.source_rank``, ``lsq.run_id``,
    ``lsq.adapter_sha256`` (:func:`lsq.workdir.adapter_digest` of the files logged; a variant whose
    recorded digest differs from its folder is refused), ``adapter_bytes`` and ``extra_tags``; a new
    version's description says what it is (:func:`version_description`). ``label_names``
    (classification) name the predicted classes; without them they are ``"0".."n-1"``, n read from
    the adapter's saved head.

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
            SIZE_TAG: str(_weights_bytes(Path(variant.adapter_dir))),
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
        label_names = [str(i) for i in range(_num_labels(Path(variant.adapter_dir)))]
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


# ------------------------------------------------------------------------------ aliases, reading
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


# ------------------------------------------------------------------------------------- promotion
def promote(uri: str, model_name: str, champion_alias: str, against: Callable[[str | None], Decision],
            versions: Mapping[str, str]) -> Decision:
    """Decide against the champion as it is when the alias moves, move it, and return the decision.

    ``against(version)`` decides this run's winner against registered ``version`` (None: there is no
    champion), scoring it if needed; ``versions`` maps each variant label to its registered version.
    Under :func:`registry_lock` this reads the version behind ``champion_alias``, decides against it
    (each version is decided against once per call: decisions are cached by version), and points
    ``decision.alias`` at the winner's version (:func:`set_alias`). The decision returned, and the
    ``lsq.reason`` tag, name the champion version it was compared with (``compared_to``).

    So when two runs promote at once, the later one compares against the champion the earlier one
    set. Without a lock shared by the promoters (compare-and-set, see :func:`registry_lock`) the
    alias is re-read before it is set, and again ``CAS_SETTLE_S`` after; if it moved, the round is
    repeated against the version now behind it (at most ``PROMOTE_TRIES`` rounds), and a move by a
    promoter that compared against our winner is accepted as is. That is best effort, not a lock:
    MLflow has no conditional alias update, so a racer that read the alias before our write and
    stalls for more than ``CAS_SETTLE_S`` before its own write overwrites ours unnoticed.
    """
    decided: dict[str | None, Decision] = {}

    def decide(current: str | None) -> Decision:
        if current not in decided:
            decided[current] = _naming_champion(against(current), current)
        return decided[current]

    with registry_lock(uri, model_name) as how:
        for attempt in range(1, PROMOTE_TRIES + 1):
            current = alias_version(uri, model_name, champion_alias)
            decision = decide(current)
            if decision.winner not in versions:
                raise KeyError(f"promote: the winner {decision.winner!r} is not among the registered variants "
                               f"({', '.join(versions)})")
            winner = str(versions[decision.winner])
            if alias_version(uri, model_name, champion_alias) != current:
                continue  # moved while we decided (only possible without a shared lock)
            set_alias(uri, model_name, winner, decision.alias, decision)
            if not how.startswith("file lock"):
                _settle()
            now = alias_version(uri, model_name, champion_alias)
            expected = winner if decision.alias == champion_alias else current
            if now == expected or _compared_with(uri, model_name, now) == winner:
                log.info("%s: %s (version %s) -> %s, compared with %s [%s]", model_name, decision.winner, winner,
                         decision.alias, current or "no champion", how)
                return decision
            log.warning("%s: champion moved to version %s during promotion round %d (%s); deciding again",
                        model_name, now, attempt, how)
    raise RuntimeError(f"{model_name}: the {champion_alias!r} alias kept moving; gave up after {PROMOTE_TRIES} rounds")


@contextmanager
def registry_lock(uri: str, model_name: str) -> Iterator[str]:
    """Hold the promotion lock of ``model_name`` in the store ``uri``; yields how it is held.

    - sqlite store: a :class:`filelock.FileLock` (``flock``) on ``<database>.<model>.promote.lock``
      beside the database, shared by every process on the machine and released by the kernel when
      its holder dies, ``kill -9`` included; no server involved.
    - a local file store: the same, beside its folder.
    - any other store (an MLflow server, a database server): a Prefect global concurrency limit
      ``lsq-registry-<model>`` of one slot (created when missing: Prefect's ``concurrency()`` with
      ``strict=False`` would silently not lock without it), held with a lease that Prefect renews
      while the body runs and that expires (300 s) if the holder dies. Only when ``PREFECT_API_URL``
      is set: without it Prefect would start a server in this process, which no other pipeline shares.
    - otherwise (no Prefect API, or it cannot be reached): no lock; :func:`promote` falls back to
      compare-and-set.

    Yields ``"file lock <path>"``, ``"prefect limit <name>"`` or ``"compare-and-set"``. A per-process
    temporary Prefect server also grants the slot, but shares it with no other process: promote's
    compare-and-set checks run under every kind of lock, so that case still converges.
    """
    local = _local_store(uri)
    if local is not None:
        from filelock import FileLock

        path = local.parent / f"{local.name}.{_slug(model_name)}.promote.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path), timeout=LOCK_TIMEOUT_S):
            yield f"file lock {path}"
        return
    name = f"lsq-registry-{_slug(model_name)}"
    with ExitStack() as stack:
        how = "compare-and-set"
        try:
            if _prefect_limit(name):
                from prefect.concurrency.sync import concurrency

                stack.enter_context(concurrency(name, occupy=1, timeout_seconds=LOCK_TIMEOUT_S, strict=True))
                how = f"prefect limit {name}"
        except TimeoutError:
            raise
        except Exception as exc:  # noqa: BLE001 - no Prefect API reachable: compare-and-set alone
            log.warning("registry lock %s for %s unavailable (%s); promoting by compare-and-set",
                        name, redact_uri(uri), exc)
        yield how


def _prefect_limit(name: str) -> bool:
    """True when a Prefect API is configured and holds (now) a global concurrency limit ``name`` of one slot."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return False
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # created meanwhile by another promoter
                pass
            return True
    if limit.limit != 1 or not limit.active:
        log.warning("Prefect concurrency limit %s has %d slots (active: %s); promotions may overlap",
                    name, limit.limit, limit.active)
    return True


def _settle() -> None:
    """Compare-and-set: give a racer's write that overlaps ours the time to land before we look."""
    time.sleep(CAS_SETTLE_S)


def _naming_champion(decision: Decision, current: str | None) -> Decision:
    """``decision`` with ``compared_to`` set and a reason that names the champion version compared with."""
    reason = decision.reason
    if current is not None and f"champion version {current}" not in reason:
        reason = f"{reason} (compared with champion version {current})"
    return decision.model_copy(update={"compared_to": current, "reason": reason})


def _compared_with(uri: str, model_name: str, version: str | None) -> str | None:
    if version is None:
        return None
    return client_for(uri).get_model_version(model_name, version).tags.get("lsq.compared_to")


def _local_store(uri: str) -> Path | None:
    """The database file or folder of a store on this machine (sqlite, ``file:``, a plain path); else None."""
    db = sqlite_path(uri)
    if db is not None:
        return db.resolve()
    if uri.startswith("sqlite:"):
        return None  # in-memory
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return Path(unquote(parts.path)).resolve()
    if not parts.scheme or re.fullmatch(r"[A-Za-z]", parts.scheme):  # a path (C:\... on Windows)
        return Path(uri).resolve()
    return None


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


def _weights_bytes(adapter: Path) -> int:
    """Size of the adapter's weights file on disk: what ``adapter_bytes`` measures (lsq.evaluate)."""
    weights = [adapter / name for name in ("adapter_model.safetensors", "adapter_model.bin")]
    return next((w.stat().st_size for w in weights if w.is_file()), 0)


def _set_version_tags(client: mlflow.MlflowClient, model_name: str, version: str, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        retry(client.set_model_version_tag, model_name, version, key, value)


def _num_labels(adapter: Path) -> int:
    """Rows of the saved classification head (``classifier``/``score`` weight) of a PEFT adapter."""
    from safetensors import safe_open

    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                if re.search(r"(classifier|score)(\.modules_to_save)?(\.out_proj)?\.weight$", key):
                    return int(f.get_slice(key).get_shape()[0])
    raise ValueError(f"{adapter}: no saved classification head; pass label_names to register_variant")


def _requirements() -> list[str]:
    reqs = []
    for name in ("mlflow", "torch", "transformers", "peft", "safetensors", "pydantic", "pandas"):
        try:
            reqs.append(f"{name}=={package_version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


