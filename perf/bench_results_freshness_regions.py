"""Cross-region freshness of the live results (issue 13): from a vote's 201 in region A to
the SSE event showing it on region B's results role.

    python -m perf.bench_results_freshness_regions [--rate 200] [--duration-s 10] [--interval-ms 200]

Two private redis-servers (A and B, as perf/bench_results_freshness.py starts one), a
`votes serve` of region A publishing to A's Redis, `votes replicator --region local` shipping
A's counters into B's Redis every `--interval-ms`, and a `votes results` on B's Redis; one
SSE stream on B's results role. Votes are sent to A at a paced rate; the freshness of the
k-th 201 is the time until B's stream first showed a total >= k (one monotonic clock).
Prints p50/p99/max and PASS/FAIL against p99 <= 1 s; JSON to perf/results/freshness_regions.json.
The path is A's publish (results_publish_ms), the replicator's interval, B's wake (100 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from perf import RESULTS_DIR
from perf.bench_results_freshness import (
    CROSS_REGION_TARGET_MS, READY_WAIT_S, SETTLE_WAIT_S, TOKEN_TTL_S, VENV_BIN, StreamWatcher,
    create_poll, freshness_ms, measure_and_write, percentile, send_votes, start_engine, start_redis,
    start_results_role, stopping, wait_results)
from perf.cpu_sampling import CpuSampler
from perf.output import print_table
from perf.processes import ServerProcess

POLL = "freshness-regions"


async def measure(engine_url: str, results_b_url: str, data_dir: Path, args) -> dict:
    from engine.keys import load_keys
    from engine.tokens import issue_voter_tokens

    count = int(args.rate * args.duration_s)
    tokens = list(issue_voter_tokens(load_keys(data_dir), 1, count, ttl_s=TOKEN_TTL_S))
    watcher = StreamWatcher("region B's results role", results_b_url, POLL)
    await watcher.open()
    await asyncio.sleep(0.5)
    times_201, others, lateness_s = await send_votes(engine_url, POLL, tokens, args.rate,
                                                     args.connections)
    deadline = time.monotonic() + SETTLE_WAIT_S
    while time.monotonic() < deadline and watcher.total() < len(times_201):
        await asyncio.sleep(0.05)
    watcher.close()
    values, missing = freshness_ms(times_201, watcher.events)
    p99 = percentile(values, 0.99)
    return {"votes_sent": count, "answers_201": len(times_201), "answers_other": others,
            "send_lateness_ms_max": round(lateness_s * 1000, 1), "missing": missing,
            "p50_ms": round(percentile(values, 0.5) or 0, 1), "p99_ms": round(p99 or 0, 1),
            "max_ms": round(values[-1] if values else 0, 1), "events": len(watcher.events),
            "target_p99_ms": CROSS_REGION_TARGET_MS,
            "verdict": "PASS" if p99 is not None and p99 <= CROSS_REGION_TARGET_MS
            and missing == 0 else "FAIL"}


def run(args: argparse.Namespace) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="votes-freshness-regions-", dir=args.data_root))
    try:
        redis_a, redis_a_url = start_redis(run_dir / "a")
        with stopping([redis_a]) as servers:
            redis_b, redis_b_url = start_redis(run_dir / "b")
            servers.append(redis_b)
            engine, engine_url, data_dir = start_engine(run_dir, redis_a_url, args.workers)
            servers.append(engine)
            replicator = ServerProcess("replicator", [
                str(VENV_BIN / "votes"), "replicator", "--region", "local", "--from-redis",
                redis_a_url, "--to-redis", redis_b_url, "--interval-ms", str(args.interval_ms)],
                run_dir / "replicator.log", env=dict(os.environ))
            servers.append(replicator)
            results_b, results_b_url = start_results_role(run_dir / "b", redis_b_url, 16)
            servers.append(results_b)
            create_poll(engine_url, data_dir, POLL)
            wait_results(results_b_url, POLL, READY_WAIT_S)
            sampler = CpuSampler({"engine": engine.pid, "replicator": replicator.pid,
                                  "results_b": results_b.pid, "client": os.getpid()}).start()
            measured = asyncio.run(measure(engine_url, results_b_url, data_dir, args))
            usage = sampler.stop()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    from engine.config import Config

    return {**measured, "cpu_percent": usage.cpu_percent,
            "machine_busy_percent": usage.machine_busy_percent,
            "parameters": {"rate_per_s": args.rate, "duration_s": args.duration_s,
                           "connections": args.connections, "workers": args.workers,
                           "replicator_interval_ms": args.interval_ms,
                           "results_publish_ms": Config().results_publish_ms}}


def report(measured: dict) -> None:
    print(f"\n== freshness across regions, 201 in A -> SSE event on B (ms; target p99 <= "
          f"{CROSS_REGION_TARGET_MS:.0f})")
    print_table(["stream", "votes", "missing", "p50", "p99", "max", "events", "verdict"],
                [["A -> replicator -> B", measured["answers_201"], measured["missing"],
                  measured["p50_ms"], measured["p99_ms"], measured["max_ms"], measured["events"],
                  measured["verdict"]]])
    print(f"  201s {measured['answers_201']} of {measured['votes_sent']} (other answers "
          f"{measured['answers_other']}); CPU % of a core {measured['cpu_percent']}, machine "
          f"busy {measured['machine_busy_percent']} % of 200")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="votes per second")
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--interval-ms", type=int, default=200, help="the replicator's")
    parser.add_argument("--data-root", default="/var/tmp")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "freshness_regions.json")
    args = parser.parse_args(argv)
    if not (1 <= args.rate <= 5000 and 1 <= args.duration_s <= 120
            and 1 <= args.connections <= 64 and 10 <= args.interval_ms <= 10_000):
        parser.error("bounds: --rate 1..5000, --duration-s 1..120, --connections 1..64, "
                     "--interval-ms 10..10000")
    return args


def main(argv: list[str] | None = None) -> int:
    return measure_and_write("results_freshness_regions", parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
