"""Where finished steps live: the local work folder (laptop mode) or a shared root by URI (team mode).

``storage.root`` unset, the laptop default: a unit's record is kept in ``<output_dir>/units/`` and
the adapters it names stay where their steps wrote them. Nothing is copied.

``storage.root`` set (``s3://bucket/prefix``, or any fsspec URL, or a folder every machine mounts):
machines share no folder, only that root.

- A finished adapter folder is uploaded to ``<root>/adapters/<sha256>/``. The name is the adapter's
  own digest, so a retry or a second machine writing the same adapter writes the same bytes and
  never replaces a good result with another. A ``COMPLETE`` object goes last; a folder without it
  is ignored, re-uploaded, and never fetched.
- A unit's record goes to ``<root>/units/<name>.json`` after its adapters, in one PUT, which an
  object store makes visible whole or not at all (a local root: temporary name, then rename). Its
  ``adapter_dir`` fields are then URIs under ``<root>/adapters/``.
- A step that needs an adapter fetches it into its machine's cache ``<cache>/<sha256>/``: downloaded
  to a temporary folder, its digest checked, then renamed. A step never reads a path another
  machine wrote.

Credentials come from the environment (for S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, the
endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``), never from the config, so nothing
here can print them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from lsq.errors import LsqError
from lsq.workdir import adapter_digest, adapters_in, atomic_write, temporary_folder

log = logging.getLogger(__name__)
R = TypeVar("R", bound=BaseModel)
COMPLETE = "COMPLETE"
_FILES = ("report", "plot")  # Variant fields naming a file inside its adapter folder


def is_url(location: str | os.PathLike | None) -> bool:
    """A URL (``s3://``, ``file://``, ``memory://``...): fetched into this machine's cache before use. A plain
    path (a root every machine mounts) is read in place."""
    return location is not None and "://" in str(location)


class Storage:
    """The results of units: ``units/<name>.json`` records and, with a shared root, ``adapters/<sha256>/``.

    ``root`` None keeps everything in ``local`` (the work folder): laptop mode, nothing copied.
    ``cache`` is this machine's folder for fetched adapters.
    """

    def __init__(self, root: str | None, local: str | os.PathLike, cache: str | os.PathLike | None = None):
        self.root = str(root).rstrip("/") if root else None
        self.local = Path(local)
        self.cache = Path(cache) if cache else self.local / "cache"
        self._fs = None

    @property
    def shared(self) -> bool:
        return self.root is not None

    @property
    def fs(self):
        if self._fs is None:
            import fsspec

            try:
                self._fs, _ = fsspec.core.url_to_fs(self.root)
            except (ImportError, ValueError) as exc:  # e.g. s3:// without s3fs
                raise LsqError(f"storage.root {self.root}: {exc}") from None
        return self._fs

    def describe(self) -> str:
        return self.root if self.shared else str(self.local / "units")

    # --- records ------------------------------------------------------------------------------
    def get(self, name: str, kind: type[R]) -> R | None:
        """The record of unit ``name``, or None when it is absent or unreadable (the unit runs again)."""
        if not self.shared:
            path = self.local / "units" / f"{name}.json"
            text = path.read_text() if path.is_file() else None
        else:
            try:
                text = self.fs.cat_file(f"{self.root}/units/{name}.json").decode()
            except FileNotFoundError:
                text = None
        if text is None:
            return None
        try:
            record = kind.model_validate_json(text)
        except (ValidationError, ValueError) as exc:
            log.warning("unit record %s unreadable (%s); the unit runs again", name, str(exc).splitlines()[0])
            return None
        for adapter, digest in adapters_in(record.model_dump()):
            if is_url(adapter):
                whole = (self.fs if self.shared else _fs_for(adapter)).exists(f"{adapter}/{COMPLETE}")
            else:
                whole = adapter_digest(adapter) == digest
            if not whole:
                log.warning("unit record %s names adapter %s, which is gone or changed; the unit runs again",
                            name, adapter)
                return None
        return record

    def put(self, name: str, record: R) -> R:
        """Keep ``record`` as unit ``name``: its adapters uploaded first (shared root), then the record.

        Returns the record as others will read it (adapter locations as URIs under a shared root).
        """
        if not self.shared:
            folder = self.local / "units"
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / f"{name}.json", (record.model_dump_json(indent=1) + "\n").encode())
            return record
        published = self.put_adapters(record)
        self._put_bytes(f"{self.root}/units/{name}.json", (published.model_dump_json(indent=1) + "\n").encode())
        return published

    # --- adapters -----------------------------------------------------------------------------
    def put_adapters(self, record: R) -> R:
        """Upload the adapters ``record`` names (shared root; nothing otherwise): ``record`` as others
        will read it. :meth:`put` does this first for a record that still names local folders."""
        return _rewrite(record, self._upload) if self.shared else record

    def localize(self, record: R) -> R:
        """``record`` with every adapter it names on this machine (fetched into the cache when a URI)."""
        return _rewrite(record, self._fetch)

    def adapter_uri(self, digest: str) -> str:
        return f"{self.root}/adapters/{digest}"

    def _upload(self, variant: dict[str, Any]) -> dict[str, Any]:
        folder, digest = variant["adapter_dir"], variant["adapter_sha256"]
        if is_url(folder):
            return variant  # published already (a record built from fetched inputs)
        uri = self.adapter_uri(digest)
        if not self.fs.exists(f"{uri}/{COMPLETE}"):
            started = time.perf_counter()
            files = self._put_tree(Path(folder), uri, digest)
            log.info("uploaded adapter %s (%d files) in %.2f s", uri, files, time.perf_counter() - started)
        return _moved(variant, folder, uri)

    def _fetch(self, variant: dict[str, Any]) -> dict[str, Any]:
        uri, digest = variant["adapter_dir"], variant["adapter_sha256"]
        if not is_url(uri):
            return variant
        target = self.cache / digest
        if not (target / COMPLETE).is_file():
            with temporary_folder(self.cache, f".{digest[:12]}-") as tmp:
                fs = self.fs if self.shared and uri.startswith(self.root) else _fs_for(uri)
                if not fs.exists(f"{uri}/{COMPLETE}"):
                    raise LsqError(f"adapter {uri}: not in the storage root (no {COMPLETE} marker)")
                _get_tree(fs, uri, tmp)
                if adapter_digest(tmp) != digest:
                    raise LsqError(f"adapter {uri}: its files do not have the digest {digest[:12]} it is named by")
                (tmp / COMPLETE).write_text(digest)
                try:
                    os.rename(tmp, target)
                except OSError:  # another process of this machine fetched it meanwhile
                    if not (target / COMPLETE).is_file():
                        raise
        return _moved(variant, uri, str(target))

    # --- checkpoints --------------------------------------------------------------------------
    def push_checkpoint(self, run: str, checkpoint: Path) -> None:
        """Copy a whole checkpoint of training ``run`` (its work folder's name) to
        ``<root>/checkpoints/<run>/<checkpoint-N>/`` (a ``COMPLETE`` object last), then drop older ones
        there: a unit rerun on another machine resumes from it (:meth:`pull_checkpoint`)."""
        if not self.shared:
            return
        started = time.perf_counter()
        base = f"{self.root}/checkpoints/{run}"
        self._put_tree(checkpoint, f"{base}/{checkpoint.name}", checkpoint.name)
        for older in self._checkpoints(base):
            if older != checkpoint.name:
                self.fs.rm(f"{base}/{older}", recursive=True)
        log.info("checkpoint %s of %s kept in %s (%.2f s)", checkpoint.name, run, base, time.perf_counter() - started)

    def pull_checkpoint(self, run: str, into: Path) -> Path | None:
        """The newest whole checkpoint of ``run`` in the root, fetched into ``into`` (None when there is none)."""
        if not self.shared:
            return None
        base = f"{self.root}/checkpoints/{run}"
        names = self._checkpoints(base)
        if not names:
            return None
        name = names[-1]
        with temporary_folder(into, f".{name}-") as tmp:
            _get_tree(self.fs, f"{base}/{name}", tmp)
            os.rename(tmp, into / name)
        log.info("resuming %s from %s/%s", run, base, name)
        return into / name

    def _checkpoints(self, base: str) -> list[str]:
        """Names of the whole (``COMPLETE``) checkpoints under ``base``, oldest first."""
        try:
            entries = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        whole = [n for n in names if n.startswith("checkpoint-") and n.split("-")[-1].isdigit()
                 and self.fs.exists(f"{base}/{n}/{COMPLETE}")]
        return sorted(whole, key=lambda n: int(n.split("-")[-1]))

    def _put_tree(self, folder: Path, uri: str, marker: str) -> int:
        """Every file under ``folder`` to ``uri``, then ``uri/COMPLETE`` (holding ``marker``); the file count."""
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in files:
            target = f"{uri}/{path.relative_to(folder).as_posix()}"
            if _is_local(self.fs):
                self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(path), target)
        self._put_bytes(f"{uri}/{COMPLETE}", marker.encode())
        return len(files)

    def _put_bytes(self, uri: str, data: bytes) -> None:
        """One object, visible whole or not at all: one PUT on an object store, tmp + rename on a disk."""
        if _is_local(self.fs):
            path = Path(self.fs._strip_protocol(uri))
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        else:
            self.fs.pipe_file(uri, data)


def _get_tree(fs, uri: str, into: Path) -> None:
    """Every file under ``uri`` but the ``COMPLETE`` marker, into folder ``into``."""
    prefix = fs._strip_protocol(uri)
    for remote in fs.find(uri):
        relative = remote[len(prefix):].lstrip("/")
        if relative != COMPLETE:
            (into / relative).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(into / relative))


def _fs_for(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)[0]


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _moved(variant: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """``variant`` with its adapter folder, and the files it names inside it, moved from ``old`` to ``new``."""
    out = dict(variant, adapter_dir=new)
    for key in _FILES:
        value = variant.get(key)
        if value and str(value).startswith(str(old)):
            out[key] = new + str(value)[len(str(old)):]
    return out


def _rewrite(record: R, change: Callable[[dict[str, Any]], dict[str, Any]]) -> R:
    """``record`` with ``change`` applied to every variant in it (any mapping naming an adapter, at any depth)."""

    def walk(node: Any) -> Any:
        if isinstance(node, Mapping):
            node = {k: walk(v) for k, v in node.items()}
            if node.get("adapter_dir") and node.get("adapter_sha256"):
                node = change(node)
            return node
        if isinstance(node, (list, tuple)):
            return [walk(v) for v in node]
        return node

    return type(record).model_validate(walk(record.model_dump(mode="json")))
