"""The one way lsq reads a config: a YAML file (or a dict, or nothing for the defaults), ``key.sub=value``
overrides parsed as YAML on top, then a pydantic model's validation. Every error is one line naming the file,
the override or the key at fault (:func:`lsq.errors.one_line` renders validation errors). Also the
``--settings`` listing of a config, every key with its value and meaning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from lsq.errors import LsqError, one_line

M = TypeVar("M", bound=BaseModel)


def load_config(model: type[M], source: str | Path | dict[str, Any] | BaseModel | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> M:
    """``model`` from ``source`` (a YAML path, a dict, a model to start from, or None: the defaults) with
    ``overrides`` applied; an :class:`LsqError` of one line on any problem."""
    if isinstance(source, BaseModel):
        raw = source.model_dump()
    elif isinstance(source, dict):
        raw = dict(source)
    elif source is None:
        raw = {}
    else:
        raw = read_yaml_mapping(source)
    try:
        return model.model_validate(apply_overrides(raw, list(overrides)))
    except ValidationError as exc:
        raise LsqError(one_line(exc)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.sub=value`` overrides (values parsed as YAML) applied to a nested dict."""
    out = dict(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LsqError(f"override {item!r}: expected key=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[parts[-1]] = _override_value(item, value)
    return out


def _override_value(item: str, value: str) -> Any:
    """An override's value parsed as YAML; malformed YAML (``rank=[1``) is an LsqError naming the override."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        # a MarkedYAMLError says what it was parsing and what it found; its str() adds multi-line marks
        words = [w for w in (getattr(exc, "context", None), getattr(exc, "problem", None)) if w]
        detail = ": ".join(words) or str(exc).splitlines()[0]
        raise LsqError(f"override {item!r}: value is not valid YAML ({detail})") from None


def config_and_overrides(config: str | None, overrides: list[str] | tuple[str, ...]) -> tuple[str | None, list[str]]:
    """A command line's config file and overrides: a ``key=value`` in the config slot is an override, not a file
    (``lsq train method=in``, ``python -m flows.squeeze_pipeline source_rank=32``)."""
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, list(overrides)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; one-line errors for a missing file, bad YAML or a non-mapping."""
    p = Path(path)
    if not p.is_file():
        raise LsqError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LsqError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise LsqError(f"{p}: expected a mapping at the top level")
    return raw


def settings_lines(config) -> list[str]:
    """Every setting of the pydantic ``config`` (nested models flattened), one line each: the dotted
    ``key=value`` as an override would write it, then the field's description, in aligned columns."""
    rows = []

    def walk(model, prefix: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if hasattr(type(value), "model_fields"):  # a nested settings model
                walk(value, f"{prefix}{name}.")
                continue
            rows.append((f"{prefix}{name}={as_override(value)}", field.description or ""))

    def as_override(value) -> str:
        try:
            if isinstance(value, str) and yaml.safe_load(value) == value:
                return value  # reads back as itself: no quotes needed
        except yaml.YAMLError:
            pass
        return json.dumps(list(value) if isinstance(value, tuple) else value, default=str, separators=(",", ": "))

    walk(config, "")
    width = min(max(len(setting) for setting, _ in rows), 48)
    return [f"{setting:<{width}}  {meaning}".rstrip() for setting, meaning in rows]
