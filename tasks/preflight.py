"""Before any training: can this machine reach the tracking server, its artifact store, and the storage root?

:func:`preflight` raises :class:`LsqError` with one line naming what is wrong, e.g.

    preflight: tracking server http://127.0.0.1:5000 unreachable (Connection refused)
    preflight: artifact store behind http://127.0.0.1:5000 not writable (HTTP 500: Internal Server Error)
    preflight: storage root s3://lsq/runs not writable (Could not connect to the endpoint URL ...)

so that a pipeline fails in seconds, not after an hour of training. URIs are shown redacted and known
secrets (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``...) are masked in the reasons.

What is checked, by the form of each location:

- tracking ``http(s)://``: ``GET /health``, then an authenticated ``experiments/search`` (MLflow's
  credentials from the environment); then the artifact proxy: a probe file PUT under
  ``lsq-preflight/<uuid>/`` of ``/api/2.0/mlflow-artifacts/artifacts``, read back and DELETEd. No
  retries; each request waits up to ``timeout`` s, the upload up to ``3 * timeout`` s (the server
  itself retries a dead object store for ~10 s before it answers 500). A server that does not proxy
  artifacts (``--no-serve-artifacts``) is only logged: its clients write to the store themselves.
- tracking ``sqlite:///path``, ``file:`` or a plain path: the database's folder (the store's folder)
  must be creatable and writable (a probe file is written and removed). A database file that exists
  must be a file this process can write, an SQLite database (its 16-byte header) and, unless it has no
  tables yet, MLflow's (an ``experiments`` or ``alembic_version`` table; read through a read-only
  connection): MLflow would otherwise fail with a page of SQLAlchemy traceback, or add its tables to
  another program's database. A missing or empty file passes: MLflow creates its tables.
- other tracking stores (a database URI): one ``search_experiments(max_results=1)``.
- storage root, a folder or an fsspec URL (``s3://bucket/prefix``): a probe object
  ``<root>/.lsq-preflight/<uuid>`` is written, read back and deleted. A ``file://`` root is the folder
  fsspec (and so :class:`lsq.storage.Storage`) makes of it: ``file://runs`` is ``./runs``. For
  ``s3://``, botocore gets ``timeout``-second connect/read timeouts and one attempt, so a dead endpoint
  fails at once.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from contextlib import closing
from pathlib import Path
from typing import NoReturn
from urllib.parse import unquote, urlsplit

from lsq.errors import LsqError
from tasks.tracking.store import redact_uri, sqlite_path

log = logging.getLogger(__name__)

PROBE = b"lsq preflight probe\n"
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
               "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_CONNECTION_STRING", "GOOGLE_APPLICATION_CREDENTIALS")


def preflight(tracking_uri: str, storage_root: str | None, timeout: float = 10.0) -> None:
    """Raise LsqError (one line) unless the tracking store, its artifact store and ``storage_root``
    (None: not used) are reachable and writable from here. Leaves nothing behind when it passes."""
    _check_tracking(tracking_uri, timeout)
    if storage_root:
        _check_storage_root(str(storage_root), timeout)


# ------------------------------------------------------------------------------------- tracking
def _check_tracking(uri: str, timeout: float) -> None:
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_server(uri, timeout)
        _check_artifact_proxy(uri, timeout)
    elif uri.startswith("sqlite:"):
        db = sqlite_path(uri)
        if db is not None:
            _check_sqlite(db, f"tracking store {redact_uri(uri)}", timeout)
    elif scheme == "file" or not scheme or len(scheme) == 1:  # file:/path, /path, C:\path
        folder = Path(unquote(urlsplit(uri).path)) if scheme == "file" else Path(uri)
        _check_folder(folder, f"tracking store {redact_uri(uri)}")
    else:
        from tasks.tracking.store import client_for

        try:
            client_for(uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the store is not usable
            _fail(f"tracking store {redact_uri(uri)} unreachable", exc)


def _request(uri: str, method: str, endpoint: str, timeout: float, **kwargs):
    """One HTTP request to the MLflow server with its client credentials: no retries, no backoff."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(get_default_host_creds(uri), endpoint, method, max_retries=0, backoff_factor=0,
                        backoff_jitter=0, retry_codes=(), raise_on_status=False, timeout=timeout, **kwargs)


def _check_server(uri: str, timeout: float) -> None:
    where = f"tracking server {redact_uri(uri)}"
    try:
        response = _request(uri, "GET", "/health", timeout)
    except Exception as exc:  # noqa: BLE001 - refused, timed out, bad TLS, bad host...
        _fail(f"{where} unreachable", exc)
    if response.status_code != 200:
        _fail(f"{where} unhealthy", _http(response, "/health"))
    try:
        response = _request(uri, "GET", "/api/2.0/mlflow/experiments/search", timeout, params={"max_results": 1})
    except Exception as exc:  # noqa: BLE001
        _fail(f"{where} unreachable", exc)
    if response.status_code != 200:
        _fail(f"{where} refused an API call", _http(response, "experiments/search"))


def _check_artifact_proxy(uri: str, timeout: float) -> None:
    where = f"artifact store behind {redact_uri(uri)}"
    endpoint = f"{ARTIFACTS_API}/lsq-preflight/{uuid.uuid4().hex}/probe"
    try:
        response = _request(uri, "PUT", endpoint, 3 * timeout, data=PROBE)
    except Exception as exc:  # noqa: BLE001
        _fail(f"{where} not writable", exc)
    if response.status_code in (404, 503) and "serve-artifacts" in response.text:
        log.info("%s: the server does not proxy artifacts (--no-serve-artifacts); not checked", where)
        return
    if response.status_code != 200:
        _fail(f"{where} not writable", _http(response, "upload"))
    try:
        response = _request(uri, "GET", endpoint, 3 * timeout)
    except Exception as exc:  # noqa: BLE001
        _fail(f"{where} not readable", exc)
    if response.status_code != 200 or response.content != PROBE:
        _fail(f"{where} not readable", _http(response, "download") if response.status_code != 200
              else "the probe came back changed")
    try:  # MLflow proxies DELETE when the server allows it; where it does not, the probe stays
        response = _request(uri, "DELETE", endpoint, timeout)
        if response.status_code != 200:
            log.info("%s: probe %s left behind (HTTP %d on delete)", where, endpoint, response.status_code)
    except Exception as exc:  # noqa: BLE001
        log.info("%s: probe %s left behind (%s)", where, endpoint, exc)


def _http(response, what: str) -> str:
    """``HTTP <code>: <message>`` of an MLflow error answer (its JSON ``message``, else its text)."""
    try:
        body = response.json()
        text = body.get("message") or body.get("error_code") or response.text
    except ValueError:
        text = response.text
    text = re.sub(r"<[^>]+>", " ", text or "").strip() or response.reason or ""
    return f"HTTP {response.status_code} on {what}: {text}"


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file
MLFLOW_TABLES = ("experiments", "alembic_version")  # either one: the database is MLflow's (perhaps half-made)
_USE_INSTEAD = "point tracking.tracking_uri at an MLflow database, or at a file that does not exist yet"


def _check_sqlite(db: Path, where: str, timeout: float) -> None:
    """The folder of ``db`` creatable and writable; ``db`` missing, empty, or an SQLite database of MLflow's
    that this process can write. Past the folder's probe, reads the header and the table names only."""
    _check_folder(db.parent, where)
    if not db.exists():
        return  # MLflow creates it
    if db.is_dir():
        _fail(f"{where} is a folder, not a database file", str(db), _USE_INSTEAD)
    try:
        with open(db, "r+b") as f:  # opened for writing, written to never: permissions, read-only mounts
            head = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        _fail(f"{where} not {'writable' if os.access(db, os.R_OK) else 'readable'}", exc)
    if not head:
        return  # an empty file is an empty database to SQLite: MLflow creates its tables
    if head != SQLITE_HEADER:
        _fail(f"{where} is not an SQLite database", f"it begins {head!r}", _USE_INSTEAD)
    import sqlite3

    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)) as con:
            tables = sorted(name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    except sqlite3.OperationalError as exc:  # locked, a hot journal to roll back...: MLflow's own open decides
        log.info("%s: table names not read (%s); left to MLflow", where, exc)
        return
    except sqlite3.DatabaseError as exc:  # malformed, encrypted
        _fail(f"{where} is not a readable SQLite database", exc, _USE_INSTEAD)
    if tables and not set(MLFLOW_TABLES) & set(tables):
        shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
        _fail(f"{where} is another program's SQLite database", f"tables {shown}; none of MLflow's", _USE_INSTEAD)


# --------------------------------------------------------------------------------- storage root
def _check_storage_root(root: str, timeout: float) -> None:
    where = f"storage root {redact_uri(root)}"
    if "://" not in root:
        _check_folder(Path(root), where)
        return
    import fsspec

    if root.lower().startswith("file://"):  # where the storage writes: fsspec's path (file://runs is ./runs)
        _check_folder(Path(fsspec.core.url_to_fs(root)[1]), where)
        return

    protocol = root.split("://", 1)[0].lower()
    options = {"skip_instance_cache": True}
    if protocol in ("s3", "s3a"):  # fresh dicts: s3fs rewrites config_kwargs["retries"] in place
        options["config_kwargs"] = {"connect_timeout": timeout, "read_timeout": timeout,
                                    "retries": {"max_attempts": 1}}
    try:
        fs, path = fsspec.core.url_to_fs(root, **options)
    except Exception as exc:  # noqa: BLE001 - unknown protocol, missing package (s3fs), bad URL
        _fail(f"{where} unusable", exc)
    probe = f"{path.rstrip('/')}/.lsq-preflight/{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, PROBE)
    except Exception as exc:  # noqa: BLE001
        _fail(f"{where} not writable", exc)
    try:
        if fs.cat_file(probe) != PROBE:
            _fail(f"{where} not readable", "the probe came back changed")
    except LsqError:
        raise
    except Exception as exc:  # noqa: BLE001
        _fail(f"{where} not readable", exc)
    try:
        fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001
        _fail(f"{where} refused to delete a probe", exc)


def _check_folder(folder: Path, where: str) -> None:
    """``folder`` created if missing, and a probe file written, read back and removed in it."""
    probe_dir = folder / ".lsq-preflight"
    probe = probe_dir / uuid.uuid4().hex
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_dir.mkdir(exist_ok=True)
        probe.write_bytes(PROBE)
        if probe.read_bytes() != PROBE:
            _fail(f"{where} not readable", "the probe came back changed")
        probe.unlink()
    except OSError as exc:
        _fail(f"{where} not writable", exc)
    try:
        probe_dir.rmdir()
    except OSError:  # another preflight's probe is there: it removes the folder
        pass


# -------------------------------------------------------------------------------------- messages
def _fail(what: str, reason: BaseException | str, fix: str = "") -> NoReturn:
    raise LsqError(f"preflight: {what} ({_reason(reason)})" + (f"; {fix}" if fix else "")) from None


def _reason(reason: BaseException | str, limit: int = 300) -> str:
    """A one-line, secret-free reason: ``[Errno 111] Connection refused`` -> ``Connection refused``."""
    if isinstance(reason, OSError) and reason.strerror:
        text = f"{reason.strerror}: {reason.filename}" if reason.filename else reason.strerror
    elif isinstance(reason, BaseException):
        text = str(reason) or type(reason).__name__
        errno = re.findall(r"\[Errno -?\d+\] ([^'\")]+)", text)
        if errno:
            text = errno[-1]
        elif "timed out" in text.lower() or "timeout" in type(reason).__name__.lower():
            text = f"no answer in time: {text}"
    else:
        text = reason
    text = re.sub(r"(://[^/@\s:]*):[^@\s/]*@", r"\1:***@", text)  # user:password@ in any URL
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
