"""A Redis Cluster of three masters (no replicas) on 127.0.0.1, for the rate limiter's
global view (engine/ratelimit.py) and its integration tests.

Three `redis-server --cluster-enabled yes` processes without persistence on the base port
+ REDIS_CLUSTER_OFFSET + 0..2, their cluster bus ports + 3..5 (explicit, so the whole
cluster stays inside the stack's port span), joined by `redis-cli --cluster create`; up
once `CLUSTER INFO` says `cluster_state:ok` on every node. Killing a master without
replicas makes its slots fail, which is how a test takes "Redis down".

    python -m deploy.local.redis_cluster up|down|status [--stack-base-port N] [--state-dir D]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from deploy.local.ports import REDIS_CLUSTER_MASTERS, Ports, check_base_port, default_base_port
from deploy.local.processes import Service, StackError, terminate
from deploy.local.redis_server import ensure_redis, wait_redis

CLUSTER_OK_TIMEOUT_S = 30.0
CLUSTER_POLL_S = 0.2
CREATE_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
INFO_BYTES_MAX = 4096


def cluster_argv(redis_server: str, port: int, bus_port: int, directory: Path) -> list[str]:
    return [
        redis_server,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--cluster-enabled", "yes",
        "--cluster-port", str(bus_port),
        "--cluster-config-file", str(directory / "nodes.conf"),
        "--cluster-node-timeout", "2000",
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--logfile", "",
        "--pidfile", "",
    ]


def cluster_state(port: int) -> str:
    """The `cluster_state` CLUSTER INFO reports on one node ("ok", "fail"), "" if silent."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as connection:
            connection.sendall(b"CLUSTER INFO\r\n")
            reply = connection.recv(INFO_BYTES_MAX).decode("ascii", "replace")
    except OSError:
        return ""
    for line in reply.splitlines():
        if line.startswith("cluster_state:"):
            return line.split(":", 1)[1].strip()
    return ""


class LocalRedisCluster:
    """The cluster's processes, known by pid files under state_dir (one stack's)."""

    def __init__(self, base_port: int | None = None, state_dir: Path | None = None) -> None:
        self.ports = Ports(check_base_port(base_port or default_base_port()))
        self.state_dir = state_dir or Path(f"/var/tmp/votes-redis-cluster-{self.ports.base}")

    @property
    def url(self) -> str:
        """The address a cluster client starts from (it discovers the other masters)."""
        return f"redis://127.0.0.1:{self.ports.redis_cluster(0)}"

    def services(self) -> list[Service]:
        return [Service(name=f"redis-cluster-{index}", port=self.ports.redis_cluster(index),
                        pid_file=self.state_dir / "pids" / f"redis-cluster-{index}.pid",
                        log_file=self.state_dir / "logs" / f"redis-cluster-{index}.log")
                for index in range(REDIS_CLUSTER_MASTERS)]

    def is_up(self) -> bool:
        return all(service.alive() and cluster_state(service.port) == "ok"
                   for service in self.services())

    def up(self) -> None:
        """Start the masters and join them (a fresh cluster: nothing is kept across runs)."""
        if self.is_up():
            return
        self.down()
        redis_server = ensure_redis()
        redis_cli = shutil.which("redis-cli") or str(Path(redis_server).with_name("redis-cli"))
        for index, service in enumerate(self.services()):
            directory = self.state_dir / f"node-{index}"
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            service.start(cluster_argv(redis_server, service.port,
                                       self.ports.redis_cluster_bus(index), directory))
        for service in self.services():
            wait_redis(service)
        addresses = [f"127.0.0.1:{service.port}" for service in self.services()]
        created = subprocess.run(
            [redis_cli, "--cluster", "create", *addresses, "--cluster-replicas", "0",
             "--cluster-yes"], capture_output=True, text=True, timeout=CREATE_TIMEOUT_S)
        if created.returncode != 0:
            raise StackError(f"redis-cli --cluster create failed:\n{created.stdout}\n"
                             f"{created.stderr}")
        self._wait_ok()

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + CLUSTER_OK_TIMEOUT_S
        while time.monotonic() < deadline:
            if all(cluster_state(service.port) == "ok" for service in self.services()):
                return
            time.sleep(CLUSTER_POLL_S)
        raise StackError(f"redis cluster not ok within {CLUSTER_OK_TIMEOUT_S:.0f}s: "
                         + ", ".join(f"{s.port}={cluster_state(s.port) or 'silent'}"
                                     for s in self.services()))

    def down(self) -> None:
        terminate([service.pid() for service in self.services() if service.alive()],
                  timeout=STOP_TIMEOUT_S)

    def status(self) -> str:
        return "\n".join(f"{service.name} 127.0.0.1:{service.port} "
                         f"{'up' if service.alive() else 'down'} "
                         f"cluster_state={cluster_state(service.port) or '-'}"
                         for service in self.services())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.redis_cluster",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--stack-base-port", type=int, default=None)
    parser.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    cluster = LocalRedisCluster(args.stack_base_port, args.state_dir)
    try:
        if args.command == "up":
            cluster.up()
            print(f"redis cluster up: {cluster.url}")
        elif args.command == "down":
            cluster.down()
        print(cluster.status())
    except StackError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
