"""Processes of the local stack: start detached, identify by pid file, stop, lock.

Every service runs in its own session (setsid), so it outlives the `up` that started it and
a test's Ctrl-C does not reach it. A pid file holds (pid, start time): together they name one
process for good, so `down` never signals an unrelated process that reused the pid. Every
wait here is bounded; a wait that runs out raises `StackError` naming what it waited for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from deploy.local.installer import InstallError, ensure_debian_package

STOP_TIMEOUT_S = 20.0  # SIGTERM, then SIGKILL after this
KILLED_GONE_TIMEOUT_S = 10.0  # a SIGKILLed process disappears from /proc within this
STOP_POLL_S = 0.1
PORT_PROBE_TIMEOUT_S = 0.5
LOCK_POLL_S = 0.2
LOG_TAIL_BYTES_MAX = 64 * 1024  # read only the end of a log, however long it grew
LOG_TAIL_LINES = 40
# /proc/<pid>/stat after the ")" that closes the command name: field 3 (state) is index 0,
# field 22 (start time in clock ticks since boot) is index 19.
PROC_STAT_STATE_INDEX = 0
PROC_STAT_START_TIME_INDEX = 19
PROC_STATES_GONE = ("Z", "X", "x")  # zombie or dead: exited, only not reaped yet

Result = TypeVar("Result")


class StackError(RuntimeError):
    """Something in the local stack did not come up / go down as expected."""


def log(message: str) -> None:
    print(f"[stack {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def install_debian_package(command: str, package: str) -> str:
    """`ensure_debian_package`, failing with StackError like every other stack step."""
    try:
        return ensure_debian_package(command, package, log=log)
    except InstallError as error:
        raise StackError(str(error)) from error


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log, headed by its path, for error messages."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            size_bytes = file.tell()
            file.seek(max(0, size_bytes - LOG_TAIL_BYTES_MAX))
            text = file.read().decode("utf-8", "replace")
    except OSError as error:
        return f"(no log at {path}: {error})"
    return f"--- tail of {path} ---\n" + "\n".join(text.splitlines()[-lines:])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = PORT_PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _reap(pid: int) -> None:
    """Collect a child that has exited (no-op for processes that are not our children)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _proc_stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and ")": split after its last ")".
    return stat.rsplit(")", 1)[-1].split()


def proc_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None if it does not run."""
    fields = _proc_stat_fields(pid)
    return None if fields is None else int(fields[PROC_STAT_START_TIME_INDEX])


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True if pid runs (not a zombie) and, if given, was started at start_time."""
    if pid <= 0:
        return False
    _reap(pid)
    fields = _proc_stat_fields(pid)
    if fields is None or fields[PROC_STAT_STATE_INDEX] in PROC_STATES_GONE:
        return False
    return start_time is None or int(fields[PROC_STAT_START_TIME_INDEX]) == start_time


def spawn_detached(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Start argv in its own session, stdin from /dev/null, stdout+stderr appended to log_path.

    posix_spawn, because forking a possibly multi-threaded interpreter is unsafe and a Popen
    object would warn when collected while the service still runs. Returns the pid.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    executable = argv[0] if os.sep in argv[0] else shutil.which(argv[0])
    if executable is None:
        raise StackError(f"executable not found: {argv[0]}")
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    with open(log_path, "ab") as file:
        file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(argv)}\n".encode())
    return os.posix_spawn(executable, argv, env if env is not None else dict(os.environ),
                          file_actions=file_actions, setsid=True)


def _wait_all_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
        time.sleep(STOP_POLL_S)


def terminate(pids: Iterable[int], timeout: float = STOP_TIMEOUT_S,
              sig: int = signal.SIGTERM) -> list[int]:
    """Send sig to each pid, wait up to timeout, then SIGKILL the rest. Returns killed pids."""
    running = [pid for pid in pids if pid_alive(pid)]
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    _wait_all_gone(running, timeout)
    killed = [pid for pid in running if pid_alive(pid)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_all_gone(running, KILLED_GONE_TIMEOUT_S)
    return killed


def run_coroutine(coroutine: Coroutine[Any, Any, Result]) -> Result:
    """Run a coroutine to completion from sync code, even if called inside a running loop
    (a test's event loop): then on a fresh loop in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        return executor.submit(asyncio.run, coroutine).result()


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive flock on path; StackError after timeout_s of waiting for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as file:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StackError(f"timed out after {timeout_s}s waiting for lock {path} "
                                     f"({what})") from None
                time.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


@dataclass
class Service:
    """One process of the stack, known by its pid file and the port that says it is up."""

    name: str
    port: int
    pid_file: Path
    log_file: Path  # stdout/stderr
    extra_log: Path | None = None  # the service's own log, if it has one

    def _read_pid_file(self) -> tuple[int, int | None]:
        try:
            parts = self.pid_file.read_text().split()
            return int(parts[0]), int(parts[1])
        except (OSError, ValueError, IndexError):
            return 0, None

    def pid(self) -> int:
        return self._read_pid_file()[0]

    def alive(self) -> bool:
        pid, start_time = self._read_pid_file()
        return start_time is not None and pid_alive(pid, start_time)

    def write_pid(self, pid: int) -> None:
        start_time = proc_start_time(pid)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.pid_file.with_suffix(".tmp")
        temporary.write_text(f"{pid} {start_time if start_time is not None else -1}\n")
        temporary.replace(self.pid_file)  # atomic: a reader sees the old or the new pid

    def tails(self, lines: int = LOG_TAIL_LINES) -> str:
        out = [log_tail(self.log_file, lines)]
        if self.extra_log is not None:
            out.append(log_tail(self.extra_log, lines))
        return "\n".join(out)

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Spawn argv unless this service already runs; refuse a port someone else holds."""
        if self.alive():
            return
        if port_open(self.port):
            raise StackError(
                f"{self.name}: port 127.0.0.1:{self.port} is already in use by a process that "
                f"is not this stack's {self.name} (pid file {self.pid_file}); pick another "
                "--base-port")
        self.write_pid(spawn_detached(argv, self.log_file, env))

    def wait_port(self, timeout_s: float) -> None:
        """Until the port opens; StackError with the log tails if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if port_open(self.port):
                return
            if not self.alive():
                time.sleep(0.3)  # let the log flush before its tail goes into the error
                raise StackError(f"{self.name} exited before its port {self.port} opened\n"
                                 f"{self.tails()}")
            time.sleep(STOP_POLL_S)
        raise StackError(f"{self.name}: port 127.0.0.1:{self.port} did not open within "
                         f"{timeout_s:.0f}s\n{self.tails()}")
