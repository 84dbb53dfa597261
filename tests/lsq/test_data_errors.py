"""Data files that cannot be read (lsq/data_files.py): one line naming the file, the place and the fix, from
``load_data`` and from ``lsq train`` (exit 2, one ``lsq: error:`` line on stderr, nothing written)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from pydantic import ValidationError

from lsq.cli import main
from lsq.data import DataConfig, load_data
from lsq.errors import LsqError
from tests.lsq.tiny import tiny_bert  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[2]
ROWS = [("a good film", "1"), ("a dull film", "0")] * 10


def csv_bytes(rows=ROWS, sep=",", header="text,label", encoding="utf-8") -> bytes:
    return "".join(line + "\n" for line in [header, *(sep.join(r) for r in rows)]).encode(encoding)


def jsonl_bytes(rows=ROWS) -> bytes:
    return "".join(json.dumps({"text": t, "label": int(y)}) + "\n" for t, y in rows).encode()


# name -> (file name, its bytes, the line; {path} is the file as data.source names it)
CASES = {
    "latin-1 csv": ("data.csv", csv_bytes([("café good", "1"), *ROWS], encoding="latin-1"),
                    "source: {path} is not utf-8 (byte 0xe9 at offset 14, line 2); re-save it as UTF-8 or set "
                    "data.encoding=latin-1"),
    "utf-16 csv": ("data.csv", csv_bytes(encoding="utf-16"),
                   "source: {path} is not utf-8 (byte 0xff at offset 0, line 1: a UTF-16 byte-order mark); "
                   "re-save it as UTF-8 or set data.encoding=utf-16"),
    "cp1252 quotes": ("data.csv", csv_bytes([("\u201cgood\u201d film", "1"), *ROWS], encoding="cp1252"),
                      "source: {path} is not utf-8 (byte 0x93 at offset 11, line 2); re-save it as UTF-8 or set "
                      "data.encoding=cp1252"),
    "latin-1 jsonl": ("data.jsonl", jsonl_bytes(ROWS[:3]) + '{"text": "café", "label": 1}\n'.encode("latin-1"),
                      "source: {path} is not utf-8 (byte 0xe9 at offset 121, line 4); re-save it as UTF-8 or set "
                      "data.encoding=latin-1"),
    "header only": ("data.csv", b"text,label\n",
                    "source: {path} has only its header line 'text,label', no rows; add rows below the header"),
    "empty csv": ("data.csv", b"", "source: {path} is empty (0 bytes); fill it"),
    "empty jsonl": ("data.jsonl", b"\n\n", "source: {path} is empty (2 bytes); fill it"),
    "tab separated": ("data.csv", csv_bytes(sep="\t", header="text\tlabel"),
                      "source: {path} line 1: the header 'text\\tlabel' has no comma but a tab; a .csv is read "
                      "comma-separated: re-save it with commas (text that holds commas in double quotes)"),
    "semicolons, commas in text": ("data.csv", csv_bytes([*ROWS, ("good, not great", "1")], sep=";",
                                                         header="text;label"),
                                   "source: {path} line 1: the header 'text;label' has no comma but a semicolon; a "
                                   ".csv is read comma-separated: re-save it with commas (text that holds commas in "
                                   "double quotes)"),
    "unquoted comma": ("data.csv", csv_bytes([*ROWS[:5], ("good, not great", "1"), *ROWS]),
                       'source: {path} line 7 has 3 fields, the header 2; put text that holds commas in double '
                       'quotes ("good, not great")'),
    "one bad json line": ("data.jsonl", jsonl_bytes(ROWS[:2]) + b'{"text": "c" "label": 0}\n' + jsonl_bytes(),
                          "source: {path} line 3 is not a JSON object (Expecting ',' delimiter at column 14); fix or "
                          "delete that line (a JSON lines file holds one object per line)"),
    "broken json array": ("data.json", b'[{"text": "a", "label": 1},\n {"text": "b" "label": 0}]\n',
                          "source: {path} line 2, column 15 breaks its JSON array (Expecting ',' delimiter); fix it "
                          "there"),
}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def write_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    name, data, line = CASES[case]
    path = tmp_path / "data" / name
    path.parent.mkdir()
    path.write_bytes(data)
    return path, line.format(path=path)


@pytest.mark.parametrize("case", list(CASES))
def test_load_data_says_what_is_wrong_in_one_line(tmp_path, case):
    path, line = write_case(tmp_path, case)
    readers = [logging.getLogger(f"datasets.packaged_modules.{m}.{m}") for m in ("csv", "json")]
    levels = [r.level for r in readers]
    with pytest.raises(LsqError) as failed:
        load_data(DataConfig(source=str(path)))
    assert str(failed.value) == line
    assert [r.level for r in readers] == levels  # muted while reading only


@pytest.mark.parametrize("case", list(CASES))
def test_lsq_train_exits_2_with_the_line_and_writes_nothing(tmp_path, case, tiny_bert, capfd):  # noqa: F811
    path, line = write_case(tmp_path, case)
    out = tmp_path / "out"
    rc = main(["train", f"model.name={tiny_bert}", f"data.source={path}", f"output_dir={out}"])
    captured = capfd.readouterr()  # the file descriptors: datasets' own log handler writes there
    assert rc == 2, captured.err[-3000:]
    assert captured.err == f"lsq: error: {line}\n" and captured.out == ""
    assert not out.exists()


def test_in_a_real_process_stderr_is_the_one_line(tmp_path, tiny_bert):  # noqa: F811
    path, line = write_case(tmp_path, "latin-1 csv")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    done = subprocess.run([sys.executable, "-m", "lsq", "train", f"model.name={tiny_bert}", f"data.source={path}",
                           f"output_dir={tmp_path / 'out'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert (done.returncode, done.stderr, done.stdout) == (2, f"lsq: error: {line}\n", "")
    assert not (tmp_path / "out").exists()


def test_a_list_of_files_names_the_one_that_is_wrong(tmp_path):
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_bytes(csv_bytes())
    bad.write_bytes(csv_bytes([("naïve", "1")], encoding="latin-1"))
    with pytest.raises(LsqError, match=rf"^source: {bad} is not utf-8 \(byte 0xef at offset 13, line 2\)"):
        load_data(DataConfig(source=[str(good), str(bad)]))


def test_data_encoding_reads_what_utf8_cannot(tmp_path):
    rows = [("café crème", "1"), ("naïve plot", "0")] * 10
    (tmp_path / "d.csv").write_bytes(csv_bytes(rows, encoding="latin-1"))
    (tmp_path / "d.jsonl").write_bytes("".join(json.dumps({"text": t, "label": int(y)}, ensure_ascii=False) + "\n"
                                               for t, y in rows).encode("latin-1"))
    (tmp_path / "u.csv").write_bytes(csv_bytes(rows, encoding="utf-16"))
    for name, encoding in [("d.csv", "latin-1"), ("d.jsonl", "latin-1"), ("u.csv", "utf-16")]:
        dsd = load_data(DataConfig(source=str(tmp_path / name), encoding=encoding))
        texts = {t for split in dsd.values() for t in split["text"][:]}
        assert texts == {"café crème", "naïve plot"}, name


def test_an_unknown_encoding_is_refused_by_the_config():
    with pytest.raises(ValidationError, match=r"encoding: unknown text encoding 'latin-9000'"):
        DataConfig(source="d.csv", encoding="latin-9000")
