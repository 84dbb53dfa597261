"""lsq.processes: liveness through psutil, die-with-parent, private folders, and the one server launcher
(one line on a failed start; a new port when the one picked was taken before the server bound it).

Every process a test starts ends in it; waits are on conditions with generous deadlines."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from lsq.errors import LsqError
from lsq.processes import (
    PORT_TRIES,
    ServerFailed,
    ServerProcess,
    free_port,
    free_ports,
    pid_alive,
    pid_namespace,
    private_folder,
    process_start,
)

DEADLINE_S = 30.0


def until(condition, within: float = DEADLINE_S) -> bool:
    """True as soon as ``condition()`` is, False after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def children():
    """Popen objects a test registers; killed and reaped at its end, whatever happened."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DEADLINE_S)


def test_pid_alive_on_this_process_a_dead_one_and_a_zombie(children):
    assert pid_alive(os.getpid()) and not pid_alive(0) and not pid_alive(-1)
    done = subprocess.Popen(["true"])
    children.append(done)
    done.wait(timeout=DEADLINE_S)  # reaped: its pid is free
    assert not pid_alive(done.pid)

    unreaped = subprocess.Popen(["true"])
    children.append(unreaped)
    assert until(lambda: zombie(unreaped.pid)), "the child never ended"
    assert psutil.pid_exists(unreaped.pid) and not pid_alive(unreaped.pid)  # exists, yet not alive
    unreaped.wait(timeout=DEADLINE_S)


def test_process_start_names_one_process_and_none_once_gone(children):
    assert process_start(os.getpid()) == process_start(os.getpid()) is not None
    child = subprocess.Popen(["sleep", "60"])
    children.append(child)
    first = process_start(child.pid)
    assert first is not None and first == process_start(child.pid) and first != process_start(os.getpid())
    child.kill()
    child.wait(timeout=DEADLINE_S)
    assert process_start(child.pid) is None
    assert pid_namespace() is None or pid_namespace().startswith("pid:")


def test_die_with_parent_kills_the_grandchild_when_the_parent_is_sigkilled(children):
    script = textwrap.dedent("""
        import signal, subprocess, sys, time
        from lsq.processes import die_with_parent_by
        child = subprocess.Popen(["sleep", "600"], preexec_fn=die_with_parent_by(signal.SIGKILL))
        print(child.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    children.append(parent)
    grandchild = int(parent.stdout.readline())
    try:
        assert pid_alive(grandchild) and psutil.Process(grandchild).ppid() == parent.pid
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=DEADLINE_S)
        assert until(lambda: not pid_alive(grandchild)), "the grandchild outlived its SIGKILLed parent"
    finally:
        if pid_alive(grandchild):
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild, signal.SIGKILL)


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))


def test_private_folder_removes_those_of_dead_processes(tmp_path, monkeypatch, children):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    gone = subprocess.Popen(["true"])
    children.append(gone)
    gone.wait(timeout=DEADLINE_S)
    orphan = tmp_path / f"lsq-test-{gone.pid}-abc"
    alive = tmp_path / f"lsq-test-{os.getppid()}-def"
    other = tmp_path / f"lsq-other-{gone.pid}-ghi"
    for folder in (orphan, alive, other):
        folder.mkdir()
    mine = private_folder("lsq-test")
    assert mine.parent == tmp_path and mine.name.startswith(f"lsq-test-{os.getpid()}-") and mine.is_dir()
    assert not orphan.exists() and alive.exists() and other.exists()


# ---------------------------------------------------------------------------------------- servers
def fake_server(tmp_path: Path) -> Path:
    """A server taking its port as argv[1]: prints as real ones do when the port is taken, and exits."""
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent("""
        import socket, sys, time
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", int(sys.argv[1])))
        except OSError as exc:
            print("starting", flush=True)
            print(f"ERROR: [Errno 98] error while attempting to bind on address: {exc}", flush=True)
            sys.exit(1)
        sock.listen()
        print("listening", flush=True)
        time.sleep(600)
    """))
    return script


def answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_server_that_exits_at_once_is_one_line_naming_it_its_command_port_and_output(tmp_path):
    server = ServerProcess("fake db", tmp_path / "fake.log", hidden=("s3cret",))
    port = free_port()
    server.spawn(["sh", "-c", "echo 'reading config'; echo 'fatal: bad setting s3cret' >&2; exit 3", str(port)],
                 env=dict(os.environ), cwd=tmp_path, deathsig=signal.SIGTERM, ports=(port,))
    try:
        with pytest.raises(ServerFailed) as failed:
            server.wait_until(lambda: answers(port), 60, "answer", hint="raise X")
    finally:
        server.stop(signal.SIGTERM, 1.0)
    message = str(failed.value)
    assert isinstance(failed.value, LsqError)
    assert "\n" not in message and "s3cret" not in message, message
    assert message.startswith("fake db exited during start-up (status 3): command sh -c "), message
    assert f"port {port}" in message and str(tmp_path / "fake.log") in message
    assert message.endswith("reading config | fatal: bad setting ***"), message


def test_a_taken_port_is_replaced_and_the_server_started_again(tmp_path):
    script, ports = fake_server(tmp_path), []
    server = ServerProcess("fake", tmp_path / "fake.log")

    def launch(port: int) -> None:
        ports.append(port)
        server.spawn([sys.executable, str(script), str(port)], env=dict(os.environ), cwd=tmp_path,
                     deathsig=signal.SIGTERM, ports=(port,))

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        launch(taken.getsockname()[1])  # picked free, then taken before the server could bind it
        try:
            server.wait_until(lambda: answers(ports[-1]) and "listening" in server.output(), 60, "answer",
                              respawn=lambda: launch(free_port()))
            assert len(ports) == 2 and ports[1] != ports[0] and server.ports == (ports[1],)
            assert pid_alive(server.pid)
        finally:
            pid = server.pid
            server.stop(signal.SIGTERM, 5.0)
        assert not pid_alive(pid) and server.pid is None

        launch(taken.getsockname()[1])
        try:
            with pytest.raises(ServerFailed) as failed:  # always taken: a few tries, then one line
                server.wait_until(lambda: False, 60, "answer", respawn=lambda: launch(taken.getsockname()[1]))
        finally:
            server.stop(signal.SIGTERM, 1.0)
    message = str(failed.value)
    assert f"its port was taken, {PORT_TRIES} tries" in message and "address already in use" in message.lower()
    assert "\n" not in message and len(ports) == 2 + PORT_TRIES


def test_a_server_that_does_not_answer_in_time_is_named_and_its_whole_group_stopped(tmp_path):
    server = ServerProcess("slow", tmp_path / "slow.log")
    server.spawn(["sh", "-c", "echo booting; sleep 600 & sleep 600 & wait"], env=dict(os.environ), cwd=tmp_path,
                 deathsig=signal.SIGTERM, ports=(1234,))
    leader = server.pid
    try:
        assert until(lambda: len(psutil.Process(leader).children()) == 2)
        group = [leader, *(c.pid for c in psutil.Process(leader).children())]
        with pytest.raises(ServerFailed, match=r"^slow did not answer within 0.3 s \(raise X\): command sh -c .*"
                                               r"; port 1234; last output \(.*slow.log\): booting$"):
            server.wait_until(lambda: False, 0.3, "answer", hint="raise X")
    finally:
        server.stop(signal.SIGTERM, 5.0)
    assert until(lambda: not any(pid_alive(pid) for pid in group)), "a process of the group outlived stop()"
    server.stop(signal.SIGTERM, 5.0)  # safe twice


def test_a_server_never_started_says_so(tmp_path):
    with pytest.raises(ServerFailed, match="^never was not started: command \\(not started\\)"):
        ServerProcess("never", tmp_path / "never.log").wait_until(lambda: True, 1, "answer")
