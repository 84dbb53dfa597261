"""``python -m flows.squeeze_pipeline`` as a command: help and settings without a server, one line for bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The command as `python -m` runs it, with the server start replaced by a marker, and what was
# imported printed at exit: a server, prefect or mlflow before the run starts is a failure.
PROBE = """
import json, runpy, sys
import flows.server
flows.server.start_unless_configured = lambda: print("SERVER STARTED", file=sys.stderr) or sys.exit(99)
sys.argv = ["squeeze_pipeline", *json.loads(sys.argv[1])]
try:
    runpy.run_module("flows.squeeze_pipeline", run_name="__main__", alter_sys=True)
finally:
    print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"prefect", "mlflow", "torch"})))
"""


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_"))}
    out.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    return out


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.squeeze_pipeline", *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def probe(*args: str) -> tuple[int, str, str, list[str]]:
    """(status, stdout without the last line, stderr, heavy modules imported) of the command with ``args``."""
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=120, check=False)
    *out, imported = done.stdout.splitlines()
    return done.returncode, "\n".join(out), done.stderr, json.loads(imported)


def test_help_answers_at_once_with_usage_examples_and_metrics():
    started = time.monotonic()
    done = run("--help")
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert took < 5, f"--help took {took:.1f} s"
    text = done.stdout
    assert "usage: python -m flows.squeeze_pipeline" in text and "[config] [key=value ...]" in text
    assert "\nexamples:\n" in text and "configs/demo.yaml train.seed=1 target_ranks=[8,4]" in text
    assert "--settings" in text and "dotted keys" in text
    for metric in ("accuracy", "macro_f1", "answer_accuracy", "choice_accuracy", "loss"):
        assert metric in text.split("promotion.metric (")[1], metric
    assert "Starting temporary server" not in done.stderr + done.stdout


def test_help_starts_no_server_and_imports_no_prefect():
    status, out, err, imported = probe("--help")
    assert status == 0 and "usage:" in out, err
    assert "SERVER STARTED" not in err and imported == []


@pytest.mark.parametrize("args, message", [
    (("configs/missing.yaml",), "configs/missing.yaml: config file not found"),
    (("configs/demo.yaml", "source_rank=[1"), "override 'source_rank=[1'"),
    (("configs/demo.yaml", "no_such_key=1"), "no_such_key"),
    (("configs/demo.yaml", "promotion.no_such_key=1"), "promotion.no_such_key"),
    (("configs/demo.yaml", "target_ranks=[128]"), "target_ranks"),
    (("configs/demo.yaml", "promotion.metric=f1"),
     "promotion.metric: 'f1' is not a classification metric; use one of auto, accuracy, macro_f1"),
    (("--no-such-option",), "unrecognized arguments: --no-such-option"),
])
def test_bad_input_is_one_line_and_status_2_before_any_server(args, message):
    status, out, err, imported = probe(*args)
    assert status == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("squeeze_pipeline: error: ") and message in lines[0], err[-2000:]
    assert "Traceback" not in err and "SERVER STARTED" not in err
    assert "prefect" not in imported and "mlflow" not in imported and out == ""


def test_missing_config_as_users_run_it():
    done = run("configs/missing.yaml")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "squeeze_pipeline: error: configs/missing.yaml: config file not found\n"


def test_settings_list_every_key_of_the_config():
    status, out, err, imported = probe("configs/demo.yaml", "target_ranks=[8,4]", "--settings")
    assert status == 0, err
    assert "SERVER STARTED" not in err and "prefect" not in imported
    settings = dict(re.split(r" {2,}", line)[0].split("=", 1) for line in out.splitlines())
    assert settings["target_ranks"] == "[8,4]" and settings["promotion.metric"] == "auto"
    assert settings["baselines.adalora_settings.tinit"] == "0.1" and "orchestration.runner" in settings
    from lsq.pipeline_config import load_pipeline_config

    assert load_pipeline_config(None, [f"{k}={v}" for k, v in settings.items()]) == \
        load_pipeline_config(str(REPO / "configs/demo.yaml"), ["target_ranks=[8,4]"])


def test_schema_lists_the_promotion_metrics():
    status, out, err, imported = probe("--schema")
    assert status == 0, err
    assert "SERVER STARTED" not in err and "prefect" not in imported
    schema = json.loads(out)
    promotion = schema["$defs"]["Promotion"]["properties"]
    assert promotion["metric"]["enum"] == ["auto", "accuracy", "macro_f1", "exact_match", "choice_accuracy",
                                          "answer_accuracy", "loss"]
    assert "servable_only" in promotion and "eval_split" not in schema["properties"]


def test_a_tracking_store_that_is_not_a_database_is_one_line_before_any_work(tmp_path):
    store, out = tmp_path / "x.db", tmp_path / "out"
    store.write_text("these are notes, not a database\n")
    done = run("configs/demo.yaml", f"tracking.tracking_uri=sqlite:///{store}", f"output_dir={out}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr == (f"squeeze_pipeline: error: preflight: tracking store sqlite:///{store} is not an SQLite "
                           "database (it begins b'these are notes,'); point tracking.tracking_uri at an MLflow "
                           "database, or at a file that does not exist yet\n")
    assert done.stdout == "" and not out.exists() and os.listdir(tmp_path) == ["x.db"]
