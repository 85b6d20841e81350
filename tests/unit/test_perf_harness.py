"""The perf harness's own logic measures what it claims: the open-loop generator parses
pipelined HTTP/1.1 answers exactly and schedules requests at the profile's rate; its
percentiles are exact nearest-rank values; repeat-vote files repeat only earlier voters, at
least the gap apart; the results cross-check rejects uncounted and over-counted votes; a run
whose counts do not add up reports INVALID ratios and targets and exits non-zero, while a
clean run gets PASS/FAIL from its numbers; and the scenario file the bench runs is valid."""

from __future__ import annotations

import array
import itertools
from pathlib import Path

import pytest

from perf import PERF_DIR, loadgen
from perf.integrity import cross_check, repeat_check
from perf.report import print_report
from perf.scenarios import load_scenarios
from perf.summary import exit_status, summarize_rounds
from perf.tokens import TokenPool


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
    pool = TokenPool(tmp_path, tmp_path, mint_procs=1, ttl_s=60)
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
    assert cross_check(100, None, 0) is None  # a stateless peer: nothing to check
    assert cross_check(100, 100, 0)["ok"]
    assert cross_check(100, 103, 3)["ok"]  # in flight when the run stopped
    assert not cross_check(100, 99, 5)["ok"]  # acknowledged but not counted
    assert not cross_check(100, 104, 3)["ok"]  # counted but never sent


def test_the_default_scenarios_load_and_cover_the_issue() -> None:
    scenarios = load_scenarios(PERF_DIR / "scenarios" / "default.toml", 1.0)
    by_name = {s.name: s for s in scenarios.scenarios}
    assert next(iter(by_name)) == "closed_max" and by_name["closed_max"].generator == "wrk"
    assert by_name["open_half"].generator == "open" and by_name["open_half"].needs_max()
    assert by_name["repeat_votes"].repeat_share > 0
    assert by_name["many_polls"].polls > 1
    assert by_name["burst_opening"].new_poll
    assert not by_name["repeat_votes"].applies_to("ceiling")
    assert by_name["closed_max"].applies_to("ceiling")
    quick = load_scenarios(PERF_DIR / "scenarios" / "default.toml", 0.4)
    assert all(s.duration_s == int(s.duration_s) for s in quick.scenarios)  # wrk: whole seconds


# --- integrity: a run whose counts do not add up never reports a ratio with PASS ----------

MACHINE = {"cpu_model": "test", "cores_usable": 2, "memory_gib": 4, "os": "test", "kernel": "6",
           "python": "3.12", "load_average_at_start": [0.0, 0.0, 0.0]}


def closed_max(rate_per_s: float, counted_extra: int = 0) -> dict:
    """A closed_max result whose peer counted ``counted_extra`` votes more than the 201s."""
    created = int(rate_per_s * 10)
    return {"created": created, "created_per_s": rate_per_s, "connections": 64,
            "connections_tried": {"64": rate_per_s, "256": rate_per_s},
            "statuses": {"201": created}, "latency_us": {"p50": 900.0, "p99": 4000.0},
            "cpu": None, "cpu_us_per_created": None,
            "cross_check": cross_check(created, created + counted_extra, 0)}


def one_round(engine_counted_extra: int = 0, pg_repeat_ok: bool = True) -> dict:
    """Ceiling 50k/s; engine 30k/s (0.6 of it); Granian+PG 5k/s (x6); FastAPI+PG 4k/s (x7.5)."""
    def peer(name: str, scenarios: dict) -> dict:
        return {"peer": name, "label": name, "durability": "test", "info": {},
                "scenarios": scenarios, "errors": {}}

    engine = {"closed_max": closed_max(30_000, engine_counted_extra),
              "open_half": {"created": 150_000, "created_per_s": 15_000.0, "statuses": {"201": 1},
                            "latency_us": {"p50": 800.0, "p99": 6_000.0}}}
    repeats = {**closed_max(3_000), "repeats_sent": 1000}
    # 409s for more votes than were sent as repeats: a first vote refused.
    repeats["repeat_check"] = repeat_check(conflicts=900 if pg_repeat_ok else 1200,
                                           repeats_sent=1000, votes_sent=31_000, created=30_000)
    ceiling = closed_max(50_000)
    ceiling["cross_check"] = None  # the ceiling counts nothing
    return {"ceiling": peer("ceiling", {"closed_max": ceiling}),
            "embedded": peer("embedded", engine),
            "granian_asyncpg": peer("granian_asyncpg", {"closed_max": closed_max(5_000)}),
            "fastapi_pg": peer("fastapi_pg", {"closed_max": closed_max(4_000),
                                              "repeat_votes": repeats})}


def report_of(rounds: list[dict], capsys) -> tuple[dict, dict, str]:
    """(document, verdict per target, printed report) of the rounds, as the driver builds them."""
    document = {"conditions": MACHINE, "filesystems": {}, "peers": rounds[-1],
                "earlier_rounds": rounds[:-1], "failures": {}, **summarize_rounds(rounds, None)}
    capsys.readouterr()
    print_report(document)
    verdicts = {target["target"]: target["verdict"] for target in document["targets"]}
    return document, verdicts, capsys.readouterr().out


def test_a_clean_run_gets_pass_and_fail_from_its_numbers(capsys) -> None:
    document, verdicts, printed = report_of([one_round()], capsys)
    assert document["integrity"]["ok"] and exit_status(document) == 0
    assert document["ratios"]["embedded/ceiling"] == 0.6
    assert document["ratios"]["embedded/ceiling at 256 conns"] == 0.6
    assert verdicts["embedded/ceiling at 64 conns"] == "PASS"  # 0.6 >= 0.45
    assert verdicts["embedded/ceiling at 256 conns"] == "PASS"  # 0.6 >= 0.55
    assert verdicts["embedded/granian_asyncpg"] == "PASS"  # 6 >= 4
    assert verdicts["embedded/fastapi_pg"] == "FAIL"  # 7.5 < 10
    assert verdicts["embedded open_half p99 ms"] == "PASS"  # 6 ms <= 10 ms
    assert "INVALID" not in printed


@pytest.mark.parametrize("counted_extra", [-5, +5])  # 201s not counted / counted never sent
def test_a_results_mismatch_makes_the_ratios_invalid_and_the_run_fail(capsys, counted_extra) -> None:
    document, verdicts, printed = report_of([one_round(engine_counted_extra=counted_extra)], capsys)
    assert not document["integrity"]["ok"] and exit_status(document) != 0
    assert document["integrity"]["invalid_peers_by_round"] == [["embedded"]]
    for key in ("embedded/ceiling at 64 conns", "embedded/ceiling at 256 conns",
                "embedded/granian_asyncpg", "embedded/fastapi_pg", "embedded open_half p99 ms"):
        assert verdicts[key] == "INVALID", key
    assert document["ratios"]["embedded/ceiling"] == "INVALID"
    assert document["ratios_as_measured"]["embedded/ceiling"] == 0.6  # kept for diagnosis
    assert "PASS" not in verdicts.values() and "FAIL" not in verdicts.values()
    targets_table = printed.split("== targets", 1)[1]
    assert "INVALID" in targets_table and "PASS" not in targets_table
    assert "INTEGRITY FAILURE embedded closed_max" in printed
    assert "0.6000" not in printed.split("== ratios", 1)[1]  # no number beside INVALID


def test_a_failed_count_check_in_any_round_invalidates_the_median(capsys) -> None:
    rounds = [one_round(), one_round(pg_repeat_ok=False), one_round()]
    document, verdicts, printed = report_of(rounds, capsys)
    assert exit_status(document) != 0
    assert document["integrity"]["invalid_peers_by_round"] == [[], ["fastapi_pg"], []]
    assert verdicts["embedded/fastapi_pg"] == "INVALID"  # one bad round of three: no median
    assert verdicts["embedded/ceiling at 64 conns"] == "PASS"  # peers whose counts held keep theirs
    assert document["ratios_by_round"][0]["embedded/fastapi_pg"] == 7.5
    assert "r2 fastapi_pg repeat_votes" in printed
