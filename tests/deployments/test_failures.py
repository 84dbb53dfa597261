"""Failures of the deployment commands are one line on stderr: a team server that does not start
(``python -m deployments.team_demo``: its name, command line, port and last output; exit 1) and a Prefect
API that cannot be reached (``python -m deployments.setup``: exit 1)."""

from __future__ import annotations

import os
import signal

from lsq.processes import ServerProcess, free_port


class BrokenServers:
    """Stands in for TeamServers: its first server exits at once, as a server with a bad setting would."""

    def __init__(self, folder, *args, **kwargs):
        self.process = ServerProcess("postgres", folder / "postgres.log")
        self.port = free_port()

    def __enter__(self):
        self.process.spawn(["sh", "-c", "echo 'FATAL:  invalid value for parameter \"port\"'; exit 1", str(self.port)],
                           env=dict(os.environ), cwd=None, deathsig=signal.SIGTERM, ports=(self.port,))
        try:
            self.process.wait_until(lambda: False, 60, "answer")
        finally:
            self.process.stop(signal.SIGINT, 5.0)

    def __exit__(self, *exc):
        pass


def test_team_demo_prints_a_failed_server_start_on_one_line_and_exits_1(tmp_path, monkeypatch, capsys):
    from deployments import stack, team_demo

    monkeypatch.setattr(stack, "TeamServers", BrokenServers)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        status = team_demo.main(["--keep", str(tmp_path / "demo")])
    finally:
        signal.signal(signal.SIGTERM, handler)  # main() turns SIGTERM into SystemExit
    out, err = capsys.readouterr()
    assert status == 1 and err.count("\n") == 1, err
    assert err.startswith("team_demo: error: postgres exited during start-up (status 1): command sh -c "), err
    assert "port " in err and 'invalid value for parameter "port"' in err and "postgres.log" in err


def test_setup_prints_an_unreachable_api_on_one_line_and_exits_1(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments import setup

    url = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings({PREFECT_API_URL: url}):
        assert setup.main(["--slots", "1"]) == 1
        assert setup.main(["--slots", "0"]) == 2
    out, err = capsys.readouterr()
    first, second = err.splitlines()
    assert out == "" and first.startswith(f"setup: error: Prefect API {url}: ") and "refused" in first, err
    assert second == "setup: error: slots: 0 must be at least 1"
