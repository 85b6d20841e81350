"""perf/capacity.py runs with no arguments, and its fleet arithmetic is self-consistent:
every tier it sizes carries the design rate (peak x headroom), survives the loss of one AZ
at peak, is spread evenly over the AZs, and follows its inputs in the right direction."""

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
    assert out["transactions_per_s"] == i["shards"] * 1000 / i["commit_interval_ms"]
    assert out["kafka_brokers"] * i["broker_txn_per_s"] >= out["transactions_per_s"]
    assert out["votes_per_transaction_at_design"] * out["transactions_per_s"] == pytest.approx(
        design, rel=0.01)
    assert out["redis_primaries"] * i["redis_calls_per_s_per_primary"] >= out["redis_calls_per_s"]
    assert out["redis_nodes"] == 2 * out["redis_primaries"]
    assert out["origin_requests_per_s_with_cdn"] < out["viewer_requests_per_s_at_cdn"]
    assert out["ec2_instances_total"] == (out["engine_instances"] + out["kafka_brokers"]
                                          + out["redis_nodes"] + out["haproxy_instances"]
                                          + out["results_instances_with_cdn"])


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
