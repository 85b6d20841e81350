#!/usr/bin/env python3
"""The real local stack: 3 Kafka KRaft nodes, SeaweedFS S3 and Redis on 127.0.0.1.

Usage (from the repo root, with the project's virtualenv):

    .venv/bin/python -m deploy.local.stack up      [--base-port 19000] [--partitions 8] [--fresh]
    .venv/bin/python -m deploy.local.stack status  [--base-port 19000] [--json]
    .venv/bin/python -m deploy.local.stack down    [--base-port 19000] [--wipe]
    .venv/bin/python -m deploy.local.stack kill-broker N | stop-broker N | start-broker N
    .venv/bin/python -m deploy.local.stack wait-replicated [--topic T] [--timeout 60]
    .venv/bin/python -m deploy.local.stack endpoints | engine-config

Python API (tests, fault injection)::

    from deploy.local.stack import LocalStack
    stack = LocalStack(base_port=19000, partitions=8)
    info = stack.up()                 # idempotent; returns the endpoints dict (also stack.json)
    stack.kill_broker(2); stack.start_broker(2); stack.wait_fully_replicated("votes-wal", 60)
    stack.down()

This module composes the services (kafka_brokers, kafka_admin, seaweedfs, redis_server,
processes, ports, stack_state) and holds the CLI. Invariant: `up` and `down` of one base
port hold one file lock, so two callers never start or stop one stack's processes at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deploy.local import kafka_brokers, seaweedfs
from deploy.local.kafka_admin import (
    BROKERS_TIMEOUT_S,
    REPLICATED_TIMEOUT_S,
    TOPIC_TIMEOUT_S,
    WAL_TOPIC_CONFIGS,
    KafkaAdmin,
)
from deploy.local.kafka_brokers import (
    KAFKA_VERSION,
    MIN_INSYNC_REPLICAS,
    REPLICATION_FACTOR,
    ensure_java,
    ensure_kafka_jars,
    kafka_lib_dir,
)
from deploy.local.ports import (
    BROKER_COUNT,
    DEFAULT_BASE_PORT,
    Ports,
    check_base_port,
    default_base_port,
)
from deploy.local.processes import (
    STOP_TIMEOUT_S,
    Service,
    StackError,
    file_lock,
    log,
    pid_alive,
    port_open,
    run_coroutine,
    terminate,
)
from deploy.local.redis_server import (
    ensure_redis,
    redis_ping,
    start_redis,
    wait_redis,
)
from deploy.local.seaweedfs import (
    S3_ACCESS_KEY,
    S3_BUCKET,
    S3_REGION,
    S3_SECRET_KEY,
    bucket_exists,
    ensure_weed,
    find_weed,
    s3_request,
)
from deploy.local.stack_state import (
    cache_root,
    default_state_dir,
    engine_config_toml,
    lock_file_of,
    read_state,
    recorded_partitions,
    write_state,
)

# What other code imports from here (tests/, perf/): the stack, its errors and the helpers
# that lived in this module before it was split.
__all__ = [
    "DEFAULT_BASE_PORT", "DEFAULT_PARTITIONS", "KAFKA_VERSION", "MIN_INSYNC_REPLICAS",
    "REPLICATION_FACTOR", "S3_ACCESS_KEY", "S3_BUCKET", "S3_REGION", "S3_SECRET_KEY",
    "WAL_TOPIC", "LocalStack", "Ports", "Service", "StackError", "cache_root",
    "default_base_port", "engine_config_toml", "ensure_java", "ensure_kafka_jars",
    "ensure_redis", "ensure_weed", "find_weed", "kafka_lib_dir", "main", "pid_alive",
    "port_open", "redis_ping", "s3_request", "terminate",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PARTITIONS = 8
WAL_TOPIC = "votes-wal"
UP_LOCK_TIMEOUT_S = 900.0  # another `up` of this stack may be fetching jars meanwhile
DOWN_LOCK_TIMEOUT_S = 300.0
PORT_OPEN_TIMEOUT_S = 60.0  # a Kafka node's port opens after its JVM starts
HEALTH_REQUEST_TIMEOUT_S = 2.0
BROKER_STOP_TIMEOUT_S = 30.0
EXIT_NOT_RUNNING = 3  # `status` when a service is not running


class LocalStack:
    """One local stack (one "region"): 3 Kafka nodes, SeaweedFS S3, Redis."""

    def __init__(
        self,
        base_port: int | None = None,
        state_dir: str | os.PathLike | None = None,
        partitions: int | None = None,
        kafka_version: str = KAFKA_VERSION,
        wal_topic: str = WAL_TOPIC,
    ) -> None:
        """partitions=None: what stack.json of an earlier `up` says, else DEFAULT_PARTITIONS."""
        self.base_port = check_base_port(
            default_base_port() if base_port is None else int(base_port))
        self.ports = Ports(self.base_port)
        self.state_dir = (Path(state_dir).expanduser().resolve() if state_dir
                          else default_state_dir(self.base_port))
        self._partitions_explicit = partitions is not None
        if partitions is None:
            partitions = recorded_partitions(self.state_dir) or DEFAULT_PARTITIONS
        self.partitions = int(partitions)
        self.kafka_version = kafka_version
        self.wal_topic = wal_topic
        self.lock_file = lock_file_of(self.state_dir)
        self.kafka_admin = KafkaAdmin(self.bootstrap_servers)

    # Endpoints --------------------------------------------------------------------------
    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{self.ports.kafka(node)}" for node in self._nodes())

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports.s3}"

    @property
    def s3_credentials(self) -> dict[str, str]:
        return {"aws_access_key_id": S3_ACCESS_KEY, "aws_secret_access_key": S3_SECRET_KEY,
                "region_name": S3_REGION}

    @property
    def s3_bucket(self) -> str:
        return S3_BUCKET

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports.redis}/0"

    @property
    def endpoints_file(self) -> Path:
        return self.state_dir / "stack.json"

    def _kafka_endpoints(self) -> dict[str, Any]:
        brokers = [{"node_id": node, "host": "127.0.0.1", "port": self.ports.kafka(node),
                    "controller_port": self.ports.controller(node), "rack": f"az{node}"}
                   for node in self._nodes()]
        return {"version": self.kafka_version, "bootstrap_servers": self.bootstrap_servers,
                "brokers": brokers, "wal_topic": self.wal_topic, "partitions": self.partitions,
                "replication_factor": REPLICATION_FACTOR,
                "min_insync_replicas": MIN_INSYNC_REPLICAS}

    def endpoints(self) -> dict[str, Any]:
        return {
            "base_port": self.base_port,
            "state_dir": str(self.state_dir),
            "kafka": self._kafka_endpoints(),
            "s3": {"endpoint_url": self.s3_endpoint, "access_key_id": S3_ACCESS_KEY,
                   "secret_access_key": S3_SECRET_KEY, "region": S3_REGION,
                   "bucket": S3_BUCKET, "addressing_style": "path"},
            "redis": {"url": self.redis_url},
        }

    # Services ---------------------------------------------------------------------------
    @staticmethod
    def _nodes() -> range:
        return range(1, BROKER_COUNT + 1)

    def _service(self, name: str, port: int, log_name: str,
                 extra_log: Path | None = None) -> Service:
        return Service(name=name, port=port, pid_file=self.state_dir / "pids" / f"{name}.pid",
                       log_file=self.state_dir / "logs" / log_name, extra_log=extra_log)

    def kafka_service(self, n: int) -> Service:
        server_log = kafka_brokers.node_dir(self.state_dir, n) / "logs" / "server.log"
        return self._service(f"kafka-{n}", self.ports.kafka(n), f"kafka-{n}.out", server_log)

    def s3_service(self) -> Service:
        return self._service("s3", self.ports.s3, "s3.log")

    def redis_service(self) -> Service:
        return self._service("redis", self.ports.redis, "redis.log")

    def services(self) -> list[Service]:
        return [*(self.kafka_service(node) for node in self._nodes()), self.s3_service(),
                self.redis_service()]

    def _start_kafka_node(self, n: int, lib: Path) -> None:
        self.kafka_service(n).start(kafka_brokers.broker_argv(self.state_dir, n, lib))

    def _start_s3(self) -> None:
        seaweedfs.start_s3(self.s3_service(), self.ports, self.state_dir / "s3")

    def _wait_s3(self) -> None:
        seaweedfs.wait_s3(self.s3_service())

    def _start_redis(self) -> None:
        start_redis(self.redis_service(), self.state_dir / "redis")

    def _wait_redis(self) -> None:
        wait_redis(self.redis_service())

    # Kafka admin ------------------------------------------------------------------------
    async def wait_brokers_async(self, expected: Iterable[int] | None = None,
                                 timeout_s: float = BROKERS_TIMEOUT_S) -> list[int]:
        return await self.kafka_admin.wait_brokers(
            expected, timeout_s, logs_of=lambda node: self.kafka_service(node).tails(25))

    def wait_brokers(self, expected: Iterable[int] | None = None,
                     timeout_s: float = BROKERS_TIMEOUT_S) -> list[int]:
        return run_coroutine(self.wait_brokers_async(expected, timeout_s))

    async def under_replicated_async(self, topics: list[str] | None = None) -> list[str]:
        """A list of problems ("topic/partition: isr [..] of replicas [..]"); [] = healthy."""
        return await self.kafka_admin.under_replicated(topics)

    async def wait_fully_replicated_async(self, topic: str | list[str] | None = None,
                                          timeout_s: float = REPLICATED_TIMEOUT_S) -> None:
        """Wait until every partition of topic (default: WAL topic + internal topics) has all
        its replicas in sync and all brokers are alive."""
        await self.kafka_admin.wait_fully_replicated(topic, self.wal_topic, timeout_s)

    def wait_fully_replicated(self, topic: str | list[str] | None = None,
                              timeout_s: float = REPLICATED_TIMEOUT_S) -> None:
        run_coroutine(self.wait_fully_replicated_async(topic, timeout_s))

    async def _after_brokers_up(self) -> None:
        count = await self.kafka_admin.ensure_topic(self.wal_topic, self.partitions,
                                                    WAL_TOPIC_CONFIGS)
        if count != self.partitions:
            raise StackError(
                f"Kafka: topic {self.wal_topic} exists with {count} partitions, "
                f"{self.partitions} requested; use --partitions {count} or `down --wipe` first")
        await self.kafka_admin.warm_coordinators()
        await self.wait_fully_replicated_async(None, TOPIC_TIMEOUT_S)

    # Lifecycle --------------------------------------------------------------------------
    def up(self, fresh: bool = False, quiet: bool = False) -> dict[str, Any]:
        """Bring the whole stack up (idempotent). Returns the endpoints dict."""
        started = time.monotonic()
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.lock_file, UP_LOCK_TIMEOUT_S, f"stack {self.base_port}"):
            if fresh:
                self._down_locked(wipe=True)
                if not self._partitions_explicit:
                    self.partitions = DEFAULT_PARTITIONS
            self._check_partitions_match()
            already_up = self._healthy_fast()
            if not already_up:
                self._start_all()
            info = self.endpoints()
            write_state(self.state_dir, info)
        if not quiet:
            elapsed_s = time.monotonic() - started
            log(f"stack {self.base_port} already up ({elapsed_s:.1f}s)" if already_up
                else f"stack {self.base_port} up in {elapsed_s:.1f}s")
        return info

    def _start_all(self) -> None:
        """Start whatever does not run, then wait for each service and the WAL topic."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Java before the jars: Maven itself needs a JRE, and a missing one should be named.
        ensure_java()
        lib = ensure_kafka_jars(self.kafka_version)
        kafka_brokers.prepare_nodes(self.state_dir, self.ports, lib)
        # Everything starts before anything is waited for: the JVMs take longest.
        for node in self._nodes():
            self._start_kafka_node(node, lib)
        self._start_s3()
        self._start_redis()
        self._wait_redis()
        self._wait_s3()
        for node in self._nodes():
            self.kafka_service(node).wait_port(PORT_OPEN_TIMEOUT_S)
        self.wait_brokers()
        run_coroutine(self._after_brokers_up())

    def _check_partitions_match(self) -> None:
        kafka = (read_state(self.state_dir) or {}).get("kafka", {})
        recorded = kafka.get("partitions")
        if recorded is not None and recorded != self.partitions \
                and kafka.get("wal_topic") == self.wal_topic:
            raise StackError(
                f"stack {self.base_port} was brought up with {recorded} partitions of "
                f"{self.wal_topic}, {self.partitions} requested; use --partitions {recorded} "
                "or `up --fresh`")

    def _healthy_fast(self) -> bool:
        if not all(service.alive() and port_open(service.port) for service in self.services()):
            return False
        if not redis_ping(self.ports.redis):
            return False
        try:
            if not bucket_exists(self.ports.s3, timeout=HEALTH_REQUEST_TIMEOUT_S):
                return False
            problems = run_coroutine(self.under_replicated_async([self.wal_topic]))
        except Exception:  # noqa: BLE001 - any failure means "not healthy"
            return False
        return not problems

    def is_up(self) -> bool:
        """Cheap check: every process is alive, all endpoints answer, the WAL topic is healthy."""
        return self._healthy_fast()

    def down(self, wipe: bool = False) -> None:
        """Stop everything: SIGTERM, bounded wait, SIGKILL. wipe=True also deletes the state."""
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.lock_file, DOWN_LOCK_TIMEOUT_S, f"stack {self.base_port}"):
            self._down_locked(wipe)

    def _down_locked(self, wipe: bool) -> None:
        running = [service for service in self.services() if service.alive()]
        if running:
            log(f"stopping {', '.join(service.name for service in running)}")
            killed = terminate([service.pid() for service in running], STOP_TIMEOUT_S)
            for service in running:
                if service.pid() in killed:
                    log(f"{service.name} did not stop within {STOP_TIMEOUT_S:.0f}s of "
                        "SIGTERM: SIGKILLed")
        for service in self.services():
            with contextlib.suppress(FileNotFoundError):
                service.pid_file.unlink()
        if wipe and self.state_dir.exists():
            shutil.rmtree(self.state_dir)

    # Per-node control for fault tests ---------------------------------------------------
    def _check_n(self, n: int) -> None:
        if not 1 <= n <= BROKER_COUNT:
            raise StackError(f"broker number must be 1..{BROKER_COUNT}, got {n}")

    def broker_pid(self, n: int) -> int | None:
        self._check_n(n)
        service = self.kafka_service(n)
        return service.pid() if service.alive() else None

    def broker_alive(self, n: int) -> bool:
        self._check_n(n)
        return self.kafka_service(n).alive()

    def kill_broker(self, n: int, wait_gone: bool = False,
                    timeout_s: float = BROKER_STOP_TIMEOUT_S) -> None:
        """SIGKILL Kafka node n (broker + controller) and wait until the process is gone.

        The cluster notices only after broker.session.timeout.ms (3 s); wait_gone=True also
        waits until the surviving brokers' metadata no longer lists node n."""
        self._check_n(n)
        service = self.kafka_service(n)
        if service.alive():
            terminate([service.pid()], timeout=0, sig=signal.SIGKILL)
        if wait_gone:
            self.wait_broker_gone(n, timeout_s)

    def stop_broker(self, n: int, timeout_s: float = BROKER_STOP_TIMEOUT_S,
                    wait_gone: bool = False) -> None:
        """SIGTERM Kafka node n (controlled shutdown), SIGKILL after timeout_s."""
        self._check_n(n)
        service = self.kafka_service(n)
        if service.alive():
            terminate([service.pid()], timeout=timeout_s)
        if wait_gone:
            self.wait_broker_gone(n, timeout_s)

    async def wait_broker_gone_async(self, n: int,
                                     timeout_s: float = BROKER_STOP_TIMEOUT_S) -> None:
        """Wait until the cluster metadata no longer lists broker n (it was fenced)."""
        await self.kafka_admin.wait_broker_gone(n, timeout_s)

    def wait_broker_gone(self, n: int, timeout_s: float = BROKER_STOP_TIMEOUT_S) -> None:
        run_coroutine(self.wait_broker_gone_async(n, timeout_s))

    def start_broker(self, n: int, wait: bool = True,
                     timeout_s: float = BROKERS_TIMEOUT_S) -> None:
        """Start Kafka node n again; by default wait until the cluster sees it as a broker."""
        self._check_n(n)
        ensure_java()
        lib = ensure_kafka_jars(self.kafka_version)
        if not kafka_brokers.node_formatted(self.state_dir, n):
            raise StackError(f"kafka-{n} has no formatted storage in {self.state_dir}: "
                             "run up first")
        self._start_kafka_node(n, lib)
        if wait:
            self.kafka_service(n).wait_port(timeout_s)
            self.wait_brokers([n], timeout_s)

    def kill_service(self, name: str) -> None:
        """SIGKILL one service by name: kafka-N, s3 or redis."""
        service = {service.name: service for service in self.services()}.get(name)
        if service is None:
            raise StackError(f"unknown service {name!r}")
        if service.alive():
            terminate([service.pid()], timeout=0, sig=signal.SIGKILL)

    def start_service(self, name: str) -> None:
        """Start one service again (kafka-N, s3 or redis) and wait until it answers."""
        if name.startswith("kafka-"):
            self.start_broker(int(name.split("-", 1)[1]))
        elif name == "s3":
            self._start_s3()
            self._wait_s3()
        elif name == "redis":
            self._start_redis()
            self._wait_redis()
        else:
            raise StackError(f"unknown service {name!r}")

    # Status -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        services = {}
        for service in self.services():
            alive = service.alive()
            services[service.name] = {
                "pid": service.pid() if alive else None,
                "alive": alive,
                "port": service.port,
                "listening": port_open(service.port),
                "log": str(service.extra_log or service.log_file),
            }
        out: dict[str, Any] = {"base_port": self.base_port, "state_dir": str(self.state_dir),
                               "services": services}
        if any(services[f"kafka-{node}"]["listening"] for node in self._nodes()):
            try:
                out["kafka_brokers_seen"] = run_coroutine(self.kafka_admin.brokers_seen())
                out["under_replicated"] = run_coroutine(
                    self.under_replicated_async([self.wal_topic]))
            except Exception as error:  # noqa: BLE001 - reported, status goes on
                out["kafka_error"] = repr(error)
        return out


# CLI -------------------------------------------------------------------------------------


def _maybe_reexec_in_venv() -> None:
    """Re-run under the repo's .venv python when started with a python lacking aiokafka."""
    try:
        import aiokafka  # noqa: F401
    except ImportError:
        venv = REPO_ROOT / ".venv"
        python = venv / "bin" / "python"
        # The venv's python is often a symlink to this very interpreter: compare prefixes.
        if python.exists() and Path(sys.prefix).resolve() != venv.resolve():
            os.chdir(REPO_ROOT)  # deploy/ is a package at the repository root
            os.execv(str(python), [str(python), "-m", "deploy.local.stack", *sys.argv[1:]])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.stack",
                                     description=(__doc__ or "").split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-port", type=int, default=None,
                        help=f"base port (default $VOTES_STACK_BASE_PORT or {DEFAULT_BASE_PORT})")
    common.add_argument("--state-dir", default=None,
                        help="state dir (default ~/.cache/votes-stack/run-<base-port>)")
    common.add_argument("--partitions", type=int, default=None,
                        help="partitions of the WAL topic (default: as in the stack's "
                        f"stack.json, else {DEFAULT_PARTITIONS})")
    commands = parser.add_subparsers(dest="cmd", required=True)
    command = commands.add_parser("up", parents=[common], help="start the stack (idempotent)")
    command.add_argument("--fresh", action="store_true", help="stop and wipe the state first")
    command = commands.add_parser("down", parents=[common], help="stop the stack")
    command.add_argument("--wipe", action="store_true", help="also delete the state dir")
    command = commands.add_parser("status", parents=[common], help="show what runs")
    command.add_argument("--json", action="store_true")
    commands.add_parser("endpoints", parents=[common], help="print stack.json")
    commands.add_parser("engine-config", parents=[common],
                        help="print a `votes serve --config` TOML for this stack")
    for name in ("kill-broker", "stop-broker", "start-broker"):
        command = commands.add_parser(name, parents=[common])
        command.add_argument("n", type=int, help="node 1..3")
    command = commands.add_parser("wait-replicated", parents=[common],
                                  help="wait until no partition is under-replicated")
    command.add_argument("--topic", action="append", default=None)
    command.add_argument("--timeout", type=float, default=REPLICATED_TIMEOUT_S)
    return parser


def _print_status(stack: LocalStack, status: dict[str, Any]) -> None:
    print(f"stack base port {status['base_port']}  state {status['state_dir']}")
    for name, service in status["services"].items():
        state = "running" if service["alive"] else "stopped"
        listening = "listening" if service["listening"] else "-"
        print(f"  {name:8} {state:8} pid={service['pid'] or '-':<8} "
              f"port={service['port']} {listening:9} log={service['log']}")
    if "kafka_brokers_seen" in status:
        print(f"  kafka brokers seen: {status['kafka_brokers_seen']}")
        problems = status["under_replicated"]
        print(f"  {stack.wal_topic}: " + ("; ".join(problems) if problems
                                          else "fully replicated"))
    if "kafka_error" in status:
        print(f"  kafka: {status['kafka_error']}")


def _recorded_endpoints_text(stack: LocalStack) -> str:
    if not stack.endpoints_file.exists():
        raise StackError(f"no {stack.endpoints_file}: run up first")
    return stack.endpoints_file.read_text()


def _run_command(stack: LocalStack, args: argparse.Namespace) -> int:
    """One CLI command; its exit code."""
    if args.cmd == "up":
        print(json.dumps(stack.up(fresh=args.fresh), indent=2))
    elif args.cmd == "down":
        stack.down(wipe=args.wipe)
        log(f"stack {stack.base_port} down" + (" and wiped" if args.wipe else ""))
    elif args.cmd == "status":
        status = stack.status()
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            _print_status(stack, status)
        if not all(service["alive"] for service in status["services"].values()):
            return EXIT_NOT_RUNNING
    elif args.cmd == "endpoints":
        print(_recorded_endpoints_text(stack), end="")
    elif args.cmd == "engine-config":
        print(engine_config_toml(json.loads(_recorded_endpoints_text(stack))), end="")
    elif args.cmd == "kill-broker":
        stack.kill_broker(args.n)
    elif args.cmd == "stop-broker":
        stack.stop_broker(args.n)
    elif args.cmd == "start-broker":
        stack.start_broker(args.n)
    elif args.cmd == "wait-replicated":
        stack.wait_fully_replicated(args.topic, args.timeout)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        stack = LocalStack(args.base_port, args.state_dir, args.partitions)
        return _run_command(stack, args)
    except StackError as error:
        print(f"deploy.local.stack {args.cmd}: ERROR: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    _maybe_reexec_in_venv()
    sys.exit(main())
