"""Run `votes serve` against the real local stack, as a process group tests can stop or pause.

An `EngineProcess` is one engine instance: its own data dir, port and log file, and the
Kafka WAL named by its environment (`VOTES_KAFKA_BOOTSTRAP_SERVERS`, `VOTES_SHARDS`, ...).
Rules a caller can rely on:
- Each start runs in a new session (its own process group), output appended to one log file.
- `keys_from` copies another engine's `keys/` before the first start, as production hosts
  share keys from a secrets store: tokens and receipts of one engine verify at the other.
- `pause()` / `resume()` send SIGSTOP / SIGCONT to the whole group (a zombie owner).
- `stop()` SIGKILLs (after SIGCONT) the whole group and returns only when none of it runs.
- Readiness is GET /readyz answering 200, waited for with a bound; on timeout or early exit
  the test fails with the tail of the engine's log.
- Only one engine may own a shard at a time: starting a second one fences the first.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

READY_WAIT_S = 60.0
EXIT_WAIT_S = 10.0
CLI_TIMEOUT_S = 60.0
LOG_TAIL_BYTES = 4000
READY_POLL_S = 0.1


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


def kafka_env(local_stack, **extra: str) -> dict[str, str]:
    """Environment that points `votes serve` at the stack's WAL topic."""
    return {"VOTES_KAFKA_BOOTSTRAP_SERVERS": local_stack.bootstrap_servers,
            "VOTES_SHARDS": str(local_stack.partitions),
            "VOTES_WAL_TOPIC": local_stack.wal_topic, **extra}


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
        fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
        if int(fields[2]) == group_id and fields[0] not in ("Z", "X"):
            running.append(int(entry.name))
    return running


class EngineProcess:
    def __init__(self, data_dir: Path, log_path: Path, env: dict[str, str], *,
                 keys_from: Path | None = None, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.env = env
        self.keys_from = keys_from
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the engine is already running")
        if self.keys_from is not None and not (self.data_dir / "keys").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(self.keys_from / "keys", self.data_dir / "keys")
        command = [sys.executable, "-m", "engine.cli", "serve", "--data-dir", str(self.data_dir),
                   "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start at {time.strftime('%H:%M:%S')} ===\n".encode())
            log.flush()
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL,
                                            env={**os.environ, **self.env},
                                            start_new_session=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_exit(self, timeout_s: float = READY_WAIT_S) -> int:
        return self.process.wait(timeout_s)

    def _check_alive(self, last: str) -> None:
        if not self.alive():
            code = None if self.process is None else self.process.returncode
            pytest.fail(f"engine exited ({code}) before it was ready (last: {last}); log:\n"
                        f"{self.log_tail()}")

    def wait_ready(self, timeout_s: float = READY_WAIT_S) -> float:
        """Block until /readyz answers 200; return the seconds it took."""
        started = time.monotonic()
        last = "no answer"
        while time.monotonic() - started < timeout_s:
            self._check_alive(last)
            try:
                answer = httpx.get(self.base_url + "/readyz", timeout=2.0)
                if answer.status_code == 200:
                    return time.monotonic() - started
                last = f"{answer.status_code} {answer.text[:300]}"
            except httpx.TransportError as error:
                last = repr(error)
            time.sleep(READY_POLL_S)
        self._fail_not_ready(timeout_s, last)

    async def wait_ready_async(self, client: httpx.AsyncClient,
                               timeout_s: float = READY_WAIT_S) -> float:
        """Like `wait_ready`, without blocking the event loop."""
        started = time.monotonic()
        last = "no answer"
        while time.monotonic() - started < timeout_s:
            self._check_alive(last)
            try:
                answer = await client.get(self.base_url + "/readyz", timeout=2.0)
                if answer.status_code == 200:
                    return time.monotonic() - started
                last = f"{answer.status_code} {answer.text[:300]}"
            except httpx.TransportError as error:
                last = repr(error)
            await asyncio.sleep(READY_POLL_S)
        self._fail_not_ready(timeout_s, last)

    def _fail_not_ready(self, timeout_s: float, last: str) -> NoReturn:
        pytest.fail(f"engine not ready within {timeout_s} s (last: {last}); log:\n"
                    f"{self.log_tail()}")

    def _signal_group(self, signal_number: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal_number)  # start_new_session: pid = group id
        except ProcessLookupError:
            pass

    def pause(self) -> None:
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def stop(self) -> None:
        """SIGKILL the whole group (paused or not) and wait until none of it runs."""
        if self.process is None:
            return
        group_id = self.process.pid
        self._signal_group(signal.SIGKILL)
        self._signal_group(signal.SIGCONT)  # a stopped process dies only once it runs
        self.process.wait(EXIT_WAIT_S)
        deadline = time.monotonic() + EXIT_WAIT_S
        while (running := _group_running(group_id)) and time.monotonic() < deadline:
            time.sleep(0.01)
        if running:
            pytest.fail(f"processes {running} of engine group {group_id} survived SIGKILL")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self) -> str:
        return self.log_text()[-LOG_TAIL_BYTES:] or "<empty log>"
