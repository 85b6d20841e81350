"""Run `votes serve` as a subprocess in its own process group, for functional and integration tests.

An `EngineProcess` is one engine instance: one data dir, port and log file, kept across
restarts, so a test can kill the whole engine (the Granian main process and every worker) and
start it again on the same data. Rules a caller can rely on:
- Each start runs in a new session (its own process group); its stdout and stderr are
  appended to one log file that outlives the restarts, after a marker line per start.
- `env` is added to the test's environment (e.g. `kafka_env(local_stack)` for the Kafka WAL);
  `workers` is passed as `--workers` when given.
- `keys_from` copies another engine's `keys/` before the first start, as production hosts
  share keys from a secrets store: tokens and receipts of one engine verify at the other.
- Readiness is GET /readyz answering 200, waited for with a bound; on timeout or an early
  exit the test fails with the tail of the log. Every /readyz answer on the way is validated
  against engine/openapi.yaml (tests/support/http_client.py), and `check_readyz` sees it.
- `kill()` sends SIGKILL (and SIGCONT, so a paused group dies too) to the whole group and
  returns only when no process of the group is still running (bounded wait; zombies awaiting
  their reaper no longer hold locks or sockets).
- `stop()` sends SIGTERM to the group and waits; if the engine has not exited in time, SIGKILL.
- `pause()` / `resume()` send SIGSTOP / SIGCONT to the whole group (a zombie owner).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support import http_client
from tests.support.cli import cli_command

READY_WAIT_S = 30.0
READY_POLL_S = 0.05
PROBE_TIMEOUT_S = 1.0
EXIT_WAIT_S = 10.0
LOG_TAIL_BYTES = 4000
# An engine on the Kafka WAL takes every shard's fence and replays its partition first.
KAFKA_READINESS = {"ready_wait_s": 60.0, "ready_poll_s": 0.1, "probe_timeout_s": 2.0}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kafka_env(local_stack, **extra: str) -> dict[str, str]:
    """Environment that points `votes serve` at the stack's WAL topic: one fencing group per
    partition, one shard per group (the lease, fence and move tests count in shards)."""
    return {"VOTES_KAFKA_BOOTSTRAP_SERVERS": local_stack.bootstrap_servers,
            "VOTES_SHARDS": str(local_stack.partitions),
            "VOTES_GROUPS": str(local_stack.partitions),
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
        # The command name (field 2) may hold spaces; the fields after its ')' do not.
        fields = stat[stat.rindex(")") + 2:].split()
        state, process_group = fields[0], int(fields[2])
        if process_group == group_id and state not in ("Z", "X"):
            running.append(int(entry.name))
    return running


class EngineProcess:
    def __init__(self, data_dir: Path, log_path: Path, env: dict[str, str] | None = None, *,
                 workers: int | None = None, keys_from: Path | None = None,
                 port: int | None = None, ready_wait_s: float = READY_WAIT_S,
                 ready_poll_s: float = READY_POLL_S,
                 probe_timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.env = env
        self.workers = workers
        self.keys_from = keys_from
        self.port = port or free_port()
        self.ready_wait_s = ready_wait_s
        self.ready_poll_s = ready_poll_s
        self.probe_timeout_s = probe_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the engine (not waiting for readiness)."""
        if self.alive():
            raise RuntimeError("the engine is already running")
        if self.keys_from is not None and not (self.data_dir / "keys").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(self.keys_from / "keys", self.data_dir / "keys")
        command = cli_command("serve", "--data-dir", str(self.data_dir), "--port", str(self.port))
        if self.workers is not None:
            command += ["--workers", str(self.workers)]
        environment = None if self.env is None else {**os.environ, **self.env}
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts + 1} at {time.strftime('%H:%M:%S')} ===\n"
                      .encode())
            log.flush()
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=environment,
                                            start_new_session=True)
        self.starts += 1

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_exit(self, timeout_s: float) -> int:
        return self.process.wait(timeout_s)

    # Readiness ---------------------------------------------------------------------------

    def check_readyz(self, answer: httpx.Response) -> None:
        """Called with every /readyz answer while waiting (a subclass may validate it)."""

    def wait_ready(self, timeout_s: float | None = None) -> float:
        """Block until /readyz answers 200; return the seconds it took."""
        timeout_s = self.ready_wait_s if timeout_s is None else timeout_s
        started = time.monotonic()
        last = "no answer"
        while time.monotonic() - started < timeout_s:
            if not self.alive():
                code = None if self.process is None else self.process.returncode
                pytest.fail(f"`votes serve` exited ({code}) before it was ready (last: {last}); "
                            f"log:\n{self.log_tail()}")
            try:
                answer = http_client.get(self.base_url + "/readyz",
                                         timeout_s=self.probe_timeout_s)
            except httpx.TransportError as error:
                last = repr(error)
            else:
                self.check_readyz(answer)
                if answer.status_code == 200:
                    return time.monotonic() - started
                last = f"{answer.status_code} {answer.text[:300]}"
            time.sleep(self.ready_poll_s)
        pytest.fail(f"`votes serve` not ready within {timeout_s} s (last: {last}); log:\n"
                    f"{self.log_tail()}")

    async def wait_ready_async(self, timeout_s: float | None = None) -> float:
        """Like `wait_ready`, without blocking the event loop (other tasks keep sending): the
        probes run in a worker thread."""
        return await asyncio.to_thread(self.wait_ready, timeout_s)

    # Signals -----------------------------------------------------------------------------

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

    def kill(self) -> None:
        """SIGKILL the whole group (paused or not) and wait until none of it runs any more."""
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
            pytest.fail(f"processes {running} of group {group_id} survived SIGKILL")

    def stop(self) -> int | None:
        """SIGTERM the group and wait for the engine; SIGKILL the group if it takes too long.
        Returns the engine's exit code (None if it was never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait(EXIT_WAIT_S)
        return self.process.returncode

    # The log -----------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self) -> str:
        return self.log_text()[-LOG_TAIL_BYTES:] or "<empty log>"
