"""The exception types lsq raises for bad input and failed writes; the CLI prints each as a single line."""

from __future__ import annotations

import errno
import os
import re


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """``exc`` as the one line lsq prints after ``error:``: a pydantic ValidationError as ``key.sub: problem (got VALUE); ...``,
    anything else as its message with the line breaks folded (its type's name when it has none), cut at ``limit``."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and type(exc).__name__ == "ValidationError":
        parts = []
        for e in errors():
            loc = ".".join(str(x) for x in e.get("loc", ()))
            msg = e.get("msg", "").removeprefix("Value error, ")
            got = e.get("input")
            if not loc:  # a whole-config check: its message already starts with the key at fault
                parts.append(msg)
                continue
            parts.append(f"{loc}: {msg}" + ("" if isinstance(got, dict) else f" (got {got!r})"))
        return "; ".join(parts)
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


class LsqError(ValueError):
    """Bad input or a refused operation. The message names the file, key or value at fault."""


class TrainingDiverged(LsqError):
    """Training ended with a non-finite loss: a result for a study, bad settings for a pipeline."""


class WriteFailed(OSError):
    """A file lsq writes could not be written (disk full, no permission, read-only file system), and the writer has
    removed what it had begun: ``cannot write PATH: CAUSE (errno N); nothing was written``. An OSError, not an
    LsqError: the same input can succeed once there is room (a pipeline step retries it)."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror} (errno {self.errno}); nothing was written"


_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust writer reports an I/O error


def write_failure(exc: BaseException, path: str | os.PathLike) -> WriteFailed | None:
    """``exc``, raised while writing ``path``, as a :class:`WriteFailed` naming ``path``; None when it is not an
    I/O failure. Recognised: an OSError with an errno, safetensors' ``SafetensorError`` wrapping one
    (``I/O error: No space left on device (os error 28)``), and torch's zip writer's RuntimeError, which gives
    no errno (taken as a full disk when the file system under ``path`` has less than 1 MiB left)."""
    if isinstance(exc, OSError):  # a WriteFailed too: named anew (a file inside a temporary folder, say)
        code = exc.errno
    elif type(exc).__name__ == "SafetensorError" and (found := _OS_ERROR.search(str(exc))):
        code = int(found[1])
    elif isinstance(exc, RuntimeError) and "inline_container" in str(exc):
        code = errno.ENOSPC if _free_bytes(path) < 2**20 else None
    else:
        code = None
    return WriteFailed(code, os.strerror(code), os.fspath(path)) if code is not None else None


def _free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path`` (its nearest existing parent)."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize
