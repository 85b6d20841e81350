"""Redis of the local stack: one `redis-server` without persistence, on 127.0.0.1.

The engine keeps only leases in Redis, which expire anyway, so nothing is saved to disk
(`--save "" --appendonly no`): a restarted Redis starts empty, as after a real failover.
The binary is Debian's `redis-server`, installed through the project's installer when
missing.(Named redis_server, not redis: a module named redis would read as the client library.)
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from deploy.local.processes import Service, StackError, install_debian_package

REDIS_PACKAGE = "redis-server"
REDIS_TIMEOUT_S = 20.0  # until PONG
PING_TIMEOUT_S = 1.0
PING_POLL_S = 0.1
PONG_BYTES_MAX = 64


def ensure_redis() -> str:
    """The path of redis-server, apt-get installing it first if missing (root only).

    Debian's package also starts a system instance on 6379; the stack does not use it and
    leaves it be."""
    return install_debian_package("redis-server", REDIS_PACKAGE)


def redis_ping(port: int, timeout: float = PING_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(PONG_BYTES_MAX).startswith(b"+PONG")
    except OSError:
        return False


def redis_argv(redis_server: str, port: int, directory: Path) -> list[str]:
    return [
        redis_server,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",  # the stack tracks the process it spawned
        "--protected-mode", "yes",
        "--logfile", "",  # stdout, which goes to logs/redis.log
        "--pidfile", "",
    ]


def start_redis(service: Service, directory: Path) -> None:
    if service.alive():
        return
    redis_server = ensure_redis()
    directory.mkdir(parents=True, exist_ok=True)
    service.start(redis_argv(redis_server, service.port, directory))


def wait_redis(service: Service, timeout_s: float = REDIS_TIMEOUT_S) -> None:
    service.wait_port(timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if redis_ping(service.port):
            return
        time.sleep(PING_POLL_S)
    raise StackError(f"redis: no PONG on redis://127.0.0.1:{service.port}/0 within "
                     f"{timeout_s:.0f}s\n{service.tails()}")
