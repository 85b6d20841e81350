"""Ratios of the engine to its ceiling and peers, and the perf issue's targets as verdicts.

Ratios are of closed_max 201/s measured side by side in one run (and, steadier on a busy
machine, of CPU per 201). A value that depends on a peer whose integrity checks failed
(perf/integrity.py) is the string INVALID, never a number, and its target's verdict is
INVALID, never PASS or FAIL.
"""

from __future__ import annotations

import statistics

from perf.scenarios import ENGINES, PEERS

INVALID = "INVALID"

# The perf issue's targets: (key of the measured value, description, threshold, "min" =
# the measured value must be at least the threshold, "max" = at most).
TARGETS = [
    ("embedded/ceiling at 64 conns",
     "engine embedded, default config, 1 worker, 201/s ÷ ceiling at 64 connections", 0.45, "min"),
    ("embedded/ceiling at 256 conns",
     "engine embedded, default config, 1 worker, 201/s ÷ ceiling at 256 connections", 0.55, "min"),
    ("kafka/ceiling", "engine Kafka WAL, default config, best 201/s ÷ ceiling's best", 0.4, "min"),
    ("embedded/fastapi_pg", "engine ÷ FastAPI+PG, 201/s", 10.0, "min"),
    ("embedded/granian_asyncpg", "engine ÷ Granian+asyncpg+PG, 201/s", 4.0, "min"),
    ("embedded open_half p99 ms", "engine embedded p99 at half max rate (open loop), ms", 10.0,
     "max"),
    ("kafka open_half p99 ms", "engine Kafka p99 at half max rate (open loop), ms", 25.0, "max"),
    ("kafka open_half send lag p99 ms",
     "the generator's own send lag (p99) in that Kafka open-loop run, ms", 2.0, "max"),
    ("cython apply votes/s", "Cython batch apply, votes/s (bench_micro)", 5e6, "min"),
    ("cython/python apply", "Cython batch apply ÷ Python twin (bench_micro)", 10.0, "min"),
    ("bitmap bits/voter at 50%",
     "voter bitmaps, bits per eligible voter at 50% turnout (bench_micro)", 2.2, "max"),
]  # fmt: skip
# The shard sweep's target (perf/sweep.py): the most shards per worker keep this share of
# the 1-shard throughput at each connection count, per engine.
SWEEP_RATIO_TO_1_SHARD_MIN = 0.9


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
        ratios.update(ratios_by_connections(peers, engine, "ceiling"))
    return ratios


def ratios_by_connections(peers: dict, engine: str, other: str) -> dict:
    """closed_max 201/s ratios at each connection count both peers ran (connections_tried)."""
    def tried(name):
        result = scenario_of(peers, name, "closed_max") or {}
        return result.get("connections_tried") or {}

    mine, theirs = tried(engine), tried(other)
    return {f"{engine}/{other} at {count} conns": round(mine[count] / theirs[count], 4)
            for count in sorted(set(mine) & set(theirs), key=int) if theirs[count]}  # fmt: skip


def median_by_key(documents: list[dict]) -> dict:
    """Per key, the median of the values the documents hold for it (rounds of a run).

    A key INVALID in any round is INVALID: a median must not hide a round whose counts
    did not add up.
    """
    keys = [key for document in documents for key in document]
    medians: dict = {}
    for key in dict.fromkeys(keys):
        values = [d[key] for d in documents if key in d]
        medians[key] = INVALID if INVALID in values else round(statistics.median(values), 4)
    return medians


def peers_named_in(key: str) -> set[str]:
    """The peers a measured value depends on: "embedded/ceiling" -> {embedded, ceiling}."""
    return set(key.replace("/", " ").split()) & set(PEERS)


def invalidated(values: dict, invalid_peers: list[str] | set[str]) -> dict:
    """``values`` with every value that depends on an invalid peer replaced by INVALID."""
    invalid = set(invalid_peers)
    return {key: INVALID if peers_named_in(key) & invalid else value
            for key, value in values.items()}  # fmt: skip


def open_p99_ms(peers: dict) -> dict:
    """The engines' open_half p99, ms, keyed as the targets name it."""
    values = {}
    for engine in ENGINES:
        result = scenario_of(peers, engine, "open_half")
        if result and result["latency_us"]:
            values[f"{engine} open_half p99 ms"] = round(result["latency_us"]["p99"] / 1000, 2)
        lag = (result or {}).get("send_lag_us") or {}
        if lag.get("p99") is not None:
            values[f"{engine} open_half send lag p99 ms"] = round(lag["p99"] / 1000, 3)
    return values


def measured_targets(ratios: dict, p99_ms: dict, micro: dict | None) -> list[dict]:
    """PASS / FAIL / INVALID per target of the perf issue; with rounds, medians of rounds."""
    values: dict = {**ratios, **p99_ms}
    if micro:
        targets = micro.get("targets_measured", {})
        values.update({k: v for k, v in targets.items() if v is not None})
    return verdict_rows(TARGETS, values)


def verdict_rows(targets: list[tuple], values: dict) -> list[dict]:
    """One row per target: the value measured and PASS / FAIL / INVALID / not measured."""
    rows = []
    for key, description, threshold, sense in targets:
        value = values.get(key)
        if value is None:
            verdict = "not measured"
        elif value == INVALID:
            verdict = INVALID  # the counts behind it did not add up: no PASS, no FAIL
        elif sense == "min":
            verdict = "PASS" if value >= threshold else "FAIL"
        else:
            verdict = "PASS" if value <= threshold else "FAIL"
        rows.append({"target": key, "description": description, "threshold": threshold,
                     "sense": ">=" if sense == "min" else "<=", "measured": value,
                     "verdict": verdict})  # fmt: skip
    return rows


def sweep_targets(rows: list[dict], shards_most: int = 32, connections: tuple = (64, 256)) -> list[dict]:
    """The sweep's target per engine and connection count: ``shards_most`` shards per worker
    ÷ 1 shard >= 0.9 (perf/sweep.py rows); "not measured" where the sweep has no such row."""
    targets, values = [], {}
    for engine in ENGINES:
        for count in connections:
            key = f"{engine} {shards_most}/1 shards at {count} conns"
            targets.append((key, f"engine {engine}, {shards_most} shards per worker ÷ 1 shard, "
                            f"201/s at {count} connections (sweep)", SWEEP_RATIO_TO_1_SHARD_MIN, "min"))
            found = [row["ratio_to_1_shard"] for row in rows if row["engine"] == engine
                     and row["shards"] == shards_most and row["connections"] == count]  # fmt: skip
            if found and found[0] is not None:
                values[key] = found[0]
    return verdict_rows(targets, values)
