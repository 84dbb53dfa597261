"""Pre-flight of local stores (tasks/preflight.py): a sqlite tracking store and a folder storage root.

Fast, no server: the servers and object stores are in tests/team/test_preflight.py. Root writes through
any mode bits, so "read-only" is a read-only bind mount in a private mount namespace when the tests run
as root, and chmod otherwise.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from lsq.errors import LsqError
from tasks.preflight import preflight

REPO = Path(__file__).resolve().parents[2]
FIX = "point tracking.tracking_uri at an MLflow database, or at a file that does not exist yet"
CHILD = """import sys
from lsq.errors import LsqError
from tasks.preflight import preflight
try:
    preflight(sys.argv[1], sys.argv[2] or None)
    print("passed")
except LsqError as exc:
    print(exc)
"""


def failure(tracking: str, root: str | None = None) -> str:
    with pytest.raises(LsqError) as failed:
        preflight(tracking, root)
    message = str(failed.value)
    assert "\n" not in message, message
    return message


def failure_read_only(path: Path, tracking: str, root: str | None = None) -> str:
    """The message of ``preflight(tracking, root)`` while ``path`` (a file or a folder) is read-only."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            return failure(tracking, root)
        finally:
            path.chmod(mode)
    if shutil.which("unshare") is None:
        pytest.skip("running as root, which writes through mode bits, and no unshare for a read-only mount")
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec "$2" -c "$3" "$4" "$5"'
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(path),
                           sys.executable, CHILD, tracking, root or ""],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0 and not done.stdout:
        pytest.skip(f"running as root, and no read-only bind mount here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_a_text_file_as_tracking_store_is_refused_and_left_as_it_was(tmp_path):
    db = tmp_path / "x.db"
    db.write_text("these are notes, not a database\n")
    message = failure(f"sqlite:///{db}")
    assert message == (f"preflight: tracking store sqlite:///{db} is not an SQLite database "
                       f"(it begins b'these are notes,'); {FIX}")
    assert db.read_text() == "these are notes, not a database\n" and os.listdir(tmp_path) == ["x.db"]


def test_another_programs_sqlite_database_is_refused_not_filled_with_mlflow_tables(tmp_path):
    db = tmp_path / "notes.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE notes (text TEXT)")
        con.execute("CREATE TABLE tags (name TEXT)")
    message = failure(f"sqlite:///{db}")
    assert message == (f"preflight: tracking store sqlite:///{db} is another program's SQLite database "
                       f"(tables notes, tags; none of MLflow's); {FIX}")
    with sqlite3.connect(db) as con:
        assert sorted(n for (n,) in con.execute("SELECT name FROM sqlite_master")) == ["notes", "tags"]
    assert os.listdir(tmp_path) == ["notes.db"]


def test_a_damaged_database_is_refused(tmp_path):
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE experiments (name TEXT)")
    data = bytearray(db.read_bytes())
    data[100:200] = b"\xff" * 100  # the header intact, the table list after it overwritten
    db.write_bytes(bytes(data))
    message = failure(f"sqlite:///{db}")
    assert message.startswith(f"preflight: tracking store sqlite:///{db} is not a readable SQLite database ("), message
    assert message.endswith(f"); {FIX}")


def test_a_folder_as_tracking_store_is_refused(tmp_path):
    (tmp_path / "mlflow.db").mkdir()
    assert failure(f"sqlite:///{tmp_path / 'mlflow.db'}") == (
        f"preflight: tracking store sqlite:///{tmp_path / 'mlflow.db'} is a folder, not a database file "
        f"({tmp_path / 'mlflow.db'}); {FIX}")


def test_a_new_an_empty_and_an_mlflow_database_pass_and_nothing_is_created(tmp_path, mlflow_uri):
    preflight(mlflow_uri, None)  # a migrated MLflow store (tests/tasks/conftest.py)
    new = tmp_path / "new"
    new.mkdir()
    preflight(f"sqlite:///{new / 'mlflow.db'}", None)  # MLflow creates it
    assert os.listdir(new) == []
    (new / "empty.db").touch()  # SQLite reads an empty file as an empty database
    preflight(f"sqlite:///{new / 'empty.db'}", None)
    assert os.listdir(new) == ["empty.db"] and (new / "empty.db").stat().st_size == 0


def test_a_read_only_tracking_database(tmp_path):
    db = tmp_path / "mlflow.db"
    db.touch()  # an empty database: passes when writable
    message = failure_read_only(db, f"sqlite:///{db}")
    assert message.startswith(f"preflight: tracking store sqlite:///{db} not writable ("), message
    assert message.endswith(f": {db})") and ("Read-only file system" in message or "Permission denied" in message)


def test_a_read_only_storage_root(tmp_path):
    (tmp_path / "root").mkdir()
    message = failure_read_only(tmp_path / "root", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
                                str(tmp_path / "root"))
    assert message.startswith(f"preflight: storage root {tmp_path / 'root'} not writable ("), message


@pytest.mark.parametrize("store, root", [
    ("sqlite:///{file}/mlflow.db", None),
    ("sqlite:///{tmp}/mlruns/mlflow.db", "{file}/runs"),
    ("sqlite:///{tmp}/mlruns/mlflow.db", "file://{file}/runs"),
])
def test_a_store_whose_folder_cannot_be_made(tmp_path, store, root):
    (tmp_path / "file").write_text("a file, not a folder")
    store, root = (s and s.format(file=tmp_path / "file", tmp=tmp_path) for s in (store, root))
    message = failure(store, root)
    where = f"storage root {root}" if root else f"tracking store {store}"
    assert message.startswith(f"preflight: {where} not writable ("), message


def test_a_relative_file_url_root_is_checked_where_storage_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    preflight(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "file://runs")  # fsspec: ./runs
    assert (tmp_path / "runs").is_dir() and os.listdir(tmp_path / "runs") == []
