"""The shard sweep's verdicts follow its numbers: each row divides by the ceiling and by the
1-shard case at the same connection count; 32 shards at >= 0.9 of 1 shard PASS and below
FAIL; a case whose results total does not match its 201s makes its ratios (and every ratio
to it, when it is the 1-shard base) INVALID, never PASS or FAIL; the targets table reads the
files of a run and exits non-zero on an integrity failure only, not on a FAIL."""

from __future__ import annotations

import json
from pathlib import Path

from perf import targets_report
from perf.integrity import cross_check
from perf.sweep import ceiling_rates, sweep_integrity, sweep_rows
from perf.targets import INVALID, sweep_targets


def run(rate_per_s: float, counted_extra: int = 0) -> dict:
    created = int(rate_per_s * 4)
    return {"created": created, "created_per_s": rate_per_s, "cpu": {"server_percent": 99.0},
            "cross_check": cross_check(created, created + counted_extra, 0)}


def case(shards: int, groups: int, at_64: float, at_256: float, counted_extra: int = 0) -> dict:
    return {"shards": shards, "groups": groups, "errors": {},
            "runs": {"64": run(at_64, counted_extra), "256": run(at_256)}}


def engines(extra_1: int = 0, extra_32: int = 0) -> dict:
    """1 shard 20k/30k; 8 shards 19k/28k; 32 shards 18.5k (0.925) / 24k (0.8)."""
    return {"embedded": {"1": case(1, 1, 20_000, 30_000, extra_1), "8": case(8, 4, 19_000, 28_000),
                         "32": case(32, 4, 18_500, 24_000, extra_32)}}


CEILING = {"scenarios": {"closed_max": {"connections": 256, "created_per_s": 50_000.0,
                                        "connections_tried": {"64": 40_000.0, "256": 50_000.0}}}}


def rows_of(sweeps: dict) -> tuple[dict, list[dict]]:
    integrity = sweep_integrity(sweeps)
    rows = sweep_rows(sweeps, ceiling_rates(CEILING), integrity["invalid_cases"])
    return integrity, rows


def row(rows: list[dict], shards: int, connections: int) -> dict:
    return next(r for r in rows if r["shards"] == shards and r["connections"] == connections)


def test_ratios_are_to_the_ceiling_and_one_shard_at_the_same_connections() -> None:
    integrity, rows = rows_of(engines())
    assert integrity["ok"]
    assert row(rows, 1, 64)["ratio_to_ceiling"] == 0.5  # 20k / 40k
    assert row(rows, 1, 256)["ratio_to_ceiling"] == 0.6  # 30k / 50k
    assert row(rows, 32, 64)["ratio_to_1_shard"] == 0.925
    assert row(rows, 32, 256)["ratio_to_1_shard"] == 0.8
    assert row(rows, 8, 256)["groups"] == 4
    verdicts = {t["target"]: t["verdict"] for t in sweep_targets(rows)}
    assert verdicts["embedded 32/1 shards at 64 conns"] == "PASS"
    assert verdicts["embedded 32/1 shards at 256 conns"] == "FAIL"
    assert verdicts["kafka 32/1 shards at 64 conns"] == "not measured"


def test_a_mismatched_count_makes_that_case_and_the_ratios_to_it_invalid() -> None:
    integrity, rows = rows_of(engines(extra_32=-3))  # 32 shards: 3 votes answered, not counted
    assert not integrity["ok"] and integrity["invalid_cases"] == ["embedded/32"]
    assert row(rows, 32, 64)["ratio_to_ceiling"] == INVALID
    assert row(rows, 32, 256)["ratio_to_1_shard"] == INVALID
    assert row(rows, 8, 64)["ratio_to_1_shard"] == 0.95  # a case whose counts held keeps its own
    verdicts = {t["target"]: t["verdict"] for t in sweep_targets(rows)}
    assert verdicts["embedded 32/1 shards at 64 conns"] == INVALID

    integrity, rows = rows_of(engines(extra_1=+2))  # the 1-shard base counted votes never sent
    assert integrity["invalid_cases"] == ["embedded/1"]
    assert all(r["ratio_to_1_shard"] == INVALID for r in rows)


def test_the_targets_table_fails_the_run_on_integrity_only(tmp_path: Path, capsys) -> None:
    def write(sweeps: dict) -> int:
        integrity, rows = rows_of(sweeps)
        document = {"conditions": {"time_utc": "t"}, "rows": rows, "integrity": integrity,
                    "targets": sweep_targets(rows)}
        (tmp_path / "sweep.json").write_text(json.dumps(document))
        return targets_report.main(["--results-dir", str(tmp_path)])

    assert write(engines()) == 0  # one FAIL (32 shards at 256), reported, not fatal
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "not measured" in printed  # no peers.json, no memory.json
    assert write(engines(extra_32=5)) == 1
    assert "INTEGRITY FAILURE embedded 32 shards at 64 conns" in capsys.readouterr().out
    saved = json.loads((tmp_path / "targets.json").read_text())
    assert INVALID in [t["verdict"] for t in saved["targets"]]
