"""Processes lsq starts and watches: the one home for "die with my parent", "is that process still the one I
recorded", "a loopback port to listen on", and the one server launcher (:class:`ServerProcess`). Used by the
library (torchrun workers), the flows (the temporary Prefect server, unit flow runs) and the deployments (the
team servers, Prefect servers and workers). Liveness comes from psutil, not /proc parsing, so it reads the same
on every platform psutil knows.

Light module (the temporary Prefect server starts through it before the pipeline's heavy imports): no torch,
prefect or mlflow, here or in what it imports.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

from lsq.errors import LsqError


def die_with_parent_by(sig: int) -> Callable[[], None]:
    """A ``preexec_fn`` (or a call in the process itself) asking the kernel to send ``sig`` when the
    parent dies (``PR_SET_PDEATHSIG``; after any user switch, which clears it). Not Linux: nothing."""
    def preexec() -> None:
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)
        except OSError:
            pass
    return preexec


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists on this host and is not a zombie (someone else's process counts)."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, as an opaque string (None when gone): equal for one process, different for
    a later process given the same pid (the boot time is in it, so a reboot changes it too)."""
    try:
        return f"psutil:{psutil.boot_time():.0f}:{psutil.Process(pid).create_time():.3f}"
    except psutil.Error:
        return None


def pid_namespace() -> str | None:
    """This process's pid namespace (``pid:[4026531836]``), None when the platform has none: pids compare only
    within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now. Only for a server that takes its port on the command line: bind it
    at once, and retry on a new port if the server reports it taken."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def answers(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers HTTP 200 now (a server's health endpoint); False while it cannot be reached."""
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status == 200
    return False


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports from :func:`free_port` (a server that listens on several)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


def private_folder(prefix: str) -> Path:
    """A new folder ``<tmp>/<prefix>-<pid>-XXXXXXXX`` for this process, after removing the folders of
    ``prefix`` whose process is gone (its owner was SIGKILLed and could not clean up; its server, bound
    to it, is gone too)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}-*-*"):
        pid = folder.name.removeprefix(f"{prefix}-").split("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-"))


# ------------------------------------------------------------------------------------------ servers
PORT_TAKEN = re.compile(r"already in use|EADDRINUSE", re.IGNORECASE)  # uvicorn, postgres, weed, prefect's CLI
PORT_TRIES = 4  # starts of one server on newly picked ports when its port was taken before it could bind
TAIL_LINES = 20
TAIL_CHARS = 3000


class ServerFailed(LsqError):
    """A server that exited or did not answer during start-up. One line: the server, its command line, its
    port(s) and the last lines it printed (secrets masked)."""


class ServerProcess:
    """One server process, the one launcher of lsq's servers (the temporary Prefect server, the team's
    PostgreSQL, object store, MLflow and Prefect servers, the Prefect workers).

    :meth:`spawn` starts it in its own session (Ctrl-C in a terminal reaches only its parent, which stops it
    in order), writing to ``log``, asking the kernel for ``deathsig`` when its parent dies
    (``PR_SET_PDEATHSIG``, which belongs to the parent *thread*: start servers from one that outlives them;
    set after an optional user switch, which would clear it). :meth:`wait_until` polls a readiness check,
    starts it again on new ports when its port was taken between :func:`free_port` and its bind, and raises
    :class:`ServerFailed` otherwise. :meth:`stop` sends the polite signal, waits up to a grace time for the
    leader, then SIGKILLs whatever is left of its process group. ``hidden`` strings are masked in every
    message; ``keep_log`` False: the log goes away with its folder (not named in messages).
    """

    def __init__(self, name: str, log: str | os.PathLike, hidden: tuple[str, ...] = (), keep_log: bool = True):
        self.name, self.log, self.hidden, self.keep_log = name, Path(log), tuple(filter(None, hidden)), keep_log
        self.popen: subprocess.Popen | None = None
        self.argv: list[str] = []
        self.ports: tuple[int, ...] = ()
        self._log_start = 0  # where this start's output begins in the log (appended to across starts)

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str | os.PathLike | None, deathsig: int,
              user: pwd.struct_passwd | None = None, ports: tuple[int, ...] = ()) -> None:
        """Start ``argv`` (at once: no wait); ``ports``: those it listens on, for messages."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.argv, self.ports = [str(a) for a in argv], tuple(ports)
        with open(self.log, "ab") as out:
            self._log_start = os.fstat(out.fileno()).st_size
            self.popen = subprocess.Popen(
                self.argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
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
        """``sig``, up to ``grace`` seconds for the leader to exit, then SIGKILL to the whole group. Safe twice."""
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

    def output(self, since: int | None = None, lines: int | None = TAIL_LINES, size: int = 16384) -> list[str]:
        """The last ``lines`` lines (of the last ``size`` bytes) written to the log since ``since`` (default:
        this start), secrets masked; blank lines left out."""
        start = self._log_start if since is None else since
        try:
            with open(self.log, "rb") as f:
                f.seek(max(start, f.seek(0, os.SEEK_END) - size))
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        found = [line.strip() for line in self._masked(text).splitlines() if line.strip()]
        return found if lines is None else found[-lines:]

    def failure(self, what: str, argv: list[str] | None = None, since: int | None = None) -> ServerFailed:
        """``<name> <what>: command ...; port(s) ...; last output (log): a | b | c`` as one line."""
        command = self._masked(shlex.join(self.argv if argv is None else argv)) or "(not started)"
        ports = ""
        if self.ports:
            ports = f"; port{'s' if len(self.ports) > 1 else ''} {', '.join(map(str, self.ports))}"
        printed = " | ".join(self.output(since)) or "(nothing)"
        if len(printed) > TAIL_CHARS:
            printed = "..." + printed[-TAIL_CHARS + 3:]
        where = f" ({self.log})" if self.keep_log else ""
        return ServerFailed(f"{self.name} {what}: command {command}{ports}; last output{where}: {printed}")

    def port_taken(self) -> bool:
        """True when this start's output says its port was in use (anywhere: a traceback of the shutdown
        that follows may be longer than what a message shows)."""
        return any(PORT_TAKEN.search(line) for line in self.output(lines=None, size=1 << 20))

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str | Callable[[], str],
                   hint: str | None = None, respawn: Callable[[], None] | None = None,
                   interval: float = 0.25) -> None:
        """Poll ``ready()`` until true. When the server exits first and said its port was taken, and
        ``respawn`` is given (it picks new ports and calls :meth:`spawn`), start it again, up to
        :data:`PORT_TRIES` starts in all. Else :class:`ServerFailed` when it exits or ``timeout``
        passes (``what``: what it did not do in time, e.g. ``answer at URL``; ``hint``: what to do)."""
        if self.popen is None:
            raise self.failure("was not started")
        deadline, tries = time.monotonic() + timeout, 1
        while True:
            code = self.exited()
            if code is not None:
                taken = self.port_taken()
                if taken and respawn is not None and tries < PORT_TRIES:
                    tries += 1
                    self.stop(signal.SIGKILL, 0.0)  # reaped, with whatever it left in its group
                    respawn()
                    continue
                why = f"; its port was taken, {tries} tries" if taken and respawn is not None else ""
                raise self.failure(f"exited during start-up (status {code}{why})")
            if ready():
                return
            if time.monotonic() > deadline:
                doing = what() if callable(what) else what
                raise self.failure(f"did not {doing} within {timeout:g} s" + (f" ({hint})" if hint else ""))
            time.sleep(interval)

    def _masked(self, text: str) -> str:
        for secret in self.hidden:
            text = text.replace(secret, "***")
        return text


def entered(server):
    """``server`` started and waited for (a ``with`` statement's value); stopped if either fails."""
    try:
        server.start()
        return server.wait()
    except BaseException:
        server.stop()
        raise


def _ended_unreaped(pid: int) -> bool:
    """True once child ``pid`` has exited, without reaping it (so its pid, and pgid, stay reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True
