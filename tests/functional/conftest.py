"""Run the real server (`votes serve`) in a subprocess for functional tests.

Each server gets its own data directory and port, starts in its own process group, and is
ready when GET /readyz answers 200 (bounded wait; on failure the test fails with the tail of
the server's log). Teardown sends SIGTERM to the group, waits, then SIGKILL, and fails the
test if the server logged a traceback. Every response a test receives through
`Server.client()` is validated against engine/openapi.yaml (tests/contract.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

TESTS_DIR = str(Path(__file__).resolve().parents[1])
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

import contract  # noqa: E402

READY_WAIT_S = 30.0
STOP_WAIT_S = 10.0
CLI_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 15.0
LOG_TAIL_BYTES = 4000


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", *args]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `votes ARGS...`; with check, fail the test (with its output) on non-zero exit."""
    completed = subprocess.run(
        cli_command(*args), capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
        check=False,
    )
    if check and completed.returncode != 0:
        pytest.fail(
            f"`votes {' '.join(args)}` exited {completed.returncode}\n"
            f"stdout: {completed.stdout[-LOG_TAIL_BYTES:]}\n"
            f"stderr: {completed.stderr[-LOG_TAIL_BYTES:]}"
        )
    return completed


def admin_token(data_dir: Path, ttl_s: int | None = None) -> str:
    """An admin token from `votes admin-token --data-dir DIR [--ttl-s N]`."""
    args = ["admin-token", "--data-dir", str(data_dir)]
    if ttl_s is not None:
        args += ["--ttl-s", str(ttl_s)]
    token = run_cli(*args).stdout.strip()
    assert token and "\n" not in token, f"admin-token printed {token!r}"
    return token


def voter_tokens(data_dir: Path, first: int, count: int, poll: str | None = None,
                 ttl_s: int = 3600) -> list[str]:
    """Tokens for voters first..first+count-1, in that order, from `votes token`."""
    args = ["token", "--data-dir", str(data_dir), "--voter", str(first),
            "--count", str(count), "--ttl-s", str(ttl_s)]
    if poll is not None:
        args += ["--poll", poll]
    tokens = run_cli(*args).stdout.split()
    assert len(tokens) == count, f"`votes token` printed {len(tokens)} tokens, not {count}"
    return tokens


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class ContractClient(httpx.Client):
    """An httpx.Client that validates every response against the OpenAPI document."""

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = super().send(request, **kwargs)
        response.read()
        template = contract.path_template_for(request.url.path)
        contract.validate_response(request.method, template, response)
        return response


@dataclass
class Server:
    base_url: str
    data_dir: Path
    log_path: Path
    workers: int
    process: subprocess.Popen[bytes]
    _clients: list[ContractClient] = field(default_factory=list)

    def client(self, **kwargs: Any) -> ContractClient:
        """A validating client for this server, closed at teardown."""
        kwargs.setdefault("timeout", HTTP_TIMEOUT_S)
        client = ContractClient(base_url=self.base_url, **kwargs)
        self._clients.append(client)
        return client

    def admin_token(self, ttl_s: int | None = None) -> str:
        return admin_token(self.data_dir, ttl_s=ttl_s)

    def run_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `votes ARGS... --data-dir DIR` against this server's data directory."""
        return run_cli(*args, "--data-dir", str(self.data_dir), check=check)

    def voter_tokens(self, first: int, count: int, poll: str | None = None,
                     ttl_s: int = 3600) -> list[str]:
        return voter_tokens(self.data_dir, first, count, poll=poll, ttl_s=ttl_s)

    def log_tail(self) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return "<no log>"
        return data[-LOG_TAIL_BYTES:].decode("utf-8", "replace")

    def stop(self) -> int:
        for client in self._clients:
            client.close()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(STOP_WAIT_S)
        return self.process.returncode


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(data_dir: Path, workers: int = 1) -> Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = data_dir.parent / f"{data_dir.name}-server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            cli_command("serve", "--data-dir", str(data_dir), "--port", str(port),
                        "--workers", str(workers)),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", data_dir, log_path, workers, process)
    deadline = time.monotonic() + READY_WAIT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited {process.returncode} before ready; log:\n"
                        f"{server.log_tail()}")
        try:
            answer = httpx.get(f"{server.base_url}/readyz", timeout=1.0)
        except httpx.TransportError as error:
            last = repr(error)
        else:
            # Not-ready answers are part of the contract too.
            contract.validate_response("GET", "/readyz", answer)
            if answer.status_code == 200:
                return server
            last = f"{answer.status_code} {answer.text[:200]}"
        time.sleep(0.1)
    server.stop()
    pytest.fail(f"server not ready within {READY_WAIT_S} s (last: {last}); log:\n"
                f"{server.log_tail()}")


def finish_server(server: Server) -> None:
    """Stop the server; fail if it logged a traceback (a server bug even if answers passed)."""
    server.stop()
    log = server.log_path.read_text("utf-8", "replace")
    if "Traceback" in log:
        pytest.fail(f"server logged a traceback; log:\n{log[-LOG_TAIL_BYTES * 2:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with one worker and a fresh data directory, shared by a module."""
    running = start_server(tmp_path_factory.mktemp("server") / "data", workers=1)
    yield running
    finish_server(running)


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Start servers on demand, each with a fresh data directory: `server_factory(workers=3)`.

    Module-scoped so module fixtures can share one server; every server started is stopped
    when the module ends (a test may stop one earlier with `Server.stop()`).
    """
    started: list[Server] = []

    def factory(workers: int = 1) -> Server:
        running = start_server(tmp_path_factory.mktemp("server") / "data", workers=workers)
        started.append(running)
        return running

    yield factory
    for running in started:
        finish_server(running)


@pytest.fixture(scope="module")
def admin(server: Server) -> dict[str, str]:
    """Authorization headers with an admin token for the module's server."""
    return bearer(server.admin_token())


@pytest.fixture(scope="module")
def client(server: Server) -> ContractClient:
    return server.client()
