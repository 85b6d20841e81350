"""The engine with its defences on or off, and the private Redis Cluster it limits with.

Shared by perf/bench_defences.py (throughput with the defences on and off) and
perf/bench_attack.py (the attack simulation). Three configurations, each `votes serve` with
a TOML written here, everything else the engine's defaults (32 shards in 4 groups, one
worker unless told otherwise):

- ``default``: the engine as shipped: local limits per worker, loopback exempt from the
  address and prefix limits, no trusted proxy (X-Forwarded-For ignored), no Redis.
- ``off``: ``ratelimit_enabled = false``: no limit at all.
- ``local-limits``: the defended engine without Redis (each worker limits alone), so the
  cost of the checks and the cost of the global view's sync are told apart.
- ``defended``: every defence built: ``trusted_proxies = "127.0.0.1/32"`` (the load
  generator plays the edge proxy and names each client in X-Forwarded-For), no exempt
  network (every client address is limited), and the global view on a private
  three-master Redis Cluster (deploy/local/redis_cluster.py) synchronised every
  ``ratelimit_sync_ms``.

The cluster runs on ``$VOTES_STACK_BASE_PORT`` + 50..55 with its state under the run
directory, and is always taken down by ``RedisClusterUnderTest.down`` (call it in a
``finally``). Redis calls are counted on the servers (INFO commandstats, summed over the
masters), so nothing depends on the engine counting its own calls right.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from deploy.local.ports import default_base_port
from deploy.local.processes import StackError
from deploy.local.redis_cluster import LocalRedisCluster
from perf import BenchError
from perf.processes import ServerProcess, free_port, http_request, wait_for_http
from perf.wrk import WrkParameters, run_wrk

VOTES_SCRIPT = Path(__file__).resolve().parent / "wrk" / "votes.lua"

VENV_BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 60.0
CONFIGS = ("default", "off", "local-limits", "defended")
PROXY_TOML = 'trusted_proxies = "127.0.0.1/32"\nratelimit_exempt_networks = ""\n'
# The commands the limiter's sync sends (a Lua script by EVALSHA, EVAL the first time it
# is not cached). INFO commandstats also counts the commands a script runs inside Redis
# (engine/ratelimit.py SYNC_SCRIPT's redis.call()s): work in Redis, not round trips, so
# they are counted apart. The rest (HELLO, CLUSTER SLOTS, ...) is the client's discovery.
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro")
# The commands the scripts run inside Redis: the rate limits' (engine/ratelimit.py) and the
# velocity rules' (engine/velocity_sync.py); not round trips.
SCRIPT_INNER_COMMANDS = ("time", "hget", "hset", "hdel", "hscan", "get", "set",
                         "incrby", "expire", "del", "pfadd", "pfcount", "ttl")


def config_toml(name: str, redis_url: str | None) -> str:
    """The `votes serve --config` TOML of one configuration (see the module docstring)."""
    if name == "default":
        return ""
    if name == "off":
        return "ratelimit_enabled = false\n"
    if name == "local-limits":
        return PROXY_TOML
    if name == "defended":
        if not redis_url:
            raise BenchError("the defended engine needs the Redis Cluster's URL")
        return PROXY_TOML + f'ratelimit_redis_url = "{redis_url}"\n'
    raise BenchError(f"unknown engine configuration {name!r}; known: {', '.join(CONFIGS)}")


class RedisClusterUnderTest:
    """The private Redis Cluster of one run: up, its pids, its command counts, down."""

    def __init__(self, run_dir: Path, base_port: int | None = None) -> None:
        self.cluster = LocalRedisCluster(base_port or default_base_port(),
                                         run_dir / "redis-cluster")
        self.up_s: float | None = None

    @property
    def url(self) -> str:
        return self.cluster.url

    def up(self) -> None:
        started = time.monotonic()
        try:
            self.cluster.down()
            self.cluster.up()
        except StackError as error:
            raise BenchError(f"the Redis Cluster did not come up: {error}") from error
        self.up_s = round(time.monotonic() - started, 1)

    def pids(self) -> list[int]:
        return [pid for pid in (service.pid() for service in self.cluster.services()) if pid]

    def command_calls(self) -> dict[str, int]:
        """{command: calls} summed over the masters (INFO commandstats)."""
        import redis

        totals: dict[str, int] = {}
        for service in self.cluster.services():
            client = redis.Redis(host="127.0.0.1", port=service.port, socket_timeout=5.0)
            try:
                stats = client.info("commandstats")
            except redis.RedisError as error:
                raise BenchError(f"INFO commandstats on {service.port}: {error}") from error
            finally:
                client.close()
            for key, value in stats.items():
                command = key.removeprefix("cmdstat_")
                totals[command] = totals.get(command, 0) + int(value["calls"])
        return totals

    def down(self) -> None:
        try:
            self.cluster.down()
        except StackError as error:
            print(f"!! stopping the Redis Cluster failed: {error}", flush=True)


def calls_between(before: dict[str, int], after: dict[str, int]) -> dict:
    """Calls made between two command_calls readings: the script's, every round trip but
    this bench's INFO, and the commands the script ran inside Redis."""
    delta = {command: after.get(command, 0) - before.get(command, 0) for command in after}
    delta = {command: calls for command, calls in delta.items() if calls > 0}
    inner = sum(delta.get(command, 0) for command in SCRIPT_INNER_COMMANDS)
    return {"script": sum(delta.get(command, 0) for command in SCRIPT_COMMANDS),
            "round_trips": sum(calls for command, calls in delta.items()
                               if command != "info" and command not in SCRIPT_INNER_COMMANDS),
            "inside_scripts": inner,
            "by_command": dict(sorted(delta.items()))}


class EngineUnderTest:
    """One `votes serve` in a fresh data dir with the keys the tokens were minted with."""

    def __init__(self, name: str, run_dir: Path, keys_dir: Path, redis_url: str | None,
                 workers: int = 1) -> None:
        self.name = name
        self.data_dir = run_dir / f"engine-{name}-data"
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir.mkdir(parents=True)
        shutil.copytree(keys_dir, self.data_dir / "keys")
        config = run_dir / f"engine-{name}.toml"
        config.write_text(config_toml(name, redis_url))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [str(VENV_BIN / "votes"), "serve", "--data-dir", str(self.data_dir),
                "--port", str(self.port), "--workers", str(workers), "--config", str(config)]
        self.server = ServerProcess(f"engine-{name}", argv, run_dir / f"engine-{name}.log")
        try:
            wait_for_http(f"{self.url}/readyz", READY_TIMEOUT_S, 200, self.server)
        except BaseException:
            self.server.stop()
            raise

    @property
    def pid(self) -> int:
        return self.server.pid

    def create_poll(self, admin_token: str, poll: str, options: list[str]) -> None:
        status, body = http_request("POST", f"{self.url}/v1/polls",
                                    {"id": poll, "options": options}, token=admin_token)
        if status != 201:
            raise BenchError(f"creating poll {poll} answered {status}: {body[:300]!r}")

    def results(self, poll: str) -> dict:
        status, body = http_request("GET", f"{self.url}/v1/polls/{poll}/results")
        if status != 200:
            raise BenchError(f"results of {poll} answered {status}: {body[:300]!r}")
        return json.loads(body)

    def settled_results(self, poll: str, timeout_s: float = 10.0) -> dict:
        """The results once their total stops moving (two equal reads 0.3 s apart)."""
        deadline = time.monotonic() + timeout_s
        last = self.results(poll)
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.results(poll)
            if now.get("total") == last.get("total"):
                return now
            last = now
        return last

    def metric_total(self, name: str) -> float:
        """The sum of every sample of one metric in GET /metrics (0 when absent)."""
        status, body = http_request("GET", f"{self.url}/metrics")
        if status != 200:
            raise BenchError(f"GET /metrics answered {status}")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def wrk_votes(url: str, server_pid: int, tokens: Path, poll: str, duration_s: float,
              connections: int, forwarded_for: str | None, wrk_path: str,
              extra_roots: dict | None = None, spread_first: int = 0) -> dict:
    """One closed-loop wrk run of perf/wrk/votes.lua (each token once), with the server's
    CPU (and ``extra_roots``', e.g. the Redis masters) sampled over it. ``spread_first``:
    the first spread address's index (VOTES_SPREAD_FIRST), for a second run against the
    same engine."""
    env = {"VOTES_TOKENS_FILE": str(tokens), "VOTES_POLL": poll, "VOTES_OPTIONS": "a",
           "VOTES_SPREAD_FIRST": str(spread_first)}
    if forwarded_for is not None:
        env["VOTES_FORWARDED_FOR"] = forwarded_for
    # wrk takes whole seconds only (-d1.5s is refused).
    parameters = WrkParameters(1, connections, max(1, round(duration_s)), timeout_s=5.0)
    roots = {"server": server_pid, **(extra_roots or {})}
    result = run_wrk(url, VOTES_SCRIPT, parameters, env, cpu_roots=roots, wrk_path=wrk_path)
    answered = sum(result.statuses.values())
    cpu = result.cpu
    cpu_s = {name: round(percent / 100 * cpu.interval_s, 4)
             for name, percent in cpu.cpu_percent.items()} if cpu else {}
    return {
        "wrk_argv": " ".join(parameters.argv()),
        "forwarded_for": forwarded_for,
        "duration_s": round(result.duration_s, 3),
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "answered": answered,
        "answered_per_s": round(answered / result.duration_s, 1) if result.duration_s else 0.0,
        "created": result.created,
        "created_per_s": round(result.created_per_s, 1),
        "votes_sent": result.votes_sent,
        "exhausted": result.exhausted,
        "errors": result.errors,
        "bodies_not_created": result.bodies_not_created,
        "latency_us": result.latency_us,
        "cpu_percent": cpu.cpu_percent if cpu else {},
        "cpu_s": cpu_s,
        "cpu_window_s": cpu.interval_s if cpu else None,
        "machine_busy_percent": cpu.machine_busy_percent if cpu else None,
        "server_cpu_us_per_answer": round(cpu_s["server"] * 1e6 / answered, 2)
        if cpu_s.get("server") and answered else None,
    }
