"""Server processes bound to the process that starts them (used by :mod:`deployments.stack`).

A :class:`ServerProcess` runs in its own session (Ctrl-C in a terminal reaches only its parent, which
stops it in order), logs to one file, asks the kernel for a signal when its parent dies
(``PR_SET_PDEATHSIG``, which belongs to the parent *thread*: start servers from one that outlives
them), and on :meth:`ServerProcess.stop` gets its polite signal, a grace period, then SIGKILL for
whatever is left of its process group.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from flows.server import _free_port, die_with_parent_by
from lsq.errors import LsqError


class ServerProcess:
    """One server process in its own process group, writing to ``log``; ``hidden`` strings are masked
    in what :meth:`tail` shows."""

    def __init__(self, name: str, log: Path, hidden: tuple[str, ...] = ()):
        self.name, self.log, self.hidden = name, log, hidden
        self.popen: subprocess.Popen | None = None

    def spawn(self, argv: list[str], env: dict[str, str], cwd: Path, deathsig: int,
              user: pwd.struct_passwd | None = None) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent_by(deathsig),
                **({} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}),
            )

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def exited(self) -> int | None:
        """The exit status once the process has ended (None while it runs or before it started)."""
        return None if self.popen is None else self.popen.poll()

    def stop(self, sig: int, grace: float) -> None:
        """``sig``, up to ``grace`` seconds for the leader to exit, then SIGKILL to the whole group."""
        if self.popen is None:
            return
        pid = self.popen.pid
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while not _ended_unreaped(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # what is left of the group (a leader not yet reaped keeps its pgid)
        self.popen.wait()
        self.popen = None

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the log, secrets masked."""
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        for secret in self.hidden:
            text = text.replace(secret, "***")
        return "\n".join("  " + line for line in text.splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready()`` until true; LsqError naming the server (with its log's tail) if it exits or
        ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.exited()
            if code is not None:
                raise LsqError(f"{self.name} exited during start-up (status {code}); {self.log}:\n{self.tail()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise LsqError(f"{self.name} did not {what} within {timeout:g} s (raise LSQ_STACK_STARTUP_TIMEOUT); "
                               f"{self.log}:\n{self.tail()}")
            time.sleep(0.25)


def _ended_unreaped(pid: int) -> bool:
    """True once child ``pid`` has exited, without reaping it (so its pid, and pgid, stay reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = _free_port()
        if port not in ports:
            ports.append(port)
    return ports


def child_env(drop: tuple[str, ...] = ("AWS_", "MLFLOW_")) -> dict[str, str]:
    """This process's environment without credentials or settings meant for clients."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def private_file(path: Path, text: str, owner: pwd.struct_passwd | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def entered(server):
    """``server`` started and waited for (the ``with`` statement's value); stopped if either fails."""
    try:
        server.start()
        return server.wait()
    except BaseException:
        server.stop()
        raise
