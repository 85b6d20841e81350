"""Capacity model: the EC2 fleet for 250,000 votes/s peak, 2x headroom, 300M voters, 3 AZs.

Standard library only; runs with no arguments. Every input is a named figure with its
source: measured per-core figures come from perf/results/peers.json (bench_peers.py) and
perf/results/micro.json (bench_micro.py) when those files exist, and documented defaults
otherwise (taken from docs/performance.md's runs, or stated as assumptions to be measured
on real instances). Every output line shows its arithmetic, so a reader can check it and
change one input at a time (``--set name=value``, repeatable).

    python -m perf.capacity [--json] [--set engine_cpu_us_per_vote=120] [--results-dir DIR]

What it sizes: engine instances (one Granian worker per vCPU), the Kafka WAL (one
transaction per fencing group per commit cycle; partitions = groups or shards by the
layout; brokers from transactions, bandwidth and partition count), the balance of G groups
over the workers for G in GROUP_CANDIDATES, the Redis cluster
(rate limits and tally publishing), the edge (HAProxy) and the results fan-out to
viewers (CDN-cached JSON, or SSE connections served directly), plus the per-poll memory
of the voter bitmaps and receipt locators. Its last line is the verdict on issue 10's
broker target: ``PASS: Kafka brokers <= 9 ...`` or ``FAIL: ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from perf import RESULTS_DIR
from perf.capacity_fanout import FANOUT_INPUTS, fanout_section, measured_fanout_figures
from perf.capacity_redis import REDIS_INPUTS, measured_redis_figures, redis_section

# A measured engine's CPU per vote is used only if its worker was at least this busy.
ENGINE_BUSY_PERCENT_MIN = 50.0
# Brokers sized from measured CPU per transaction: an m7i.2xlarge (8 vCPU), kept at most
# 60 % busy (replication bursts, GC, a broker's share after an AZ loss).
BROKER_VCPUS = 8
BROKER_CPU_BUDGET = 0.6
ENGINE_TRANSACTION_RETRY_MS = 2.0  # engine/config.py kafka_transaction_retry_ms
# The target of issue 10: 3 brokers per AZ for the design rate.
KAFKA_BROKERS_TARGET = 9
# The fencing-group counts the model compares (S = 1024: each divides it).
GROUP_CANDIDATES = (64, 128, 256, 1024)


@dataclass
class Figure:
    value: float
    unit: str
    source: str


def default_inputs() -> dict[str, Figure]:
    """Every input of the model, before any measured file or --set overrides it."""
    a = "assumption"
    return {
        # The requirement (docs/design.md "Requirements").
        "peak_votes_per_s": Figure(250_000, "votes/s", "requirement"),
        "headroom": Figure(2.0, "x", "requirement"),
        "voters_eligible": Figure(300_000_000, "voters", "requirement"),
        "azs": Figure(3, "AZs", "requirement"),
        "polls_concurrent": Figure(10, "polls", a + ": several polls open at once"),
        # The engine. CPU per vote of the engine process alone (the WAL's brokers are a
        # separate fleet); default: the Kafka-WAL engine measured by make bench --kafka
        # (docs/capacity.md, 38.3 us), replaced by perf/results/peers.json when present.
        "engine_cpu_us_per_vote": Figure(38.3, "us/vote", "docs/capacity.md: make bench --kafka "
                                         "2026-12-01 14:53Z, kafka engine, closed_max"),
        "engine_vcpus_per_instance": Figure(8, "vCPU", "c7i.2xlarge: 8 vCPU, 16 GiB"),
        "engine_vcpus_reserved": Figure(1, "vCPU", a + ": OS, metrics, log shipping"),
        # Two hyperthreads of one core do about 1.3x one thread's work: a vCPU is 0.65 of
        # the core the per-vote figure was measured on.
        "vcpu_share_of_core": Figure(0.65, "core/vCPU", a + ": hyperthread pair = 1.3 cores"),
        "shards": Figure(1024, "shards", "docs/design.md Requirements: S = 1024 in production"),
        # Fencing groups (docs/design.md "Fencing groups"): G groups of
        # S/G shards, one owner, one transactional producer and one durable write per group
        # per commit cycle. 128: see docs/capacity.md "Fencing groups" (the sweep below).
        "fencing_groups": Figure(128, "groups", "choice: balance over 42 workers vs writes per cycle"),
        # The Kafka layout: 0 = one partition per group (the group's records in one batch),
        # 1 = one partition per shard, the group's shards in its one transaction.
        "kafka_partition_per_shard": Figure(0, "0/1", "choice: docs/performance.md "
                                            "\"Kafka layout: one partition per group or per shard\""),
        # Kafka. Each group commits one transaction per commit interval while it has votes;
        # the interval bounds latency (p99 target 25 ms with Kafka).
        "commit_interval_ms": Figure(20.0, "ms", a + ": commit cadence per group, fits p99 25 ms"),
        "wal_bytes_per_vote": Figure(6.0, "B", "shards/records.py: u32 voter + u16 option"),
        "wal_bytes_per_record": Figure(140.0, "B", "a 1-vote VoteBatch record, framed"),
        "kafka_txn_overhead_bytes": Figure(250.0, "B", a + ": batch header, markers, txn log writes"),
        "replication_factor": Figure(3, "copies", "docs/design.md Durability: RF 3, min ISR 2"),
        # Brokers' CPU (three brokers together: leader, followers, coordinator) per
        # transaction of one partition, and what each further partition in it adds
        # (AddPartitionsToTxn entries, a batch and a commit marker per partition).
        "broker_cpu_ms_per_transaction": Figure(3.7, "ms", "docs/performance.md 2026-12-01: 8 "
                                                "producers, one partition per transaction"),
        # 2.7 % of a one-partition transaction per added partition: the least-squares slope
        # over K = 1, 4, 16, 64 (same bytes) relative to K = 1, in one run on a busy machine
        # (docs/performance.md "Kafka layout"), times the quiet run's 3.7 ms.
        "broker_cpu_ms_per_added_partition": Figure(0.1, "ms", "docs/performance.md 2026-12-02: "
                                                    "slope of the partitions sweep, relative"),
        "broker_vcpus": Figure(BROKER_VCPUS, "vCPU", "m7i.2xlarge"),
        "broker_cpu_budget": Figure(BROKER_CPU_BUDGET, "share", a + ": at most 60 % busy "
                                    "(replication bursts, GC, a broker's share after an AZ loss)"),
        "broker_write_mb_per_s": Figure(125.0, "MB/s", a + ": m7i.2xlarge + gp3, half its 250 MB/s"),
        "broker_partition_replicas_max": Figure(4_000, "replicas", a + ": per-broker guidance"),
        # Redis (rate limits, tally publish); calls and CPU per vote: perf/capacity_redis.py.
        "redis_calls_per_s_per_primary": Figure(80_000, "calls/s", a + ": small Lua GCRA script, r7g.large"),
        "tally_publish_per_s_per_owner": Figure(10, "msg/s", "planned: tally publish every ~100 ms"),
        # Edge.
        "haproxy_req_per_s_per_vcpu": Figure(20_000, "req/s", a + ": TLS keep-alive, HAProxy 2.x"),
        "haproxy_vcpus_per_instance": Figure(8, "vCPU", "c7i.2xlarge"),
        # Results fan-out.
        "viewers_concurrent": Figure(5_000_000, "viewers", a + ": millions of viewers"),
        "results_update_s": Figure(1.0, "s", "docs/design.md Requirements: visible within a second"),
        "cdn_edge_locations": Figure(600, "PoPs", a + ": CloudFront edge locations asking the origin"),
        "results_req_per_s_per_vcpu": Figure(10_000, "req/s", a + ": cached JSON from a results worker"),
        "sse_connections_per_instance": Figure(50_000, "conns", a + ": c7i.2xlarge, uvloop, ~20 KB each"),
        "sse_event_bytes": Figure(300.0, "B", a + ": one results event with framing and TLS"),
        "instance_network_gbit": Figure(12.5, "Gbit/s", "c7i.2xlarge: up to 12.5 Gbit/s"),
        # Memory per poll (bench_micro.py).
        "bitmap_bits_per_eligible": Figure(1.12, "bits", "bench_micro default, S=1024, 50% turnout"),
        "locator_bits_per_eligible": Figure(0.44, "bits", "RAM; docs/performance.md locator section"),
    } | {name: Figure(*figure) for name, figure in FANOUT_INPUTS.items()} \
      | {name: Figure(*figure) for name, figure in REDIS_INPUTS.items()}  # perf/capacity_redis.py


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_measured(results_dir: Path, inputs: dict[str, Figure]) -> list[str]:
    """Override defaults with figures from the result files; returns what was used."""
    return [*measured_engine_cpu(results_dir, inputs),
            *measured_transactions(results_dir, inputs),
            *measured_fanout(results_dir, inputs),
            *measured_redis(results_dir, inputs),
            *measured_micro(results_dir, inputs)]  # fmt: skip


def measured_engine_cpu(results_dir: Path, inputs: dict[str, Figure]) -> list[str]:
    """Engine CPU per vote from peers.json (perf/bench_peers.py), if a busy engine ran."""
    used = []
    peers_path = results_dir / "peers.json"
    peers = read_json(peers_path)
    if peers:
        when = peers.get("conditions", {}).get("time_utc", "?")
        # A peer whose counts did not add up in the last round has no figure to give.
        invalid = (peers.get("integrity", {}).get("invalid_peers_by_round") or [[]])[-1]
        skipped = []
        for engine in ("kafka", "embedded"):
            result = peers.get("peers", {}).get(engine, {}).get("scenarios", {}).get("closed_max")
            cpu = (result or {}).get("cpu") or {}
            if not (result and cpu.get("server_percent") and result.get("created_per_s")):
                continue
            if engine in invalid:
                skipped.append(f"{engine} (INVALID: its integrity checks failed)")
                continue
            # A worker that was mostly idle (waiting on its WAL) spreads fixed costs over
            # few votes: its CPU per vote says little about a loaded worker. Use the
            # production WAL's figure when its worker was busy, else the embedded one's.
            if cpu["server_percent"] < ENGINE_BUSY_PERCENT_MIN:
                skipped.append(f"{engine} (worker at {cpu['server_percent']:.0f}% of a core)")
                continue
            us = cpu["server_percent"] / 100 * 1e6 / result["created_per_s"]
            note = f"; not {', '.join(skipped)}" if skipped else ""
            inputs["engine_cpu_us_per_vote"] = Figure(round(us, 1), "us/vote",
                f"measured: {peers_path.name} {when}, {engine} engine, closed_max, server CPU "
                f"only, worker at {cpu['server_percent']:.0f}% of a core{note}")  # fmt: skip
            used.append(f"engine_cpu_us_per_vote from {peers_path.name} ({engine})")
            break
    return used


def measured_transactions(results_dir: Path, inputs: dict[str, Figure]) -> list[str]:
    """Brokers' CPU per transaction, and per added partition, from kafka_transactions.json."""
    transactions_path = results_dir / "kafka_transactions.json"
    transactions = read_json(transactions_path) or {}
    cases = [case for case in transactions.get("cases", [])
             if case.get("retry_ms") == ENGINE_TRANSACTION_RETRY_MS]
    if not cases:
        return []
    # The busiest producer count, so per-transaction costs are shared as in a loaded
    # cluster. Files from before the partition sweep hold one partition per transaction.
    producers = max(case["producers"] for case in cases)
    cases = [case for case in cases if case["producers"] == producers]
    by_count = {case.get("partitions_per_transaction", 1): case["brokers_cpu_ms_per_transaction"]
                for case in cases if case.get("bytes_mode", "split") == "split"}
    conditions = transactions.get("conditions", {})
    when = conditions.get("time_utc", "?")
    load = (conditions.get("load_average_at_start") or [0.0])[0]
    cores = conditions.get("cores_usable") or 1
    if load > cores:
        # Other work was running (a shared machine): the brokers were starved, and their
        # CPU per transaction then holds their fixed costs spread over few transactions.
        return [f"NOT {transactions_path.name} ({when}): load average {load:.1f} on {cores} "
                "cores at its start; defaults kept"]
    used = []
    if 1 in by_count:
        inputs["broker_cpu_ms_per_transaction"] = Figure(by_count[1], "ms",
            f"measured: {transactions_path.name} {when}, {producers} producers, one partition "
            "per transaction, three brokers together")  # fmt: skip
        used.append(f"broker CPU per transaction from {transactions_path.name}")
    if len(by_count) > 1:
        slope = least_squares_slope(by_count)
        inputs["broker_cpu_ms_per_added_partition"] = Figure(round(slope, 3), "ms",
            f"measured: {transactions_path.name} {when}, slope over "
            f"{', '.join(map(str, sorted(by_count)))} partitions per transaction (same bytes)")  # fmt: skip
        used.append(f"broker CPU per added partition from {transactions_path.name}")
    return used


def measured_fanout(results_dir: Path, inputs: dict[str, Figure]) -> list[str]:
    figures, used = measured_fanout_figures(results_dir)
    inputs.update({name: Figure(*figure) for name, figure in figures.items()})
    return used


def measured_redis(results_dir: Path, inputs: dict[str, Figure]) -> list[str]:
    figures, used = measured_redis_figures(results_dir)
    inputs.update({name: Figure(*figure) for name, figure in figures.items()})
    return used


def least_squares_slope(points: dict[int, float]) -> float:
    """The slope of the least-squares line through (x, y) points."""
    mean_x = sum(points) / len(points)
    mean_y = sum(points.values()) / len(points)
    spread = sum((x - mean_x) ** 2 for x in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points.items()) / spread


def measured_micro(results_dir: Path, inputs: dict[str, Figure]) -> list[str]:
    """WAL bytes and bitmap/locator bits from micro.json (perf/bench_micro.py), if present."""
    used = []
    micro_path = results_dir / "micro.json"
    micro = read_json(micro_path)
    if micro:
        when = micro.get("conditions", {}).get("time_utc", "?")
        wal = micro.get("wal") or {}
        if wal.get("bytes_per_vote_framed"):
            inputs["wal_bytes_per_vote"] = Figure(wal["bytes_per_vote_framed"], "B",
                                                  f"measured: {micro_path.name} {when}")  # fmt: skip
            inputs["wal_bytes_per_record"] = Figure(wal["record_bytes_one_vote"], "B",
                                                    f"measured: {micro_path.name} {when}")  # fmt: skip
            used.append(f"WAL bytes from {micro_path.name}")
        rows = [r for r in micro.get("bitmaps", []) if r["turnout"] == 0.5]
        if rows:
            worst = max(rows, key=lambda r: r["bits_per_eligible_serialized"])
            inputs["bitmap_bits_per_eligible"] = Figure(worst["bits_per_eligible_serialized"], "bits",
                f"measured: {micro_path.name} {when}, S={worst['shards']}, 50% turnout")  # fmt: skip
            used.append(f"bitmap bits from {micro_path.name}")
    return used


def round_up_to(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


class Model:
    """The arithmetic, one line per result, each kept with the formula that made it."""

    def __init__(self, inputs: dict[str, Figure]):
        self.i = {name: figure.value for name, figure in inputs.items()}
        self.lines: list[tuple[str, str, float, str]] = []  # (section, name, value, formula)
        self.out: dict[str, float] = {}

    def put(self, section: str, name: str, value: float, formula: str) -> float:
        self.lines.append((section, name, value, formula))
        self.out[name] = value
        return value

    def run(self) -> Model:
        """Every tier in turn; a later tier reads what an earlier one put in ``out``."""
        self._engine()
        self._kafka()
        self._groups()
        self._redis_and_edge()
        self._results_and_memory()
        s = "fleet"
        o = self.out
        self.put(s, "ec2_instances_total",
                 o["engine_instances"] + o["kafka_brokers"] + o["redis_nodes"] + o["haproxy_instances"] +
                 o["results_instances_with_cdn"],
                 "engine + Kafka brokers + Redis nodes + HAProxy + results (CDN variant)")  # fmt: skip
        fanout_section(self)
        return self

    def _engine(self) -> None:
        i = self.i
        s = "requirement"
        design = self.put(s, "design_votes_per_s", i["peak_votes_per_s"] * i["headroom"],
                          f"{i['peak_votes_per_s']:,.0f} peak x {i['headroom']:g} headroom")  # fmt: skip

        s = "engine"
        per_core = self.put(s, "votes_per_s_per_core", 1e6 / i["engine_cpu_us_per_vote"],
                            f"1e6 / {i['engine_cpu_us_per_vote']:g} us CPU per vote")  # fmt: skip
        per_vcpu = self.put(s, "votes_per_s_per_vcpu", per_core * i["vcpu_share_of_core"],
                            f"{per_core:,.0f} x {i['vcpu_share_of_core']:g} (a vCPU is a hyperthread)")  # fmt: skip
        workers_per_instance = self.put(s, "workers_per_instance",
                                        i["engine_vcpus_per_instance"] - i["engine_vcpus_reserved"],
                                        f"{i['engine_vcpus_per_instance']:g} vCPU - {i['engine_vcpus_reserved']:g} reserved")  # fmt: skip
        workers = self.put(s, "workers_needed", math.ceil(design / per_vcpu),
                           f"ceil({design:,.0f} / {per_vcpu:,.0f})")  # fmt: skip
        instances_min = math.ceil(workers / workers_per_instance)
        instances = self.put(s, "engine_instances", round_up_to(instances_min, int(i["azs"])),
                             f"ceil({workers:,} / {workers_per_instance:g}) = {instances_min}, up to a "
                             f"multiple of {i['azs']:g} AZs")  # fmt: skip
        capacity = instances * workers_per_instance * per_vcpu
        self.put(s, "engine_capacity_votes_per_s", round(capacity),
                 f"{instances} x {workers_per_instance:g} x {per_vcpu:,.0f}")  # fmt: skip
        self.put(s, "capacity_after_az_loss_x_peak",
                 round(capacity * (i["azs"] - 1) / i["azs"] / i["peak_votes_per_s"], 2),
                 f"{capacity:,.0f} x {i['azs'] - 1:g}/{i['azs']:g} / {i['peak_votes_per_s']:,.0f}")  # fmt: skip
        self.put(s, "shards_per_worker", round(i["shards"] / (instances * workers_per_instance), 2),
                 f"{i['shards']:g} shards / {instances * workers_per_instance:g} workers")  # fmt: skip
        self.put(s, "peak_votes_per_s_per_shard", round(i["peak_votes_per_s"] / i["shards"], 1),
                 f"{i['peak_votes_per_s']:,.0f} / {i['shards']:g}")  # fmt: skip

    def _broker_txn_per_s(self, partitions_per_transaction: float) -> tuple[float, str]:
        """Transactions per second one broker carries, for transactions over K partitions."""
        i = self.i
        cpu_ms = i["broker_cpu_ms_per_transaction"] + \
            i["broker_cpu_ms_per_added_partition"] * (partitions_per_transaction - 1)
        budget_ms = i["broker_vcpus"] * i["vcpu_share_of_core"] * i["broker_cpu_budget"] * 1000
        return budget_ms / cpu_ms, (
            f"{i['broker_vcpus']:g} vCPU x {i['vcpu_share_of_core']:g} x {i['broker_cpu_budget']:g} "
            f"x 1000 ms / ({i['broker_cpu_ms_per_transaction']:g} + "
            f"{i['broker_cpu_ms_per_added_partition']:g} x {partitions_per_transaction - 1:g}) ms")

    def brokers_for(self, transactions_per_s: float, partitions_per_transaction: float,
                    partitions: float) -> tuple[int, dict[str, int]]:
        """Brokers for a transaction rate, by CPU, replicated bytes and partition replicas."""
        i, design = self.i, self.out["design_votes_per_s"]
        bytes_per_s = design * i["wal_bytes_per_vote"] + transactions_per_s * (
            i["wal_bytes_per_record"] * partitions_per_transaction + i["kafka_txn_overhead_bytes"])
        per_broker, _ = self._broker_txn_per_s(partitions_per_transaction)
        bounds = {"txn": math.ceil(transactions_per_s / per_broker),
                  "bytes": math.ceil(bytes_per_s * i["replication_factor"] / 1e6 / i["broker_write_mb_per_s"]),
                  "replicas": math.ceil(partitions * i["replication_factor"] / i["broker_partition_replicas_max"]),
                  "rf": int(i["replication_factor"])}  # fmt: skip
        return round_up_to(max(bounds.values()), int(i["azs"])), bounds

    def _kafka(self) -> None:
        i, o = self.i, self.out
        design = o["design_votes_per_s"]
        groups, shards = i["fencing_groups"], i["shards"]
        per_shard = bool(i["kafka_partition_per_shard"])
        s = "kafka"
        partitions = self.put(s, "wal_partitions", shards if per_shard else groups,
                              "= shards (partition per shard)" if per_shard else
                              "= fencing groups (one partition per group)")  # fmt: skip
        count = self.put(s, "partitions_per_transaction", shards / groups if per_shard else 1,
                         f"{shards:g} / {groups:g} shards of a group" if per_shard else "the group's one partition")  # fmt: skip
        txn_per_s = self.put(s, "transactions_per_s", groups * 1000 / i["commit_interval_ms"],
                             f"{groups:g} groups x 1000 / {i['commit_interval_ms']:g} ms (one "
                             "transaction per group per commit cycle at peak)")  # fmt: skip
        self.put(s, "votes_per_transaction_at_design", round(design / txn_per_s, 1),
                 f"{design:,.0f} / {txn_per_s:,.0f}")  # fmt: skip
        bytes_per_s = design * i["wal_bytes_per_vote"] + txn_per_s * (
            i["wal_bytes_per_record"] * count + i["kafka_txn_overhead_bytes"])
        self.put(s, "wal_mb_per_s", round(bytes_per_s / 1e6, 2),
                 f"({design:,.0f} x {i['wal_bytes_per_vote']:g} B + {txn_per_s:,.0f} txn x "
                 f"({i['wal_bytes_per_record']:g} B x {count:g} + {i['kafka_txn_overhead_bytes']:g} B)) / 1e6")  # fmt: skip
        per_broker, formula = self._broker_txn_per_s(count)
        self.put(s, "broker_txn_per_s", round(per_broker), formula)
        brokers, bounds = self.brokers_for(txn_per_s, count, partitions)
        self.put(s, "kafka_brokers", brokers,
                 f"max(txn {txn_per_s:,.0f}/{per_broker:,.0f} = {bounds['txn']}, bytes x RF "
                 f"= {bounds['bytes']}, partition replicas = {bounds['replicas']}, RF {bounds['rf']}) "
                 f"up to a multiple of {i['azs']:g}")  # fmt: skip
        self.put(s, "kafka_brokers_per_az", brokers / i["azs"], f"{brokers} / {i['azs']:g}")
        self.put(s, "kafka_brokers_target_met", float(brokers <= KAFKA_BROKERS_TARGET),
                 f"{brokers} <= {KAFKA_BROKERS_TARGET} (3 per AZ)")
        self._kafka_alternatives(bounds)

    def _kafka_alternatives(self, bounds: dict[str, int]) -> None:
        """The layouts not chosen, with the same inputs, to show what the choice is worth."""
        i, o = self.i, self.out
        s = "kafka"
        groups, shards = i["fencing_groups"], i["shards"]
        other = not i["kafka_partition_per_shard"]
        txn_per_s = o["transactions_per_s"]
        other_count = shards / groups if other else 1
        self.put(s, "kafka_brokers_other_layout",
                 self.brokers_for(txn_per_s, other_count, shards if other else groups)[0],
                 f"{'partition per shard' if other else 'partition per group'}: {txn_per_s:,.0f} "
                 f"transactions of {other_count:g} partitions")  # fmt: skip
        txn_per_shard = self.put(s, "transactions_per_s_if_one_txn_per_shard", shards * 1000 / i["commit_interval_ms"],
                                 f"{shards:g} shards x 1000 / {i['commit_interval_ms']:g} ms (the layout before "
                                 "fencing groups: a producer per shard)")  # fmt: skip
        self.put(s, "kafka_brokers_if_one_txn_per_shard", self.brokers_for(txn_per_shard, 1, shards)[0],
                 "the same max() with a transaction per shard")  # fmt: skip
        workers_total = o["engine_instances"] * o["workers_per_instance"]
        txn_per_worker = workers_total * 1000 / i["commit_interval_ms"]
        self.put(s, "transactions_per_s_if_one_txn_per_worker", txn_per_worker,
                 f"{workers_total:g} workers x 1000 / {i['commit_interval_ms']:g} ms (fencing per "
                 "worker: G = workers, a move fences a whole worker)")  # fmt: skip
        self.put(s, "kafka_brokers_if_one_txn_per_worker",
                 self.brokers_for(txn_per_worker, 1, o["wal_partitions"])[0],
                 "the same max() with the per-worker transaction rate")  # fmt: skip

    def _groups(self) -> None:
        """For each candidate G: balance over the workers and durable writes per cycle."""
        i, o = self.i, self.out
        s = "groups"
        workers = o["engine_instances"] * o["workers_per_instance"]
        after_az_loss = workers * (i["azs"] - 1) / i["azs"]
        for groups in GROUP_CANDIDATES:
            most = math.ceil(groups / workers)
            self.put(s, f"g{groups}_groups_per_worker_max_over_mean", round(most / (groups / workers), 3),
                     f"ceil({groups} / {workers:g}) = {most} / {groups / workers:.2f}")  # fmt: skip
            most_after = math.ceil(groups / after_az_loss)
            self.put(s, f"g{groups}_max_over_mean_after_az_loss",
                     round(most_after / (groups / after_az_loss), 3),
                     f"ceil({groups} / {after_az_loss:g}) = {most_after} / {groups / after_az_loss:.2f}")  # fmt: skip
            self.put(s, f"g{groups}_durable_writes_per_cycle_per_worker_max", most,
                     f"{most} group(s), one transaction each")  # fmt: skip
            txn_per_s = groups * 1000 / i["commit_interval_ms"]
            count = i["shards"] / groups if i["kafka_partition_per_shard"] else 1
            partitions = i["shards"] if i["kafka_partition_per_shard"] else groups
            self.put(s, f"g{groups}_kafka_brokers", self.brokers_for(txn_per_s, count, partitions)[0],
                     f"{txn_per_s:,.0f} transactions/s of {count:g} partition(s)")  # fmt: skip
        groups = i["fencing_groups"]
        most = math.ceil(groups / workers)
        per_vcpu = o["votes_per_s_per_vcpu"]
        self.put(s, "busiest_worker_load_at_design", round(most * i["shards"] / groups * o["design_votes_per_s"]
                                                           / i["shards"] / per_vcpu, 2),
                 f"{most} groups x {i['shards'] / groups:g} shards x {o['design_votes_per_s'] / i['shards']:,.0f} "
                 f"votes/s per shard / {per_vcpu:,.0f} votes/s per worker (must stay below 1)")  # fmt: skip

    def _redis_and_edge(self) -> None:
        i, o = self.i, self.out
        design = o["design_votes_per_s"]
        redis_section(self)  # perf/capacity_redis.py

        s = "edge"
        haproxy_vcpus = math.ceil(design / i["haproxy_req_per_s_per_vcpu"])
        self.put(s, "haproxy_instances",
                 round_up_to(math.ceil(haproxy_vcpus / i["haproxy_vcpus_per_instance"]), int(i["azs"])),
                 f"ceil({design:,.0f} / {i['haproxy_req_per_s_per_vcpu']:,.0f}) = {haproxy_vcpus} vCPU "
                 f"/ {i['haproxy_vcpus_per_instance']:g}, up to a multiple of {i['azs']:g}; behind an NLB")  # fmt: skip

    def _results_and_memory(self) -> None:
        i, instances = self.i, self.out["engine_instances"]
        s = "results"
        viewer_req = i["viewers_concurrent"] / i["results_update_s"]
        self.put(s, "viewer_requests_per_s_at_cdn", viewer_req,
                 f"{i['viewers_concurrent']:,.0f} viewers / {i['results_update_s']:g} s")  # fmt: skip
        origin = i["cdn_edge_locations"] * i["polls_concurrent"] / i["results_update_s"]
        self.put(s, "origin_requests_per_s_with_cdn", origin,
                 f"{i['cdn_edge_locations']:g} edge locations x {i['polls_concurrent']:g} polls / "
                 f"{i['results_update_s']:g} s (max-age = update interval)")  # fmt: skip
        self.put(s, "results_instances_with_cdn",
                 round_up_to(max(1, math.ceil(origin / i["results_req_per_s_per_vcpu"] / 8)), int(i["azs"])),
                 f"ceil({origin:,.0f} / {i['results_req_per_s_per_vcpu']:,.0f} / 8 vCPU), at least one per AZ")  # fmt: skip
        sse_bytes = i["viewers_concurrent"] * i["sse_event_bytes"] / i["results_update_s"]
        by_conns = math.ceil(i["viewers_concurrent"] / i["sse_connections_per_instance"])
        by_net = math.ceil(sse_bytes * 8 / 1e9 / i["instance_network_gbit"])
        self.put(s, "sse_gbit_per_s_direct", round(sse_bytes * 8 / 1e9, 1),
                 f"{i['viewers_concurrent']:,.0f} x {i['sse_event_bytes']:g} B x 8 / {i['results_update_s']:g} s")  # fmt: skip
        self.put(s, "results_instances_sse_direct", round_up_to(max(by_conns, by_net), int(i["azs"])),
                 f"max(connections {by_conns}, bandwidth {by_net}) up to a multiple of {i['azs']:g}")  # fmt: skip

        s = "memory"
        bitmap = i["voters_eligible"] * i["bitmap_bits_per_eligible"] / 8
        locator = i["voters_eligible"] * i["locator_bits_per_eligible"] / 8
        self.put(s, "bitmap_gb_per_poll", round(bitmap / 1e9, 3),
                 f"{i['voters_eligible']:,.0f} x {i['bitmap_bits_per_eligible']:g} bits / 8")  # fmt: skip
        self.put(s, "locator_gb_per_poll", round(locator / 1e9, 2),
                 f"{i['voters_eligible']:,.0f} x {i['locator_bits_per_eligible']:g} bits / 8 "
                 "(receipt locator in RAM, shards/locator_runs.py)")  # fmt: skip
        self.put(s, "state_gb_per_engine_instance",
                 round((bitmap + locator) * i["polls_concurrent"] / instances / 1e9, 2),
                 f"({bitmap / 1e9:.3f} + {locator / 1e9:.2f}) GB x {i['polls_concurrent']:g} polls / "
                 f"{instances} instances")  # fmt: skip


def render(model: Model, inputs: dict[str, Figure], used: list[str]) -> str:
    out = ["# Capacity model (perf/capacity.py)", ""]
    out.append("Inputs (value, unit, source):")
    width = max(map(len, inputs))
    for name, figure in inputs.items():
        out.append(f"  {name:{width}}  {figure.value:>14,.6g} {figure.unit:10} {figure.source}")
    if used:
        out.append("Measured files read: " + "; ".join(used))
    else:
        out.append("No measured files read: all defaults (run make bench to measure).")
    section = None
    for sec, name, value, formula in model.lines:
        if sec != section:
            out.append(f"\n[{sec}]")
            section = sec
        shown = f"{value:,.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:,.3g}"
        out.append(f"  {name:42} = {shown:>12}   <- {formula}")
    o = model.out
    out.append("")
    out.append(
        f"Fleet: {o['engine_instances']:.0f} engine instances ({o['workers_needed']:.0f} workers needed), "
        f"{o['kafka_brokers']:.0f} Kafka brokers ({o['wal_partitions']:.0f} partitions, "
        f"{inputs['fencing_groups'].value:g} fencing groups), "
        f"{o['redis_nodes']:.0f} Redis nodes, {o['haproxy_instances']:.0f} HAProxy, "
        f"{o['results_instances_with_cdn']:.0f} results instances behind a CDN "
        f"({o['results_instances_sse_direct']:.0f} if every viewer held an SSE connection), "
        f"over {inputs['azs'].value:g} AZs: {o['ec2_instances_total']:.0f} EC2 instances in all."
    )
    out.append(f"Redis Cluster for the rate limits at {o['design_votes_per_s']:,.0f} votes/s: "
               f"{o['redis_primaries']:.0f} primaries + {o['redis_primaries']:.0f} replicas "
               f"({inputs['redis_calls_per_vote'].value:g} calls and "
               f"{inputs['redis_cpu_us_per_vote'].value:g} us of Redis CPU per vote; "
               f"{inputs['redis_calls_per_vote'].source})")
    verdict = "PASS" if o["kafka_brokers_target_met"] else "FAIL"
    out.append(f"{verdict}: Kafka brokers <= {KAFKA_BROKERS_TARGET} (3 per AZ) for the "
               f"{o['design_votes_per_s']:,.0f} votes/s design rate: {o['kafka_brokers']:.0f}")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print inputs and outputs as JSON")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-measured", action="store_true", help="defaults only")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override one input")  # fmt: skip
    return parser.parse_args(argv)


def build(argv: list[str] | None = None) -> tuple[Model, dict[str, Figure], list[str], argparse.Namespace]:
    args = parse_args(argv)
    inputs = default_inputs()
    used = [] if args.no_measured else load_measured(args.results_dir, inputs)
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in inputs:
            raise SystemExit(f"unknown input {name!r}; inputs: {', '.join(inputs)}")
        inputs[name] = Figure(float(value), inputs[name].unit, "--set")
    return Model(inputs).run(), inputs, used, args


def main(argv: list[str] | None = None) -> int:
    model, inputs, used, args = build(argv)
    if args.json:
        print(json.dumps({
            "inputs": {k: {"value": f.value, "unit": f.unit, "source": f.source} for k, f in inputs.items()},
            "measured_files": used,
            "outputs": model.out,
            "formulas": {name: formula for _, name, _, formula in model.lines},
        }, indent=2))  # fmt: skip
    else:
        print(render(model, inputs, used))
    return 0


if __name__ == "__main__":
    sys.exit(main())
