"""Where the MLflow store is and how to talk to it: URIs, clients, experiments, retries, redaction.

Every function takes the tracking URI explicitly: MLflow's active run is thread-local and Prefect
runs tasks in worker threads, so nothing in this package reads or changes the caller's active run or
the process-global tracking URI, except MLflow code that insists on reading it, which runs inside
:func:`tracking_uri` (shared by callers with the same URI, exclusive between different URIs).
"""

from __future__ import annotations

import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import mlflow
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from lsq.pipeline_config import Tracking

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_DELAYS: tuple[float, ...] = (0.5, 2.0)  # 3 tries; tests shorten it (patch it here, where retry reads it)
MAX_TAG = 5000  # MLflow's limit on a tag value
_URI_CHANGE = threading.Condition()
_uri_users, _uri_active, _uri_previous = 0, None, None


# ---------------------------------------------------------------------------------------- store
def default_tracking_uri(tracking: Tracking, root: Path | None = None) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlruns/mlflow.db``.

    The default store keeps artifacts in ``<root>/mlruns/artifacts`` (set per experiment by
    :func:`ensure_experiment`). ``root`` defaults to the current directory. The URI is returned as
    given, credentials included (it is used to connect): show it only through :func:`redact_uri`.
    """
    if tracking.tracking_uri:
        return tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = (root if root is not None else Path.cwd()).resolve() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = unquote(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if not db or db == ":memory:":
        return None
    return Path(db)


def artifact_root(uri: str) -> Path | None:
    """``<folder of the database>/artifacts`` for a sqlite URI; None for other stores (server-side default)."""
    db = sqlite_path(uri)
    return None if db is None else db.resolve().parent / "artifacts"


_READY: set[str] = set()
_READY_LOCK = threading.Lock()


def client_for(uri: str) -> mlflow.MlflowClient:
    """A client whose tracking and registry stores are both ``uri`` (never the process-global ones).

    The first client of a sqlite store in a process opens it under a file lock beside the database:
    MLflow creates and migrates a new database when its store opens, and two processes doing that
    at once on one new file fail (``table _alembic_tmp_experiments already exists``).
    """
    db = sqlite_path(uri)
    if db is not None and uri not in _READY:
        from filelock import FileLock

        with _READY_LOCK:
            if uri not in _READY:
                db.parent.mkdir(parents=True, exist_ok=True)
                with FileLock(str(db) + ".init.lock"):
                    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # opens the tracking store
                    client.search_registered_models(max_results=1)  # and the registry store
                _READY.add(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing (artifacts beside a sqlite database)."""
    client = client_for(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise MlflowException(f"experiment {name!r} is deleted; restore it or pick another tracking.experiment")
        return found.experiment_id
    root = artifact_root(uri)
    location = (root / _slug(name)).as_uri() if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:  # created meanwhile by a concurrent pipeline
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


# ------------------------------------------------------------------------------------ redaction
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|key|sig|credential|auth", re.IGNORECASE)
# SQLAlchemy-style userinfo, whose password may hold characters a URL parser stops at ("/", "?", "#")
_LOOSE_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@?#]*):(?P<password>[^@]*)@")


def redact_uri(uri: str | None) -> str:
    """``uri`` fit to show: the password of its user info and secret-looking query values become ``***``.

    ``postgresql://user:pass@host/db`` -> ``postgresql://user:***@host/db``; ``?password=x`` (also
    ``token``, ``secret``, ``key``, ``sig``...) -> ``?password=***``. A user name alone is kept;
    URIs without credentials (``sqlite:///path``, ``s3://bucket/path``, plain paths) come back unchanged.
    """
    if not uri:
        return "" if uri is None else uri
    text = str(uri)
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. an invalid IPv6 netloc: still strip what looks like a password
        parts = None
    if parts is not None and "@" in parts.netloc:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{hostport}"
            text = text.replace(f"//{parts.netloc}", f"//{netloc}", 1)
    else:
        text = _LOOSE_USERINFO.sub(lambda m: f"{m['head']}{m['user']}:***@", text, count=1)
    head, sep, query = text.partition("?")
    if sep:
        query, hash_sep, fragment = query.partition("#")
        fields = []
        for field in query.split("&"):
            key, eq, _value = field.partition("=")
            fields.append(f"{key}=***" if eq and _SECRET_KEY.search(unquote(key)) else field)
        text = f"{head}?{'&'.join(fields)}{hash_sep}{fragment}"
    return text


# -------------------------------------------------------------------------------------- retries
def retry(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args)``, tried again after a transient database error (len(RETRY_DELAYS) + 1 tries, jittered)."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if delay is None or not transient(exc):
                raise
            log.warning("%s: transient error (%s); retrying in %.1f s", getattr(fn, "__name__", fn), exc, delay)
            time.sleep(delay * (1 + 0.5 * random.random()))
    raise AssertionError("unreachable")


def transient(exc: BaseException | None) -> bool:
    """True for errors a retry may cure: "database is locked", busy, temporarily unavailable, rate limits,
    and two writers setting the same tag at once (the store reads, then inserts: the second insert
    breaks the tag table's unique key; retried, it finds the row and updates it)."""
    while exc is not None:
        text = str(exc).lower()
        if "unique constraint failed" in text and "_tags." in text or "duplicate key value" in text and "tags" in text:
            return True
        if isinstance(exc, MlflowException) and exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        if isinstance(exc, (MlflowException, sqlite3.OperationalError)) and ("database is locked" in text or "busy" in text):
            return True
        if type(exc).__name__ == "OperationalError" and "locked" in text:  # sqlalchemy's wrapper
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# ------------------------------------------------------------------------- the global URI, briefly
@contextmanager
def tracking_uri(uri: str):
    """Set the process-global tracking URI while MLflow code that reads it runs; put the previous one back.

    Callers with the same URI share it (they may overlap in threads); a caller with another URI waits.
    """
    global _uri_users, _uri_active, _uri_previous
    with _URI_CHANGE:
        while _uri_users and _uri_active != uri:
            _URI_CHANGE.wait()
        if not _uri_users:
            _uri_previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
            mlflow.set_tracking_uri(uri)
            _uri_active = uri
        _uri_users += 1
    try:
        yield
    finally:
        with _URI_CHANGE:
            _uri_users -= 1
            if not _uri_users:
                mlflow.set_tracking_uri(_uri_previous)
                _uri_active = None
                _URI_CHANGE.notify_all()


# -------------------------------------------------------------------------------------- helpers
def all_runs(client: mlflow.MlflowClient, experiment_id: str, query: str) -> list:
    """Every run of ``experiment_id`` matching ``query``, page after page."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _params(values: Mapping[str, Any]) -> list[Param]:
    """MLflow params from a mapping: None dropped, lists joined with commas, values cut to 6000 characters."""
    return [Param(k, _tag(v)[:6000]) for k, v in values.items() if v is not None]


def _tag(value: Any) -> str:
    """A tag value: lists joined with commas, cut to MLflow's limit."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text[:MAX_TAG]


def _slug(name: str) -> str:
    """``name`` with runs of characters outside ``[A-Za-z0-9_.-]`` replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "lsq"


def _quote(text: str) -> str:
    """``text`` for a single-quoted string in an MLflow search filter."""
    return text.replace("'", "\\'")

