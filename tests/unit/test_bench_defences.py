"""perf/bench_defences.py's pure parts: a run whose results total does not hold its 201s
(and no more than those plus the unanswered) is INVALID, and so is every ratio of its
round; Redis round trips are told apart from the commands a Lua script runs inside Redis
(INFO commandstats counts both); the targets follow the medians."""

from __future__ import annotations

from perf.bench_defences import integrity_of, summarize, targets_of
from perf.defended_engine import CONFIGS, calls_between, config_toml
from perf.targets import INVALID


def wrk_run(created: int, sent: int | None = None) -> dict:
    sent = created if sent is None else sent
    return {"created": created, "votes_sent": sent, "answered": created,
            "errors": {"timeout": 0}}


def test_the_total_must_hold_every_201_and_at_most_the_unanswered_more() -> None:
    warmup, run = wrk_run(100), wrk_run(1000, sent=1010)  # 10 unanswered at the end
    assert integrity_of(1100, warmup, run) is None
    assert integrity_of(1110, warmup, run) is None
    assert integrity_of(1099, warmup, run) is not None  # a 201 not counted
    assert integrity_of(1111, warmup, run) is not None  # a vote counted that was never sent


def test_round_trips_are_counted_apart_from_the_scripts_inner_commands() -> None:
    before = {"evalsha": 10, "hget": 100, "info": 5}
    after = {"evalsha": 13, "hget": 700, "hset": 600, "hello": 1, "info": 8, "time": 3}
    calls = calls_between(before, after)
    assert calls["script"] == 3
    assert calls["round_trips"] == 4  # 3 EVALSHA + 1 HELLO; INFO is this bench's own
    assert calls["inside_scripts"] == 600 + 600 + 3


def runs(rates: dict[str, float], integrity: str | None = None) -> dict:
    return {name: {"created_per_s": rates[name], "cpu_us_per_201": 1e6 / rates[name],
                   "integrity": integrity if name == "defended" else None, "created": 1000,
                   "cpu_s": {"redis": 0.01}, "cpu_window_s": 1.0,
                   "cpu_percent": {"redis": 0.2},
                   "redis_calls": {"script": 6, "round_trips": 7, "inside_scripts": 6000,
                                   "by_command": {}}, "store_calls_engine": 6}
            for name in CONFIGS}


def test_ratios_are_medians_and_a_bad_count_makes_its_round_invalid() -> None:
    rates = {"default": 5000.0, "off": 5000.0, "local-limits": 4600.0, "defended": 4400.0}
    summary = summarize([runs(rates), runs({**rates, "defended": 4000.0})])
    assert summary["ratios"]["defended/off"] == 0.84
    assert summary["redis"]["calls_per_vote_median"] == 0.007
    assert summary["redis"]["redis_cpu_us_per_vote"] == 8.0  # 10 ms - 0.2 % of 1 s, / 1000
    verdicts = {row["target"]: row["verdict"] for row in targets_of(summary)}
    assert verdicts == {"defences on/off throughput": "FAIL", "redis calls per vote": "PASS",
                        "defences on/off cpu per 201": "reported"}
    broken = summarize([runs(rates), runs(rates, integrity="results total 5 outside")])
    assert broken["ratios"]["defended/off"] == INVALID
    assert {row["target"]: row["verdict"] for row in targets_of(broken)}[
        "defences on/off throughput"] == INVALID


def test_the_defended_engine_trusts_loopback_as_its_proxy_and_limits_every_address() -> None:
    toml = config_toml("defended", "redis://127.0.0.1:20950")
    assert 'trusted_proxies = "127.0.0.1/32"' in toml
    assert 'ratelimit_exempt_networks = ""' in toml
    assert 'ratelimit_redis_url = "redis://127.0.0.1:20950"' in toml
    assert config_toml("off", None) == "ratelimit_enabled = false\n"
    assert config_toml("default", None) == ""
