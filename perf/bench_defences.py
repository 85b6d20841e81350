"""Throughput with every defence on against the same engine with them off, side by side.

Four configurations of one engine (perf/defended_engine.py), each fresh, in this order
every round: ``default`` (as shipped: local limits, loopback exempt), ``off`` (no limits),
``local-limits`` (every client address limited, each worker alone) and ``defended``
(trusted proxy 127.0.0.1, every client address limited, the global view on a private
three-master Redis Cluster; proof-of-work is not built, so honest traffic pays none). The same wrk load for all: one distinct valid token per vote, each from its
own client address in X-Forwarded-For (perf/wrk/votes.lua VOTES_FORWARDED_FOR=spread: 250
per /24, so honest traffic never reaches a limit), a warm-up, then ``--duration-s`` at 64
connections with the server's CPU sampled.

Reported: 201/s and server CPU per 201 of each, the ratios defended ÷ off and defended ÷
default (target: defended keeps >= 0.85 of off's throughput), and Redis calls per vote
with the defences on, counted on the Redis masters (INFO commandstats: the sync's Lua
calls, and every command but INFO) beside the engine's own counter
(`vote_ratelimit_store_calls_total`), with the masters' CPU per vote: one worker at its
maximum rate is what each worker runs at the design rate (perf/capacity.py sizes workers
that way), so this is the design rate's calls per vote (target <= 0.1). A run whose
results total does not match its 201s is INVALID and exits 1.
perf/capacity.py sizes Redis from the figures written to perf/results/defences.json.

    python -m perf.bench_defences [--quick] [--duration-s 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

from perf import RESULTS_DIR, BenchError
from perf.bench_attack import Minter, write_tokens
from perf.defended_engine import (CONFIGS, EngineUnderTest, RedisClusterUnderTest,
                                  calls_between, wrk_votes)
from perf.machine import describe_machine
from perf.output import print_conditions, print_table, write_json
from perf.targets import INVALID, verdict_rows
from perf.wrk import ensure_wrk

POLL = "defences"
CONNECTIONS = 64
WARMUP_S = 2.0
# The measured run's first spread address (perf/wrk/votes.lua VOTES_SPREAD_FIRST): past the
# warm-up's, which uses at most TOKENS_PER_S * (WARMUP_S + 1) addresses from 0.
MEASURED_SPREAD_FIRST = 500_000
TOKENS_PER_S = 12_000  # tokens per second of a run: above any rate one worker reaches here
SYNC_SETTLE_S = 0.5  # after a run, the limiter's last sync (every 200 ms) has landed
THROUGHPUT_RATIO_MIN = 0.85
REDIS_CALLS_PER_VOTE_MAX = 0.1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s runs, one round")
    parser.add_argument("--duration-s", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stack-base-port", type=int, default=None,
                        help="the Redis Cluster's base port (default $VOTES_STACK_BASE_PORT)")
    parser.add_argument("--data-root", type=Path, default=Path("/var/tmp/votes-bench"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "defences.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration_s, args.rounds = min(args.duration_s, 3.0), 1
    if not 1 <= args.rounds <= 5:
        parser.error("--rounds must be in 1..5")
    return args


def one_run(name: str, args, run_dir: Path, minter: Minter, cluster: RedisClusterUnderTest,
            wrk_path: str, files: tuple[Path, Path]) -> dict:
    """One configuration: a fresh engine, the warm-up, the measured run, its checks."""
    defended = name == "defended"
    engine = EngineUnderTest(name, run_dir, run_dir / "keys-data" / "keys",
                             cluster.url if defended else None)
    try:
        engine.create_poll(minter.admin_token, POLL, ["a", "b"])
        warmup = wrk_votes(engine.url, engine.pid, files[0], POLL, WARMUP_S, CONNECTIONS,
                           "spread", wrk_path)
        time.sleep(SYNC_SETTLE_S)
        before = cluster.command_calls()
        store_before = engine.metric_total("vote_ratelimit_store_calls_total")
        # Addresses of its own (past any warm-up's): the warm-up's /24s again would give
        # each twice the voters, and the velocity rules would ask them for proofs.
        run = wrk_votes(engine.url, engine.pid, files[1], POLL, args.duration_s, CONNECTIONS,
                        "spread", wrk_path, {"redis": cluster.pids()},
                        spread_first=MEASURED_SPREAD_FIRST)
        time.sleep(SYNC_SETTLE_S)
        run["redis_calls"] = calls_between(before, cluster.command_calls())
        run["store_calls_engine"] = (engine.metric_total("vote_ratelimit_store_calls_total")
                                     - store_before)
        run["fail_open"] = engine.metric_total("vote_ratelimit_fail_open_total")
        total = int(engine.settled_results(POLL).get("total", -1))
    finally:
        engine.stop()
    run["integrity"] = integrity_of(total, warmup, run)
    run["warmup_statuses"] = warmup["statuses"]
    run["cpu_us_per_201"] = (round(run["cpu_s"]["server"] * 1e6 / run["created"], 2)
                             if run["created"] and run["cpu_s"].get("server") else None)
    return run


def in_flight(run: dict) -> int:
    """Requests of a wrk run still unanswered when it stopped: counted or not, either way."""
    return max(0, run["votes_sent"] - run["answered"]) + run["errors"].get("timeout", 0)


def integrity_of(total: int, warmup: dict, run: dict) -> str | None:
    """None when the poll's total holds every 201 of the warm-up and the run, and no more
    than those plus the requests still unanswered when each stopped."""
    created = warmup["created"] + run["created"]
    unanswered = in_flight(warmup) + in_flight(run)
    if not created <= total <= created + unanswered:
        return f"results total {total} outside [{created} 201s, + {unanswered} unanswered]"
    return None


def redis_figures(run: dict, idle_cpu_percent: float | None) -> dict:
    """Redis calls and CPU per vote of the defended run; the masters' CPU net of what they
    use idle (sampled during the ``off`` run: cluster bus, cron), so it is the votes'."""
    created = run["created"] or 1
    calls = run["redis_calls"]
    redis_cpu_s = run["cpu_s"].get("redis")
    if redis_cpu_s is not None and idle_cpu_percent is not None:
        redis_cpu_s = max(0.0, redis_cpu_s - idle_cpu_percent / 100 * run["cpu_window_s"])
    return {"votes": run["created"], "votes_per_s": run["created_per_s"],
            "script_calls": calls["script"], "round_trips": calls["round_trips"],
            "commands_inside_scripts": calls["inside_scripts"],
            "calls_per_vote": round(calls["round_trips"] / created, 5),
            "script_calls_per_vote": round(calls["script"] / created, 5),
            "commands_inside_scripts_per_vote": round(calls["inside_scripts"] / created, 3),
            "engine_counted_calls_per_vote": round(run["store_calls_engine"] / created, 5),
            "redis_idle_cpu_percent": idle_cpu_percent,
            "redis_cpu_us_per_vote": round(redis_cpu_s * 1e6 / created, 3)
            if redis_cpu_s is not None else None,
            "by_command": calls["by_command"]}


def summarize(rounds: list[dict]) -> dict:
    """Per round the ratios; their medians; the defended run's Redis figures (last round's
    calls per vote is the median over rounds too)."""
    per_round = []
    for runs in rounds:
        rate = {name: runs[name]["created_per_s"] for name in CONFIGS}
        cost = {name: runs[name]["cpu_us_per_201"] for name in CONFIGS}
        invalid = any(runs[name]["integrity"] for name in CONFIGS)
        ratios = {"defended/off": rate["defended"] / rate["off"] if rate["off"] else None,
                  "local-limits/off": rate["local-limits"] / rate["off"] if rate["off"]
                  else None,
                  "defended/default": rate["defended"] / rate["default"] if rate["default"]
                  else None,
                  "cpu_per_201 off/defended": cost["off"] / cost["defended"]
                  if cost["off"] and cost["defended"] else None,
                  "cpu_per_201 off/local-limits": cost["off"] / cost["local-limits"]
                  if cost["off"] and cost["local-limits"] else None}
        per_round.append({key: INVALID if invalid else (round(value, 4) if value else value)
                          for key, value in ratios.items()})
    medians = {}
    for key in per_round[0]:
        values = [ratios[key] for ratios in per_round]
        medians[key] = (INVALID if INVALID in values else
                        round(statistics.median(v for v in values if v is not None), 4)
                        if any(v is not None for v in values) else None)
    redis = [redis_figures(runs["defended"], runs["off"]["cpu_percent"].get("redis"))
             for runs in rounds]
    calls = statistics.median(figures["calls_per_vote"] for figures in redis)
    return {"ratios_by_round": per_round, "ratios": medians,
            "redis": {**redis[-1], "calls_per_vote_median": round(calls, 5)}}


def targets_of(summary: dict) -> list[dict]:
    values = {"defences on/off throughput": summary["ratios"]["defended/off"],
              "redis calls per vote": summary["redis"]["calls_per_vote_median"]}
    return verdict_rows([
        ("defences on/off throughput", "engine default config, every defence on (local + global "
         "limits, Redis Cluster, trusted proxy) ÷ off, 201/s", THROUGHPUT_RATIO_MIN, "min"),
        ("redis calls per vote", "Redis calls per vote with the defences on, one worker at its "
         "max rate (INFO commandstats)", REDIS_CALLS_PER_VOTE_MAX, "max"),
    ], values) + [{
        "target": "defences on/off cpu per 201", "threshold": None, "sense": "",
        "description": "server CPU per 201, off ÷ every defence on (steadier than 201/s on a "
                       "busy machine; perf/README.md)",
        "measured": summary["ratios"]["cpu_per_201 off/defended"], "verdict": "reported"}]


def measure(args, run_dir: Path) -> list[dict]:
    cluster = RedisClusterUnderTest(run_dir, args.stack_base_port)
    try:
        print(f"  Redis Cluster on {cluster.url}", flush=True)
        cluster.up()
        minter = Minter(run_dir / "keys-data")
        count = int(TOKENS_PER_S * (args.duration_s + 1))
        files = (write_tokens(run_dir / "tokens-warmup.txt", [t for _, t in minter.tokens(
                    1, int(TOKENS_PER_S * (WARMUP_S + 1)))]),
                 write_tokens(run_dir / "tokens.txt", [t for _, t in minter.tokens(
                    1_000_000, count)]))
        wrk_path = ensure_wrk()
        rounds = []
        for round_index in range(args.rounds):
            runs = {}
            for name in CONFIGS:
                runs[name] = one_run(name, args, run_dir, minter, cluster, wrk_path, files)
                print(f"  round {round_index + 1} {name:9} {runs[name]['created_per_s']:>9,.0f} "
                      f"201/s, server {runs[name]['cpu_us_per_201']} us CPU per 201, "
                      f"statuses {runs[name]['statuses']}"
                      + (f"  INVALID: {runs[name]['integrity']}" if runs[name]["integrity"]
                         else ""), flush=True)
            rounds.append(runs)
        return rounds
    finally:
        cluster.down()


def print_summary(summary: dict, targets: list[dict]) -> None:
    print("\n== defences on vs off (ratios of 201/s measured side by side)")
    print_table(["round", *summary["ratios"]],
                [[str(index + 1), *[str(v) for v in ratios.values()]]
                 for index, ratios in enumerate(summary["ratios_by_round"])]
                + [["median", *[str(v) for v in summary["ratios"].values()]]])
    redis = summary["redis"]
    print(f"  Redis with the defences on: {redis['round_trips']} calls ({redis['script_calls']} "
          f"Lua) for {redis['votes']} votes at {redis['votes_per_s']:,.0f}/s: "
          f"{redis['calls_per_vote']} calls per vote (the engine's own counter: "
          f"{redis['engine_counted_calls_per_vote']}), {redis['commands_inside_scripts_per_vote']}"
          f" commands per vote inside the script, masters' CPU {redis['redis_cpu_us_per_vote']} "
          f"us per vote (net of {redis['redis_idle_cpu_percent']} % idle); by command "
          f"{redis['by_command']}")
    print_table(["target", "threshold", "measured", "verdict"],
                [[row["description"], "-" if row["threshold"] is None
                  else f"{row['sense']} {row['threshold']:g}", str(row["measured"]),
                  row["verdict"]] for row in targets])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    conditions = describe_machine(("redis",))
    parameters = {key: (str(value) if isinstance(value, Path) else value)
                  for key, value in vars(args).items()}
    parameters.update(connections=CONNECTIONS, warmup_s=WARMUP_S, order=list(CONFIGS),
                      engine="votes serve, default config (32 shards in 4 groups), 1 worker",
                      load="wrk + perf/wrk/votes.lua, one token per vote, "
                           "VOTES_FORWARDED_FOR=spread (250 client addresses per /24)")
    print_conditions(conditions, parameters)
    run_dir = args.data_root / f"defences-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        rounds = measure(args, run_dir)
    except BenchError as error:
        print(f"!! {error}\n  (logs kept in {run_dir})", file=sys.stderr)
        return 1
    summary = summarize(rounds)
    targets = targets_of(summary)
    print_summary(summary, targets)
    failures = [f"{name} round {index + 1}: {runs[name]['integrity']}"
                for index, runs in enumerate(rounds) for name in CONFIGS
                if runs[name]["integrity"]]
    write_json(args.out, {"benchmark": "defences", "conditions": conditions,
                          "parameters": parameters, "rounds": rounds, **summary,
                          "targets": targets, "integrity": {"failures": failures}})
    print(f"  wrote {args.out}")
    if failures:
        print("\n".join(f"  INTEGRITY FAILURE {failure}" for failure in failures))
        print(f"  logs kept in {run_dir}")
        return 1
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
