"""PEFT LoRA adapter folders: find the LoRA modules of a state dict, read and write folders.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or a legacy
``adapter_model.bin``, read with ``torch.load(weights_only=True)``, PyTorch's safe unpickler). Saved
keys look like ``base_model.model.<module>.lora_A.weight`` (Linear, Conv) or
``base_model.model.<module>.lora_embedding_A`` (Embedding). No base model is needed.

The config is handled as the JSON dict PEFT wrote, so every field lsq does not touch is written back
unchanged; rank and alpha resolution follows ``peft.utils.other.get_pattern_key`` (first key ``k`` of
``rank_pattern`` / ``alpha_pattern`` with ``re.match(rf"(.*\\.)?({k})$", module_name)``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lsq.errors import LsqError, write_failure
from lsq.workdir import discard_temporary, new_temporary

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# (suffix of the A key, suffix of the B key, kind)
_FACTOR_KEYS = (
    (".lora_A.weight", ".lora_B.weight", "linear"),
    (".lora_embedding_A", ".lora_embedding_B", "embedding"),
)
# LoRA variants whose factors do not form dW = s * B @ A the way plain LoRA and DoRA do.
_UNSUPPORTED_FIELDS = ("use_qalora", "target_parameters", "velora_config", "alora_invocation_tokens")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module of an adapter: where its factors live and how they are scaled."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    key_a: str  # state-dict key of A
    key_b: str  # state-dict key of B
    kind: Literal["linear", "embedding"]  # conv modules are "linear" with 4-D factors
    rank: int  # r from the config (rank_pattern resolved)
    alpha: float  # lora_alpha (alpha_pattern resolved)
    use_rslora: bool

    @property
    def scale(self) -> float:
        return scale_of(self.alpha, self.rank, self.use_rslora)


def scale_of(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pattern_key(patterns: Mapping[str, Any], name: str, where: str = "pattern") -> str | None:
    """The key of ``patterns`` that PEFT applies to module ``name``, or None (same rule as PEFT).

    A key that is not a valid regular expression is an LsqError naming ``where`` and the key.
    """
    for key in patterns:
        if _pattern_regex(where, key).match(name):
            return key
    return None


def _pattern_regex(where: str, key: str) -> re.Pattern[str]:
    """PEFT's regex for a rank_pattern / alpha_pattern key; a bad key is an LsqError, not re.error."""
    try:
        return re.compile(rf"(.*\.)?({key})$")
    except re.error as exc:
        raise LsqError(f"{where}: key {key!r} is not a valid regular expression ({exc.msg})") from None


def validate_config(config: Mapping[str, Any], where: str = CONFIG_NAME) -> None:
    """Refuse configs lsq cannot squeeze, naming the key and its value."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise LsqError(f"{where}: peft_type is {peft_type!r}; lsq squeezes LoRA adapters (peft_type 'LORA') only")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise LsqError(f"{where}: {key} must be a positive number, got {value!r}")
    for key in _UNSUPPORTED_FIELDS:
        if config.get(key):
            raise LsqError(f"{where}: {key}={config[key]!r} is a LoRA variant lsq does not squeeze")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise LsqError(f"{where}: {key} must be a JSON object, got {patterns!r}")
        for name, value in patterns.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise LsqError(f"{where}: {key}[{name!r}] must be a positive number, got {value!r}")
            _pattern_regex(f"{where}: {key}", name)  # PEFT would raise re.error when it loads the adapter


def find_modules(keys: list[str] | tuple[str, ...], config: Mapping[str, Any]) -> list[LoraModule]:
    """The LoRA modules named by a state dict's keys, with rank and alpha resolved from the config."""
    validate_config(config)
    key_set = set(keys)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules = []
    for key in keys:
        for suffix_a, suffix_b, kind in _FACTOR_KEYS:
            if not key.endswith(suffix_a):
                continue
            stem = key[: -len(suffix_a)]
            key_b = stem + suffix_b
            if key_b not in key_set:
                raise LsqError(f"adapter weights: {key} has no matching {key_b}")
            name = stem.removeprefix(PREFIX)
            r_key = pattern_key(rank_pattern, name, "rank_pattern")
            a_key = pattern_key(alpha_pattern, name, "alpha_pattern")
            modules.append(
                LoraModule(
                    name=name,
                    key_a=key,
                    key_b=key_b,
                    kind=kind,
                    rank=int(rank_pattern[r_key] if r_key is not None else config["r"]),
                    alpha=float(alpha_pattern[a_key] if a_key is not None else config["lora_alpha"]),
                    use_rslora=bool(config.get("use_rslora", False)),
                )
            )
    if not modules:
        raise LsqError("adapter weights hold no LoRA factors (no '*.lora_A.weight' or '*.lora_embedding_A' keys)")
    return modules


class LazyWeights(Mapping[str, torch.Tensor]):
    """Read-only mapping over a safetensors file that loads one tensor at a time (bounded memory).

    safetensors memory-maps the file, and every page read stays in the process's resident set while
    the handle lives: reading a whole adapter through one handle adds the file's size to peak RSS.
    The handle is therefore reopened after every ``REOPEN_BYTES`` read, which bounds that growth
    (tensors already returned keep their own pages until they are dropped).
    """

    REOPEN_BYTES = 64 * 2**20

    def __init__(self, path: Path):
        self.path = path
        self._file = self._open()
        self._keys = tuple(self._file.keys())
        self._read = 0  # bytes read through the current handle

    def _open(self):
        try:
            return safe_open(str(self.path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise LsqError(f"{self.path}: not a readable safetensors file ({exc})") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        if self._read >= self.REOPEN_BYTES:
            self._file, self._read = self._open(), 0  # drops the old mapping and its resident pages
        try:
            tensor = self._file.get_tensor(key)
        except Exception as exc:
            raise LsqError(f"{self.path}: tensor {key!r} cannot be read ({exc})") from None
        self._read += tensor.numel() * tensor.element_size()
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], Mapping[str, torch.Tensor]]:
    """``(config dict, weights mapping)`` of a PEFT adapter folder, without loading a base model."""
    folder = Path(path)
    if not folder.is_dir():
        raise LsqError(f"{folder}: adapter folder not found")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise LsqError(f"{config_path}: missing; a PEFT adapter folder needs {CONFIG_NAME}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LsqError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LsqError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    validate_config(config, str(config_path))
    if (folder / WEIGHTS_NAME).is_file():
        return config, LazyWeights(folder / WEIGHTS_NAME)
    if (folder / LEGACY_WEIGHTS_NAME).is_file():
        try:  # weights_only=True: PyTorch's restricted unpickler, no arbitrary code
            weights = torch.load(folder / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's message is several paragraphs: keep the lines that say what failed
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
            detail = " ".join(ln for ln in lines if not ln.startswith(boiler)) or (lines[0] if lines else repr(exc))
            raise LsqError(f"{folder / LEGACY_WEIGHTS_NAME}: refused by the safe loader ({detail})") from None
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise LsqError(f"{folder / LEGACY_WEIGHTS_NAME}: expected a state dict of tensors, got {type(weights).__name__}")
        return config, weights
    raise LsqError(f"{folder}: no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in the adapter folder")


def write_adapter(folder: Path, config: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> None:
    """Write a PEFT adapter folder's two files into ``folder`` (which the caller makes atomic).

    A failed write raises OSError naming the file (safetensors' own error, which names none, included)."""
    folder.mkdir(parents=True, exist_ok=True)
    # no sort_keys: PEFT applies the first matching rank_pattern key, so their order must survive
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.contiguous() for k, v in weights.items()}
    try:
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    except SafetensorError as exc:
        failure = write_failure(exc, folder / WEIGHTS_NAME)
        if failure is None:
            raise
        raise OSError(failure.errno, failure.strerror, failure.filename) from None


class AtomicFolder:
    """Build a folder under a temporary name beside ``target`` and rename it into place on success.

    On an exception nothing is left behind and an existing ``target`` is untouched. An existing
    ``target`` is replaced only with ``force=True``: checked before any work starts, and again by the
    final rename, which never replaces a ``target`` that another writer created meanwhile (two
    ``lsq squeeze`` runs to one new folder: one wins, the other is refused and leaves nothing).
    A write that fails (disk full, no permission) is raised as :class:`lsq.errors.WriteFailed` naming the
    file as it would have been under ``target``, once the temporary folder is gone.
    """

    FORCE_ATTEMPTS = 10  # force: times a target that keeps reappearing is moved aside before giving up

    def __init__(self, target: str | os.PathLike, force: bool = False):
        self.target = Path(target)
        self.force = force
        if self.target.exists() and not force:
            raise LsqError(f"{self.target}: output folder exists; pass --force to replace it")
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise (write_failure(exc, self.target) or exc) from None
        try:  # registered before it exists, removed at exit if a signal lands before __exit__ can run
            self.tmp = new_temporary(self.target.parent, f".{self.target.name}.")
        except OSError as exc:
            raise (write_failure(exc, self.target) or exc) from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            try:
                if exc_type is None and self.force:
                    self._replace()
                elif exc_type is None:
                    self._publish()
            finally:
                self._remove_tmp()  # nothing there any more after a successful rename
        except Exception as failed:  # the rename itself
            if (failure := write_failure(failed, self._as_target(failed))) is not None:
                raise failure from None
            raise
        if isinstance(exc, Exception) and (failure := write_failure(exc, self._as_target(exc))) is not None:
            raise failure from None

    def _as_target(self, exc: BaseException) -> Path:
        """The file an I/O error names inside the temporary folder, as it would have been under ``target``."""
        for name in (getattr(exc, "filename", None), getattr(exc, "filename2", None)):
            if isinstance(name, (str, bytes, os.PathLike)):
                with contextlib.suppress(ValueError):
                    return self.target / Path(os.fsdecode(name)).relative_to(self.tmp)
        return self.target

    def _remove_tmp(self) -> None:
        discard_temporary(self.tmp)

    def _publish(self) -> None:
        """Rename the finished folder into place, refusing a target that appeared while it was written."""
        try:
            rename_no_replace(self.tmp, self.target)
        except FileExistsError:
            raise LsqError(
                f"{self.target}: output folder appeared while writing; pass --force to replace it"
            ) from None

    def _replace(self) -> None:
        """Move any target aside and rename the finished folder into place; the old one is deleted after."""
        aside: list[Path] = []
        try:
            for attempt in range(self.FORCE_ATTEMPTS):
                old = self.tmp.with_name(f"{self.tmp.name}.old{attempt}")  # unique as the tmp name is
                aside.append(old)  # before the move: a signal right after it must still find the old folder
                try:
                    os.replace(self.target, old)
                except FileNotFoundError:
                    aside.pop()  # no target (or another writer moved it away first)
                try:
                    rename_no_replace(self.tmp, self.target)
                    return
                except FileExistsError:
                    continue  # another writer put a folder there between the two renames: again
            raise LsqError(f"{self.target}: output folder kept reappearing while being replaced; try again")
        except BaseException:
            if aside and not os.path.lexists(self.target):  # put the original back
                with contextlib.suppress(OSError):
                    rename_no_replace(aside.pop(0), self.target)
            raise
        finally:
            for old in aside:
                _remove(old)


def _remove(path: Path) -> None:
    """Delete a folder (or a file or link that stood where a folder was expected), quietly."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


_AT_FDCWD = -100  # renameat2's "relative to the current directory" (paths here are absolute or relative)
_RENAME_NOREPLACE = 1


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """glibc's ``renameat2`` (Linux 3.15+), or None where the C library has none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # macOS, musl without it, Windows
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def rename_no_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError when ``dst`` exists, even as an empty folder.

    ``os.rename`` of a folder replaces an empty folder at ``dst`` and fails on a non-empty one only,
    so it cannot tell "mine" from "appeared meanwhile". Linux's ``renameat2(RENAME_NOREPLACE)`` refuses
    any existing ``dst`` atomically. Where it is missing (other systems, filesystems without the flag)
    an exclusive ``mkdir(dst)`` claims the name and the rename replaces that empty claim.
    """
    rename = _renameat2()
    if rename is not None:
        if rename(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # those: no RENAME_NOREPLACE here
            raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))  # EEXIST: FileExistsError
    os.mkdir(dst)  # FileExistsError when taken
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):  # a forced writer replaced the claim meanwhile
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst)) from None
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        raise
