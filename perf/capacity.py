"""Capacity model: the EC2 fleet for 250,000 votes/s peak, 2x headroom, 300M voters, 3 AZs.

Standard library only; runs with no arguments. Every input is a named figure with its
source: measured per-core figures come from perf/results/peers.json (bench_peers.py) and
perf/results/micro.json (bench_micro.py) when those files exist, and documented defaults
otherwise (taken from docs/performance.md's runs, or stated as assumptions to be measured
on real instances). Every output line shows its arithmetic, so a reader can check it and
change one input at a time (``--set name=value``, repeatable).

    python -m perf.capacity [--json] [--set engine_cpu_us_per_vote=120] [--results-dir DIR]

What it sizes: engine instances (one Granian worker per vCPU), the Kafka WAL (partitions =
shards, brokers from transactions, bandwidth and partition count), the Redis cluster
(rate limits and tally publishing), the edge (HAProxy) and the results fan-out to
viewers (CDN-cached JSON, or SSE connections served directly), plus the per-poll memory
of the voter bitmaps and receipt locators.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from perf import RESULTS_DIR

# A measured engine's CPU per vote is used only if its worker was at least this busy.
ENGINE_BUSY_PERCENT_MIN = 50.0
# Brokers sized from measured CPU per transaction: an m7i.2xlarge (8 vCPU), kept at most
# 60 % busy (replication bursts, GC, a broker's share after an AZ loss).
BROKER_VCPUS = 8
BROKER_CPU_BUDGET = 0.6
ENGINE_TRANSACTION_RETRY_MS = 2.0  # engine/config.py kafka_transaction_retry_ms


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
        # separate fleet); default: the Kafka-WAL engine at 512 connections,
        # docs/performance.md (148 us); the embedded engine measured 104-158 us.
        "engine_cpu_us_per_vote": Figure(148.0, "us/vote", "docs/performance.md, kafka c512"),
        "engine_vcpus_per_instance": Figure(8, "vCPU", "c7i.2xlarge: 8 vCPU, 16 GiB"),
        "engine_vcpus_reserved": Figure(1, "vCPU", a + ": OS, metrics, log shipping"),
        # Two hyperthreads of one core do about 1.3x one thread's work: a vCPU is 0.65 of
        # the core the per-vote figure was measured on.
        "vcpu_share_of_core": Figure(0.65, "core/vCPU", a + ": hyperthread pair = 1.3 cores"),
        "shards": Figure(1024, "shards", "docs/design.md Requirements: S = 1024 in production = WAL partitions"),
        # Kafka. Each shard commits one transaction per commit interval while it has
        # votes; the interval bounds latency (p99 target 25 ms with Kafka).
        "commit_interval_ms": Figure(20.0, "ms", a + ": commit cadence per shard, fits p99 25 ms"),
        "wal_bytes_per_vote": Figure(6.0, "B", "shards/records.py: u32 voter + u16 option"),
        "wal_bytes_per_record": Figure(140.0, "B", "a 1-vote VoteBatch record, framed"),
        "kafka_txn_overhead_bytes": Figure(250.0, "B", a + ": batch header, markers, txn log writes"),
        "replication_factor": Figure(3, "copies", "docs/design.md Durability: RF 3, min ISR 2"),
        "broker_txn_per_s": Figure(2_500, "txn/s", a + ": transactions per broker per second; "
                                   "replaced by the measured broker CPU per transaction when "
                                   "perf/results/kafka_transactions.json exists"),
        "broker_write_mb_per_s": Figure(125.0, "MB/s", a + ": m7i.2xlarge + gp3, half its 250 MB/s"),
        "broker_partition_replicas_max": Figure(4_000, "replicas", a + ": per-broker guidance"),
        # Redis (rate limits, tally publish): planned, docs/design.md "Not built yet".
        "redis_calls_per_vote": Figure(3, "calls", "planned: per IP, per prefix, per voter limits"),
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
        "locator_bits_per_eligible": Figure(64.0, "bits", "shards/state.py: 8 B per voter index"),
    }


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_measured(results_dir: Path, inputs: dict[str, Figure]) -> list[str]:
    """Override defaults with figures from the result files; returns what was used."""
    return [*measured_engine_cpu(results_dir, inputs),
            *measured_transactions(results_dir, inputs),
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
    """Broker transactions per second from kafka_transactions.json, if present."""
    used = []
    transactions_path = results_dir / "kafka_transactions.json"
    transactions = read_json(transactions_path)
    cases = [case for case in (transactions or {}).get("cases", [])
             if case.get("retry_ms") == ENGINE_TRANSACTION_RETRY_MS]
    if cases:
        # The busiest case: the most producers, so per-transaction costs are shared as in a
        # loaded cluster. Its CPU is the three brokers' together (leader, followers,
        # coordinator): the fleet needs that much CPU per transaction in all.
        case = max(cases, key=lambda c: c["producers"])
        ms = case["brokers_cpu_ms_per_transaction"]
        budget_ms = BROKER_VCPUS * inputs["vcpu_share_of_core"].value * BROKER_CPU_BUDGET * 1000
        when = transactions.get("conditions", {}).get("time_utc", "?")
        inputs["broker_txn_per_s"] = Figure(round(budget_ms / ms), "txn/s",
            f"measured: {transactions_path.name} {when}, {ms:g} ms of broker CPU per "
            f"transaction ({case['producers']} producers, 3 brokers); a broker of "
            f"{BROKER_VCPUS} vCPU x {inputs['vcpu_share_of_core'].value:g} at "
            f"{BROKER_CPU_BUDGET:.0%} busy")  # fmt: skip
        used.append(f"broker transactions from {transactions_path.name}")
    return used


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
            inputs["locator_bits_per_eligible"] = Figure(worst["locator_bits_per_eligible"], "bits",
                f"measured: {micro_path.name} {when}")  # fmt: skip
            used.append(f"bitmap and locator bits from {micro_path.name}")
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
        self._redis_and_edge()
        self._results_and_memory()
        s = "fleet"
        o = self.out
        self.put(s, "ec2_instances_total",
                 o["engine_instances"] + o["kafka_brokers"] + o["redis_nodes"] + o["haproxy_instances"] +
                 o["results_instances_with_cdn"],
                 "engine + Kafka brokers + Redis nodes + HAProxy + results (CDN variant)")  # fmt: skip
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

    def _kafka(self) -> None:
        i, o = self.i, self.out
        design, instances = o["design_votes_per_s"], o["engine_instances"]
        workers_per_instance = o["workers_per_instance"]
        s = "kafka"
        partitions = self.put(s, "wal_partitions", i["shards"], "= shards (shard s is partition s)")
        txn_per_s = self.put(s, "transactions_per_s", partitions * 1000 / i["commit_interval_ms"],
                             f"{partitions:g} shards x 1000 / {i['commit_interval_ms']:g} ms (one "
                             "transaction per shard per commit at peak)")  # fmt: skip
        self.put(s, "votes_per_transaction_at_design", round(design / txn_per_s, 1),
                                 f"{design:,.0f} / {txn_per_s:,.0f}")  # fmt: skip
        bytes_per_s = design * i["wal_bytes_per_vote"] + txn_per_s * (
            i["wal_bytes_per_record"] + i["kafka_txn_overhead_bytes"])
        self.put(s, "wal_mb_per_s", round(bytes_per_s / 1e6, 2),
                 f"({design:,.0f} x {i['wal_bytes_per_vote']:g} B + {txn_per_s:,.0f} txn x "
                 f"({i['wal_bytes_per_record']:g} + {i['kafka_txn_overhead_bytes']:g}) B) / 1e6")  # fmt: skip
        by_txn = math.ceil(txn_per_s / i["broker_txn_per_s"])
        by_bytes = math.ceil(bytes_per_s * i["replication_factor"] / 1e6 / i["broker_write_mb_per_s"])
        by_partitions = math.ceil(partitions * i["replication_factor"] / i["broker_partition_replicas_max"])
        brokers = self.put(s, "kafka_brokers",
                           round_up_to(max(by_txn, by_bytes, by_partitions, i["replication_factor"]), int(i["azs"])),
                           f"max(txn {txn_per_s:,.0f}/{i['broker_txn_per_s']:,.0f} = {by_txn}, bytes x RF "
                           f"= {by_bytes}, partition replicas = {by_partitions}, RF {i['replication_factor']:g}) "
                           f"up to a multiple of {i['azs']:g}")  # fmt: skip
        self.put(s, "kafka_brokers_per_az", brokers / i["azs"], f"{brokers} / {i['azs']:g}")
        workers_total = instances * workers_per_instance
        txn_per_worker = workers_total * 1000 / i["commit_interval_ms"]
        self.put(s, "transactions_per_s_if_one_txn_per_worker", txn_per_worker,
                 f"{workers_total:g} workers x 1000 / {i['commit_interval_ms']:g} ms (alternative: one "
                 "transaction spanning a worker's shards; needs fencing per worker, not per shard)")  # fmt: skip
        self.put(s, "kafka_brokers_if_one_txn_per_worker",
                 round_up_to(max(math.ceil(txn_per_worker / i["broker_txn_per_s"]), by_bytes,
                                 by_partitions, i["replication_factor"]), int(i["azs"])),
                 "the same max() with the per-worker transaction rate")  # fmt: skip

    def _redis_and_edge(self) -> None:
        i, o = self.i, self.out
        design, instances = o["design_votes_per_s"], o["engine_instances"]
        workers_per_instance = o["workers_per_instance"]
        workers_total = instances * workers_per_instance
        s = "redis"
        calls = design * i["redis_calls_per_vote"] + instances * workers_per_instance * \
            i["tally_publish_per_s_per_owner"] * i["polls_concurrent"]
        self.put(s, "redis_calls_per_s", round(calls),
                 f"{design:,.0f} x {i['redis_calls_per_vote']:g} limit calls + {workers_total:g} owners x "
                 f"{i['tally_publish_per_s_per_owner']:g}/s x {i['polls_concurrent']:g} polls")  # fmt: skip
        primaries = self.put(s, "redis_primaries",
                             round_up_to(math.ceil(calls / i["redis_calls_per_s_per_primary"]), int(i["azs"])),
                             f"ceil({calls:,.0f} / {i['redis_calls_per_s_per_primary']:,.0f}) up to a multiple "
                             f"of {i['azs']:g}")  # fmt: skip
        self.put(s, "redis_nodes", primaries * 2, f"{primaries} primaries + 1 replica each, "
                 "replica in another AZ (Redis holds limits and tallies, never the one-vote truth)")  # fmt: skip

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
                 "(receipt locator, shards/state.py)")  # fmt: skip
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
        f"{o['kafka_brokers']:.0f} Kafka brokers ({o['wal_partitions']:.0f} partitions), "
        f"{o['redis_nodes']:.0f} Redis nodes, {o['haproxy_instances']:.0f} HAProxy, "
        f"{o['results_instances_with_cdn']:.0f} results instances behind a CDN "
        f"({o['results_instances_sse_direct']:.0f} if every viewer held an SSE connection), "
        f"over {inputs['azs'].value:g} AZs."
    )
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
