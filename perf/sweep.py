"""The shard sweep of `make bench`: an engine at 1, 8 and 32 shards per worker, each at 64
and 256 connections, closed loop (wrk), beside the ceiling measured in the same run.

One worker; the fencing groups are the engine's automatic choice (engine/config.py: the
largest divisor of the shard count up to 4, so 1, 4 and 4 groups here), read back from the
engine's cluster.json. Each case is a fresh engine (its own data dir; on Kafka its own WAL
topic, one partition per group, and its own snapshot prefix on the run's stack), a poll, a
short warm-up, then one closed_max run per connection count, each cross-checked against
the engine's results total (perf/integrity.py). Ratios are to the ceiling's closed_max at
the same connection count and to the 1-shard case at the same count, all from this run; a
ratio that depends on a run whose counts did not add up is INVALID.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import replace

from perf import BenchError
from perf.closed_loop import run_closed
from perf.integrity import failures_of
from perf.peer_api import create_poll
from perf.peer_servers import Harness
from perf.runs import RATE_BOUND_MIN_PER_S, closed_tokens_needed, run_scenario
from perf.scenarios import Scenario
from perf.targets import INVALID

# The Kafka cases run right after the kafka peer on its warm stack (its brokers JIT-compiled
# during that peer's warm-up); a new topic still needs its partitions' leaders and the
# producers' first transactions, so a Kafka case warms up longer than an embedded one.
KAFKA_WARMUP_S_MIN = 5.0


def parse_counts(text: str, what: str) -> list[int]:
    """"1,8,32" -> [1, 8, 32]; BenchError unless every count is a positive integer."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise BenchError(f"{what} {text!r}: give positive integers separated by commas")
    return counts


def ceiling_rates(ceiling: dict | None) -> dict[str, float]:
    """The ceiling's closed_max 201/s by connection count ({"64": ..., "256": ...})."""
    closed = (ceiling or {}).get("scenarios", {}).get("closed_max")
    if not closed:
        return {}
    return closed.get("connections_tried") or {str(closed["connections"]): closed["created_per_s"]}


def run_case(h: Harness, engine: str, shards: int, connection_counts: list[int],
             scenario: Scenario, rate_bound: float) -> dict:  # fmt: skip
    """One engine at ``shards`` shards: fresh state, warm-up, one run per connection count."""
    h.pool.rewind()
    started = time.monotonic()
    peer = h.start(engine, engine_shards=shards)
    case: dict = {"shards": peer.info.get("shards"), "groups": peer.info.get("groups"),
                  "info": peer.info, "runs": {}, "errors": {}}  # fmt: skip
    try:
        create_poll(peer, "bench", h.set.options, h.admin_token)
        warmup_s = h.set.warmup_s if engine != "kafka" else max(h.set.warmup_s, KAFKA_WARMUP_S_MIN)
        connections = max(connection_counts)
        warm_tokens = h.pool.take(closed_tokens_needed(h, rate_bound, warmup_s, connections), "warmup")
        warm = run_closed(h, peer, warm_tokens, warmup_s, ["bench"], connections, measure=False)
        if not h.args.keep_data:
            warm_tokens.unlink()
        state = {"rate_bound": min(rate_bound, max(warm["created_per_s"], RATE_BOUND_MIN_PER_S))}
        for connections in connection_counts:
            try:
                result = run_scenario(h, peer, replace(scenario, connections=connections), state)
            except (BenchError, subprocess.TimeoutExpired, OSError) as error:
                print(f"  !! {engine} {shards} shards at {connections} connections: {error}", flush=True)
                case["errors"][str(connections)] = f"{error}\n{peer.server.log_tail(15)}"
                continue
            case["runs"][str(connections)] = result
            check = result["cross_check"]
            cpu = result.get("cpu") or {}
            print(f"  {engine} {shards:>3} shards ({case['groups']} groups) {connections:>4} conns: "
                  f"{result['created_per_s']:>9,.0f} 201/s  server {cpu.get('server_percent') or 0:.0f}%  "
                  f"results check {'ok' if check and check['ok'] else 'MISMATCH'}", flush=True)  # fmt: skip
            if peer.server.proc.poll() is not None:
                raise BenchError(f"{engine} exited with {peer.server.proc.returncode}\n"
                                 f"{peer.server.log_tail()}")  # fmt: skip
    finally:
        peer.stop()
    case["took_s"] = round(time.monotonic() - started, 1)
    return case


def run_engine_sweep(h: Harness, engine: str, shard_counts: list[int], connection_counts: list[int],
                     ceiling_rate: float | None) -> dict:  # fmt: skip
    """Every shard count of one engine, in order; a case that fails is recorded, not fatal."""
    closed_max = next(s for s in h.set.scenarios if s.name == "closed_max")
    scenario = replace(closed_max, name="sweep_closed", connections_tried=[],
                       title="closed loop, max throughput, one poll (shard sweep)")  # fmt: skip
    rate_bound = ceiling_rate or h.args.ceiling_rate_max
    print(f"\n== sweep: {engine} at {', '.join(map(str, shard_counts))} shards per worker, "
          f"{', '.join(map(str, connection_counts))} connections, {scenario.duration_s:g} s each", flush=True)
    cases = {}
    for shards in shard_counts:
        try:
            cases[str(shards)] = run_case(h, engine, shards, connection_counts, scenario, rate_bound)
        except (BenchError, subprocess.TimeoutExpired, OSError) as error:
            print(f"  !! {engine} {shards} shards failed: {error}", flush=True)
            cases[str(shards)] = {"shards": shards, "runs": {}, "errors": {"start": str(error)}}
    return cases


def sweep_integrity(engines: dict) -> dict:
    """Failed cross-checks of every sweep run, and the (engine, shards) cases they void."""
    failures, invalid_cases = [], []
    for engine, cases in engines.items():
        for shards, case in cases.items():
            found = [failure for connections, result in case["runs"].items()
                     for failure in failures_of(f"{engine} {shards} shards", f"at {connections} conns",
                                                result)]  # fmt: skip
            if found:
                invalid_cases.append(f"{engine}/{shards}")
                failures.extend(found)
    return {"ok": not failures, "failures": failures, "invalid_cases": invalid_cases}


def sweep_rows(engines: dict, ceiling: dict[str, float], invalid_cases: list[str]) -> list[dict]:
    """Per engine, shard count and connection count: 201/s, ÷ ceiling, ÷ the 1-shard case."""
    rows = []
    for engine, cases in engines.items():
        base = cases.get("1", {"runs": {}})
        for shards, case in cases.items():
            for connections in sorted({*case["runs"], *case["errors"]} - {"start"}, key=int) or ["-"]:
                result = case["runs"].get(connections)
                rate = result["created_per_s"] if result else None
                invalid = f"{engine}/{shards}" in invalid_cases
                base_run = base["runs"].get(connections)
                row = {"engine": engine, "shards": int(shards), "groups": case.get("groups"),
                       "connections": None if connections == "-" else int(connections),
                       "created_per_s": rate,
                       "server_cpu_percent": ((result or {}).get("cpu") or {}).get("server_percent"),
                       "ratio_to_ceiling": None, "ratio_to_1_shard": None}  # fmt: skip
                if rate is not None and ceiling.get(connections):
                    row["ratio_to_ceiling"] = INVALID if invalid else round(rate / ceiling[connections], 4)
                if rate is not None and base_run:
                    void = invalid or f"{engine}/1" in invalid_cases
                    row["ratio_to_1_shard"] = INVALID if void else round(rate / base_run["created_per_s"], 4)
                rows.append(row)
    return rows
