"""Opening a new sqlite store from two processes at once (two first pipeline runs on a fresh ./mlruns)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_two_processes_create_one_new_store_at_once(tmp_path):
    code = "import sys\nfrom tasks import tracking\nprint(tracking.ensure_experiment(sys.argv[1], 'lsq'))\n"
    for attempt in range(3):  # MLflow migrates a new database as its store opens: unguarded, this races
        uri = f"sqlite:///{tmp_path / f'try{attempt}' / 'mlflow.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", code, uri], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, results):
            assert p.returncode == 0, err[-2000:]
        assert len({out.strip() for out, _ in results}) == 1  # one experiment, the same id for both


def test_two_writers_of_one_tag_is_a_transient_error():
    from mlflow.exceptions import MlflowException

    from tasks.tracking.store import transient

    clash = MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: model_version_tags.workspace, "
                            "model_version_tags.name, model_version_tags.version, model_version_tags.key")
    assert transient(clash)
    assert not transient(MlflowException("UNIQUE constraint failed: registered_models.name"))
    assert not transient(ValueError("bad input"))
