"""Why a local data file cannot be read: one line that names the file, the place and the fix.

datasets wraps a reader's failure in ``DatasetGenerationError: An error occurred while generating the
dataset`` and logs the cause above it. :func:`explain` finds the cause in the exception chain
(``__cause__``/``__context__``: a ``UnicodeDecodeError``, pandas' ``ParserError`` or ``EmptyDataError``,
pyarrow's JSON error) and re-reads the files to say where: datasets' own positions count from the start
of a chunk or a block, not of the file. Only a failure pays for the re-reading. For example (each one line)::

    source: data.csv is not utf-8 (byte 0xe9 at offset 14, line 2); re-save it as UTF-8 or set data.encoding=latin-1
    source: data.csv line 1: the header 'text;label' has no comma but a semicolon; a .csv is read
        comma-separated: re-save it with commas (text that holds commas in double quotes)
    source: data.csv line 7 has 3 fields, the header 2; put text that holds commas in double quotes ("good, not great")
    source: data.jsonl line 3 is not a JSON object (Expecting ',' delimiter at column 14); fix or delete that line
        (a JSON lines file holds one object per line)
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

TEXT_SUFFIXES = (".csv", ".json", ".jsonl")
SEPARATORS = {"\t": "a tab", ";": "a semicolon", "|": "a pipe"}
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
_CHUNK = 1 << 20


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from or while handling, down the chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the first exception in the chain that is not datasets' wrapper around it."""
    found = next((c for c in causes(exc) if type(c).__name__ not in ("DatasetGenerationError", "DatasetBuildError")),
                 exc)
    detail = (str(found).strip().splitlines() or [""])[0][:200]
    return f"{type(found).__name__}: {detail}" if detail else type(found).__name__


def explain(exc: BaseException, files: Sequence[Path], encoding: str) -> str | None:
    """The line for ``exc``, raised by datasets while reading ``files``; None when the files show nothing
    (the caller then names the root cause). A file that does not decode, or holds nothing, is the answer
    whatever the reader said; else the check follows the cause: pandas' ``ParserError`` (a row with more
    fields than the header, or another separator), or any failure of the JSON reader."""
    text_files = [f for f in files if f.suffix.lower() in TEXT_SUFFIXES and f.is_file()]
    found = next(filter(None, (not_decodable(f, encoding) for f in text_files)), None)
    if found:
        return found
    blank = next((f for f in text_files if _blank(f)), None)
    if blank is not None:  # pandas: EmptyDataError; the JSON reader: StopIteration
        return _empty(blank, len(files))
    names = {type(c).__name__ for c in causes(exc)}
    csv_files = [f for f in text_files if f.suffix.lower() == ".csv"]
    json_files = [f for f in text_files if f.suffix.lower() != ".csv"]
    if "ParserError" in names:  # pandas: a row with more fields than the header
        return next(filter(None, (_csv_problem(f, encoding) for f in csv_files)), None)
    if json_files:
        return next(filter(None, (_json_problem(f, encoding) for f in json_files)), None)
    return None


def _blank(path: Path) -> bool:
    """True for a file of nothing but white space (one larger than a chunk is not read: it holds something)."""
    size = path.stat().st_size
    return size == 0 or (size <= _CHUNK and not path.read_bytes().strip())


def no_rows(files: Sequence[Path], encoding: str) -> str:
    """The line for files that hold no rows (datasets: ``Instruction "train" corresponds to no data``)."""
    for f in files:
        if not _blank(f):
            with open(f, encoding=encoding, errors="replace") as text:
                first = next((line.strip() for line in text if line.strip()), "")
            if f.suffix.lower() == ".csv":
                return f"source: {f} has only its header line {first[:80]!r}, no rows; add rows below the header"
            return f"source: {f} holds no rows; add one JSON object per line"
    return _empty(files[0], len(files))


def _empty(path: Path, files: int) -> str:
    return (f"source: {path} is empty ({path.stat().st_size} bytes); fill it"
            + (" or leave it out of data.source" if files > 1 else ""))


def not_decodable(path: Path, encoding: str) -> str | None:
    """The line for the first byte of ``path`` that ``encoding`` cannot decode, or None."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    offset = lines = 0
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        while True:
            chunk = f.read(_CHUNK)
            pending = decoder.getstate()[0]  # bytes held back from the last chunk (half a character)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                at = offset - len(pending) + exc.start
                bad = exc.object[exc.start:exc.end] or b"?"
                lines += (pending + chunk)[: exc.start].count(b"\n")
                break
            if not chunk:
                return None
            offset += len(chunk)
            lines += chunk.count(b"\n")
    where = f"byte 0x{bad[0]:02x} at offset {at}, line {lines + 1}"
    bom = next((name for mark, name in _BOMS if head.startswith(mark)), None)
    if bom is not None and at == 0:
        where += f": a {bom.upper()} byte-order mark"
        use = bom
    else:  # 0x80-0x9f are C1 controls in latin-1 but curly quotes and dashes in Windows' cp1252
        use = "cp1252" if 0x80 <= bad[0] <= 0x9F else "latin-1"
    return f"source: {path} is not {encoding} ({where}); re-save it as UTF-8 or set data.encoding={use}"


def separator_problem(path: Path, encoding: str) -> str | None:
    """The line for a .csv whose header holds no comma but another separator (one column to a comma reader)."""
    with open(path, encoding=encoding, errors="replace", newline="") as f:
        header = f.readline().rstrip("\r\n")
    if "," in header:
        return None
    for sep, name in SEPARATORS.items():
        if sep in header:
            return (f"source: {path} line 1: the header {header[:80]!r} has no comma but {name}; a .csv is read "
                    "comma-separated: re-save it with commas (text that holds commas in double quotes)")
    return None


def _csv_problem(path: Path, encoding: str) -> str | None:
    """A header read as one column, or the first row with more fields than the header."""
    found = separator_problem(path, encoding)
    if found:
        return found
    with open(path, encoding=encoding, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        for row in reader:
            if len(row) > len(header):
                return (f"source: {path} line {reader.line_num} has {len(row)} fields, the header {len(header)}; "
                        'put text that holds commas in double quotes ("good, not great")')
    return None


def _json_problem(path: Path, encoding: str) -> str | None:
    """The first line of a JSON lines file that is not a JSON object, or where a JSON array breaks."""
    with open(path, encoding=encoding) as f:
        start = f.read(_CHUNK).lstrip()[:1]
        f.seek(0)
        if start == "[":  # one JSON array of objects
            try:
                json.load(f)
            except json.JSONDecodeError as exc:
                return (f"source: {path} line {exc.lineno}, column {exc.colno} breaks its JSON array ({exc.msg}); "
                        "fix it there")
            return None
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                return (f"source: {path} line {number} is not a JSON object ({exc.msg} at column {exc.colno}); "
                        "fix or delete that line (a JSON lines file holds one object per line)")
            if not isinstance(value, dict):
                return (f"source: {path} line {number} holds a JSON {type(value).__name__}, not an object; "
                        "each line needs one object such as {\"text\": ..., \"label\": ...}")
    return None
