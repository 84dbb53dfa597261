"""lsq's own log lines (In-Squeeze's resizes, storage and registry notes) land in the Prefect run's
logs, where the UI shows them: importing ``flows`` attaches the ``lsq`` and ``tasks`` loggers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_lsq_log_lines_are_recorded_in_the_task_runs_logs(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import logging
        import flows  # before prefect, as every flow entry point is
        from flows.server import TemporaryServer, _drain_prefect_workers, prefect_api

        with prefect_api(TemporaryServer().start()):
            from prefect import flow, task
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
            from prefect.runtime import flow_run

            @task
            def resize():
                logging.getLogger("lsq").info("in-squeeze: step 3 rank 8 -> 4, retained energy 0.900")
                logging.getLogger("tasks.steps").warning("cont-r4: child run not opened")
                logging.getLogger("lsq.storage").debug("not shown at INFO")

            @flow
            def story():
                resize()
                return flow_run.id

            run_id = story()
            _drain_prefect_workers()
            with get_client(sync_client=True) as client:
                logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            for line in logs:
                print("LOG", line.name, line.task_run_id is not None, line.message)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("LOG ")]
    assert "LOG lsq True in-squeeze: step 3 rank 8 -> 4, retained energy 0.900" in lines
    assert "LOG tasks.steps True cont-r4: child run not opened" in lines
    assert not any("not shown" in line for line in lines)
