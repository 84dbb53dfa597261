"""Reading a data source (a local file or files, a folder, a dataset id from the local cache) into a
``DatasetDict`` with ``datasets``, quietly: no progress bars for bookkeeping, no reader errors logged before
lsq says them in one line (:mod:`lsq.data_files` explains why a file cannot be read). :mod:`lsq.data` then
validates, normalises, splits and fingerprints what this returns."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
from datasets import DatasetDict, load_dataset

from lsq import data_files
from lsq.errors import LsqError

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# datasets' readers, which log a failure on stderr before raising it: lsq's one line says it instead
_READER_LOGGERS = ("datasets.packaged_modules.csv.csv", "datasets.packaged_modules.json.json")
# Suffixes that make a missing source read as a mistyped path rather than a dataset id.
_FILE_SUFFIXES = set(_BUILDERS) | {".tsv", ".txt", ".arrow", ".xlsx", ".xls", ".gz", ".zip", ".pq", ".feather"}


_QUIET_LOCK = threading.Lock()
_quiet = {"holders": 0, "switched": False}


@contextmanager
def no_progress_bars():
    """datasets' progress bars off for the body: splitting is bookkeeping of a second or two, and each
    ``flatten_indices`` would otherwise draw a "Flattening the indices" bar (five per training).

    The switch is process-wide (``datasets.disable_progress_bars``), so it is counted: other threads
    splitting at the same time share it, and the last one out restores what the caller had (bars
    that tokenising draws meanwhile in another thread are hidden too; nothing else changes)."""
    with _QUIET_LOCK:
        if _quiet["holders"] == 0:  # left alone when off already, or forced on (HF_DATASETS_DISABLE_PROGRESS_BARS=0)
            forced = datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is not None
            _quiet["switched"] = datasets.is_progress_bar_enabled() and not forced
            if _quiet["switched"]:
                datasets.disable_progress_bars()
        _quiet["holders"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet["holders"] -= 1
            if _quiet["holders"] == 0 and _quiet["switched"]:
                datasets.enable_progress_bars()


_muted = {"holders": 0, "levels": {}}


@contextmanager
def _reading_quietly():
    """datasets' readers without their progress bar ("Generating train split") and without the error they
    log before raising it ("Failed to read file ..."): lsq says it in one line. Counted like
    :func:`no_progress_bars`, whose lock it shares; the loggers get their levels back when the last reader ends."""
    with no_progress_bars():
        with _QUIET_LOCK:
            if _muted["holders"] == 0:
                _muted["levels"] = {name: logging.getLogger(name).level for name in _READER_LOGGERS}
                for name in _READER_LOGGERS:
                    logging.getLogger(name).setLevel(logging.CRITICAL)
            _muted["holders"] += 1
        try:
            yield
        finally:
            with _QUIET_LOCK:
                _muted["holders"] -= 1
                if _muted["holders"] == 0:
                    for name, level in _muted["levels"].items():
                        logging.getLogger(name).setLevel(level)


def load_source(source: str | tuple[str, ...], encoding: str) -> DatasetDict:
    if isinstance(source, tuple):
        return _load_files([Path(s).expanduser() for s in source], encoding)
    path = Path(source).expanduser()
    if path.is_file():
        return _load_files([path], encoding)
    if path.is_dir():  # datasets picks the reader; a parquet reader takes no encoding
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in data_files.TEXT_SUFFIXES)
        return _load_dataset(str(path), f"source: folder {source!r} could not be loaded", source, files,
                             encoding if encoding != "utf-8" else None)
    if source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1 \
            or path.suffix.lower() in _FILE_SUFFIXES:
        raise LsqError(f"source: no such file or folder {source!r}")
    return _load_dataset(source, f"source: dataset {source!r} could not be loaded offline "
                         "(not a local file or folder, and not in the local datasets cache)", source)


def _load_files(paths: list[Path], encoding: str) -> DatasetDict:
    for p in paths:
        if not p.is_file():
            raise LsqError(f"source: no such file {str(p)!r}")
        if p.suffix.lower() not in _BUILDERS:
            raise LsqError(f"source: unsupported file extension {p.suffix!r} of {str(p)!r} "
                           f"(use {', '.join(_BUILDERS)})")
    builders = {_BUILDERS[p.suffix.lower()] for p in paths}
    if len(builders) > 1:
        raise LsqError(f"source: files mix formats ({', '.join(sorted({p.suffix for p in paths}))}); use one format")
    builder = builders.pop()
    names = ", ".join(map(str, paths))
    dsd = _load_dataset(builder, f"source: could not read {names}", names, paths,
                        encoding if builder != "parquet" else None, data_files={"train": [str(p) for p in paths]})
    if builder == "csv" and len(dsd["train"].column_names) == 1:  # another separator: one column holds all
        found = next(filter(None, (data_files.separator_problem(p, encoding) for p in paths)), None)
        if found:
            raise LsqError(found)
    return dsd


def _load_dataset(path: str, message: str, source: Any, files: Sequence[Path] = (), encoding: str | None = None,
                  **kwargs: Any) -> DatasetDict:
    """``load_dataset(path, **kwargs)`` (with ``encoding`` when given: the csv and json readers take it), quietly;
    a failure is one line, about the local ``files`` read where they show what is wrong."""
    if encoding is not None:
        kwargs["encoding"] = encoding
    encoding = encoding or "utf-8"
    try:
        with _reading_quietly():
            dsd = load_dataset(path, **kwargs)
            if isinstance(dsd, DatasetDict) and any(f.suffix.lower() in (".json", ".jsonl") for f in files):
                for ds in dsd.values():  # pyarrow's JSON reader keeps bytes that are not UTF-8: found here, not later
                    ds.data.table.validate(full=True)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ArrowInvalid...)
        empty = re.search(r'Instruction "(\w+)" corresponds to no data', str(exc))
        if empty and "data_files" in kwargs:  # the files named in data.source: none holds a row
            raise LsqError(data_files.no_rows(files, encoding)) from None
        if empty:  # how datasets reports a split without rows
            raise LsqError(f"split {empty.group(1)!r} of source {source!r} is empty") from None
        found = data_files.explain(exc, files, encoding) if files else None
        raise LsqError(found or f"{message}: {data_files.root_cause(exc)}") from None
    if not isinstance(dsd, DatasetDict):
        raise LsqError(f"{message}: got {type(dsd).__name__}, not a DatasetDict")
    return dsd


def canonical_splits(dsd: DatasetDict, source: Any) -> DatasetDict:
    """Keep train/validation/test (valid/val/dev read as validation); each must exist and hold rows."""
    out = {}
    for name, ds in dsd.items():
        canon = _SPLIT_ALIASES.get(str(name), str(name))
        if canon in SPLITS and canon not in out:
            out[canon] = ds
    if "train" not in out:
        raise LsqError(f"source: {source!r} has no train split (splits: {', '.join(map(str, dsd)) or 'none'})")
    for name, ds in out.items():
        if len(ds) == 0:
            raise LsqError(f"split {name!r} of source {source!r} is empty")
    return DatasetDict(out)
