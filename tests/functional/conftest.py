"""Run the real server (`votes serve`) in a subprocess for functional tests.

Each server gets its own data directory and port, starts in its own process group, and is
ready when GET /readyz answers 200 (bounded wait; on failure the test fails with the tail of
the server's log). Teardown sends SIGTERM to the group, waits, then SIGKILL, and fails the
test if the server logged a traceback. Every response a test receives through
`Server.client()` is validated against engine/openapi.yaml (tests/support/http_client.py,
the one HTTP client of the suites), and so is every /readyz answer while the server starts.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import cli
from tests.support.engine_process import LOG_TAIL_BYTES, EngineProcess
from tests.support.http_client import ValidatingClient
from tests.support.vote_client import bearer

HTTP_TIMEOUT_S = 15.0
READY_POLL_S = 0.1


class Server(EngineProcess):
    """A `votes serve` process with validating clients and the CLI on its data directory."""

    def __init__(self, data_dir: Path, log_path: Path, workers: int,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(data_dir, log_path, env, workers=workers, ready_poll_s=READY_POLL_S)
        self._clients: list[ValidatingClient] = []

    def client(self, **kwargs: Any) -> ValidatingClient:
        """A validating client for this server, closed at teardown."""
        kwargs.setdefault("timeout", HTTP_TIMEOUT_S)
        client = ValidatingClient(base_url=self.base_url, **kwargs)
        self._clients.append(client)
        return client

    def admin_token(self, ttl_s: int | None = None) -> str:
        return cli.admin_token(self.data_dir, ttl_s=ttl_s)

    def run_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `votes ARGS... --data-dir DIR` against this server's data directory."""
        return cli.run_cli(*args, "--data-dir", str(self.data_dir), check=check)

    def voter_tokens(self, first: int, count: int, poll: str | None = None,
                     ttl_s: int = 3600) -> list[str]:
        return cli.voter_tokens(self.data_dir, first, count, poll=poll, ttl_s=ttl_s)

    def stop(self) -> int | None:
        for client in self._clients:
            client.close()
        return super().stop()


def start_server(data_dir: Path, workers: int = 1, env: dict[str, str] | None = None) -> Server:
    """Start `votes serve` on data_dir (env: extra environment, e.g. VOTES_<FIELD> config)
    and wait until it is ready."""
    data_dir.mkdir(parents=True, exist_ok=True)
    server = Server(data_dir, data_dir.parent / f"{data_dir.name}-server.log", workers, env)
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


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
    """Start servers on demand, each with a fresh data directory: `server_factory(workers=3)`,
    `server_factory(env={"VOTES_SHARDS": "1"})`.

    Module-scoped so module fixtures can share one server; every server started is stopped
    when the module ends (a test may stop one earlier with `Server.stop()`).
    """
    started: list[Server] = []

    def factory(workers: int = 1, env: dict[str, str] | None = None) -> Server:
        running = start_server(tmp_path_factory.mktemp("server") / "data", workers=workers,
                               env=env)
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
def client(server: Server) -> ValidatingClient:
    return server.client()
