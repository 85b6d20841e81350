"""Servers under test and the HTTP calls made to them, on 127.0.0.1 only, every wait bounded.

A server runs in its own process group with its output in a log file, so stopping it ends
its workers too and a failure can show the log's last lines.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from perf import REPO_DIR, BenchError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (racy, but fine for one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_request(
    method: str,
    url: str,
    body: bytes | dict | None = None,
    token: str | None = None,
    timeout_s: float = 5.0,
) -> tuple[int, bytes]:
    """One HTTP request; returns (status, body) for any status, raises on transport errors."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_for_http(
    url: str,
    timeout_s: float,
    expect_status: int = 200,
    server: ServerProcess | None = None,
) -> float:
    """Poll ``url`` until it answers ``expect_status``; returns the seconds it took.

    Raises BenchError, with the server's log tail when a server is given, if the server
    exits or the deadline passes first.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server is not None and server.proc.poll() is not None:
            raise BenchError(
                f"{server.name} exited with code {server.proc.returncode} before {url} "
                f"answered {expect_status}\n{server.log_tail()}"
            )
        try:
            status, _ = http_request("GET", url, timeout_s=1.0)
            if status == expect_status:
                return time.monotonic() - started
            last = f"status {status}"
        except (OSError, urllib.error.URLError) as error:
            last = repr(error)
        time.sleep(0.1)
    tail = f"\n{server.log_tail()}" if server is not None else ""
    raise BenchError(f"{url} did not answer {expect_status} within {timeout_s}s ({last}){tail}")




class ServerProcess:
    """A server started in its own process group, its output kept in a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO_DIR,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines_max: int = 40) -> str:
        self._log.flush()
        try:
            with open(self.log_path, "rb") as log:
                tail = deque(log, maxlen=lines_max)
        except OSError as error:
            return f"(no log: {error})"
        text = b"".join(tail).decode(errors="replace")
        return f"--- last {len(tail)} lines of {self.log_path} ---\n{text}--- end of log ---"

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGINT the group (Granian shuts down cleanly on it), then SIGTERM, then SIGKILL."""
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        # Workers left behind by a dead parent are still in the group: end them too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        return self.proc.returncode
