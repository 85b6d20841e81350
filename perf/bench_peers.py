"""The engine against its ceiling and against what a team would build instead, in one run.

One machine, one invocation, the same generators and settings for every peer:

- ceiling          perf/ceiling.py: bare Granian RSGI, fixed 201, no parsing, no state;
- embedded         the engine (`votes serve`) on its embedded fsync'd segment log;
- kafka            (``--kafka``) the engine on the Kafka WAL of a private local stack;
- granian_asyncpg  Granian + msgspec + asyncpg, one INSERT per vote into PostgreSQL;
- fastapi_pg       FastAPI + uvicorn + asyncpg + PostgreSQL ("what most teams build");
- fastapi_redis    FastAPI + uvicorn + Redis SADD/HINCRBY (not durable: says so).

Every peer verifies the same real tokens, minted once with ``votes token`` from one key
directory (each engine data dir gets a copy of those keys), and gets fresh state. The
scenarios come from perf/scenarios/default.toml: closed-loop max throughput (wrk), an
open-loop constant rate at half that max (perf/loadgen.py: latency from each request's
intended send time, so no coordinated omission), repeat votes (409s), many polls against
one hot poll, and a burst at a poll's opening.

Honest conditions: only 201 counts as throughput, and each run's 201s are checked
against the peer's own results total; data directories (engine, PostgreSQL) are on one
real filesystem, shown; server, backend (database, stack) and generator CPU are sampled
from /proc; PostgreSQL's fsync and synchronous_commit are read back with SHOW.

Writes perf/results/peers.json and PNG plots beside it, and prints the machine, a result
table with the ratios engine/ceiling and engine/peer, and pass/fail per target of the
perf issue (with the micro-benchmarks' targets when perf/results/micro.json exists).

    python perf/bench_peers.py [--quick] [--kafka] [--peers ceiling,embedded,...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PERF_DIR,
    REPO_DIR,
    BenchError,
    CpuSampler,
    CpuUsage,
    PrivateStack,
    ServerProcess,
    WrkParameters,
    describe_machine,
    ensure_wrk,
    filesystem_of,
    format_us,
    free_port,
    http_request,
    parse_wrk_summary,
    print_conditions,
    print_table,
    run_wrk,
    wait_for_http,
    write_json,
)

sys.path.insert(0, str(REPO_DIR / "deploy" / "local"))

from postgres import PostgresCluster, PostgresError

VENV_BIN = Path(sys.executable).parent
VOTES_SCRIPT = PERF_DIR / "wrk" / "votes.lua"
LOADGEN = PERF_DIR / "loadgen.py"
PEERS_DIR = PERF_DIR / "peers"
RESULTS_DIR = PERF_DIR / "results"
LOADGEN_SUMMARY_TAG = "VOTES_LOADGEN_SUMMARY "
LOADGEN_READY_TAG = "VOTES_LOADGEN_READY"


@dataclass(frozen=True)
class PeerKind:
    label: str
    durability: str
    stateful: bool
    backend: str | None  # what else the peer runs on, sampled as "backend" CPU


# In run order. The kafka peer runs last: its private stack (3 JVMs, S3, Redis) comes up
# for it and goes down after it, so it never competes with another peer for the CPU.
PEERS = {
    "ceiling": PeerKind("ceiling: Granian, fixed 201", "n/a: keeps nothing", False, None),
    "embedded": PeerKind("engine, embedded log", "durable: fsync'd log, group commit", True, None),
    "granian_asyncpg": PeerKind(
        "Granian+msgspec+asyncpg+PG", "durable: PG sync commit, fsync", True, "postgres"
    ),
    "fastapi_pg": PeerKind(
        "FastAPI+uvicorn+asyncpg+PG", "durable: PG sync commit, fsync", True, "postgres"
    ),
    "fastapi_redis": PeerKind(
        "FastAPI+uvicorn+Redis", "NOT durable: Redis, no persistence", True, "redis"
    ),
    "kafka": PeerKind("engine, Kafka WAL", "durable: acks=all, RF 3, min ISR 2", True, "stack"),
}
DEFAULT_PEERS = "ceiling,embedded,granian_asyncpg,fastapi_pg,fastapi_redis"
ENGINES = ("embedded", "kafka")

# The perf issue's targets: (key of the measured value, description, threshold, "min" =
# the measured value must be at least the threshold, "max" = at most).
TARGETS = [
    ("embedded/ceiling", "engine embedded, 1 worker, 201/s ÷ ceiling", 0.5, "min"),
    ("kafka/ceiling", "engine Kafka WAL, 201/s ÷ ceiling", 0.35, "min"),
    ("embedded/fastapi_pg", "engine ÷ FastAPI+PG, 201/s", 10.0, "min"),
    ("embedded/granian_asyncpg", "engine ÷ Granian+asyncpg+PG, 201/s", 4.0, "min"),
    ("embedded open_half p99 ms", "engine embedded p99 at half max rate (open loop), ms", 10.0,
     "max"),
    ("kafka open_half p99 ms", "engine Kafka p99 at half max rate (open loop), ms", 25.0, "max"),
    ("cython apply votes/s", "Cython batch apply, votes/s (bench_micro)", 5e6, "min"),
    ("cython/python apply", "Cython batch apply ÷ Python twin (bench_micro)", 10.0, "min"),
    ("bitmap bits/voter at 50%",
     "voter bitmaps, bits per eligible voter at 50% turnout (bench_micro)", 2.2, "max"),
]  # fmt: skip


# --- scenarios ------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    title: str
    generator: str  # "wrk" or "open"
    duration_s: float = 0.0
    profile: list[dict] = field(default_factory=list)
    peers: str = "all"
    polls: int = 1
    repeat_share: float = 0.0
    new_poll: bool = False
    connections: int | None = None
    # Closed loop only: run once per connection count and keep the best (max throughput
    # needs enough requests in flight to cover each peer's commit latency).
    connections_tried: list[int] = field(default_factory=list)

    def applies_to(self, peer: str) -> bool:
        return self.peers == "all" or (self.peers == "stateful" and PEERS[peer].stateful)

    def needs_max(self) -> bool:
        return any("fraction_of_max" in segment for segment in self.profile)


@dataclass
class ScenarioSet:
    connections: int
    warmup_s: float
    options: list[str]
    repeat_gap: int
    scenarios: list[Scenario]
    source: str


def load_scenarios(path: Path, duration_scale: float) -> ScenarioSet:
    document = tomllib.loads(path.read_text())
    run = document.get("run", {})
    scenarios = []
    for entry in document.get("scenario", []):
        scenario = Scenario(**entry)
        if scenario.generator not in ("wrk", "open"):
            raise BenchError(f"scenario {scenario.name}: generator must be wrk or open")
        if scenario.generator == "wrk" and scenario.duration_s <= 0:
            raise BenchError(f"scenario {scenario.name}: a wrk scenario needs duration_s")
        if scenario.generator == "open" and not scenario.profile:
            raise BenchError(f"scenario {scenario.name}: an open scenario needs a profile")
        if scenario.peers not in ("all", "stateful"):
            raise BenchError(f"scenario {scenario.name}: peers must be all or stateful")
        if scenario.needs_max() and not any(s.name == "closed_max" for s in scenarios):
            raise BenchError(f"scenario {scenario.name}: fraction_of_max needs an earlier "
                             "scenario named closed_max")  # fmt: skip
        # wrk takes whole seconds only.
        scenario.duration_s = float(max(1, round(scenario.duration_s * duration_scale)))
        scenario.profile = [
            {**segment, "duration_s": segment["duration_s"] * duration_scale}
            for segment in scenario.profile
        ]
        scenarios.append(scenario)
    return ScenarioSet(
        connections=run.get("connections", 64),
        warmup_s=float(max(1, round(run.get("warmup_s", 2.0) * duration_scale))),
        options=run.get("options", ["a", "b", "c"]),
        repeat_gap=run.get("repeat_gap", 512),
        scenarios=scenarios,
        source=str(path),
    )


# --- tokens -------------------------------------------------------------------------------


class TokenPool:
    """Real voter tokens minted with `votes token` from one key directory, used in order.

    Every peer starts with fresh state, so every peer starts again at the first voter
    (``rewind``): all peers see the same tokens. Within a peer each request file takes
    the next unused voters, so no voter repeats unless a scenario asks for repeats.
    """

    def __init__(self, keys_data_dir: Path, work_dir: Path, mint_procs: int, ttl_s: int):
        self.keys_data_dir = keys_data_dir
        self.work_dir = work_dir
        self.mint_procs = mint_procs
        self.ttl_s = ttl_s
        self.tokens: list[bytes] = []
        self.cursor = 0
        self.files = 0
        self.mint_s = 0.0

    def rewind(self) -> None:
        self.cursor = 0

    def _mint(self, count: int) -> None:
        """Mint ``count`` more tokens (voters len+1 ..), split over processes."""
        started = time.monotonic()
        first = len(self.tokens) + 1
        procs = max(1, min(self.mint_procs, count // 50_000 + 1))
        share = math.ceil(count / procs)
        running = []
        for index in range(procs):
            start = first + index * share
            n = min(share, first + count - start)
            if n <= 0:
                break
            argv = [str(VENV_BIN / "votes"), "token", "--data-dir", str(self.keys_data_dir),
                    "--voter", str(start), "--count", str(n), "--ttl-s", str(self.ttl_s)]  # fmt: skip
            running.append((argv, subprocess.Popen(argv, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE)))  # fmt: skip
        for argv, proc in running:
            out, err = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                raise BenchError(f"`{shlex.join(argv)}` exited {proc.returncode}: {err.decode()}")
            self.tokens.extend(out.split())
        if len(self.tokens) != first - 1 + count:
            raise BenchError(f"minted {len(self.tokens) - first + 1} tokens, expected {count}")
        self.mint_s += time.monotonic() - started

    def _next(self, count: int) -> list[bytes]:
        if self.cursor + count > len(self.tokens):
            self._mint(self.cursor + count - len(self.tokens))
        taken = self.tokens[self.cursor : self.cursor + count]
        self.cursor += count
        return taken

    def _write(self, lines: list[bytes], purpose: str) -> Path:
        self.files += 1
        path = self.work_dir / f"{self.files:03d}-{purpose}.tokens"
        with open(path, "wb") as out:
            out.write(b"\n".join(lines) + b"\n")
        return path

    def take(self, count: int, purpose: str) -> Path:
        """A file of ``count`` tokens of voters not used yet by this peer."""
        return self._write(self._next(count), purpose)

    def take_with_repeats(self, count: int, share: float, gap: int, seed: int, purpose: str):
        """``count`` lines; after the first ``gap``, each line repeats (with probability
        ``share``) a voter from at least ``gap`` lines earlier, so that voter's first vote
        has most likely been answered. Returns (path, line numbers of the repeats)."""
        rng = random.Random(seed)
        distinct = self._next(math.ceil(count * (1 - share)) + gap + 1)
        lines: list[bytes] = []
        repeat_positions: list[int] = []
        next_distinct = 0
        while len(lines) < count and next_distinct < len(distinct):
            if len(lines) > gap and rng.random() < share:
                repeat_positions.append(len(lines))
                lines.append(lines[rng.randrange(0, len(lines) - gap)])
            else:
                lines.append(distinct[next_distinct])
                next_distinct += 1
        return self._write(lines, purpose), repeat_positions


# --- peers --------------------------------------------------------------------------------


@dataclass
class RunningPeer:
    name: str
    base_url: str
    server: ServerProcess
    backend_pids: list[int]
    info: dict
    cleanups: list = field(default_factory=list)

    def cpu_roots(self) -> dict:
        roots: dict = {"server": self.server.pid}
        if self.backend_pids:
            roots["backend"] = self.backend_pids
        return roots

    def stop(self) -> None:
        self.server.stop()
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception as error:  # noqa: BLE001 - report and go on cleaning up
                print(f"  !! cleanup of {self.name} failed: {error}", flush=True)


class Harness:
    """State of one invocation: run directory, token pool, shared services."""

    def __init__(self, args, scenario_set: ScenarioSet, run_dir: Path, wrk_path: str):
        self.args = args
        self.set = scenario_set
        self.run_dir = run_dir
        self.wrk_path = wrk_path
        self.keys_data_dir = run_dir / "keys-data"
        self.pool = TokenPool(self.keys_data_dir, run_dir, args.mint_procs, args.token_ttl_s)
        self.admin_token = ""
        self.postgres: PostgresCluster | None = None
        self.postgres_info: dict | None = None
        self.stack: PrivateStack | None = None
        self.stack_info: dict | None = None
        self.redis_info: dict | None = None

    # --- shared services ------------------------------------------------------------------

    def prepare_keys(self) -> None:
        from engine.keys import ensure_keys, load_keys
        from engine.tokens import issue_admin_token

        ensure_keys(self.keys_data_dir)
        self.admin_token = issue_admin_token(load_keys(self.keys_data_dir), ttl_s=self.args.token_ttl_s)

    def ensure_postgres(self) -> PostgresCluster:
        if self.postgres is None:
            cluster = PostgresCluster(self.run_dir / "pg-data", free_port())
            self.postgres = cluster  # from here on, shutdown() stops it
            print(f"  starting a private PostgreSQL cluster in {cluster.data_dir}", flush=True)
            info = cluster.up()
            settings = info["settings"]
            if settings["fsync"] != "on" or settings["synchronous_commit"] != "on":
                raise BenchError(f"PostgreSQL is not durable as configured: {settings}")
            info["filesystem"] = filesystem_of(cluster.data_dir)
            self.postgres_info = info
            print(f"  PostgreSQL {settings['server_version']}: fsync={settings['fsync']}, "
                  f"synchronous_commit={settings['synchronous_commit']}, "
                  f"wal_sync_method={settings['wal_sync_method']}, on "
                  f"{info['filesystem']['fs_type']} {info['filesystem']['device']}", flush=True)  # fmt: skip
        return self.postgres

    def ensure_stack(self) -> PrivateStack:
        if self.stack is None:
            stack = PrivateStack(self.args.stack_base_port, self.args.kafka_partitions,
                                 self.run_dir / "stack.log")  # fmt: skip
            self.stack = stack
            print(f"  bringing up a private stack on base port {stack.base_port} "
                  f"({stack.partitions} partitions)", flush=True)  # fmt: skip
            endpoints = stack.up()
            self.stack_info = {"base_port": stack.base_port, "partitions": stack.partitions,
                               "up_s": round(stack.up_s, 1),
                               "kafka_version": endpoints["kafka"].get("version")}  # fmt: skip
        return self.stack

    def stop_stack(self) -> None:
        if self.stack is not None and self.stack.started:
            try:
                down_s = self.stack.down()
                print(f"  private stack down and wiped in {down_s:.1f}s", flush=True)
            except (BenchError, subprocess.TimeoutExpired, OSError) as error:
                print(f"!! `stack.py down --wipe` failed: {error}", flush=True)
        self.stack = None

    def shutdown(self) -> None:
        if self.postgres is not None:
            try:
                self.postgres.down(wipe=not self.args.keep_data)
            except (PostgresError, subprocess.TimeoutExpired, OSError) as error:
                print(f"!! stopping PostgreSQL failed: {error}", flush=True)
        self.stop_stack()

    # --- starting peers -------------------------------------------------------------------

    def start(self, name: str) -> RunningPeer:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        log = self.run_dir / f"{name}.log"
        py = sys.executable
        workers = ["--workers", str(self.args.workers)]
        if name == "ceiling":
            server = ServerProcess(name, [py, str(PERF_DIR / "ceiling.py"), "--port", str(port),
                                          *workers], log)  # fmt: skip
            peer = RunningPeer(name, base_url, server, [], {})
            self._wait(peer, expect=201)
            return peer
        if name in ENGINES:
            return self._start_engine(name, port, base_url, log)
        env = {**os.environ, "VOTES_PEER_KEYS_DIR": str(self.keys_data_dir),
               "VOTES_PEER_POOL_SIZE": str(self.args.pool_size)}  # fmt: skip
        cleanups = []
        backend_pids: list[int] = []
        info: dict = {"pool_size": self.args.pool_size}
        if PEERS[name].backend == "postgres":
            cluster = self.ensure_postgres()
            env["VOTES_PEER_DSN"] = cluster.createdb(f"votes_{name}")
            env["VOTES_PEER_TALLY"] = self.args.pg_tally
            backend_pids = [cluster.postmaster_pid()]
            info.update(database=f"votes_{name}", tally=self.args.pg_tally)
        elif PEERS[name].backend == "redis":
            redis_server, redis_url = self._start_redis()
            cleanups.append(redis_server.stop)
            env["VOTES_PEER_REDIS_URL"] = redis_url
            backend_pids = [redis_server.pid]
            info.update(redis=self.redis_info)
        argv = [py, str(PEERS_DIR / f"{name}.py"), "--port", str(port), *workers]
        server = ServerProcess(name, argv, log, env=env)
        peer = RunningPeer(name, base_url, server, backend_pids, info, cleanups)
        self._wait(peer, expect=200)
        return peer

    def _wait(self, peer: RunningPeer, expect: int) -> None:
        try:
            peer.info["ready_s"] = round(wait_for_http(
                f"{peer.base_url}/readyz", self.args.ready_timeout_s, expect, peer.server), 2)  # fmt: skip
        except BaseException:
            peer.stop()
            raise

    def _start_engine(self, name: str, port: int, base_url: str, log: Path) -> RunningPeer:
        data_dir = self.run_dir / f"{name}-data"
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir()
        # The engine keeps the keys it finds: the same keys as every other peer's tokens.
        shutil.copytree(self.keys_data_dir / "keys", data_dir / "keys")
        argv = [str(VENV_BIN / "votes"), "serve", "--data-dir", str(data_dir), "--port", str(port),
                "--workers", str(self.args.workers)]  # fmt: skip
        backend_pids: list[int] = []
        if name == "kafka":
            stack = self.ensure_stack()
            config = stack.write_engine_config(self.run_dir / "kafka-engine.toml")
            argv += ["--config", str(config)]
            backend_pids = stack.pids()
        else:
            argv += ["--shards", str(max(self.args.engine_shards, self.args.workers))]
        argv += shlex.split(self.args.engine_extra_args)
        server = ServerProcess(name, argv, log)
        cleanups = [] if self.args.keep_data else [lambda: shutil.rmtree(data_dir, ignore_errors=True)]
        peer = RunningPeer(name, base_url, server, backend_pids,
                           {"data_dir": str(data_dir), "filesystem": filesystem_of(data_dir)},
                           cleanups)  # fmt: skip
        self._wait(peer, expect=200)
        try:
            peer.info["shards"] = json.loads((data_dir / "cluster.json").read_text())["shards"]
            _, body = http_request("GET", f"{base_url}/readyz")
            peer.info["readyz"] = json.loads(body)
        except (OSError, ValueError, KeyError) as error:
            peer.info["readyz_error"] = str(error)
        return peer

    def _start_redis(self) -> tuple[ServerProcess, str]:
        redis_bin = shutil.which("redis-server")
        if redis_bin is None:
            sys.path.insert(0, str(REPO_DIR / "deploy" / "local"))
            from stack import ensure_redis  # installs Debian's redis-server when missing

            redis_bin = ensure_redis()
        port = free_port()
        directory = self.run_dir / "redis"
        directory.mkdir(exist_ok=True)
        argv = [redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(directory), "--protected-mode", "yes"]  # fmt: skip
        server = ServerProcess("redis", argv, self.run_dir / "redis.log")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            cli = shutil.which("redis-cli") or "redis-cli"
            done = subprocess.run([cli, "-p", str(port), "ping"], capture_output=True, text=True,
                                  check=False, timeout=5)  # fmt: skip
            if done.stdout.strip() == "PONG":
                config = {}
                for key in ("save", "appendonly", "appendfsync"):
                    out = subprocess.run([cli, "-p", str(port), "config", "get", key],
                                         capture_output=True, text=True, check=False, timeout=5)  # fmt: skip
                    lines = out.stdout.splitlines()
                    config[key] = lines[1] if len(lines) > 1 else None
                version = subprocess.run([redis_bin, "--version"], capture_output=True, text=True,
                                         check=False, timeout=5).stdout.strip()  # fmt: skip
                self.redis_info = {"version": version, "config": config}
                return server, f"redis://127.0.0.1:{port}/0"
            time.sleep(0.1)
        server.stop()
        raise BenchError(f"redis-server did not answer PING on port {port}\n{server.log_tail()}")


# --- polls and results --------------------------------------------------------------------


def create_poll(peer: RunningPeer, poll: str, options: list[str], admin_token: str) -> None:
    status, body = http_request("POST", f"{peer.base_url}/v1/polls",
                                {"id": poll, "options": options}, admin_token)  # fmt: skip
    if status != 201:
        raise BenchError(f"{peer.name}: POST /v1/polls {poll} answered {status}: {body[:300]!r}")


def results_total(peer: RunningPeer, polls: list[str], admin_token: str) -> int:
    total = 0
    for poll in polls:
        status, body = http_request("GET", f"{peer.base_url}/v1/polls/{poll}/results",
                                    token=admin_token, timeout_s=30)  # fmt: skip
        if status != 200:
            raise BenchError(f"{peer.name}: GET results of {poll} answered {status}: {body[:300]!r}")
        total += json.loads(body)["total"]
    return total


def settled_total(peer: RunningPeer, polls: list[str], admin_token: str, timeout_s: float) -> int:
    """The results total once it has stopped moving (votes in flight applied)."""
    deadline = time.monotonic() + timeout_s
    last = results_total(peer, polls, admin_token)
    steady = 0
    while steady < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
        now = results_total(peer, polls, admin_token)
        steady = steady + 1 if now == last else 0
        last = now
    return last


def cross_check(created: int, counted: int | None, in_flight: int) -> dict | None:
    """201s seen ≤ votes the peer counted ≤ 201s + requests unanswered at the end."""
    if counted is None:
        return None
    return {"created_seen": created, "votes_counted": counted, "in_flight_at_end": in_flight,
            "ok": created <= counted <= created + in_flight}  # fmt: skip


# --- generators ---------------------------------------------------------------------------


def cpu_json(cpu: CpuUsage | None, generator_key: str) -> dict | None:
    if cpu is None:
        return None
    percent, peak = cpu.cpu_percent, cpu.cpu_percent_peak
    return {
        "server_percent": percent.get("server"),
        "server_percent_peak": peak.get("server"),
        "backend_percent": percent.get("backend"),
        "generator_percent": percent.get(generator_key),
        "machine_busy_percent": cpu.machine_busy_percent,
        "machine_capacity_percent": cpu.machine_capacity_percent,
        "window_s": cpu.interval_s,
    }


def cpu_us_per_created(cpu: dict | None, created_per_s: float) -> float | None:
    """Server + backend CPU time per 201, µs: the whole system's cost of one vote."""
    if not cpu or not created_per_s:
        return None
    percent = (cpu["server_percent"] or 0) + (cpu["backend_percent"] or 0)
    return round(percent / 100 * 1e6 / created_per_s, 1)


def run_closed(h: Harness, peer: RunningPeer, tokens: Path, duration_s: float, polls: list[str],
               connections: int, measure: bool = True) -> dict:  # fmt: skip
    env = {"VOTES_TOKENS_FILE": str(tokens), "VOTES_POLLS": ",".join(polls),
           "VOTES_OPTIONS": ",".join(h.set.options), "VOTES_SERIES": "1"}  # fmt: skip
    parameters = WrkParameters(1, connections, duration_s, h.args.timeout_s)
    result = run_wrk(peer.base_url, VOTES_SCRIPT, parameters, env,
                     cpu_roots=peer.cpu_roots() if measure else None, wrk_path=h.wrk_path)  # fmt: skip
    summary = parse_wrk_summary(result.output)
    responses = sum(result.statuses.values())
    cpu = cpu_json(result.cpu, "wrk")
    return {
        "generator": "wrk (closed loop)",
        "wrk_argv": " ".join(parameters.argv()),
        "connections": connections,
        "duration_s": round(result.duration_s, 3),
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "created": result.created,
        "created_per_s": round(result.created_per_s, 1),
        "latency_us": result.latency_us,
        "errors": result.errors,
        "bodies_not_created": result.bodies_not_created,
        "votes_sent": result.votes_sent,
        "in_flight_at_end": max(0, result.votes_sent + result.sent_after_exhaustion - responses)
        + result.errors.get("timeout", 0),
        "exhausted": result.exhausted,
        "tokens_loaded": result.tokens_loaded,
        "series": summary.get("series"),
        "cpu": cpu,
        "cpu_us_per_created": cpu_us_per_created(cpu, result.created_per_s),
    }


def run_open(h: Harness, peer: RunningPeer, tokens: Path, segments: list[tuple[float, float]],
             polls: list[str], connections: int) -> dict:  # fmt: skip
    profile = ",".join(f"{d:g}:{r:.3f}" for d, r in segments)
    argv = [sys.executable, str(LOADGEN), "--url", peer.base_url, "--tokens", str(tokens),
            "--profile", profile, "--connections", str(connections), "--polls", ",".join(polls),
            "--options", ",".join(h.set.options), "--drain-timeout-s", str(h.args.drain_timeout_s)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO_DIR)  # fmt: skip
    ready = threading.Event()
    stderr_lines: list[str] = []
    stdout_lines: list[str] = []

    def read_stderr() -> None:
        for line in proc.stderr:
            if line.startswith(LOADGEN_READY_TAG):
                ready.set()
            else:
                stderr_lines.append(line)
        ready.set()

    readers = [threading.Thread(target=read_stderr, daemon=True),
               threading.Thread(target=lambda: stdout_lines.extend(proc.stdout), daemon=True)]  # fmt: skip
    for reader in readers:
        reader.start()
    sampler = None
    schedule_s = sum(d for d, _ in segments)
    try:
        if not ready.wait(120):
            raise BenchError("loadgen did not get ready within 120 s")
        if proc.poll() is None:
            sampler = CpuSampler({**peer.cpu_roots(), "generator": proc.pid}).start()
        proc.wait(timeout=schedule_s + h.args.drain_timeout_s + 120)
    finally:
        cpu = sampler.stop() if sampler is not None else None
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for reader in readers:
            reader.join(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    line = next((l for l in stdout_lines if l.startswith(LOADGEN_SUMMARY_TAG)), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"loadgen exited {proc.returncode}: {shlex.join(argv)}\n"
                         f"{''.join(stderr_lines)[-3000:]}")  # fmt: skip
    summary = json.loads(line[len(LOADGEN_SUMMARY_TAG) :])
    cpu_doc = cpu_json(cpu, "generator")
    summary.update(
        argv=shlex.join(argv[1:]).replace(str(REPO_DIR) + "/", ""),
        in_flight_at_end=summary["unanswered"] + summary["connection_lost_pending"],
        cpu=cpu_doc,
        cpu_us_per_created=cpu_us_per_created(cpu_doc, summary["created_per_s"]),
    )
    return summary


# --- one peer -----------------------------------------------------------------------------


def closed_tokens_needed(h: Harness, rate_per_s: float, duration_s: float, connections: int) -> int:
    return min(h.args.tokens_max, math.ceil(3 * rate_per_s * duration_s) + 4 * connections)


def run_scenario(h: Harness, peer: RunningPeer, scenario: Scenario, state: dict) -> dict:
    connections = scenario.connections or h.set.connections
    if peer.name == "kafka" and scenario.connections is None and h.args.kafka_connections != "0":
        # The first count: at 2048 the open-loop runs once answered half their schedule and
        # left requests unanswered past the drain (docs/performance.md).
        connections = kafka_connection_counts(h.args)[0]
    polls = ["bench"]
    if scenario.polls > 1:
        polls = [f"{scenario.name}-{index:02d}" for index in range(scenario.polls)]
        for poll in polls:
            create_poll(peer, poll, h.set.options, h.admin_token)
    stateful = PEERS[peer.name].stateful
    document: dict = {"title": scenario.title, "polls": len(polls)}
    if scenario.generator == "wrk":
        rate = state.get("rate_bound", 0.0)
        count = closed_tokens_needed(h, rate, scenario.duration_s, connections)
        for attempt in range(2):
            repeats: list[int] = []
            if scenario.repeat_share:
                tokens, repeats = h.pool.take_with_repeats(
                    count, scenario.repeat_share, h.set.repeat_gap, h.args.seed, scenario.name)  # fmt: skip
            else:
                tokens = h.pool.take(count, scenario.name)
            before = settled_total(peer, polls, h.admin_token, h.args.settle_timeout_s) if stateful else None
            run = run_closed(h, peer, tokens, scenario.duration_s, polls, connections)
            after = settled_total(peer, polls, h.admin_token, h.args.settle_timeout_s) if stateful else None
            if not h.args.keep_data:
                tokens.unlink()
            if not run["exhausted"] or count >= h.args.tokens_max:
                break
            print(f"  {scenario.name}: ran out of {count} tokens; once more with twice as many", flush=True)
            count = min(h.args.tokens_max, 2 * count)
        if run["exhausted"]:
            raise BenchError(f"{scenario.name}: wrk ran out of tokens ({count}); raise --tokens-max")
        document.update(run)
        if scenario.repeat_share:
            # One wrk thread sends the file's lines in order: the repeats among the lines
            # it sent are the 409s to expect (a few fewer if some were still in flight).
            sent = run["votes_sent"]
            document["repeat_share_planned"] = scenario.repeat_share
            document["repeats_sent"] = sum(1 for position in repeats if position < sent)
            document["repeat_gap"] = h.set.repeat_gap
            conflicts = run["statuses"].get("409", 0)
            # No repeat may count twice and no first vote may be refused as a repeat.
            document["repeat_check"] = {
                "conflicts": conflicts,
                "repeats_sent": document["repeats_sent"],
                "distinct_sent": sent - document["repeats_sent"],
                "ok": conflicts <= document["repeats_sent"]
                and run["created"] <= sent - document["repeats_sent"],
            }
    else:
        segments = []
        for segment in scenario.profile:
            rate = segment.get("rate_per_s")
            if rate is None:
                if "max_rate" not in state:
                    raise BenchError(f"{scenario.name}: no closed_max rate for this peer")
                rate = segment["fraction_of_max"] * state["max_rate"]
            # Rounded as run_open passes it to loadgen (3 decimals), so the token count here
            # is the request count loadgen schedules from the same rate.
            segments.append((segment["duration_s"], round(max(rate, 1.0), 3)))
        if scenario.new_poll:
            polls = [scenario.name]
            create_poll(peer, scenario.name, h.set.options, h.admin_token)
        count = sum(round(d * r) for d, r in segments)
        tokens = h.pool.take(count, scenario.name)
        before = settled_total(peer, polls, h.admin_token, h.args.settle_timeout_s) if stateful else None
        run = run_open(h, peer, tokens, segments, polls, connections)
        after = settled_total(peer, polls, h.admin_token, h.args.settle_timeout_s) if stateful else None
        if not h.args.keep_data:
            tokens.unlink()
        document.update(run)
    counted = after - before if stateful else None
    document["cross_check"] = cross_check(document["created"], counted, document["in_flight_at_end"])
    if document["created"] == 0:
        raise BenchError(f"{scenario.name}: no 201 at all: statuses {document['statuses']}, "
                         f"first bodies {document.get('bodies_not_created') or document.get('samples')}")  # fmt: skip
    return document


def run_best_of_connections(h: Harness, peer: RunningPeer, scenario: Scenario, state: dict) -> dict:
    """The scenario at each of its connections_tried (one run each, each cross-checked), the
    best by 201/s kept, with every count's rate beside it. The kafka peer tries its own
    counts (--kafka-connections)."""
    tried = scenario.connections_tried if scenario.generator == "wrk" else []
    if peer.name == "kafka" and tried:
        tried = kafka_connection_counts(h.args) if h.args.kafka_connections != "0" else tried
    if len(tried) < 2:
        return run_scenario(h, peer, scenario, state)
    results = {}
    for connections in tried:
        results[connections] = run_scenario(h, peer, replace(scenario, connections=connections), state)
        print(f"  {scenario.name} at {connections} connections: "
              f"{results[connections]['created_per_s']:,.0f} 201/s", flush=True)
    best = max(results.values(), key=lambda result: result["created_per_s"])
    best["connections_tried"] = {str(count): result["created_per_s"] for count, result in results.items()}
    return best


def kafka_connection_counts(args) -> list[int]:
    try:
        counts = [int(count) for count in args.kafka_connections.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise BenchError(f"--kafka-connections {args.kafka_connections!r}: give positive "
                         "integers separated by commas, or 0")
    return counts


def run_peer(h: Harness, name: str, ceiling_rate: float | None) -> dict:
    kind = PEERS[name]
    print(f"\n== {name}: {kind.label} ({kind.durability})", flush=True)
    h.pool.rewind()
    peer = h.start(name)
    document: dict = {"peer": name, "label": kind.label, "durability": kind.durability,
                      "info": peer.info, "scenarios": {}, "errors": {}}  # fmt: skip
    state: dict = {}
    try:
        if kind.stateful:
            create_poll(peer, "bench", h.set.options, h.admin_token)
        # Warm-up: closed loop on fresh voters; its rate sizes the first token file.
        bound = ceiling_rate if ceiling_rate else h.args.ceiling_rate_max
        connections = h.set.connections
        if name == "kafka" and h.args.kafka_connections != "0":
            connections = kafka_connection_counts(h.args)[0]
        warmup_s = h.set.warmup_s
        if name == "kafka":
            # Three fresh JVMs interpret and JIT-compile for their first minute or so: on a
            # new stack the engine went 6.2k -> 10.5k -> 14.5k votes/s over three 14 s runs
            # (docs/performance.md). Production brokers run warm.
            warmup_s = max(warmup_s, h.args.kafka_warmup_s)
        warm_tokens = h.pool.take(closed_tokens_needed(h, bound, warmup_s, connections), "warmup")
        warm = run_closed(h, peer, warm_tokens, warmup_s, ["bench"], connections, measure=False)
        if not h.args.keep_data:
            warm_tokens.unlink()
        document["warmup_created_per_s"] = warm["created_per_s"]
        state["rate_bound"] = min(bound, max(warm["created_per_s"], 200.0))
        print(f"  warm-up: {warm['created_per_s']:,.0f} 201/s", flush=True)
        for scenario in h.set.scenarios:
            if not scenario.applies_to(name):
                continue
            started = time.monotonic()
            try:
                result = run_best_of_connections(h, peer, scenario, state)
            except (BenchError, subprocess.TimeoutExpired, OSError) as error:
                print(f"  !! {scenario.name} failed: {error}", flush=True)
                document["errors"][scenario.name] = f"{error}\n{peer.server.log_tail(15)}"
                continue
            document["scenarios"][scenario.name] = result
            if scenario.name == "closed_max":
                state["max_rate"] = result["created_per_s"]
                state["rate_bound"] = min(bound, max(result["created_per_s"], 200.0))
            print_scenario_line(scenario.name, result, time.monotonic() - started)
            if peer.server.proc.poll() is not None:
                raise BenchError(f"{name} exited with {peer.server.proc.returncode}\n{peer.server.log_tail()}")
    finally:
        peer.stop()
        if name == "kafka":
            h.stop_stack()
    return document


def print_scenario_line(name: str, result: dict, took_s: float) -> None:
    lat = result["latency_us"]
    cpu = result.get("cpu") or {}
    check = result.get("cross_check")
    verdict = "n/a" if check is None else ("ok" if check["ok"] else "MISMATCH")
    others = {k: v for k, v in result["statuses"].items() if k != "201"}
    print(f"  {name:14} 201/s {result['created_per_s']:>9,.0f}  p50 {format_us(lat.get('p50')):>8}"
          f"  p99 {format_us(lat.get('p99')):>8}  max {format_us(lat.get('max')):>8}  "
          f"server {cpu.get('server_percent') or 0:.0f}%  backend {cpu.get('backend_percent') or 0:.0f}%  "
          f"gen {cpu.get('generator_percent') or 0:.0f}%  other {others or '-'}  "
          f"results check {verdict}  ({took_s:.0f}s)", flush=True)  # fmt: skip


# --- report -------------------------------------------------------------------------------


def scenario_of(peers: dict, name: str, scenario: str) -> dict | None:
    return peers.get(name, {}).get("scenarios", {}).get(scenario)


def ratios_of(peers: dict) -> dict:
    """201/s ratios of closed_max (and, steadier on a busy machine, of CPU per 201)."""
    ratios: dict = {}

    def rate(name):
        result = scenario_of(peers, name, "closed_max")
        return result["created_per_s"] if result else None

    def cost(name):
        result = scenario_of(peers, name, "closed_max")
        return result.get("cpu_us_per_created") if result else None

    for engine in ENGINES:
        if rate(engine) is None:
            continue
        for other in PEERS:
            # kafka/embedded is kept; embedded/kafka would say the same thing again.
            if other == engine or rate(other) is None or (engine, other) == ("embedded", "kafka"):
                continue
            key = f"{engine}/{other}"
            ratios[key] = round(rate(engine) / rate(other), 4)
            if cost(engine) and cost(other):
                ratios[f"cpu_per_201 {other}/{engine}"] = round(cost(other) / cost(engine), 4)
    return ratios


def median_by_key(documents: list[dict]) -> dict:
    """Per key, the median of the values the documents hold for it (rounds of a run)."""
    keys = [key for document in documents for key in document]
    return {key: round(statistics.median([d[key] for d in documents if key in d]), 4)
            for key in dict.fromkeys(keys)}  # fmt: skip


def open_p99_ms(peers: dict) -> dict:
    """The engines' open_half p99, ms, keyed as the targets name it."""
    values = {}
    for engine in ENGINES:
        result = scenario_of(peers, engine, "open_half")
        if result and result["latency_us"]:
            values[f"{engine} open_half p99 ms"] = round(result["latency_us"]["p99"] / 1000, 2)
    return values


def measured_targets(ratios: dict, p99_ms: dict, micro: dict | None) -> list[dict]:
    """PASS / FAIL per target of the perf issue; with several rounds, medians of rounds."""
    values: dict = {**ratios, **p99_ms}
    if micro:
        targets = micro.get("targets_measured", {})
        values.update({k: v for k, v in targets.items() if v is not None})
    rows = []
    for key, description, threshold, sense in TARGETS:
        value = values.get(key)
        if value is None:
            verdict = "not measured"
        elif sense == "min":
            verdict = "PASS" if value >= threshold else "FAIL"
        else:
            verdict = "PASS" if value <= threshold else "FAIL"
        rows.append({"target": key, "description": description, "threshold": threshold,
                     "sense": ">=" if sense == "min" else "<=", "measured": value,
                     "verdict": verdict})  # fmt: skip
    return rows


def lat(result: dict | None, key: str) -> str:
    return format_us(result["latency_us"].get(key)) if result and result.get("latency_us") else "-"


def cpu_cell(result: dict | None) -> str:
    cpu = (result or {}).get("cpu") or {}
    if not cpu:
        return "-"
    backend = f"+{cpu['backend_percent']:.0f}" if cpu.get("backend_percent") is not None else ""
    return f"{cpu['server_percent']:.0f}{backend}/{cpu['generator_percent'] or 0:.0f}%"


def print_report(document: dict) -> None:
    peers = document["peers"]
    ratios = document["ratios"]
    conditions = document["conditions"]
    print("\n== machine")
    print(f"  {conditions['cpu_model']}, {conditions['cores_usable']} cores usable, "
          f"{conditions['memory_gib']} GiB, {conditions['os']}, kernel {conditions['kernel']}, "
          f"Python {conditions['python']}, load average at start "
          f"{', '.join(f'{x:.2f}' for x in conditions['load_average_at_start'])}")  # fmt: skip
    for what, fs in document["filesystems"].items():
        print(f"  {what:24} {fs['fs_type']} on {fs['device']} (mount {fs['mount_point']})")
    if document.get("postgres"):
        s = document["postgres"]["settings"]
        print(f"  PostgreSQL {s['server_version']}: fsync={s['fsync']} synchronous_commit="
              f"{s['synchronous_commit']} wal_sync_method={s['wal_sync_method']} "
              f"commit_delay={s['commit_delay']}")  # fmt: skip
    if document.get("redis"):
        print(f"  {document['redis']['version']}: {document['redis']['config']}")

    headers = ["peer", "durability", "conns", "closed 201/s", "p50", "p99", "CPU srv+db/gen",
               "CPU us/201", "open rate", "open p50", "p99", "p99.9", "max", "send lag p99",
               "x ceiling", "engine / peer"]  # fmt: skip
    rows = []
    for name, peer in peers.items():
        closed = scenario_of(peers, name, "closed_max")
        opened = scenario_of(peers, name, "open_half")
        x_ceiling = ratios.get(f"{name}/ceiling") if name in ENGINES else None
        if name not in ENGINES and closed and "ceiling" in peers and scenario_of(peers, "ceiling", "closed_max"):
            x_ceiling = round(closed["created_per_s"] / scenario_of(peers, "ceiling", "closed_max")["created_per_s"], 4)
        engine_over = ratios.get(f"embedded/{name}") if name not in ENGINES else None
        shards = peer.get("info", {}).get("shards")
        rows.append([
            f"{name} ({shards} shard{'s' if shards != 1 else ''})" if shards else name,
            peer["durability"],
            str(closed["connections"]) if closed else "-",
            f"{closed['created_per_s']:,.0f}" if closed else "FAILED",
            lat(closed, "p50"), lat(closed, "p99"), cpu_cell(closed),
            f"{closed['cpu_us_per_created']:.0f}" if closed and closed.get("cpu_us_per_created") else "-",
            f"{opened['created_per_s']:,.0f}" if opened else "-",
            lat(opened, "p50"), lat(opened, "p99"), lat(opened, "p99.9"), lat(opened, "max"),
            format_us(opened["send_lag_us"].get("p99")) if opened and opened.get("send_lag_us") else "-",
            f"{x_ceiling:.3f}" if x_ceiling is not None else "-",
            f"{engine_over:.2f}x" if engine_over is not None else "-",
        ])  # fmt: skip
    print("\n== result: closed loop max (wrk -t1; each peer's best of the connection counts "
          "tried, conns = the best) and open loop at half that rate (perf/loadgen.py, latency "
          "from intended send time)")
    print_table(headers, rows)
    print("  CPU srv+db/gen: server process tree + its database or stack / the generator, % of "
          "one core, mean over the run. CPU us/201: (server + database) CPU per 201.")

    headers = ["peer", "repeat 201/s", "409s / repeats sent", "16 polls 201/s",
               "16 polls / hot", "burst p50", "burst p99", "burst max", "burst 201s",
               "unanswered", "results check"]  # fmt: skip
    rows = []
    for name, peer in peers.items():
        if not PEERS[name].stateful:
            continue
        repeat = scenario_of(peers, name, "repeat_votes")
        many = scenario_of(peers, name, "many_polls")
        burst = scenario_of(peers, name, "burst_opening")
        closed = scenario_of(peers, name, "closed_max")
        checks = [r["cross_check"]["ok"] for r in peer["scenarios"].values() if r.get("cross_check")]
        conflicts = repeat["statuses"].get("409", 0) if repeat else 0
        rows.append([
            name,
            f"{repeat['created_per_s']:,.0f}" if repeat else "-",
            f"{conflicts:,} / {repeat['repeats_sent']:,}" if repeat else "-",
            f"{many['created_per_s']:,.0f}" if many else "-",
            f"{many['created_per_s'] / closed['created_per_s']:.2f}" if many and closed else "-",
            lat(burst, "p50"), lat(burst, "p99"), lat(burst, "max"),
            f"{burst['created']:,}/{burst['scheduled']:,}" if burst else "-",
            str(burst["unanswered"]) if burst else "-",
            f"{sum(checks)}/{len(checks)} ok" if checks else "-",
        ])  # fmt: skip
    print("\n== scenarios: repeat votes, hot poll vs 16 polls, burst at poll opening")
    print_table(headers, rows)

    by_round = document.get("ratios_by_round") or []
    if len(by_round) > 1:
        keys = list(dict.fromkeys(key for r in by_round for key in r))
        print(f"\n== ratios by round ({len(by_round)} rounds; the tables above show the last round)")
        print_table(["ratio", *[f"r{i + 1}" for i in range(len(by_round))], "median"],
                    [[key, *[f"{r[key]:.4f}" if key in r else "-" for r in by_round],
                      f"{document['ratios'][key]:.4f}"] for key in keys])  # fmt: skip
    print("\n== ratios (closed_max 201/s, measured side by side in this run"
          + (", median of rounds)" if len(by_round) > 1 else ")"))
    for key, value in ratios.items():
        if not key.startswith("cpu_per_201"):
            print(f"  {key:32} {value:.4f}")
    for key, value in ratios.items():
        if key.startswith("cpu_per_201"):
            print(f"  {'CPU per 201 ' + key.split(' ', 1)[1]:32} {value:.4f}  (steadier when the machine is busy)")

    print("\n== targets (perf issue)")
    print_table(["target", "threshold", "measured", "verdict"],
                [[t["description"], f"{t['sense']} {t['threshold']:g}",
                  "-" if t["measured"] is None else f"{t['measured']:,.4g}", t["verdict"]]
                 for t in document["targets"]])  # fmt: skip
    for warning in document["warnings"]:
        print(f"  WARNING {warning}")
    for name, peer in peers.items():
        for scenario, error in peer.get("errors", {}).items():
            print(f"  FAILED {name} {scenario}: {error.splitlines()[0]}")
    sys.stdout.flush()


def warnings_of(peers: dict) -> list[str]:
    warnings = []
    ceiling = scenario_of(peers, "ceiling", "closed_max")
    if ceiling and ceiling.get("cpu") and ceiling["cpu"]["server_percent"] < 90:
        warnings.append(f"the ceiling's server used {ceiling['cpu']['server_percent']:.0f}% of a core "
                        "in closed_max: it did not saturate, so the ratios to it flatter the engine")  # fmt: skip
    for name, peer in peers.items():
        for scenario, result in peer["scenarios"].items():
            cpu = result.get("cpu") or {}
            check = result.get("cross_check")
            if check is not None and not check["ok"]:
                warnings.append(f"{name} {scenario}: results total {check['votes_counted']} does not "
                                f"match the 201s seen {check['created_seen']} (+{check['in_flight_at_end']} in flight)")  # fmt: skip
            repeat = result.get("repeat_check")
            if repeat is not None and not repeat["ok"]:
                warnings.append(f"{name} {scenario}: {repeat['conflicts']} 409s for "
                                f"{repeat['repeats_sent']} repeats sent, {result['created']} 201s for "
                                f"{repeat['distinct_sent']} distinct voters: a vote counted twice "
                                "or a first vote refused")  # fmt: skip
            if cpu and (cpu.get("generator_percent") or 0) >= 90:
                warnings.append(f"{name} {scenario}: the generator used {cpu['generator_percent']:.0f}% "
                                "of a core: it may be the bottleneck")  # fmt: skip
            if cpu:
                others = cpu["machine_busy_percent"] - sum(
                    cpu.get(k) or 0 for k in ("server_percent", "backend_percent", "generator_percent"))
                if others > 25:
                    warnings.append(f"{name} {scenario}: other processes used {others:.0f}% of the "
                                    "machine: absolute rates are depressed; compare ratios")  # fmt: skip
            if result.get("overloaded_at_s") is not None:
                warnings.append(f"{name} {scenario}: open loop stopped sending at "
                                f"{result['overloaded_at_s']} s: too many requests unanswered")  # fmt: skip
            lag = (result.get("send_lag_us") or {}).get("p99")
            if lag is not None and lag > 5000:
                warnings.append(f"{name} {scenario}: the generator sent late (p99 send lag "
                                f"{format_us(lag)}): its lateness is in the latencies")  # fmt: skip
    return warnings


def load_micro() -> dict | None:
    path = RESULTS_DIR / "micro.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--peers", default=DEFAULT_PEERS, help=f"comma-separated from {','.join(PEERS)}")
    parser.add_argument("--kafka", action="store_true", help="add the kafka peer (private stack)")
    parser.add_argument("--scenarios", type=Path, default=PERF_DIR / "scenarios" / "default.toml")
    parser.add_argument("--only", default="",
                        help="comma-separated scenario names to run (closed_max always runs: "
                        "the open-loop rates are fractions of it)")  # fmt: skip
    parser.add_argument("--duration-scale", type=float, default=1.0,
                        help="multiply every scenario duration (longer runs: 3)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="--duration-scale 0.4")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every peer this many times in turn; ratios and targets use medians")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="server workers of every peer")
    parser.add_argument("--pool-size", type=int, default=32, help="database pool per worker")
    parser.add_argument("--pg-tally", choices=("count", "counter"), default="count",
                        help="PG peer tallies: count(*) at read, or a counter row per option updated in the vote's transaction")  # fmt: skip
    parser.add_argument("--kafka-connections", default="1024,2048",
                        help="connections for the kafka peer, comma-separated: closed_max tries "
                             "each and keeps the best, the other scenarios use the first (its "
                             "rate is votes in flight / transaction time); 0 = as the others")  # fmt: skip
    parser.add_argument("--kafka-partitions", type=int, default=1,
                        help="WAL partitions = shards of the kafka engine (one transaction in "
                             "flight per shard: on one machine fewer, larger transactions win)")
    parser.add_argument("--kafka-warmup-s", type=float, default=30.0,
                        help="the kafka peer's warm-up (closed loop, not measured): a fresh "
                             "stack's brokers are still compiling their hot paths")
    parser.add_argument("--stack-base-port", type=int, default=19700)
    parser.add_argument("--timeout-s", type=float, default=5.0, help="wrk --timeout")
    parser.add_argument("--drain-timeout-s", type=float, default=10.0, help="open loop: wait for answers")
    parser.add_argument("--tokens-max", type=int, default=2_000_000, help="cap per token file")
    parser.add_argument("--ceiling-rate-max", type=float, default=80_000,
                        help="sizes the ceiling's token files (201/s it could reach at most)")  # fmt: skip
    parser.add_argument("--token-ttl-s", type=int, default=7200)
    parser.add_argument("--mint-procs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-root", type=Path, default=Path("/var/tmp/votes-bench"),
                        help="run directories (engine data, PostgreSQL, tokens, logs); a real disk")  # fmt: skip
    parser.add_argument("--keep-data", action="store_true")
    parser.add_argument("--ready-timeout-s", type=float, default=90.0)
    parser.add_argument("--settle-timeout-s", type=float, default=15.0)
    parser.add_argument("--engine-shards", type=int, default=1,
                        help="shards of the embedded engine's one worker (each shard is its own "
                             "fsync'd log: see docs/performance.md for how the ratio moves with "
                             "it); the kafka engine has one shard per WAL partition")
    parser.add_argument("--engine-extra-args", default="", help="appended to `votes serve`")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "peers.json")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    if args.kafka and "kafka" not in names:
        names.append("kafka")
    unknown = set(names) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}")
    if "ceiling" not in names:
        names.insert(0, "ceiling")
    args.peer_names = [n for n in PEERS if n in names]
    if args.quick:
        args.duration_scale = 0.4
    return args


# Python modules each peer's server imports: checked before anything starts, so a
# missing `perf` extra is one clear message instead of a peer dying at start-up.
PEER_MODULES = {
    "granian_asyncpg": ("asyncpg",),
    "fastapi_pg": ("fastapi", "uvicorn", "asyncpg", "httptools"),
    "fastapi_redis": ("fastapi", "uvicorn", "redis", "httptools"),
}


def missing_modules(peer_names: list[str]) -> dict[str, list[str]]:
    import importlib.util

    missing = {}
    for name in peer_names:
        absent = [m for m in PEER_MODULES.get(name, ()) if importlib.util.find_spec(m) is None]
        if absent:
            missing[name] = absent
    return missing


def raise_on_sigterm() -> None:
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    scenario_set = load_scenarios(args.scenarios, args.duration_scale)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        scenario_set.scenarios = [s for s in scenario_set.scenarios if s.name in wanted or s.name == "closed_max"]
    missing = missing_modules(args.peer_names)
    if missing:
        print(f"peers need Python packages that are not installed: {missing}\n"
              "install the perf extra: .venv/bin/pip install -e '.[test,perf]' (make bench does)",
              file=sys.stderr)  # fmt: skip
        return 2
    wrk_path = ensure_wrk()
    run_dir = args.data_root / time.strftime("peers-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    conditions = describe_machine(("votes-engine", "fastapi", "uvicorn", "asyncpg", "redis",
                                   "pyroaring", "matplotlib", "hiredis"))  # fmt: skip
    parameters = {
        "peers": ",".join(args.peer_names),
        "scenarios": [s.name for s in scenario_set.scenarios],
        "scenario_file": str(args.scenarios.relative_to(REPO_DIR) if args.scenarios.is_relative_to(REPO_DIR) else args.scenarios),
        "duration_scale": args.duration_scale,
        "connections": scenario_set.connections,
        "kafka_connections": args.kafka_connections if "kafka" in args.peer_names else None,
        "kafka_partitions": args.kafka_partitions if "kafka" in args.peer_names else None,
        "kafka_warmup_s": args.kafka_warmup_s if "kafka" in args.peer_names else None,
        "warmup_s": scenario_set.warmup_s,
        "rounds": args.rounds,
        "workers": args.workers,
        "pool_size": args.pool_size,
        "pg_tally": args.pg_tally,
        "run_dir": str(run_dir),
    }  # fmt: skip
    print_conditions(conditions, parameters)
    started = time.monotonic()
    h = Harness(args, scenario_set, run_dir, wrk_path)
    rounds: list[dict] = []
    failures: dict = {}
    try:
        h.prepare_keys()
        for index in range(args.rounds):
            if args.rounds > 1:
                print(f"\n######## round {index + 1} of {args.rounds}", flush=True)
            peers: dict = {}
            rounds.append(peers)
            ceiling_rate = None
            for name in args.peer_names:
                try:
                    peers[name] = run_peer(h, name, ceiling_rate)
                except (BenchError, PostgresError, subprocess.TimeoutExpired, OSError) as error:
                    print(f"!! {name} failed: {error}", flush=True)
                    failures[f"r{index + 1} {name}" if args.rounds > 1 else name] = str(error)
                    continue
                closed = scenario_of(peers, name, "closed_max")
                if name == "ceiling" and closed:
                    ceiling_rate = max(closed["created_per_s"], peers[name]["warmup_created_per_s"])
    finally:
        h.shutdown()
        if not args.keep_data:
            for path in run_dir.glob("*.tokens"):
                path.unlink()

    filesystems = {"run dir (engine data)": filesystem_of(run_dir)}
    if h.postgres_info:
        filesystems["PostgreSQL data"] = h.postgres_info["filesystem"]
    peers = rounds[-1] if rounds else {}
    ratios_by_round = [ratios_of(round_peers) for round_peers in rounds]
    ratios = median_by_key(ratios_by_round)
    p99_by_round = [open_p99_ms(round_peers) for round_peers in rounds]
    micro = load_micro()
    document = {
        "benchmark": "peers",
        "conditions": conditions,
        "parameters": parameters,
        "filesystems": filesystems,
        "postgres": h.postgres_info,
        "redis": h.redis_info,
        "stack": h.stack_info,
        "tokens": {
            "minted": len(h.pool.tokens),
            "mint_s": round(h.pool.mint_s, 1),
            "token_len": len(h.pool.tokens[0]) if h.pool.tokens else None,
        },
        "peers": peers,
        "earlier_rounds": rounds[:-1],
        "failures": failures,
        "ratios": ratios,
        "ratios_by_round": ratios_by_round,
        "open_half_p99_ms_by_round": p99_by_round,
        "targets": measured_targets(ratios, median_by_key(p99_by_round), micro),
        "micro_source": {"file": "perf/results/micro.json", "time_utc": micro["conditions"].get("time_utc")}
        if micro else None,
        "warnings": [(f"r{index + 1} " if len(rounds) > 1 else "") + warning
                     for index, round_peers in enumerate(rounds)
                     for warning in warnings_of(round_peers)],
        "run_s": None,
    }
    document["run_s"] = round(time.monotonic() - started, 1)
    print_report(document)
    write_json(args.out, document)
    print(f"\nwrote {args.out}; logs in {run_dir}")
    if not args.no_plots:
        try:
            from plots import plot_peers

            for path in plot_peers(document, args.out.parent):
                print(f"wrote {path}")
        except ImportError as error:
            print(f"no plots: {error} (pip install -e '.[perf]')")
    return 1 if failures or any(p["errors"] for r in rounds for p in r.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
