"""The built-in real data: the four human-rated sentence sets of VADER (Hutto & Gilbert, ICWSM 2014).

They ship inside the source distribution of the PyPI package ``vaderSentiment==3.3.2`` (MIT), as
``additional_resources/hutto_ICWSM_2014.tar.gz``, a tar.gz inside the tar.gz. Each set is one
tab-separated file ``id<TAB>mean rating (-4..4)<TAB>text`` with CRLF line ends. This module fetches the
sdist once with pip, refuses it unless its sha256 matches, reads the four members as bytes (nothing is
extracted to disk, so no member path is ever trusted) and caches the parsed rows as JSON lines under
:func:`cache_dir`, written atomically. A later call reads the cache and never runs pip.

Pure I/O and parsing; turning the rows into ``datasets`` splits is :func:`lsq.data.builtin_dataset`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lsq.errors import LsqError
from lsq.workdir import atomic_write

VADER_VERSION = "3.3.2"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = f"vaderSentiment-{VADER_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
#: Set name -> member of the inner archive (the "GroundTruth" files hold the mean ratings).
VADER_FILES = {
    "movie": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "amazon": "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
    "nyt": "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
    "tweets": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
}
_MAX_MEMBER_BYTES = 64 * 2**20  # the real members are 0.4-2.5 MB; refuse anything absurd
_CACHE_FORMAT = 1


def cache_dir() -> Path:
    """The user's lsq cache folder: ``$LSQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/lsq``, else ``~/.cache/lsq``."""
    if os.environ.get("LSQ_CACHE_DIR"):
        return Path(os.environ["LSQ_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lsq"
    return Path.home() / ".cache" / "lsq"


def vader_rows(*, source: str | Path | None = None, sha256: str | None = None) -> dict[str, list[dict]]:
    """Every row of the four sets, zero ratings included, in file order: ``{set: [{id, rating, text}]}``.

    ``source`` is a local copy of the sdist (default: ``$LSQ_VADER_SDIST``, else ``pip download``);
    ``sha256`` is the digest it must have (default :data:`VADER_SHA256`; tests pass that of a fake
    sdist). Reads the cache when it holds a complete, intact copy for this digest; otherwise builds it.
    """
    sha256 = (sha256 or VADER_SHA256).lower()
    folder = cache_dir() / f"vader-{VADER_VERSION}" / sha256[:16]
    cached = _read_cache(folder, sha256)
    if cached is not None:
        return cached
    source = source or os.environ.get("LSQ_VADER_SDIST") or None
    if source is not None:
        rows = _rows_from_sdist(Path(source).expanduser(), sha256)
    else:
        with tempfile.TemporaryDirectory(prefix="lsq-vader-") as tmp:
            rows = _rows_from_sdist(download_sdist(Path(tmp)), sha256)
    _write_cache(folder, sha256, rows)
    return rows


def download_sdist(dest: Path) -> Path:
    """``pip download`` the vaderSentiment sdist (no wheel, no dependencies) into ``dest``; its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           "--disable-pip-version-check", f"vaderSentiment=={VADER_VERSION}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(dest.glob(f"vaderSentiment-{VADER_VERSION}.tar.gz")) + sorted(dest.glob("*.tar.gz"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
        raise LsqError(f"builtin data: pip download vaderSentiment=={VADER_VERSION} failed: {last}")
    return found[0]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rows_from_sdist(path: Path, sha256: str) -> dict[str, list[dict]]:
    if not path.is_file():
        raise LsqError(f"builtin data: sdist {str(path)!r} is not a file")
    got = file_sha256(path)
    if got != sha256:
        raise LsqError(f"builtin data: sdist {str(path)!r} has sha256 {got}, expected {sha256}; refusing it")
    members = read_members(path)
    return {name: parse_ratings(members[name], VADER_FILES[name]) for name in VADER_FILES}


def read_members(sdist: Path) -> dict[str, bytes]:
    """The four set files as bytes, read from the inner archive in memory (nothing touches the disk)."""
    try:
        with tarfile.open(sdist, mode="r:gz") as outer:
            inner = _member_bytes(outer, INNER_ARCHIVE, str(sdist))
        with tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz") as tar:
            return {name: _member_bytes(tar, member, INNER_ARCHIVE) for name, member in VADER_FILES.items()}
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise LsqError(f"builtin data: cannot read {str(sdist)!r} as a tar.gz ({exc})") from None


def _member_bytes(tar: tarfile.TarFile, name: str, where: str) -> bytes:
    try:
        info = tar.getmember(name)
    except KeyError:
        raise LsqError(f"builtin data: {where!r} has no member {name!r}") from None
    if not info.isfile() or info.size > _MAX_MEMBER_BYTES:
        raise LsqError(f"builtin data: member {name!r} of {where!r} is not a regular file of sane size")
    f = tar.extractfile(info)
    assert f is not None  # a regular file always has a file object
    return f.read()


def parse_ratings(raw: bytes, where: str) -> list[dict]:
    """Rows ``{id, rating, text}`` from ``id<TAB>rating<TAB>text`` lines (CRLF or LF; blank lines skipped).

    Decoded as UTF-8; an undecodable byte becomes U+FFFD (deterministic). The text is stripped of
    surrounding whitespace and otherwise kept as is (the tweets keep HTML entities such as ``&amp;``).
    """
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            rating = float(parts[1])
        except (IndexError, ValueError):
            raise LsqError(f"builtin data: {where} line {lineno} is not id<TAB>rating<TAB>text: {line[:60]!r}") from None
        rows.append({"id": parts[0].strip(), "rating": rating, "text": parts[2].strip() if len(parts) > 2 else ""})
    return rows


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def _write_cache(folder: Path, sha256: str, rows: dict[str, list[dict]]) -> None:
    """One jsonl per set, then ``meta.json`` (the completion mark) with the sdist digest and file digests."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, set_rows in rows.items():
        data = _jsonl(set_rows)
        atomic_write(folder / f"{name}.jsonl", data)
        files[name] = {"rows": len(set_rows), "sha256": hashlib.sha256(data).hexdigest()}
    meta = {"format": _CACHE_FORMAT, "sdist_sha256": sha256, "version": VADER_VERSION, "files": files}
    atomic_write(folder / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode("utf-8"))


def _read_cache(folder: Path, sha256: str) -> dict[str, list[dict]] | None:
    """The cached rows, or None when the cache is absent, from another sdist, incomplete or altered."""
    try:
        meta = json.loads((folder / "meta.json").read_text("utf-8"))
        if meta.get("format") != _CACHE_FORMAT or meta.get("sdist_sha256") != sha256:
            return None
        out = {}
        for name in VADER_FILES:
            data = (folder / f"{name}.jsonl").read_bytes()
            if hashlib.sha256(data).hexdigest() != meta["files"][name]["sha256"]:
                return None
            out[name] = [json.loads(line) for line in data.decode("utf-8").split("\n") if line]
        return out
    except (OSError, ValueError, KeyError, TypeError):
        return None
