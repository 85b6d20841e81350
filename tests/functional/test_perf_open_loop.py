"""The perf harness measures the real engine honestly, end to end: it mints real tokens with
`votes token`, starts `votes serve` on a copy of the same keys, and the open-loop generator
(perf/loadgen.py) sends one vote per scheduled slot; every vote is answered 201, the
generator's count of 201s equals the engine's own results total, and the latency summary
covers every request. Then the same voters again are all refused as repeats (409)."""

from __future__ import annotations

from pathlib import Path

from perf import PERF_DIR, bench_peers
from perf.open_loop import run_open
from perf.peer_api import create_poll, settled_total
from perf.peer_servers import Harness
from perf.scenarios import load_scenarios

RATE_PER_S = 200
DURATION_S = 1.0


def test_open_loop_votes_match_the_engine_results(tmp_path: Path) -> None:
    args = bench_peers.parse_args(["--data-root", str(tmp_path), "--peers", "embedded",
                                   "--ready-timeout-s", "60", "--mint-procs", "1"])
    scenario_set = load_scenarios(PERF_DIR / "scenarios" / "default.toml", 1.0)
    h = Harness(args, scenario_set, tmp_path, wrk_path="wrk")
    h.prepare_keys()
    peer = h.start("embedded")
    try:
        create_poll(peer, "bench", ["a", "b", "c"], h.admin_token)
        count = int(RATE_PER_S * DURATION_S)
        tokens = h.pool.take(count, "open")
        run = run_open(h, peer, tokens, [(DURATION_S, RATE_PER_S)], ["bench"], 8)
        total = settled_total(peer, ["bench"], h.admin_token, 10)
        assert run["statuses"] == {"201": count}
        assert run["scheduled"] == run["sent"] == run["answered"] == count
        assert run["unanswered"] == 0 and run["overloaded_at_s"] is None
        assert total == count == run["created"]
        assert 0 < run["latency_us"]["p50"] <= run["latency_us"]["p99"] <= run["latency_us"]["max"]
        assert sum(run["series"]["created"]) == count
        assert run["cpu"]["server_percent"] is not None
        again = run_open(h, peer, tokens, [(DURATION_S, RATE_PER_S)], ["bench"], 8)
        assert again["statuses"] == {"409": count}
        assert settled_total(peer, ["bench"], h.admin_token, 10) == count
    finally:
        peer.stop()
