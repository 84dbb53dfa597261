"""Promotion under concurrency: decide against the champion as it is when the alias moves, then move it.

Two pipeline runs may promote the same registered model at the same moment, from threads of one
process or from separate processes. :func:`promote_alias` reads the champion, decides and moves the
alias under :func:`registry_lock`: a file lock beside a local store, a one-slot Prefect global
concurrency limit for a server store, and compare-and-set rounds where neither is shared (MLflow has
no conditional alias update). The alias and its version tags are written by :mod:`.model_registry`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

from lsq.variants import Decision
from tasks.tracking.model_registry import alias_version, set_alias
from tasks.tracking.store import _slug, client_for, redact_uri, sqlite_path

log = logging.getLogger(__name__)

__all__ = ["promote_alias", "registry_lock"]

LOCK_TIMEOUT_S = 1800.0  # a promotion may re-score a champion under the lock
PROMOTE_TRIES = 5  # compare-and-set rounds when no lock is shared between the promoters
CAS_SETTLE_S = 1.0  # compare-and-set: wait this long after moving the alias before checking it stayed


def promote_alias(uri: str, model_name: str, champion_alias: str, against: Callable[[str | None], Decision],
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
    - otherwise (no Prefect API, or it cannot be reached): no lock; :func:`promote_alias` falls back to
      compare-and-set.

    Yields ``"file lock <path>"``, ``"prefect limit <name>"`` or ``"compare-and-set"``. A per-process
    temporary Prefect server also grants the slot, but shares it with no other process: promote_alias's
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
