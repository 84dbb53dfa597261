"""Promotion under concurrency: decide against the champion as it is when the alias moves, then move it.

Two pipeline runs may promote the same registered model at the same moment, from threads of one
process or from separate processes on several machines. :func:`promote_alias` reads the champion, decides
and moves the alias while it holds :func:`registry_lock`, a real lock wherever the store is:

- a local store (sqlite, a folder): a file lock beside it (``flock``: released by the kernel if its holder dies);
- a PostgreSQL store (``postgresql://`` as the tracking URI): a session-level advisory lock on a connection of
  its own (released by the server when the holder's connection drops, ``kill -9`` included);
- any other store, an MLflow server above all: a lease in the store itself (:func:`lease_lock`): a registered
  model created as the lock (creation is atomic: a second creator gets RESOURCE_ALREADY_EXISTS), renewed while
  held, deleted when released, and taken over once its holder has stopped renewing it for ``LEASE_S``.

MLflow has no conditional alias update, so no lock-free fallback is safe; there is none. The alias and its
version tags are written by :mod:`.model_registry`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

from filelock import FileLock
from mlflow.exceptions import MlflowException
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from lsq.variants import Decision
from tasks.tracking.model_registry import alias_version, set_alias
from tasks.tracking.store import _slug, client_for, redact_uri, sqlite_path

log = logging.getLogger(__name__)

__all__ = ["lease_lock", "promote_alias", "registry_lock"]

LOCK_TIMEOUT_S = 1800.0  # a promotion may re-score a champion under the lock
LEASE_S = 60.0  # lease lock: a lock not renewed for this long (the waiter's own clock) is its dead holder's
RENEW_S = 10.0  # lease lock: how often the holder renews it
SETTLE_S = 0.5  # lease lock: after taking it, look again this much later (a racing take-over would show)
OWNER_TAG, LEASE_TAG = "lsq.lock.owner", "lsq.lock.lease"


def promote_alias(uri: str, model_name: str, champion_alias: str, against: Callable[[str | None], Decision],
                  versions: Mapping[str, str]) -> Decision:
    """Decide against the champion as it is when the alias moves, move it, and return the decision.

    ``against(version)`` decides this run's winner against registered ``version`` (None: there is no
    champion), scoring it if needed; ``versions`` maps each variant label to its registered version.
    Under :func:`registry_lock` this reads the version behind ``champion_alias``, decides against it and
    points ``decision.alias`` at the winner's version (:func:`set_alias`). The decision returned, and the
    ``lsq.reason`` tag, name the champion version it was compared with (``compared_to``): when two runs
    promote at once, the later one compares against the champion the earlier one set.
    """
    with registry_lock(uri, model_name) as how:
        current = alias_version(uri, model_name, champion_alias)
        decision = _naming_champion(against(current), current)
        if decision.winner not in versions:
            raise KeyError(f"promote: the winner {decision.winner!r} is not among the registered variants "
                           f"({', '.join(versions)})")
        winner = str(versions[decision.winner])
        set_alias(uri, model_name, winner, decision.alias, decision)
        log.info("%s: %s (version %s) -> %s, compared with %s [%s]", model_name, decision.winner, winner,
                 decision.alias, current or "no champion", how)
        return decision


@contextmanager
def registry_lock(uri: str, model_name: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[str]:
    """Hold the promotion lock of ``model_name`` in the store ``uri`` (see the module's docstring for which);
    yields how it is held: ``"file lock <path>"``, ``"advisory lock <key>"`` or ``"lease <name>"``. A
    :class:`TimeoutError` after ``timeout`` seconds of waiting."""
    local = _local_store(uri)
    if local is not None:
        path = local.parent / f"{local.name}.{_slug(model_name)}.promote.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path), timeout=timeout):
            yield f"file lock {path}"
    elif urlsplit(uri).scheme.split("+")[0] in ("postgresql", "postgres"):
        with advisory_lock(uri, model_name, timeout) as how:
            yield how
    else:
        with lease_lock(uri, model_name, timeout) as how:
            yield how


@contextmanager
def advisory_lock(uri: str, model_name: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[str]:
    """A PostgreSQL session-level advisory lock keyed by ``model_name``, on a connection of its own."""
    key = int.from_bytes(hashlib.sha256(f"lsq-promotion:{model_name}".encode()).digest()[:8], "big", signed=True)
    engine = create_engine(uri.replace("postgres://", "postgresql://", 1), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            deadline = time.monotonic() + timeout
            while not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{model_name}: the promotion lock (advisory lock {key} in "
                                       f"{redact_uri(uri)}) was not free within {timeout:g} s")
                time.sleep(0.1 + random.random() * 0.2)
            try:
                yield f"advisory lock {key}"
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


@contextmanager
def lease_lock(uri: str, model_name: str, timeout: float = LOCK_TIMEOUT_S, lease_s: float = LEASE_S,
               renew_s: float = RENEW_S) -> Iterator[str]:
    """The promotion lock as a lease in the MLflow store: the registered model ``lsq-lock-<model>`` exists
    while someone holds it. Its owner renews tag ``lsq.lock.lease`` every ``renew_s``; a waiter that sees the
    lease unchanged for ``lease_s`` of its own clock (no clocks compared between machines) deletes the lock,
    if it still names that owner and lease, and tries again."""
    client = client_for(uri)
    name = f"lsq-lock-{model_name}"
    token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    deadline = time.monotonic() + timeout
    seen: tuple[str | None, str | None, float] | None = None  # (owner, lease, when first seen) of the holder
    while True:
        try:
            client.create_registered_model(name, tags={OWNER_TAG: token, LEASE_TAG: "0"},
                                           description=f"lsq's promotion lock of {model_name}, held by {token}; "
                                                       "deleted when released")
            time.sleep(SETTLE_S)
            if _lock_tags(client, name)[0] == token:
                break  # ours, and still ours after a look: a racing take-over of a dead holder's lock would show
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        held = _lock_tags(client, name)
        if held[0] is not None and (seen is None or held != seen[:2]):
            seen = (*held, time.monotonic())
        elif seen is not None and time.monotonic() - seen[2] > lease_s and held == seen[:2]:
            log.warning("%s: taking over the promotion lock of %s (not renewed for %.0f s)", model_name, held[0],
                        time.monotonic() - seen[2])
            try:
                client.delete_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
            seen = None
        if time.monotonic() > deadline:
            raise TimeoutError(f"{model_name}: the promotion lock ({name} in {redact_uri(uri)}, held by "
                               f"{held[0]}) was not free within {timeout:g} s")
        time.sleep(0.1 + random.random() * 0.3)
    stop = threading.Event()

    def renew() -> None:
        count = 0
        while not stop.wait(renew_s):
            count += 1
            try:
                client.set_registered_model_tag(name, LEASE_TAG, str(count))
            except Exception as exc:  # noqa: BLE001 - a missed renewal is a warning; lease_s allows for several
                log.warning("%s: renewing the promotion lock failed: %s", model_name, exc)

    renewer = threading.Thread(target=renew, name="lsq-lease", daemon=True)
    renewer.start()
    try:
        yield f"lease {name}"
    finally:
        stop.set()
        renewer.join(timeout=30)
        if _lock_tags(client, name)[0] == token:
            client.delete_registered_model(name)
        else:
            log.error("%s: the promotion lock was taken over while held (no renewal for %g s)", model_name, lease_s)


def _lock_tags(client, name: str) -> tuple[str | None, str | None]:
    """(owner, lease) of the lock ``name``; (None, None) when nobody holds it."""
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None, None
        raise
    return tags.get(OWNER_TAG), tags.get(LEASE_TAG)


def _naming_champion(decision: Decision, current: str | None) -> Decision:
    """``decision`` with ``compared_to`` set and a reason that names the champion version compared with."""
    reason = decision.reason
    if current is not None and f"champion version {current}" not in reason:
        reason = f"{reason} (compared with champion version {current})"
    return decision.model_copy(update={"compared_to": current, "reason": reason})


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
