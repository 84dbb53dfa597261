"""lsq.data and lsq.builtin_data: a fake vaderSentiment sdist end to end, user files, bad input, fingerprints.

Everything runs offline on tiny files in tmp_path; the one test that fetches the real sdist is marked slow.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Dataset, DatasetDict
from pydantic import ValidationError

from lsq import builtin_data
from lsq.data import DataConfig, builtin_dataset, fingerprint, load_data
from lsq.errors import LsqError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every cache in tmp_path; no inherited sdist or cache location."""
    monkeypatch.setenv("LSQ_CACHE_DIR", str(tmp_path / "lsq-cache"))
    monkeypatch.delenv("LSQ_VADER_SDIST", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


# ------------------------------------------------------------------------------ a fake vader sdist


def _set_bytes(name: str, n: int) -> bytes:
    """n lines id<TAB>rating<TAB>text with CRLF and no final newline; every 7th rating is zero."""
    lines = []
    for i in range(n):
        rating = 0.0 if i % 7 == 3 else (1.0 + i / 100 if i % 2 else -(1.0 + i / 100))
        lines.append(f"{i + 1}\t{rating}\t {name} sentence {i} ".encode())
    lines[1] = b"2\t-1.5\tcaf\xc3\xa9 with a\ttab and a bad byte \xff"
    return b"\r\n".join(lines)


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SIZES = {"movie": 60, "amazon": 40, "nyt": 30, "tweets": 25}


def make_sdist(folder: Path, sets: dict[str, bytes] | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """A tar.gz laid out like vaderSentiment-3.3.2.tar.gz, holding the inner hutto archive."""
    sets = sets if sets is not None else {name: _set_bytes(name, n) for name, n in SIZES.items()}
    inner = _tar_gz({builtin_data.VADER_FILES[name]: data for name, data in sets.items()}
                    | {"hutto_ICWSM_2014/_README_.txt": b"readme"})
    outer = {"vaderSentiment-3.3.2/setup.py": b"", builtin_data.INNER_ARCHIVE: inner} | (extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vaderSentiment-3.3.2.tar.gz"
    path.write_bytes(_tar_gz(outer))
    return path


@pytest.fixture
def sdist(tmp_path) -> tuple[Path, str]:
    path = make_sdist(tmp_path / "sdist")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------- parsing


def test_parse_ratings_crlf_tabs_and_bad_bytes():
    rows = builtin_data.parse_ratings(_set_bytes("movie", 10) + b"\r\n\r\n", "movie")
    assert len(rows) == 10  # trailing blank lines skipped, last line without newline kept
    assert rows[0] == {"id": "1", "rating": -1.0, "text": "movie sentence 0"}
    assert rows[1]["text"] == "caf\u00e9 with a\ttab and a bad byte \ufffd"
    assert all("\r" not in r["text"] for r in rows)
    assert rows[3]["rating"] == 0.0
    with pytest.raises(LsqError, match="movie line 2 "):
        builtin_data.parse_ratings(b"1\t0.5\tok\r\n2\tnot-a-number\ttext", "movie")


def test_builtin_dataset_end_to_end(sdist):
    path, sha = sdist
    raw = builtin_data.parse_ratings(_set_bytes("movie", SIZES["movie"]), "movie")
    nonzero = [r for r in raw if r["rating"] != 0]
    dsd = builtin_dataset("movie", source=path, sha256=sha)
    assert list(dsd) == ["train", "validation", "test"]
    n = len(nonzero)
    assert [len(dsd[s]) for s in dsd] == [n - round(0.2 * n) - round(0.1 * n), round(0.1 * n), round(0.2 * n)]
    assert dsd["train"].column_names == ["text", "label", "rating"]
    assert dsd["train"].features["label"] == ClassLabel(names=["negative", "positive"])
    rows = [r for s in dsd.values() for r in s]
    assert sorted(r["text"] for r in rows) == sorted(r["text"] for r in nonzero)
    assert all(r["rating"] != 0 and r["label"] == int(r["rating"] > 0) for r in rows)
    truth = {r["text"]: r["rating"] for r in nonzero}
    assert all(truth[r["text"]] == r["rating"] for r in rows)
    # stratified: each split's positive share is the pool's, within one row
    share = sum(r["rating"] > 0 for r in nonzero) / n
    for split in dsd.values():
        assert abs(sum(split["label"][:]) - share * len(split)) <= 1


def test_builtin_split_determinism_and_caps(sdist):
    path, sha = sdist
    a = builtin_dataset("amazon", source=path, sha256=sha, seed=3)
    b = builtin_dataset("amazon", source=path, sha256=sha, seed=3)
    c = builtin_dataset("amazon", source=path, sha256=sha, seed=4)
    assert fingerprint(a) == fingerprint(b)
    assert a["test"]["text"][:] == b["test"]["text"][:]
    assert a["test"]["text"][:] != c["test"]["text"][:]
    capped = builtin_dataset("amazon", source=path, sha256=sha, seed=3, max_train=6, max_eval=2)
    assert [len(capped[s]) for s in capped] == [6, 2, 2]
    assert set(capped["train"]["text"][:]) <= set(a["train"]["text"][:])
    again = builtin_dataset("amazon", source=path, sha256=sha, seed=3, max_train=6, max_eval=2)
    assert fingerprint(capped) == fingerprint(again)
    assert sorted(Counter(capped["train"]["label"][:]).values()) == [3, 3]  # stratified cap


def test_cache_second_call_reads_no_sdist(sdist, tmp_path, monkeypatch):
    path, sha = sdist
    first = builtin_data.vader_rows(source=path, sha256=sha)
    assert {k: len(v) for k, v in first.items()} == SIZES
    folder = tmp_path / "lsq-cache" / "vader-3.3.2" / sha[:16]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["sdist_sha256"] == sha and {k: v["rows"] for k, v in meta["files"].items()} == SIZES

    def boom(*a, **k):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(builtin_data, "read_members", boom)
    monkeypatch.setattr(builtin_data, "download_sdist", boom)
    assert builtin_data.vader_rows(source=tmp_path / "gone.tar.gz", sha256=sha) == first
    assert len(builtin_dataset("nyt", sha256=sha)["test"]) > 0
    assert not list(folder.glob("*.tmp"))


def test_cache_altered_is_rebuilt(sdist, tmp_path, monkeypatch):
    path, sha = sdist
    first = builtin_data.vader_rows(source=path, sha256=sha)
    jsonl = tmp_path / "lsq-cache" / "vader-3.3.2" / sha[:16] / "tweets.jsonl"
    jsonl.write_text(jsonl.read_text().replace("tweets sentence 0", "edited"))
    calls = []
    real = builtin_data.read_members
    monkeypatch.setattr(builtin_data, "read_members", lambda p: calls.append(p) or real(p))
    assert builtin_data.vader_rows(source=path, sha256=sha) == first
    assert calls == [path]


def test_tampered_sdist_is_refused(sdist, tmp_path):
    path, sha = sdist
    with pytest.raises(LsqError, match="sha256 .* expected 5d7c06e0"):
        builtin_dataset("movie", source=path)  # the fake is not the real sdist
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(LsqError, match=f"expected {sha}; refusing"):
        builtin_dataset("movie", source=path, sha256=sha)
    assert not (tmp_path / "lsq-cache").exists() or not list((tmp_path / "lsq-cache").rglob("meta.json"))


def test_sdist_without_a_set_or_not_a_tar(tmp_path):
    partial = make_sdist(tmp_path / "p", sets={"movie": _set_bytes("movie", 5)})
    with pytest.raises(LsqError, match="no member 'hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt'"):
        builtin_data.vader_rows(source=partial, sha256=builtin_data.file_sha256(partial))
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar")
    with pytest.raises(LsqError, match="cannot read .* as a tar.gz"):
        builtin_data.vader_rows(source=junk, sha256=builtin_data.file_sha256(junk))


def test_hostile_members_are_never_written(tmp_path):
    path = make_sdist(tmp_path / "deep" / "er", extra={"../../escaped.txt": b"x", "/tmp/abs-escape-lsq": b"x"})
    rows = builtin_data.vader_rows(source=path, sha256=builtin_data.file_sha256(path))
    assert len(rows["movie"]) == SIZES["movie"]
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/abs-escape-lsq").exists()


def test_env_sdist_is_used_without_pip(sdist, tmp_path, monkeypatch):
    path, sha = sdist
    monkeypatch.setattr(builtin_data, "VADER_SHA256", sha)
    monkeypatch.setenv("LSQ_VADER_SDIST", str(path))
    monkeypatch.setattr(builtin_data, "download_sdist", lambda d: pytest.fail("pip must not run"))
    dsd = load_data(DataConfig(source="builtin:tweets", max_eval=1))
    assert len(dsd["validation"]) == len(dsd["test"]) == 1 and dsd["train"].column_names == ["text", "label", "rating"]


def test_pip_download_runs_once(sdist, monkeypatch):
    """No local copy: pip download runs (faked here: it copies the fake sdist), then the cache answers."""
    path, sha = sdist
    monkeypatch.setattr(builtin_data, "VADER_SHA256", sha)
    runs = []

    def fake_run(cmd, **kwargs):
        runs.append(cmd)
        assert cmd[:3] == [sys.executable, "-m", "pip"] and "vaderSentiment==3.3.2" in cmd
        assert cmd[cmd.index("--no-binary") + 1] == ":all:" and "--no-deps" in cmd
        (Path(cmd[cmd.index("-d") + 1]) / path.name).write_bytes(path.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(builtin_data.subprocess, "run", fake_run)
    assert len(builtin_data.vader_rows()["nyt"]) == SIZES["nyt"]
    assert len(builtin_data.vader_rows()["nyt"]) == SIZES["nyt"]
    assert len(runs) == 1


def test_pip_failure_is_one_line(monkeypatch):
    monkeypatch.setattr(builtin_data.subprocess, "run",
                        lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n"))
    with pytest.raises(LsqError, match="pip download vaderSentiment==3.3.2 failed: ERROR: No matching distribution$"):
        builtin_data.vader_rows()


def test_cache_dir_resolution(monkeypatch, tmp_path):
    assert builtin_data.cache_dir() == tmp_path / "lsq-cache"
    monkeypatch.delenv("LSQ_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builtin_data.cache_dir() == tmp_path / "xdg" / "lsq"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert builtin_data.cache_dir() == tmp_path / "home" / ".cache" / "lsq"


@pytest.mark.slow
def test_real_vader_sdist():
    """Fetches the real sdist with pip (network to PyPI) and checks the facts of the data."""
    rows = builtin_data.vader_rows()
    assert {k: len(v) for k, v in rows.items()} == {"movie": 10605, "amazon": 3708, "nyt": 5190, "tweets": 4200}
    for name, set_rows in rows.items():
        ratings = [r["rating"] for r in set_rows]
        assert -4 <= min(ratings) < 0 < max(ratings) <= 4, name
        assert all(r["text"] for r in set_rows), name
    dsd = builtin_dataset("movie")
    n = sum(len(s) for s in dsd.values())
    assert n == sum(r["rating"] != 0 for r in rows["movie"])
    assert 0.4 < sum(dsd["train"]["label"][:]) / len(dsd["train"]) < 0.6  # Pang & Lee: balanced


# -------------------------------------------------------------------------------------- user data


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _reviews(n: int = 30) -> list[str]:
    return [f"review number {i},{'good' if i % 3 else 'bad'},{i}" for i in range(n)]


def test_csv_with_column_mapping(tmp_path):
    f = _write_csv(tmp_path / "r.csv", "review,verdict,extra", _reviews())
    dsd = load_data(DataConfig(source=str(f), text_column="review", label_column="verdict", seed=1))
    assert [len(dsd[s]) for s in dsd] == [21, 3, 6]
    assert dsd["train"].column_names == ["text", "label"]
    assert dsd["train"].features["label"].names == ["bad", "good"]  # sorted unique strings
    for row in (r for s in dsd.values() for r in s):
        i = int(row["text"].split()[-1])
        assert row["label"] == (1 if i % 3 else 0)
    named = load_data(DataConfig(source=str(f), text_column="review", label_column="verdict",
                                 label_names=("good", "bad", "meh")))
    assert named["train"].features["label"].names == ["good", "bad", "meh"]
    assert all(r["label"] == (0 if int(r["text"].split()[-1]) % 3 else 1) for r in named["train"])


def test_jsonl_int_labels_and_folder_splits(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"sentence": f"s{i}", "y": i % 3}) + "\n" for i in range(40)))
    dsd = load_data(DataConfig(source=str(f), text_column="sentence", label_column="y", max_train=9, max_eval=4))
    assert [len(dsd[s]) for s in dsd] == [9, 4, 4]
    assert dsd["train"].features["label"].names == ["0", "1", "2"]
    assert sorted(Counter(dsd["train"]["label"][:]).values()) == [3, 3, 3]

    folder = tmp_path / "folder"
    _write_csv(folder / "train.csv", "text,label", [f"t{i},{i % 2}" for i in range(20)])
    _write_csv(folder / "test.csv", "text,label", [f"x{i},{i % 2}" for i in range(5)])
    dsd = load_data(DataConfig(source=str(folder), label_names=("neg", "pos")))
    assert [len(dsd[s]) for s in dsd] == [18, 2, 5]
    assert dsd["test"]["text"][:] == [f"x{i}" for i in range(5)]  # the source's own test split, kept as is


def test_parquet_file_list_and_float_labels(tmp_path):
    paths = []
    for k in range(2):
        table = pa.table({"body": [f"p{k}-{i}" for i in range(10)], "cls": [float(i % 2) for i in range(10)]})
        paths.append(str(tmp_path / f"part{k}.parquet"))
        pq.write_table(table, paths[-1])
    dsd = load_data(DataConfig(source=paths, text_column="body", label_column="cls"))
    assert sum(len(s) for s in dsd.values()) == 20
    assert dsd["train"].features["label"].names == ["0", "1"]
    assert all(r["label"] == int(r["text"].split("-")[1]) % 2 for s in dsd.values() for r in s)


def test_causal_lm_columns(tmp_path):
    f = tmp_path / "qa.jsonl"
    rows = [{"q": f"question {i}?", "a": "yes" if i % 2 else "no", "opts": ["yes", "no"], "junk": i} for i in range(20)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dsd = load_data(DataConfig(source=str(f), task="causal_lm", prompt_column="q", answer_column="a",
                               choices_column="opts"))
    assert dsd["train"].column_names == ["prompt", "answer", "choices"]
    assert [len(dsd[s]) for s in dsd] == [14, 2, 4]
    by_prompt = {r["q"]: r for r in rows}
    assert all(by_prompt[r["prompt"]]["a"] == r["answer"] for s in dsd.values() for r in s)
    plain = load_data(DataConfig(source=str(f), task="causal_lm", prompt_column="q", answer_column="a"))
    assert plain["test"].column_names == ["prompt", "answer"]
    rows[5]["a"] = "maybe"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LsqError, match="answer_column: answer 'maybe' in row 5 of split 'train' is not one of"):
        load_data(DataConfig(source=str(f), task="causal_lm", prompt_column="q", answer_column="a",
                             choices_column="opts"))


# -------------------------------------------------------------------------------------- bad input


def _csv(tmp_path, rows, header="text,label", name="d.csv"):
    return str(_write_csv(tmp_path / name, header, rows))


@pytest.mark.parametrize(("case", "message"), [
    ("missing_file", r"source: no such file or folder '.*missing\.csv'"),
    ("missing_in_list", r"source: no such file '.*nope\.csv'"),
    ("extension", r"source: unsupported file extension '\.tsv'"),
    ("mixed", r"source: files mix formats \(\.csv, \.jsonl\)"),
    ("column", r"text_column: column 'review' not in split 'train' \(columns: text, label\)"),
    ("range", r"label_column: label 2 in split 'train' is out of range 0\.\.1"),
    ("negative", r"label_column: label -1 in split 'train' is out of range 0\.\.1"),
    ("not_int", r"label_column: value 0\.5 in split 'train' is not an integer"),
    ("unknown_name", r"label_column: value 'meh' is not one of label_names \['neg', 'pos'\]"),
    ("one_class", r"label_column: only one class \('only'\)"),
    ("one_class_in_train", r"label_column: split 'train' holds a single class"),
    ("missing_labels", r"label_column: column 'label' of split 'train' has 1 missing values"),
    ("empty", r"source: .*d\.csv has only its header line 'text,label', no rows; add rows below the header"),
    ("empty_test", r"split 'test' of source .* is empty"),
    ("not_text", r"text_column: column 'text' of split 'train' holds int64, not text"),
    ("too_small", r"split 'train' has 1 rows: too few to cut a validation split of 1 rows"),
    ("offline", r"source: dataset 'someone/not-cached' could not be loaded offline"),
    ("bad_json", r"source: .*broken\.jsonl line 2 is not a JSON object \(Expecting value at column 10\)"),
])
def test_bad_input_is_one_lsq_error_line(tmp_path, case, message):
    ok = [f"t{i},{i % 2}" for i in range(10)]
    kw: dict = {}
    if case == "missing_file":
        src = str(tmp_path / "data" / "missing.csv")
    elif case == "missing_in_list":
        src = [_csv(tmp_path, ok), str(tmp_path / "nope.csv")]
    elif case == "extension":
        (tmp_path / "d.tsv").write_text("text\tlabel\na\t0\n")
        src = str(tmp_path / "d.tsv")
    elif case == "mixed":
        (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 0}\n')
        src = [_csv(tmp_path, ok), str(tmp_path / "d.jsonl")]
    elif case == "column":
        src, kw = _csv(tmp_path, ok), {"text_column": "review"}
    elif case == "range":
        src, kw = _csv(tmp_path, ok + ["x,2"]), {"label_names": ("neg", "pos")}
    elif case == "negative":
        src = _csv(tmp_path, ok + ["x,-1"])
    elif case == "not_int":
        src = _csv(tmp_path, ok + ["x,0.5"])
    elif case == "unknown_name":
        src, kw = _csv(tmp_path, ["a,neg", "b,pos", "c,meh"]), {"label_names": ("neg", "pos")}
    elif case == "one_class":
        src = _csv(tmp_path, [f"t{i},only" for i in range(10)])
    elif case == "one_class_in_train":
        _write_csv(tmp_path / "f" / "train.csv", "text,label", [f"t{i},0" for i in range(10)])
        _write_csv(tmp_path / "f" / "test.csv", "text,label", ["a,0", "b,1"])
        src = str(tmp_path / "f")
    elif case == "missing_labels":
        src = _csv(tmp_path, ok + ["x,"])
    elif case == "empty":
        src = _csv(tmp_path, [])
    elif case == "empty_test":
        _write_csv(tmp_path / "f" / "train.csv", "text,label", ok)
        _write_csv(tmp_path / "f" / "test.csv", "text,label", [])
        src = str(tmp_path / "f")
    elif case == "not_text":
        src = _csv(tmp_path, [f"{i},{i % 2}" for i in range(10)])
    elif case == "too_small":
        src = _csv(tmp_path, ["a,0", "b,1"])
    elif case == "offline":
        src = "someone/not-cached"
    elif case == "bad_json":
        (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 0}\n{"text": oops\n')
        src = str(tmp_path / "broken.jsonl")
    with pytest.raises(LsqError, match=message) as info:
        load_data(DataConfig(source=src, **kw))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"source": "builtin:imdb"}, "unknown built-in classification set 'imdb'"),
    ({"source": "builtin:addition"}, "builtin:addition is causal_lm data"),
    ({"source": "builtin:imdb", "task": "causal_lm"}, "unknown built-in causal_lm set 'imdb'"),
    ({"source": "a.jsonl", "task": "causal_lm", "max_new_tokens": 0}, "greater than or equal to 1"),
    ({"source": "a.csv", "val_fraction": 0.5, "test_fraction": 0.5}, "leave no train rows"),
    ({"source": "a.csv", "label_names": ("one",)}, "label_names: need at least 2 distinct names"),
    ({"source": "a.csv", "label_names": ("a", "a")}, "label_names: need at least 2 distinct names"),
    ({"source": "a.csv", "text_column": "x", "label_column": "x"}, "label_column: same as text_column"),
    ({"source": "a.csv", "max_train": 0}, "greater than or equal to 1"),
    ({"source": "a.csv", "colour": "red"}, "Extra inputs are not permitted"),
    ({"source": ()}, "source: empty"),
])
def test_config_rejects(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        DataConfig(**kwargs)


def test_config_is_frozen_and_lists_become_tuples():
    cfg = DataConfig(source=["a.csv", "b.csv"], label_names=["x", "y"])
    assert cfg.source == ("a.csv", "b.csv") and cfg.label_names == ("x", "y") and cfg.max_length == 128
    with pytest.raises(ValidationError):
        cfg.seed = 2  # type: ignore[misc]
    assert DataConfig.model_json_schema()["properties"]["source"]["description"].startswith("builtin:NAME")


# ------------------------------------------------------------------------------------ fingerprint


def _toy() -> DatasetDict:
    ds = Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1], "rating": [-1.5, 2.0, -0.25, 3.0]})
    return DatasetDict(train=ds, test=ds.select([1, 2]))


def test_fingerprint_stable_and_sensitive():
    base = fingerprint(_toy())
    assert len(base) == 16 and int(base, 16) >= 0
    assert fingerprint(_toy()) == base
    assert fingerprint(DatasetDict(test=_toy()["test"], train=_toy()["train"])) == base  # dict order ignored
    dsd = _toy()
    changed = DatasetDict(train=dsd["train"].map(lambda r, i: {"text": "B" if i == 1 else r["text"]}, with_indices=True),
                          test=dsd["test"])
    assert fingerprint(changed) != base
    assert fingerprint(DatasetDict(train=dsd["train"].select([1, 0, 2, 3]), test=dsd["test"])) != base
    assert fingerprint(DatasetDict(train=dsd["train"], validation=dsd["test"])) != base  # split renamed
    relabelled = dsd.cast_column("label", ClassLabel(names=["neg", "pos"]))
    assert fingerprint(relabelled) != base
    assert fingerprint(DatasetDict(train=dsd["train"].rename_column("rating", "score"), test=dsd["test"])) != base
    assert fingerprint(dsd.with_format("numpy")) == base


def test_other_process_same_fingerprint_and_no_orchestration_imports():
    code = ("import sys; from tests.lsq.test_data import _toy; from lsq.data import fingerprint; "
            "print(fingerprint(_toy())); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip().splitlines()[-2:] == [fingerprint(_toy()), "[]"]
