"""The peers' servers and the services they run on, for one invocation of the driver.

The Harness holds what every peer shares: the run directory, the token pool, the key
directory the tokens were minted from, a private PostgreSQL cluster (started on first use,
fsync and synchronous_commit read back and required on), a Redis without persistence per
Redis peer, and a private local stack for the kafka peer. Every server is started as
``python -m ...`` from the repository root in its own process group and stopped, with its
backend, when the peer is done; ``shutdown`` stops whatever is left, also on failure.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local.installer import ensure_debian_package
from deploy.local.postgres import PostgresCluster, PostgresError
from perf import BenchError
from perf.machine import filesystem_of
from perf.private_stack import PrivateStack
from perf.processes import ServerProcess, free_port, http_request, wait_for_http
from perf.scenarios import ENGINES, PEERS, ScenarioSet
from perf.tokens import TokenPool


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


def engine_layout(shards: int) -> tuple[int, int]:
    """(shards, fencing groups) of an engine started with ``--shards shards``; 0 = the
    engine's defaults. The engine's own config decides, so the bench never guesses it."""
    from engine.config import Config

    config = (Config(shards=shards) if shards else Config()).resolved()
    return config.shards, config.groups


class Harness:
    """State of one invocation: run directory, token pool, shared services."""

    def __init__(self, args, scenario_set: ScenarioSet, run_dir: Path, wrk_path: str):
        self.args = args
        self.set = scenario_set
        self.run_dir = run_dir
        self.wrk_path = wrk_path
        self.keys_data_dir = run_dir / "keys-data"
        self.pool = TokenPool(self.keys_data_dir, run_dir, args.mint_procs, args.token_ttl_s,
                              args.votes_bin)  # fmt: skip
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
            # The WAL topic has one partition per fencing group of the kafka engine.
            stack = PrivateStack(self.args.stack_base_port, engine_layout(self.args.engine_shards)[1],
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

    def start(self, name: str, engine_shards: int | None = None) -> RunningPeer:
        """Start peer ``name``; an engine with ``engine_shards`` (a sweep case) instead of
        --engine-shards, in its own data dir, log and (kafka) WAL topic."""
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        case = "" if engine_shards is None else f"-s{engine_shards}"
        log = self.run_dir / f"{name}{case}.log"
        py = sys.executable
        workers = ["--workers", str(self.args.workers)]
        if name == "ceiling":
            server = ServerProcess(name, [py, "-m", "perf.ceiling", "--port", str(port),
                                          *workers], log)  # fmt: skip
            peer = RunningPeer(name, base_url, server, [], {})
            self._wait(peer, expect=201)
            return peer
        if name in ENGINES:
            shards = self.args.engine_shards if engine_shards is None else engine_shards
            return self._start_engine(name, port, base_url, log, shards, case)
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
        argv = [py, "-m", f"perf.peers.{name}", "--port", str(port), *workers]
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

    def _start_engine(self, name: str, port: int, base_url: str, log: Path, shards: int,
                      case: str) -> RunningPeer:  # fmt: skip
        """``shards`` 0: the engine's own defaults (no --shards flag, as `votes serve` runs)."""
        data_dir = self.run_dir / f"{name}{case}-data"
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir()
        # The engine keeps the keys it finds: the same keys as every other peer's tokens.
        shutil.copytree(self.keys_data_dir / "keys", data_dir / "keys")
        argv = [str(self.args.votes_bin), "serve", "--data-dir", str(data_dir), "--port", str(port),
                "--workers", str(self.args.workers)]  # fmt: skip
        backend_pids: list[int] = []
        if name == "kafka":
            stack = self.ensure_stack()
            # A sweep case gets a fresh topic of its own (one partition per group) and its
            # own snapshot prefix: an engine must not replay another case's votes.
            topic = stack.wal_topic_for(f"sweep{case}", engine_layout(shards)[1]) if case else None
            config = stack.write_engine_config(self.run_dir / f"kafka{case}-engine.toml",
                                               shards=shards or None, wal_topic=topic,
                                               s3_prefix=f"snapshots{case}")  # fmt: skip
            argv += ["--config", str(config)]
            backend_pids = stack.pids()
        elif shards:
            argv += ["--shards", str(max(shards, self.args.workers))]
        argv += shlex.split(self.args.engine_extra_args)
        server = ServerProcess(name, argv, log)
        cleanups = [] if self.args.keep_data else [lambda: shutil.rmtree(data_dir, ignore_errors=True)]
        peer = RunningPeer(name, base_url, server, backend_pids,
                           {"data_dir": str(data_dir), "filesystem": filesystem_of(data_dir)},
                           cleanups)  # fmt: skip
        self._wait(peer, expect=200)
        try:
            layout = json.loads((data_dir / "cluster.json").read_text())
            peer.info["shards"], peer.info["groups"] = layout["shards"], layout.get("groups")
            _, body = http_request("GET", f"{base_url}/readyz")
            peer.info["readyz"] = json.loads(body)
        except (OSError, ValueError, KeyError) as error:
            peer.info["readyz_error"] = str(error)
        return peer

    def _start_redis(self) -> tuple[ServerProcess, str]:
        redis_bin = ensure_debian_package("redis-server", "redis-server")
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
