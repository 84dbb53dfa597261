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

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock
from pydantic import BaseModel, ValidationError

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
    """Write ``data`` to ``path`` whole or not at all: a temporary file beside it, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
