"""The perf harness's own logic measures what it claims: the open-loop generator parses
pipelined HTTP/1.1 answers exactly and schedules requests at the profile's rate; its
percentiles are exact nearest-rank values; repeat-vote files repeat only earlier voters, at
least the gap apart; the results cross-check rejects uncounted and over-counted votes; and
the scenario file the bench runs is valid."""

from __future__ import annotations

import array
import itertools
import sys
from pathlib import Path

import pytest

PERF_DIR = Path(__file__).resolve().parents[2] / "perf"
sys.path.insert(0, str(PERF_DIR))

import bench_peers
import loadgen


def response(status: int, body: bytes, header: bytes = b"content-length") -> bytes:
    return (f"HTTP/1.1 {status} X\r\n".encode() + b"server: t\r\n" + header + b": "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_pipelined_answers_are_split_exactly_and_a_partial_one_waits() -> None:
    first, second = response(201, b'{"receipt":"1"}'), response(409, b"{}", b"Content-Length")
    third = response(201, b"0123456789")
    buffer = first + second + third[:-3]
    found, rest = loadgen.parse_responses(buffer, 0)
    assert [status for status, _, _ in found] == [201, 409]
    assert buffer[found[0][1]:found[0][2]] == b'{"receipt":"1"}'
    assert rest == len(first) + len(second)
    found, rest = loadgen.parse_responses(buffer[rest:] + third[-3:], 0)
    assert [status for status, _, _ in found] == [201] and rest == len(third)


def test_answers_without_a_length_are_refused() -> None:
    with pytest.raises(ValueError):
        loadgen.parse_responses(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", 0)


def test_profile_schedules_each_segment_at_its_rate() -> None:
    segments = loadgen.parse_profile("1:1000,0.5:4000")
    offsets = loadgen.intended_offsets_ns(segments)
    assert len(offsets) == 1000 + 2000
    assert offsets[1] - offsets[0] == 1_000_000
    assert offsets[1000] == 1_000_000_000 and offsets[1001] - offsets[1000] == 250_000
    assert all(b > a for a, b in itertools.pairwise(offsets))
    with pytest.raises(loadgen.ScheduleError):
        loadgen.parse_profile("0:100")


def test_percentiles_are_exact_nearest_rank() -> None:
    values = array.array("q", range(1, 1001))
    summary = loadgen.summarize_us(values)
    assert summary["p50"] == 500 and summary["p99"] == 990 and summary["p99.9"] == 999
    assert summary["max"] == 1000 and summary["min"] == 1 and summary["mean"] == 500.5


def test_repeat_files_repeat_only_earlier_voters_at_least_the_gap_apart(tmp_path: Path) -> None:
    pool = bench_peers.TokenPool(tmp_path, tmp_path, mint_procs=1, ttl_s=60)
    pool.tokens = [f"token-{i}".encode() for i in range(20_000)]  # no minting in a unit test
    path, repeats = pool.take_with_repeats(5000, share=0.3, gap=100, seed=7, purpose="t")
    lines = path.read_bytes().split()
    assert len(lines) == 5000
    first_seen: dict[bytes, int] = {}
    for position, line in enumerate(lines):
        if position in set(repeats):
            assert line in first_seen and position - first_seen[line] >= 100
        else:
            assert line not in first_seen, "a line not planned as a repeat repeats a voter"
            first_seen[line] = position
    assert 0.25 < len(repeats) / (5000 - 100) < 0.35
    # The next file of the same peer starts after every voter used so far.
    following = pool.take(10, "next").read_bytes().split()
    assert not set(following) & set(lines)


def test_cross_check_bounds() -> None:
    assert bench_peers.cross_check(100, None, 0) is None  # a stateless peer: nothing to check
    assert bench_peers.cross_check(100, 100, 0)["ok"]
    assert bench_peers.cross_check(100, 103, 3)["ok"]  # in flight when the run stopped
    assert not bench_peers.cross_check(100, 99, 5)["ok"]  # acknowledged but not counted
    assert not bench_peers.cross_check(100, 104, 3)["ok"]  # counted but never sent


def test_the_default_scenarios_load_and_cover_the_issue() -> None:
    scenarios = bench_peers.load_scenarios(PERF_DIR / "scenarios" / "default.toml", 1.0)
    by_name = {s.name: s for s in scenarios.scenarios}
    assert next(iter(by_name)) == "closed_max" and by_name["closed_max"].generator == "wrk"
    assert by_name["open_half"].generator == "open" and by_name["open_half"].needs_max()
    assert by_name["repeat_votes"].repeat_share > 0
    assert by_name["many_polls"].polls > 1
    assert by_name["burst_opening"].new_poll
    assert not by_name["repeat_votes"].applies_to("ceiling")
    assert by_name["closed_max"].applies_to("ceiling")
    quick = bench_peers.load_scenarios(PERF_DIR / "scenarios" / "default.toml", 0.4)
    assert all(s.duration_s == int(s.duration_s) for s in quick.scenarios)  # wrk: whole seconds
