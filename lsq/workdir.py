"""Work folders that cannot collide: named by everything that determines their output, claimed by a lock.

A step (train one adapter, squeeze one source, score one adapter) works in
``<root>/<label>-<key>``, where ``key`` is a digest of the step's whole input: its config (seed
included), the data fingerprint, the lsq code version and the digests of the adapters it starts
from. Different inputs never share a folder; the same inputs always do, so a re-run or a second run
of the same config finds the finished result. While a step works it holds an exclusive lock on
``<folder>/.lock`` (``filelock``: ``flock`` underneath, released by the kernel when the process
dies, so a ``kill -9`` never leaves a folder claimed). A finished step leaves ``record.json``
(written to a temporary name and renamed: it is whole or absent); a reader validates it against
the record's type and checks the digests of the adapters it names before reusing it, so a result
is reused only when it is verifiably the one that was written.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock
from pydantic import BaseModel, ValidationError

from lsq.errors import write_failure

log = logging.getLogger(__name__)
R = TypeVar("R", bound=BaseModel)
RECORD_NAME = "record.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def step_key(inputs: Mapping[str, Any]) -> str:
    """A digest of a step's inputs (JSON-able mapping, key order irrelevant): 20 hex characters."""
    blob = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def adapter_digest(folder: str | os.PathLike) -> str:
    """sha256 over an adapter folder's config and weights: equal for the same adapter, bit for bit."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode())
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


@contextmanager
def claimed(folder: str | os.PathLike, timeout: float = -1) -> Iterator[Path]:
    """Hold the exclusive claim on ``folder`` (created if missing) for the body; waits for another holder.

    The claim is a lock, not a marker: it ends with the holder's process, however that ends.
    """
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path / ".lock"), timeout=timeout):
        yield path


def publish(folder: str | os.PathLike, record: BaseModel, name: str = RECORD_NAME) -> Path:
    """Write ``record`` as ``folder/name`` atomically (:func:`atomic_write`)."""
    target = Path(folder) / name
    atomic_write(target, (record.model_dump_json(indent=1) + "\n").encode())
    return target


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file beside it, fsync, rename.

    A failed write (disk full, no permission) raises :class:`lsq.errors.WriteFailed` naming ``path``."""
    try:
        tmp = new_temporary(path.parent, f".{path.name}.", folder=False)
        try:
            with open(tmp, "wb") as f:
                os.fchmod(f.fileno(), 0o644)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            discard_temporary(tmp)  # gone already after the rename
    except OSError as exc:
        raise (write_failure(exc, path) or exc) from None


# Temporary files and folders of this process not yet renamed into place or removed (atomic writes, the
# AtomicFolder of lsq.adapter, the storage's downloads). A signal turned into an exception (the CLI's SIGTERM,
# Prefect's, Ctrl-C) can land where no clean-up runs yet: whatever is left here is removed when the process exits.
_UNFINISHED: set[Path] = set()


@atexit.register
def _remove_unfinished() -> None:
    for path in list(_UNFINISHED):
        discard_temporary(path)


def new_temporary(parent: Path, prefix: str, folder: bool = True) -> Path:
    """A new empty folder (or file) ``parent/<prefix><random>.tmp``, removed at exit unless renamed away or
    :func:`discard_temporary` comes first. Not tempfile's ``mkdtemp`` / ``mkstemp``: a signal landing just after
    their mkdir or open, before the caller's ``try``, would leave it behind with its name lost."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}.tmp"
        _UNFINISHED.add(path)  # before it exists
        try:
            if folder:
                os.mkdir(path)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return path
        except FileExistsError:
            _UNFINISHED.discard(path)  # that name is someone else's: draw another
        except BaseException:
            discard_temporary(path)
            raise


def discard_temporary(path: Path) -> None:
    """Remove a temporary file or folder of :func:`new_temporary`, if it is still there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(OSError):
            path.unlink(missing_ok=True)
    _UNFINISHED.discard(path)


@contextmanager
def temporary_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """:func:`new_temporary` folder for the block, removed with what is in it when the block ends."""
    parent.mkdir(parents=True, exist_ok=True)
    path = new_temporary(parent, prefix)
    try:
        yield path
    finally:
        discard_temporary(path)


def finished(folder: str | os.PathLike, kind: type[R], name: str = RECORD_NAME) -> R | None:
    """The record a finished step left in ``folder``, or None when there is none or it cannot be trusted.

    Trusted means: it parses as ``kind`` (pydantic, ``extra="forbid"``: data only, never code) and
    every adapter it names (any ``adapter_dir`` with an ``adapter_sha256``, at any depth) still has
    that digest. A record that fails either check is removed, so the step runs again.
    """
    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        record = kind.model_validate_json(path.read_text())
    except (ValidationError, ValueError, OSError) as exc:
        log.warning("%s: unreadable step record (%s); the step runs again", path, str(exc).splitlines()[0])
        path.unlink(missing_ok=True)
        return None
    for adapter, digest in adapters_in(record.model_dump()):
        if adapter_digest(adapter) != digest:
            log.warning("%s: adapter %s changed since it was recorded; the step runs again", path, adapter)
            path.unlink(missing_ok=True)
            return None
    return record


def adapters_in(node: Any) -> Iterator[tuple[str, str]]:
    """(adapter_dir, adapter_sha256) pairs anywhere in a dumped record."""
    if isinstance(node, Mapping):
        if node.get("adapter_dir") and node.get("adapter_sha256"):
            yield node["adapter_dir"], node["adapter_sha256"]
        for value in node.values():
            yield from adapters_in(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from adapters_in(value)
