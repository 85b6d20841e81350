"""Run `votes serve` as a killable process group, for crash and fault tests.

A `ServerProcess` keeps one data directory and one port across restarts, so a test can
SIGKILL the whole server (the Granian main process and every worker) and start it again on
the same log. Rules a caller can rely on:
- Each start runs in a new session (its own process group); its stdout and stderr are
  appended to one log file that outlives the restarts.
- `kill()` sends SIGKILL to the whole group and returns only when no process of the group
  is still running (bounded wait; zombies awaiting their reaper no longer hold locks or
  sockets).
- Readiness is GET /readyz answering 200, waited for with a bound; on timeout or an early
  exit the test fails with the tail of the server's log.
- `running_server(...)` always kills the group on the way out, whatever happened.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

READY_WAIT_S = 30.0
KILL_WAIT_S = 10.0
CLI_TIMEOUT_S = 60.0
LOG_TAIL_BYTES = 4000
READY_POLL_S = 0.05


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def votes_cli(*args: str) -> str:
    """Run `votes ARGS...` and return its stdout; fail the test on a non-zero exit."""
    completed = subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True,
                               text=True, timeout=CLI_TIMEOUT_S, check=False)
    if completed.returncode != 0:
        pytest.fail(f"`votes {' '.join(args)}` exited {completed.returncode}\n"
                    f"stdout: {completed.stdout[-LOG_TAIL_BYTES:]}\n"
                    f"stderr: {completed.stderr[-LOG_TAIL_BYTES:]}")
    return completed.stdout


def _group_running(group_id: int) -> list[int]:
    """Pids of the group's processes that have not exited yet (zombies excluded)."""
    running = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; the fields after its ')' do not.
        fields = stat[stat.rindex(")") + 2:].split()
        state, process_group = fields[0], int(fields[2])
        if process_group == group_id and state not in ("Z", "X"):
            running.append(int(entry.name))
    return running


class ServerProcess:
    def __init__(self, data_dir: Path, log_path: Path, *, workers: int = 1,
                 shards: int | None = None, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.workers = workers
        self.shards = shards
        self.port = port or free_port()
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server (not waiting for readiness)."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the server is already running")
        command = [sys.executable, "-m", "engine.cli", "serve", "--data-dir", str(self.data_dir),
                   "--port", str(self.port), "--workers", str(self.workers)]
        if self.shards is not None:
            command += ["--shards", str(self.shards)]
        environment = None if self.env is None else {**os.environ, **self.env}
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts + 1} ===\n".encode())
            log.flush()
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=environment,
                                            start_new_session=True)
        self.starts += 1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _check_alive_while_waiting(self, last: str) -> None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            pytest.fail(f"server exited ({code}) before it was ready (last: {last}); log:\n"
                        f"{self.log_tail()}")

    def wait_ready(self, timeout_s: float = READY_WAIT_S) -> float:
        """Block until /readyz answers 200; return the seconds it took."""
        started = time.monotonic()
        last = "no answer"
        while time.monotonic() - started < timeout_s:
            self._check_alive_while_waiting(last)
            try:
                answer = httpx.get(self.base_url + "/readyz", timeout=1.0)
                if answer.status_code == 200:
                    return time.monotonic() - started
                last = f"{answer.status_code} {answer.text[:200]}"
            except httpx.TransportError as error:
                last = repr(error)
            time.sleep(READY_POLL_S)
        self._fail_not_ready(timeout_s, last)

    async def wait_ready_async(self, client: httpx.AsyncClient,
                               timeout_s: float = READY_WAIT_S) -> float:
        """Like `wait_ready`, without blocking the event loop (other tasks keep sending)."""
        started = time.monotonic()
        last = "no answer"
        while time.monotonic() - started < timeout_s:
            self._check_alive_while_waiting(last)
            try:
                answer = await client.get(self.base_url + "/readyz", timeout=1.0)
                if answer.status_code == 200:
                    return time.monotonic() - started
                last = f"{answer.status_code} {answer.text[:200]}"
            except httpx.TransportError as error:
                last = repr(error)
            await asyncio.sleep(READY_POLL_S)
        self._fail_not_ready(timeout_s, last)

    def _fail_not_ready(self, timeout_s: float, last: str) -> NoReturn:
        pytest.fail(f"server not ready within {timeout_s} s (last: {last}); log:\n"
                    f"{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process group and wait until none of it runs any more."""
        if self.process is None:
            return
        group_id = self.process.pid  # start_new_session: the leader's pid is the group id
        try:
            os.killpg(group_id, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(KILL_WAIT_S)
        deadline = time.monotonic() + KILL_WAIT_S
        while (running := _group_running(group_id)) and time.monotonic() < deadline:
            time.sleep(0.01)
        if running:
            pytest.fail(f"processes {running} of group {group_id} survived SIGKILL")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self) -> str:
        return self.log_text()[-LOG_TAIL_BYTES:] or "<empty log>"


@contextmanager
def running_server(data_dir: Path, log_path: Path, **options) -> Iterator[ServerProcess]:
    """A started, ready server that is SIGKILLed (whole group) when the block ends."""
    server = ServerProcess(data_dir, log_path, **options)
    try:
        server.start()
        server.wait_ready()
        yield server
    finally:
        server.kill()
