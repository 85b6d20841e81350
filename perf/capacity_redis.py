"""The capacity model's Redis Cluster section (issue 12), apart from perf/capacity.py so that
file stays within its size bounds: the primaries the rate limiter's global view needs at
the design rate, from the calls and the Redis CPU each vote costs.

The limiter sends one Lua call per bucket per sync, each carrying up to 512 keys
(engine/ratelimit.py), so a vote costs Redis far less than one call but each call costs
Redis far more than a small command: a Redis primary is one thread, so it is sized by CPU
(the masters' CPU per vote, net of their idle use) as well as by calls, and the larger
count wins. Both figures come from perf/results/defences.json (perf/bench_defences.py,
the engine with every defence on, one worker at its max rate) when it holds a valid
defended run, else the defaults below, named as such.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

ASSUMPTION = "assumption"
# Defaults until perf/results/defences.json exists: python -m perf.bench_defences,
# 2026-12-02 19:06Z (docs/capacity.md "Redis for the rate limits"): 0.006 round trips and
# 12.3 us of the masters' CPU per vote, one worker at 3,929 votes/s.
REDIS_CALLS_PER_VOTE_DEFAULT = 0.006
REDIS_CPU_US_PER_VOTE_DEFAULT = 12.3

REDIS_INPUTS: dict[str, tuple[float, str, str]] = {
    "redis_calls_per_vote": (REDIS_CALLS_PER_VOTE_DEFAULT, "calls",
                             "default, no defences.json (bench_defences 2026-12-02 19:06Z, one "
                             "worker at its max rate)"),
    "redis_cpu_us_per_vote": (REDIS_CPU_US_PER_VOTE_DEFAULT, "us/vote",
                              "default, no defences.json (bench_defences 2026-12-02 19:06Z: "
                              "the masters' CPU net of idle)"),
    # A primary is one thread: it has one core, kept at most half busy (a failover puts a
    # replica's share on it, key growth in a flood, BGSAVE-free but cron and the bus).
    "redis_primary_cpu_budget": (0.5, "core", ASSUMPTION + ": a primary at most 50 % busy"),
}


def measured_redis_figures(results_dir: Path) -> tuple[dict[str, tuple[float, str, str]], list[str]]:
    """Calls and the masters' CPU per vote from defences.json, if its defended runs are
    valid; and the file used (or why it was not)."""
    path = results_dir / "defences.json"
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, []
    if (document.get("integrity") or {}).get("failures"):
        return {}, [f"NOT {path.name}: its integrity checks failed; Redis defaults kept"]
    redis = document.get("redis") or {}
    calls, cpu_us = redis.get("calls_per_vote_median"), redis.get("redis_cpu_us_per_vote")
    if calls is None:
        return {}, []
    when = (document.get("conditions") or {}).get("time_utc", "?")
    source = (f"measured: {path.name} {when}, one worker at {redis.get('votes_per_s', 0):,.0f} "
              "votes/s, INFO commandstats")
    figures = {"redis_calls_per_vote": (float(calls), "calls", source)}
    if cpu_us is not None:
        figures["redis_cpu_us_per_vote"] = (float(cpu_us), "us/vote",
                                            source + ", masters' CPU net of idle")
    return figures, [f"Redis calls and CPU per vote from {path.name}"]


def round_up_to(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def redis_section(model: Any) -> None:
    """Calls/s, primaries by calls and by CPU (the larger, up to a multiple of the AZs), and
    nodes (a replica per primary in another AZ), through the Model's `i`, `out`, `put`."""
    i, o = model.i, model.out
    design, azs = o["design_votes_per_s"], int(i["azs"])
    owners = o["engine_instances"] * o["workers_per_instance"]
    s = "redis"
    limit_calls = design * i["redis_calls_per_vote"]
    publish = owners * i["tally_publish_per_s_per_owner"] * i["polls_concurrent"]
    calls = model.put(s, "redis_calls_per_s", round(limit_calls + publish),
                      f"{design:,.0f} x {i['redis_calls_per_vote']:g} limit calls + {owners:g} "
                      f"owners x {i['tally_publish_per_s_per_owner']:g}/s x "
                      f"{i['polls_concurrent']:g} polls")  # fmt: skip
    by_calls = model.put(s, "redis_primaries_by_calls",
                         math.ceil(calls / i["redis_calls_per_s_per_primary"]),
                         f"ceil({calls:,.0f} / {i['redis_calls_per_s_per_primary']:,.0f} calls/s)")
    cores = model.put(s, "redis_cores_for_limits", round(design * i["redis_cpu_us_per_vote"] / 1e6, 2),
                      f"{design:,.0f} x {i['redis_cpu_us_per_vote']:g} us / 1e6")  # fmt: skip
    by_cpu = model.put(s, "redis_primaries_by_cpu",
                       math.ceil(cores / i["redis_primary_cpu_budget"]),
                       f"ceil({cores:g} cores / {i['redis_primary_cpu_budget']:g} of a core each)")
    primaries = model.put(s, "redis_primaries", round_up_to(max(by_calls, by_cpu, 1), azs),
                          f"max({by_calls}, {by_cpu}) up to a multiple of {azs}")
    model.put(s, "redis_nodes", primaries * 2, f"{primaries} primaries + 1 replica each, "
              "replica in another AZ (Redis holds limits and tallies, never the one-vote truth)")
