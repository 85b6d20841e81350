"""perf/capacity.py runs with no arguments, and its fleet arithmetic is self-consistent:
every tier it sizes carries the design rate (peak x headroom), survives the loss of one AZ
at peak, is spread evenly over the AZs, and follows its inputs in the right direction; the
Kafka tier makes one transaction per fencing group per commit cycle, in the layout chosen,
and the broker target's verdict follows the arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from perf import REPO_DIR, capacity


def model_of(*argv: str) -> tuple[dict, dict]:
    model, inputs, _, _ = capacity.build(["--no-measured", *argv])
    return model.out, {name: figure.value for name, figure in inputs.items()}


def test_runs_with_no_arguments_and_prints_the_fleet() -> None:
    done = subprocess.run([sys.executable, "-m", "perf.capacity"], capture_output=True,
                          text=True, timeout=60, check=False, cwd=REPO_DIR)
    assert done.returncode == 0, done.stderr
    assert "Fleet:" in done.stdout and "engine instances" in done.stdout
    json_done = subprocess.run([sys.executable, "-m", "perf.capacity", "--json"],
                               capture_output=True, text=True, timeout=60, check=False,
                               cwd=REPO_DIR)
    document = json.loads(json_done.stdout)
    assert document["outputs"]["design_votes_per_s"] == 500_000


def test_every_tier_carries_the_design_rate_and_is_spread_over_the_azs() -> None:
    out, i = model_of()
    azs = int(i["azs"])
    design = i["peak_votes_per_s"] * i["headroom"]
    assert out["design_votes_per_s"] == design
    per_vcpu = 1e6 / i["engine_cpu_us_per_vote"] * i["vcpu_share_of_core"]
    workers = out["engine_instances"] * out["workers_per_instance"]
    assert workers * per_vcpu >= design
    assert (out["engine_instances"] - azs) * out["workers_per_instance"] * per_vcpu < design, \
        "one AZ's worth of instances fewer must not be enough: the model rounds up, not over"
    assert out["capacity_after_az_loss_x_peak"] >= 1.0
    for tier in ("engine_instances", "kafka_brokers", "redis_primaries", "haproxy_instances",
                 "results_instances_with_cdn", "results_instances_sse_direct"):
        assert out[tier] % azs == 0, tier
    assert out["kafka_brokers"] >= i["replication_factor"]
    assert out["transactions_per_s"] == i["fencing_groups"] * 1000 / i["commit_interval_ms"]
    assert out["kafka_brokers"] * out["broker_txn_per_s"] >= out["transactions_per_s"]
    assert out["votes_per_transaction_at_design"] * out["transactions_per_s"] == pytest.approx(
        design, rel=0.01)
    assert out["redis_primaries"] * i["redis_calls_per_s_per_primary"] >= out["redis_calls_per_s"]
    assert out["redis_nodes"] == 2 * out["redis_primaries"]
    assert out["origin_requests_per_s_with_cdn"] < out["viewer_requests_per_s_at_cdn"]
    assert out["ec2_instances_total"] == (out["engine_instances"] + out["kafka_brokers"]
                                          + out["redis_nodes"] + out["haproxy_instances"]
                                          + out["results_instances_with_cdn"])


def test_one_transaction_per_group_per_cycle_and_the_broker_target() -> None:
    out, i = model_of()
    # The chosen layout: one partition per group, a one-partition transaction per group.
    assert i["kafka_partition_per_shard"] == 0
    assert out["wal_partitions"] == i["fencing_groups"]
    assert out["partitions_per_transaction"] == 1
    budget_ms = i["broker_vcpus"] * i["vcpu_share_of_core"] * i["broker_cpu_budget"] * 1000
    assert out["broker_txn_per_s"] == round(budget_ms / i["broker_cpu_ms_per_transaction"])
    # A transaction per shard (the layout before groups) costs S/G times the transactions.
    assert out["transactions_per_s_if_one_txn_per_shard"] == \
        out["transactions_per_s"] * i["shards"] / i["fencing_groups"]
    assert out["kafka_brokers_if_one_txn_per_shard"] > out["kafka_brokers"]
    assert out["kafka_brokers_target_met"] == float(out["kafka_brokers"] <= 9)
    per_shard, _ = model_of("--set", "kafka_partition_per_shard=1")
    assert per_shard["wal_partitions"] == i["shards"]
    assert per_shard["partitions_per_transaction"] == i["shards"] / i["fencing_groups"]
    assert per_shard["transactions_per_s"] == out["transactions_per_s"]
    assert per_shard["broker_txn_per_s"] < out["broker_txn_per_s"]
    assert per_shard["kafka_brokers"] == out["kafka_brokers_other_layout"]
    assert per_shard["kafka_brokers_other_layout"] == out["kafka_brokers"]


def test_groups_balance_and_durable_writes_per_worker() -> None:
    out, i = model_of("--set", "fencing_groups=128")
    workers = out["engine_instances"] * out["workers_per_instance"]
    for groups in capacity.GROUP_CANDIDATES:
        most = -(-groups // int(workers))
        assert out[f"g{groups}_durable_writes_per_cycle_per_worker_max"] == most
        assert out[f"g{groups}_groups_per_worker_max_over_mean"] == round(most * workers / groups, 3)
        assert out[f"g{groups}_groups_per_worker_max_over_mean"] >= 1.0
    # More groups: better balance, more transactions, never fewer brokers.
    assert out["g1024_groups_per_worker_max_over_mean"] < out["g128_groups_per_worker_max_over_mean"]
    assert out["g1024_kafka_brokers"] >= out["g256_kafka_brokers"] >= out["g128_kafka_brokers"]
    assert out["g128_kafka_brokers"] == out["kafka_brokers"]
    # The busiest worker (most groups) must carry its share of the design rate.
    assert out["busiest_worker_load_at_design"] < 1.0


def test_the_broker_verdict_is_printed_and_follows_the_groups() -> None:
    model, inputs, _, _ = capacity.build(["--no-measured"])
    assert "PASS: Kafka brokers <= 9" in capacity.render(model, inputs, [])
    model, inputs, _, _ = capacity.build(["--no-measured", "--set", "fencing_groups=1024"])
    assert model.out["kafka_brokers"] > 9
    assert "FAIL: Kafka brokers <= 9" in capacity.render(model, inputs, [])


def test_outputs_follow_their_inputs() -> None:
    base, _ = model_of()
    slower, _ = model_of("--set", "engine_cpu_us_per_vote=296")
    assert slower["workers_needed"] >= 2 * base["workers_needed"] - 1
    assert slower["engine_instances"] > base["engine_instances"]
    longer, _ = model_of("--set", "commit_interval_ms=40")
    assert longer["transactions_per_s"] == base["transactions_per_s"] / 2
    assert longer["kafka_brokers"] <= base["kafka_brokers"]


def test_measured_results_replace_the_defaults(tmp_path: Path) -> None:
    peers = {"conditions": {"time_utc": "T"}, "peers": {"embedded": {"scenarios": {"closed_max": {
        "created_per_s": 5000.0, "cpu": {"server_percent": 100.0}}}}}}
    micro = {"conditions": {"time_utc": "T"},
             "wal": {"bytes_per_vote_framed": 7.5, "record_bytes_one_vote": 150},
             "bitmaps": [{"turnout": 0.5, "shards": 8, "bits_per_eligible_serialized": 1.5,
                          "locator_bits_per_eligible": 60.0}]}
    (tmp_path / "peers.json").write_text(json.dumps(peers))
    (tmp_path / "micro.json").write_text(json.dumps(micro))
    model, inputs, used, _ = capacity.build(["--results-dir", str(tmp_path)])
    assert inputs["engine_cpu_us_per_vote"].value == 200.0  # 1 core / 5000 votes/s
    assert inputs["wal_bytes_per_vote"].value == 7.5
    assert inputs["bitmap_bits_per_eligible"].value == 1.5
    assert len(used) == 3
    assert model.out["votes_per_s_per_core"] == 5000.0


def test_measured_transaction_costs_by_partitions_per_transaction(tmp_path: Path) -> None:
    def case(producers: int, count: int, mode: str, ms: float) -> dict:
        return {"producers": producers, "partitions_per_transaction": count, "bytes_mode": mode,
                "retry_ms": 2.0, "brokers_cpu_ms_per_transaction": ms}
    # ms = 3 + 0.5 x (K - 1) over the split cases; the "each" cases and the 2-producer case
    # carry other figures and must not be used.
    cases = [case(4, 1, "split", 3.0), case(4, 4, "split", 4.5), case(4, 16, "split", 10.5),
             case(4, 16, "each", 40.0), case(2, 1, "split", 9.0)]
    (tmp_path / "kafka_transactions.json").write_text(json.dumps({"cases": cases}))
    model, inputs, used, _ = capacity.build(["--results-dir", str(tmp_path)])
    assert inputs["broker_cpu_ms_per_transaction"].value == 3.0
    assert inputs["broker_cpu_ms_per_added_partition"].value == pytest.approx(0.5)
    assert len(used) == 2
    per_shard, _, _, _ = capacity.build(["--results-dir", str(tmp_path),
                                         "--set", "kafka_partition_per_shard=1"])
    count = per_shard.out["partitions_per_transaction"]
    budget_ms = 8 * 0.65 * 0.6 * 1000
    assert per_shard.out["broker_txn_per_s"] == round(budget_ms / (3.0 + 0.5 * (count - 1)))
    # A file from before the sweep (no partitions_per_transaction) still gives the base cost.
    old = [{"producers": 8, "retry_ms": 2.0, "brokers_cpu_ms_per_transaction": 3.7}]
    (tmp_path / "kafka_transactions.json").write_text(json.dumps({"cases": old}))
    _, inputs, used, _ = capacity.build(["--results-dir", str(tmp_path)])
    assert inputs["broker_cpu_ms_per_transaction"].value == 3.7
    assert len(used) == 1
    # A run on a machine busy with other work (load average above its cores) is not used.
    busy = {"conditions": {"load_average_at_start": [9.4, 5.6, 2.3], "cores_usable": 2},
            "cases": cases}
    (tmp_path / "kafka_transactions.json").write_text(json.dumps(busy))
    _, inputs, used, _ = capacity.build(["--results-dir", str(tmp_path)])
    assert inputs["broker_cpu_ms_per_transaction"].value == capacity.default_inputs()[
        "broker_cpu_ms_per_transaction"].value
    assert used and used[0].startswith("NOT kafka_transactions.json")


def test_fanout_reads_fanout_json_and_the_cdn_needs_fewer_processes(tmp_path: Path) -> None:
    """The fan-out section sizes `fanout_viewers` from fanout.json's streams per process and
    bytes per stream: direct streams need viewers / streams-per-vCPU-process processes; behind
    a CDN only edges x polls origin streams remain; a memory-bound stream size caps an
    instance by memory, not CPU."""
    (tmp_path / "fanout.json").write_text(json.dumps({
        "subscribers_held_max": 10_000, "rss_bytes_per_subscriber": 20_000,
        "parameters": {"update_rate_per_s": 10.0}}))
    model, inputs, used, _ = capacity.build(["--results-dir", str(tmp_path)])
    out = model.out
    assert inputs["sse_subscribers_per_process"].value == 10_000 and len(used) == 1
    per_process = out["fanout_streams_per_vcpu_process"]
    assert per_process == 10_000 * inputs["vcpu_share_of_core"].value
    assert out["fanout_processes_direct"] == -(-inputs["fanout_viewers"].value // per_process)
    assert out["fanout_processes_with_cdn"] < out["fanout_processes_direct"]
    assert out["fanout_instances_with_cdn"] < out["fanout_instances_direct"]
    assert out["fanout_instances_direct"] % inputs["azs"].value == 0
    heavy, _ = model_of("--set", "sse_bytes_per_subscriber=10000000")  # 10 MB per stream
    assert heavy["fanout_streams_per_instance"] == 16e9 * 0.7 // 10e6


def test_redis_is_sized_from_defences_json_by_calls_or_cpu(tmp_path: Path) -> None:
    """Without defences.json the stated defaults size Redis; with it, its median calls and
    the masters' CPU per vote do, and the larger of the two counts of primaries wins; a
    file whose integrity checks failed is refused."""
    _, inputs, used, _ = capacity.build(["--results-dir", str(tmp_path)])
    assert "default" in inputs["redis_calls_per_vote"].source and not used
    document = {"conditions": {"time_utc": "t"}, "integrity": {"failures": []},
                "redis": {"calls_per_vote_median": 0.01, "redis_cpu_us_per_vote": 40.0,
                          "votes_per_s": 4000}}
    (tmp_path / "defences.json").write_text(json.dumps(document))
    model, inputs, used, _ = capacity.build(["--results-dir", str(tmp_path)])
    out = model.out
    assert inputs["redis_calls_per_vote"].value == 0.01
    assert inputs["redis_cpu_us_per_vote"].value == 40.0
    assert any("defences.json" in line for line in used)
    assert out["redis_cores_for_limits"] == 20.0  # 500,000 x 40 us
    assert out["redis_primaries_by_cpu"] == 40  # at half a core each
    assert out["redis_primaries"] == 42 and out["redis_nodes"] == 84  # up to a multiple of 3
    more_calls = capacity.build(["--results-dir", str(tmp_path),
                                 "--set", "redis_calls_per_vote=10"])[0].out
    by_calls = more_calls["redis_primaries_by_calls"]  # 5M calls/s / 80,000 = 63
    assert by_calls > more_calls["redis_primaries_by_cpu"]
    assert more_calls["redis_primaries"] == -(-by_calls // 3) * 3 == 63
    document["integrity"]["failures"] = ["results total 5 outside [6, +0]"]
    (tmp_path / "defences.json").write_text(json.dumps(document))
    _, inputs, used, _ = capacity.build(["--results-dir", str(tmp_path)])
    assert "default" in inputs["redis_calls_per_vote"].source
    assert any(line.startswith("NOT defences.json") for line in used)
