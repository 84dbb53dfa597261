"""Training data through ``datasets``: load, validate, normalise, split, cap and fingerprint.

Sources: a built-in set (``builtin:movie``, ``builtin:amazon``, ``builtin:nyt``, ``builtin:tweets``; see
:mod:`lsq.builtin_data`; as causal LM instructions, and ``builtin:addition``: :mod:`lsq.builtin_tasks`), one
local file or a list of them (.csv, .json/.jsonl, .parquet; a list is one pool), a local folder or a dataset
id for ``datasets.load_dataset`` (offline: from the local cache). Every source ends as a ``DatasetDict`` with splits train/validation/test and the columns
``text``/``label`` (classification, ``label`` a ``ClassLabel``) or ``prompt``/``answer``(/``choices``)
(causal LM). Missing validation/test splits are cut from train with a fixed seed (stratified by label
when every class is large enough). Every problem is one :class:`~lsq.errors.LsqError` line, raised
before any training starts.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lsq import builtin_data, builtin_tasks
from lsq.data_sources import canonical_splits, load_source, no_progress_bars
from lsq.errors import LsqError

BUILTIN_SETS = tuple(builtin_data.VADER_FILES)  # classification; as causal_lm: builtin_tasks.TASKS
BUILTIN_LABELS = ("negative", "positive")


class DataConfig(BaseModel):
    """Where the training data comes from, how its columns map, and how it is split."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str | tuple[str, ...] = Field(
        description="builtin:NAME (movie, amazon, nyt, tweets; causal_lm: the same as instructions, and "
        "addition); a local file or list of files (.csv, .json, "
        ".jsonl, .parquet; a list is one pool); a local folder or a dataset id for datasets.load_dataset "
        "(offline: from the local datasets cache)."
    )
    task: Literal["classification", "causal_lm"] = Field("classification", description="What the data trains.")
    text_column: str = Field("text", description="classification: column holding the input text.")
    label_column: str = Field("label", description="classification: column holding the label (int or string).")
    prompt_column: str = Field("prompt", description="causal_lm: column holding the prompt.")
    answer_column: str = Field("answer", description="causal_lm: column holding the target answer.")
    choices_column: str | None = Field(None, description="causal_lm: optional column with a list of choices.")
    encoding: str = Field("utf-8", description="Text encoding of .csv/.json/.jsonl files (latin-1, cp1252, "
                          "utf-16...; a UTF-8 byte-order mark is read either way).")
    label_names: tuple[str, ...] | None = Field(
        None, description="classification: class names, id = position. String labels map through them; "
        "without them string labels map to their sorted unique values."
    )
    seed: int = Field(0, description="Seed of the validation/test splitting and of the caps.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Validation share, when the source has no validation split.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Test share, when the source has no test split.")
    max_train: int | None = Field(None, ge=1, description="Cap on train rows (seeded sample, after splitting).")
    max_eval: int | None = Field(None, ge=1, description="Cap on validation and on test rows (after splitting).")
    max_length: int = Field(128, ge=1, description="Maximum tokens per example (the trainer truncates to it).")
    max_new_tokens: int = Field(16, ge=1, description="causal_lm: most tokens generated per answer when scoring "
                                "exact_match (greedy decoding).")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source in ("", ()):
            raise ValueError("source: empty")
        if self.builtin is not None:
            known = BUILTIN_SETS if self.task == "classification" else builtin_tasks.TASKS
            if self.builtin not in known:
                raise ValueError(f"source: unknown built-in {self.task} set {self.builtin!r} (known: {', '.join(known)}"
                                 + ("; builtin:addition is causal_lm data)" if self.builtin == "addition" else ")"))
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"encoding: unknown text encoding {self.encoding!r} (e.g. utf-8, latin-1, cp1252, "
                             "utf-16)") from None
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction: {self.val_fraction} + test_fraction {self.test_fraction} leave no train rows")
        if self.label_names is not None and (len(self.label_names) < 2 or len(set(self.label_names)) != len(self.label_names)):
            raise ValueError(f"label_names: need at least 2 distinct names, got {list(self.label_names)}")
        if self.task == "classification" and self.text_column == self.label_column:
            raise ValueError(f"label_column: same as text_column ({self.text_column!r})")
        return self

    @property
    def builtin(self) -> str | None:
        """The built-in set name of a ``builtin:NAME`` source, else None."""
        if isinstance(self.source, str) and self.source.startswith("builtin:"):
            return self.source.removeprefix("builtin:")
        return None


@functools.lru_cache(maxsize=4)
def _builtin_splits(name: str, task: str, seed: int, val_fraction: float, test_fraction: float,
                    max_train: int | None, max_eval: int | None) -> DatasetDict:
    if task == "causal_lm":
        return split_and_cap(builtin_tasks.task_dataset(name), seed=seed, val_fraction=val_fraction,
                             test_fraction=test_fraction, max_train=max_train, max_eval=max_eval, stratify=None)
    return builtin_dataset(name, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                           max_train=max_train, max_eval=max_eval)


def load_data(cfg: DataConfig) -> DatasetDict:
    """The validated, normalised train/validation/test splits that ``cfg`` describes.

    A built-in set (package data: it cannot change under a running process) is built once per process
    and split settings (about 2 s each time otherwise; the pipeline's units each load it); callers get
    their own ``DatasetDict`` over the same immutable datasets."""
    split_args = dict(seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                      max_train=cfg.max_train, max_eval=cfg.max_eval)
    if cfg.builtin is not None:
        return DatasetDict(_builtin_splits(cfg.builtin, cfg.task, **split_args))
    raw = canonical_splits(load_source(cfg.source, cfg.encoding), cfg.source)
    if cfg.task == "classification":
        dsd = _classification(raw, cfg)
        return split_and_cap(dsd, stratify="label", **split_args)
    return split_and_cap(_causal_lm(raw, cfg), stratify=None, **split_args)


def builtin_dataset(name: str, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
                    max_train: int | None = None, max_eval: int | None = None,
                    source: str | Path | None = None, sha256: str | None = None) -> DatasetDict:
    """A built-in VADER set as train/validation/test with columns text, label (0 negative, 1 positive), rating.

    Zero ratings are dropped; the label is the sign of the mean human rating (-4..4), kept as ``rating``.
    ``source``/``sha256`` override where the sdist comes from and the digest it must have (tests).
    """
    if name not in BUILTIN_SETS:
        raise LsqError(f"source: unknown built-in set {name!r} (known: {', '.join(BUILTIN_SETS)})")
    rows = [r for r in builtin_data.vader_rows(source=source, sha256=sha256)[name] if r["rating"] != 0]
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(BUILTIN_LABELS)),
                         "rating": Value("float64")})
    ds = Dataset.from_dict({"text": [r["text"] for r in rows], "label": [int(r["rating"] > 0) for r in rows],
                            "rating": [float(r["rating"]) for r in rows]}, features=features)
    return split_and_cap(DatasetDict(train=ds), seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                         max_train=max_train, max_eval=max_eval, stratify="label")


def split_and_cap(dsd: DatasetDict, *, seed: int, val_fraction: float, test_fraction: float,
                  max_train: int | None, max_eval: int | None, stratify: str | None) -> DatasetDict:
    """Cut the missing validation/test splits from train, then apply the caps; all seeded.

    A missing split gets ``round(fraction * n)`` rows (at least 1) of the n train rows there were
    before any cut; caps take a seeded (stratified when possible) sample of a split.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise LsqError(f"val_fraction: {val_fraction} and test_fraction {test_fraction} must lie in (0, 1), sum below 1")
    train, val, test = dsd["train"], dsd.get("validation"), dsd.get("test")
    n = len(train)
    if test is None:
        train, test = _split(train, max(1, round(test_fraction * n)), seed, stratify, "test")
    if val is None:
        train, val = _split(train, max(1, round(val_fraction * n)), seed, stratify, "validation")
    out = DatasetDict(train=_cap(train, max_train, seed, stratify), validation=_cap(val, max_eval, seed, stratify),
                      test=_cap(test, max_eval, seed, stratify))
    with no_progress_bars():  # contiguous rows: later reads (label values, tokenising) flatten nothing, draw no bar
        out = DatasetDict({name: ds.flatten_indices() if ds._indices is not None else ds for name, ds in out.items()})
    for name, ds in out.items():
        if len(ds) == 0:
            raise LsqError(f"split {name!r} is empty")
    return out


def _split(ds: Dataset, size: int, seed: int, stratify: str | None, what: str) -> tuple[Dataset, Dataset]:
    """(rest, part): ``size`` rows cut from ``ds`` by a seeded shuffle; stratified when every class allows."""
    if size >= len(ds):
        raise LsqError(f"split 'train' has {len(ds)} rows: too few to cut a {what} split of {size} rows from")
    with no_progress_bars():
        if ds._indices is not None:  # a selection: datasets would read the stratify column row by row (2x slower)
            ds = ds.flatten_indices()  # the same rows in the same order, so the same split
        for strat in ([stratify, None] if stratify else [None]):
            try:
                parts = ds.train_test_split(test_size=size, seed=seed, stratify_by_column=strat)
                return parts["train"], parts["test"]
            except ValueError as exc:
                error = exc  # too few rows of some class to stratify: fall back to a plain seeded split
    raise LsqError(f"split 'train' ({len(ds)} rows) cannot give a {what} split of {size} rows: {error}")


def _cap(ds: Dataset, cap: int | None, seed: int, stratify: str | None) -> Dataset:
    if cap is None or len(ds) <= cap:
        return ds
    return _split(ds, cap, seed, stratify, "capped")[1]


# ----------------------------------------------------------------------------------------- columns


def _table(ds: Dataset) -> pa.Table:
    return ds.with_format("arrow")[:]


def _column(dsd: DatasetDict, key: str, column: str) -> dict[str, pa.ChunkedArray]:
    """``column`` of every split; an LsqError naming the key, the split and the columns present if absent."""
    out = {}
    for split, ds in dsd.items():
        if column not in ds.column_names:
            raise LsqError(f"{key}: column {column!r} not in split {split!r} (columns: {', '.join(ds.column_names)})")
        out[split] = _table(ds).column(column)
        if out[split].null_count:
            raise LsqError(f"{key}: column {column!r} of split {split!r} has {out[split].null_count} missing values")
    return out


def _check_text(dsd: DatasetDict, key: str, column: str) -> None:
    for split, arr in _column(dsd, key, column).items():
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            raise LsqError(f"{key}: column {column!r} of split {split!r} holds {arr.type}, not text")


def _classification(dsd: DatasetDict, cfg: DataConfig) -> DatasetDict:
    _check_text(dsd, "text_column", cfg.text_column)
    labels = _column(dsd, "label_column", cfg.label_column)
    feature = dsd["train"].features[cfg.label_column]
    kinds = {_label_kind(a.type) for a in labels.values()}
    if len(kinds) > 1:
        types = ", ".join(f"{s} {a.type}" for s, a in labels.items())
        raise LsqError(f"label_column: splits disagree on the type of column {cfg.label_column!r} ({types})")
    kind = kinds.pop()
    if kind == "string":
        seen = sorted({v for a in labels.values() for v in pc.unique(a).to_pylist()})
        names = list(cfg.label_names) if cfg.label_names else seen
        unknown = [v for v in seen if v not in names]
        if unknown:
            raise LsqError(f"label_column: value {unknown[0]!r} is not one of label_names {names}")
    elif kind == "number":
        ints = {}
        for split, arr in labels.items():
            values = pc.unique(arr).to_pylist()
            bad = [v for v in values if isinstance(v, float) and not (math.isfinite(v) and v.is_integer())]
            if bad:
                raise LsqError(f"label_column: value {bad[0]!r} in split {split!r} is not an integer")
            ints[split] = [int(v) for v in values]
        default = feature.names if isinstance(feature, ClassLabel) else None
        names = list(cfg.label_names or default or [str(i) for i in range(max(max(v) for v in ints.values()) + 1)])
        for split, values in ints.items():
            outside = [v for v in values if not 0 <= v < len(names)]
            if outside:
                raise LsqError(f"label_column: label {outside[0]} in split {split!r} is out of range 0..{len(names) - 1}")
    else:
        raise LsqError(f"label_column: column {cfg.label_column!r} holds {kind}, not integer or string labels")
    if len(names) < 2:
        raise LsqError(f"label_column: only one class ({names[0]!r}); classification needs at least 2")
    if pc.count_distinct(labels["train"]).as_py() < 2:
        raise LsqError(f"label_column: split 'train' holds a single class ({pc.unique(labels['train'])[0]}); "
                       "classification needs at least 2")
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    out = {}
    for split, ds in dsd.items():
        ds = ds.select_columns([cfg.text_column, cfg.label_column])
        f = ds.features[cfg.label_column]
        if isinstance(f, Value) and (f.dtype.startswith("float") or f.dtype == "bool"):
            ds = ds.cast_column(cfg.label_column, Value("int64"))
        ds = ds.rename_columns({c: n for c, n in [(cfg.text_column, "text"), (cfg.label_column, "label")] if c != n})
        out[split] = ds.cast(features)
    return DatasetDict(out)


def _label_kind(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return "number"
    return str(t)


def _causal_lm(dsd: DatasetDict, cfg: DataConfig) -> DatasetDict:
    _check_text(dsd, "prompt_column", cfg.prompt_column)
    _check_text(dsd, "answer_column", cfg.answer_column)
    for split, arr in _column(dsd, "answer_column", cfg.answer_column).items():
        blank = [i for i, a in enumerate(arr.to_pylist()) if not a.strip()]
        if blank:
            raise LsqError(f"answer_column: row {blank[0]} of split {split!r} has an empty answer "
                           f"({len(blank)} such rows); every row needs the answer to train on")
    mapping = {cfg.prompt_column: "prompt", cfg.answer_column: "answer"}
    if cfg.choices_column is not None:
        for split, arr in _column(dsd, "choices_column", cfg.choices_column).items():
            if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)) or not (
                    pa.types.is_string(arr.type.value_type) or pa.types.is_large_string(arr.type.value_type)):
                raise LsqError(f"choices_column: column {cfg.choices_column!r} of split {split!r} holds {arr.type}, "
                               "not lists of strings")
            answers = _table(dsd[split]).column(cfg.answer_column).to_pylist()
            for i, (choices, answer) in enumerate(zip(arr.to_pylist(), answers)):
                if answer not in choices:
                    raise LsqError(f"answer_column: answer {answer!r} in row {i} of split {split!r} is not one of "
                                   f"its choices {choices}")
        mapping[cfg.choices_column] = "choices"
    out = {}
    for split, ds in dsd.items():
        ds = ds.select_columns(list(mapping)).rename_columns({c: n for c, n in mapping.items() if c != n})
        out[split] = ds.cast_column("prompt", Value("string")).cast_column("answer", Value("string"))
    return DatasetDict(out)


# ------------------------------------------------------------------------------------- fingerprint


def num_labels_of(dsd: DatasetDict) -> int:
    """The number of classes of a classification DatasetDict: one more than the largest label in any split."""
    labels = [int(x) for split in dsd.values() for x in split.unique("label")]
    return max(labels) + 1


def fingerprint(dsd: DatasetDict) -> str:
    """sha256 (first 16 hex digits) of the content: every split's name, columns, class names and rows in order.

    Independent of ``datasets``' own (random, per-process) fingerprints, of the Arrow layout and of the
    split order in the dict; it changes when any value, row order, column name or class name changes.
    """
    digest = hashlib.sha256()
    for name in sorted(dsd):
        ds = dsd[name].with_format(None)
        labels = {c: f.names for c, f in ds.features.items() if isinstance(f, ClassLabel)}
        digest.update(_canon({"split": str(name), "columns": ds.column_names, "class_names": labels, "rows": len(ds)}))
        for batch in ds.iter(batch_size=1000):
            for row in zip(*(batch[c] for c in ds.column_names)):
                digest.update(_canon(list(row)))
    return digest.hexdigest()[:16]


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default).encode() + b"\n"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"bytes": obj.hex()}
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    return {"repr": str(obj)}
