"""The benchmark driver: the engine against its ceiling and against what a team would build.

One machine, one invocation, the same generators and settings for every peer:

- ceiling          perf/ceiling.py: bare Granian RSGI, fixed 201, no parsing, no state;
- embedded         the engine (`votes serve`) on its embedded fsync'd segment log;
- kafka            (``--kafka``) the engine on the Kafka WAL of a private local stack;
- granian_asyncpg  Granian + msgspec + asyncpg, one INSERT per vote into PostgreSQL;
- fastapi_pg       FastAPI + uvicorn + asyncpg + PostgreSQL ("what most teams build");
- fastapi_redis    FastAPI + uvicorn + Redis SADD/HINCRBY (not durable: says so).

Every peer verifies the same real tokens, minted once with ``votes token`` from one key
directory (each engine data dir gets a copy of those keys), and gets fresh state. The
scenarios come from perf/scenarios/default.toml: closed-loop max throughput (wrk), an
open-loop constant rate at half that max (perf/loadgen.py: latency from each request's
intended send time, so no coordinated omission), repeat votes (409s), many polls against
one hot poll, and a burst at a poll's opening. Options add what the earlier wrk-only bench
measured: ``--paced-fraction`` a paced closed-loop run of each engine with its late sends,
``--wal-commits`` the engine's group commits per run (from /metrics), ``--wrk-threads``.

Honest conditions: only 201 counts as throughput, and each run's 201s are checked against
the peer's own results total (perf/integrity.py): a check that fails makes that peer's
ratios and targets INVALID and the run exit 1. Data directories (engine, PostgreSQL) are
on one real filesystem, shown; server, backend and generator CPU are sampled from /proc;
PostgreSQL's fsync and synchronous_commit are read back with SHOW.

After each engine peer (last round only) the shard sweep (perf/sweep.py) runs that engine
at 1, 8 and 32 shards per worker, at 64 and 256 connections, and perf/results/sweep.json
gets its table; the engines themselves run in their default config (32 shards in 4 fencing
groups; ``--engine-shards`` for another).

Writes perf/results/peers.json and PNG plots beside it, and prints the machine, a result
table with the ratios engine/ceiling and engine/peer, and pass/fail per target of the
perf issue (with the micro-benchmarks' targets when perf/results/micro.json exists).

    python -m perf.bench_peers [--quick] [--kafka] [--peers ceiling,embedded,...]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from deploy.local.postgres import PostgresError
from perf import PERF_DIR, REPO_DIR, RESULTS_DIR, BenchError
from perf.machine import describe_machine, filesystem_of
from perf.open_loop import GENERATOR_SCHEDULING, usable_scheduling
from perf.output import print_conditions, write_json
from perf.peer_servers import Harness, engine_layout
from perf.report import print_report, print_sweep
from perf.runs import run_peer
from perf.scenarios import DEFAULT_PEERS, ENGINES, PEERS, load_scenarios, paced_scenario
from perf.summary import exit_status, load_micro, summarize_rounds
from perf.sweep import ceiling_rates, parse_counts, run_engine_sweep, sweep_integrity, sweep_rows
from perf.targets import scenario_of, sweep_targets
from perf.tokens import VENV_BIN
from perf.wrk import ensure_wrk

# Python modules each peer's server imports: checked before anything starts, so a
# missing `perf` extra is one clear message instead of a peer dying at start-up.
PEER_MODULES = {
    "granian_asyncpg": ("asyncpg",),
    "fastapi_pg": ("fastapi", "uvicorn", "asyncpg", "httptools"),
    "fastapi_redis": ("fastapi", "uvicorn", "redis", "httptools"),
}
PACKAGES_SHOWN = ("votes-engine", "fastapi", "uvicorn", "asyncpg", "redis", "pyroaring",
                  "matplotlib", "hiredis")  # fmt: skip


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """What runs and for how long."""
    parser.add_argument("--peers", default=DEFAULT_PEERS, help=f"comma-separated from {','.join(PEERS)}")
    parser.add_argument("--kafka", action="store_true", help="add the kafka peer (private stack)")
    parser.add_argument("--scenarios", type=Path, default=PERF_DIR / "scenarios" / "default.toml")
    parser.add_argument("--only", default="",
                        help="comma-separated scenario names to run (closed_max always runs: "
                        "the open-loop rates are fractions of it)")  # fmt: skip
    parser.add_argument("--duration-scale", type=float, default=1.0,
                        help="multiply every scenario duration (longer runs: 3)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="--duration-scale 0.4")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every peer this many times in turn; ratios and targets use medians")  # fmt: skip
    parser.add_argument("--paced-fraction", type=float, default=0.0,
                        help="after closed_max, a wrk run of each engine paced at this fraction "
                             "of its closed_max rate, with its late sends; 0 = none")  # fmt: skip
    parser.add_argument("--wal-commits", action="store_true",
                        help="read the engines' group-commit histograms (/metrics) around each "
                             "run: commits, ms and votes per commit, commits in flight")  # fmt: skip
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk -t of every closed-loop run")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="wrk --timeout")
    parser.add_argument("--drain-timeout-s", type=float, default=10.0, help="open loop: wait for answers")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--generator-scheduling", choices=tuple(GENERATOR_SCHEDULING),
                        default="fifo",
                        help="how the open-loop generator (perf/loadgen.py) is scheduled: on 2 "
                             "shared cores it must run the moment a send is due, or its lateness "
                             "lands in the latencies (send lag). fifo: SCHED_FIFO priority 1 (it "
                             "uses a few %% of a core; the kernel caps real-time work at 95 %%); "
                             "nice: nice -10; normal: as every other process")  # fmt: skip


def add_sweep_options(parser: argparse.ArgumentParser) -> None:
    """The shard sweep (perf/sweep.py), run right after each engine peer."""
    parser.add_argument("--no-sweep", action="store_true", help="skip the shard sweep")
    parser.add_argument("--sweep-shards", default="1,8,32",
                        help="shards per worker of the sweep's cases (include 1: the ratios "
                             "to 1 shard divide by that case)")  # fmt: skip
    parser.add_argument("--sweep-connections", default="64,256",
                        help="closed-loop connections of every sweep case (the ceiling's closed_max "
                             "runs at the same counts)")  # fmt: skip
    parser.add_argument("--sweep-out", type=Path, default=RESULTS_DIR / "sweep.json")


def add_peer_options(parser: argparse.ArgumentParser) -> None:
    """How the peers are started."""
    parser.add_argument("--workers", type=int, default=1, help="server workers of every peer")
    parser.add_argument("--pool-size", type=int, default=32, help="database pool per worker")
    parser.add_argument("--pg-tally", choices=("count", "counter"), default="count",
                        help="PG peer tallies: count(*) at read, or a counter row per option updated in the vote's transaction")  # fmt: skip
    parser.add_argument("--kafka-connections", default="1024,2048",
                        help="connections for the kafka peer, comma-separated: closed_max tries "
                             "each and keeps the best, the other scenarios use the first (its "
                             "rate is votes in flight / transaction time); 0 = as the others")  # fmt: skip
    parser.add_argument("--kafka-warmup-s", type=float, default=30.0,
                        help="the kafka peer's warm-up (closed loop, not measured): a fresh "
                             "stack's brokers are still compiling their hot paths")
    parser.add_argument("--stack-base-port", type=int,
                        default=int(os.environ.get("VOTES_STACK_BASE_PORT", "19700")),
                        help="the kafka peer's private stack (default: $VOTES_STACK_BASE_PORT)")
    parser.add_argument("--engine-shards", type=int, default=0,
                        help="shards per worker of both engines; 0 = the engine's own defaults "
                             "(no --shards flag: 32 shards in 4 fencing groups, engine/config.py), "
                             "the shape users deploy. Groups are the engine's automatic choice; "
                             "the kafka WAL topic gets one partition per group")
    parser.add_argument("--engine-extra-args", default="", help="appended to `votes serve`")
    parser.add_argument("--votes-bin", type=Path, default=VENV_BIN / "votes",
                        help="the engine's `votes` command (serve, token)")  # fmt: skip
    parser.add_argument("--ready-timeout-s", type=float, default=90.0)
    parser.add_argument("--settle-timeout-s", type=float, default=15.0)


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """Tokens, directories and output."""
    parser.add_argument("--tokens-max", type=int, default=2_000_000, help="cap per token file")
    parser.add_argument("--ceiling-rate-max", type=float, default=80_000,
                        help="sizes the ceiling's token files (201/s it could reach at most)")  # fmt: skip
    parser.add_argument("--token-ttl-s", type=int, default=7200)
    parser.add_argument("--mint-procs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--data-root", type=Path, default=Path("/var/tmp/votes-bench"),
                        help="run directories (engine data, PostgreSQL, tokens, logs); a real disk")  # fmt: skip
    parser.add_argument("--keep-data", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "peers.json")
    parser.add_argument("--no-plots", action="store_true")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add_run_options(parser)
    add_peer_options(parser)
    add_data_options(parser)
    add_sweep_options(parser)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    if args.kafka and "kafka" not in names:
        names.append("kafka")
    unknown = set(names) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}")
    if "ceiling" not in names:
        names.insert(0, "ceiling")
    args.peer_names = [n for n in PEERS if n in names]
    if args.quick:
        args.duration_scale = 0.4
    if args.paced_fraction and not 0 < args.paced_fraction < 1:
        parser.error("--paced-fraction must be in (0, 1)")
    try:
        args.sweep_shard_counts = parse_counts(args.sweep_shards, "--sweep-shards")
        args.sweep_connection_counts = parse_counts(args.sweep_connections, "--sweep-connections")
    except BenchError as error:
        parser.error(str(error))
    if args.engine_shards < 0:
        parser.error("--engine-shards must be 0 (the engine's defaults) or positive")
    return args


def missing_modules(peer_names: list[str]) -> dict[str, list[str]]:
    missing = {}
    for name in peer_names:
        absent = [m for m in PEER_MODULES.get(name, ()) if importlib.util.find_spec(m) is None]
        if absent:
            missing[name] = absent
    return missing


def raise_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the finally blocks stop servers and the stack."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def chosen_scenarios(args):
    """The scenario set of the run: --only applied, the paced run after closed_max."""
    scenario_set = load_scenarios(args.scenarios, args.duration_scale)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        scenario_set.scenarios = [s for s in scenario_set.scenarios
                                  if s.name in wanted or s.name == "closed_max"]  # fmt: skip
    if args.paced_fraction:
        names = [s.name for s in scenario_set.scenarios]
        closed_max = scenario_set.scenarios[names.index("closed_max")]
        paced = paced_scenario(closed_max, args.paced_fraction)
        scenario_set.scenarios.insert(names.index("closed_max") + 1, paced)
    return scenario_set


def run_parameters(args, scenario_set, run_dir: Path) -> dict:
    """The parameters printed first and stored with the results."""
    kafka = "kafka" in args.peer_names
    scenario_file = args.scenarios
    if scenario_file.is_relative_to(REPO_DIR):
        scenario_file = scenario_file.relative_to(REPO_DIR)
    return {
        "peers": ",".join(args.peer_names),
        "scenarios": [s.name for s in scenario_set.scenarios],
        "scenario_file": str(scenario_file),
        "duration_scale": args.duration_scale,
        "connections": scenario_set.connections,
        "kafka_connections": args.kafka_connections if kafka else None,
        "engine_config": engine_config_text(args.engine_shards),
        "kafka_partitions": engine_layout(args.engine_shards)[1] if kafka else None,
        "kafka_warmup_s": args.kafka_warmup_s if kafka else None,
        "warmup_s": scenario_set.warmup_s,
        "rounds": args.rounds,
        "workers": args.workers,
        "pool_size": args.pool_size,
        "pg_tally": args.pg_tally,
        **({"paced_fraction": args.paced_fraction} if args.paced_fraction else {}),
        **({"wrk_threads": args.wrk_threads} if args.wrk_threads != 1 else {}),
        "open_loop_generator_scheduling": shlex.join(GENERATOR_SCHEDULING[args.generator_scheduling])
        or "normal",
        "sweep": None if args.no_sweep else
        f"shards per worker {args.sweep_shards} x connections {args.sweep_connections}, groups "
        "automatic, after each engine peer",
        "run_dir": str(run_dir),
    }


def engine_config_text(engine_shards: int) -> str:
    """The engines' layout as the conditions print it."""
    shards, groups = engine_layout(engine_shards)
    if not engine_shards:
        return (f"votes serve defaults: {shards} shards in {groups} fencing groups per worker "
                "(engine/config.py), no --shards flag")
    return f"--shards {shards} ({groups} fencing groups, the engine's automatic choice)"


def run_rounds(h: Harness, args) -> tuple[list[dict], dict, dict]:
    """Every peer, in order, ``--rounds`` times; (rounds of peer documents, failures, sweep
    cases by engine). The sweep runs once, in the last round, right after each engine peer
    (the kafka one on that peer's warm stack, before it goes down)."""
    rounds: list[dict] = []
    failures: dict = {}
    sweeps: dict = {}
    h.prepare_keys()
    for index in range(args.rounds):
        if args.rounds > 1:
            print(f"\n######## round {index + 1} of {args.rounds}", flush=True)
        peers: dict = {}
        rounds.append(peers)
        ceiling_rate = None
        for name in args.peer_names:
            try:
                peers[name] = run_peer(h, name, ceiling_rate)
                if name in ENGINES and not args.no_sweep and index == args.rounds - 1:
                    sweeps[name] = run_engine_sweep(h, name, args.sweep_shard_counts,
                                                    args.sweep_connection_counts, ceiling_rate)  # fmt: skip
            except (BenchError, PostgresError, subprocess.TimeoutExpired, OSError) as error:
                print(f"!! {name} failed: {error}", flush=True)
                failures[f"r{index + 1} {name}" if args.rounds > 1 else name] = str(error)
                continue
            finally:
                if name == "kafka":
                    h.stop_stack()
            closed = scenario_of(peers, name, "closed_max")
            if name == "ceiling" and closed:
                ceiling_rate = max(closed["created_per_s"], peers[name]["warmup_created_per_s"])
    return rounds, failures, sweeps


def sweep_document(conditions: dict, parameters: dict, args, peers: dict, sweeps: dict) -> dict:
    """sweep.json: the sweep's cases, its table rows, its targets and its integrity."""
    ceiling = ceiling_rates(peers.get("ceiling"))
    integrity = sweep_integrity(sweeps)
    rows = sweep_rows(sweeps, ceiling, integrity["invalid_cases"])
    shards_most = max(args.sweep_shard_counts)
    return {
        "benchmark": "sweep",
        "conditions": conditions,
        "parameters": {**parameters, "shard_counts": args.sweep_shard_counts,
                       "connection_counts": args.sweep_connection_counts, "workers": args.workers,
                       "groups": "the engine's automatic choice (engine/config.py: largest "
                                 "divisor of shards up to 4)",
                       "kafka_topic": "one per case, one partition per group"},  # fmt: skip
        "ceiling_created_per_s": ceiling,
        "engines": sweeps,
        "rows": rows,
        "targets": sweep_targets(rows, shards_most, tuple(args.sweep_connection_counts)),
        "integrity": integrity,
    }


def results_document(h: Harness, conditions: dict, parameters: dict, rounds: list[dict],
                     failures: dict) -> dict:  # fmt: skip
    """peers.json: conditions, every peer's scenarios, ratios, targets, integrity."""
    filesystems = {"run dir (engine data)": filesystem_of(h.run_dir)}
    if h.postgres_info:
        filesystems["PostgreSQL data"] = h.postgres_info["filesystem"]
    micro = load_micro()
    summary = summarize_rounds(rounds, micro)
    micro_source = None
    if micro:
        micro_source = {"file": "perf/results/micro.json",
                        "time_utc": micro["conditions"].get("time_utc")}
    return {
        "benchmark": "peers",
        "conditions": conditions,
        "parameters": parameters,
        "filesystems": filesystems,
        "postgres": h.postgres_info,
        "redis": h.redis_info,
        "stack": h.stack_info,
        "tokens": {
            "minted": len(h.pool.tokens),
            "mint_s": round(h.pool.mint_s, 1),
            "token_len": len(h.pool.tokens[0]) if h.pool.tokens else None,
        },
        "peers": rounds[-1] if rounds else {},
        "earlier_rounds": rounds[:-1],
        "failures": failures,
        **summary,
        "micro_source": micro_source,
        "run_s": None,
    }


def write_plots(document: dict, out_dir: Path) -> None:
    try:
        from perf.plots import plot_peers
    except ImportError as error:
        print(f"no plots: {error} (pip install -e '.[perf]')")
        return
    for path in plot_peers(document, out_dir):
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    scenario_set = chosen_scenarios(args)
    missing = missing_modules(args.peer_names)
    if missing:
        print(f"peers need Python packages that are not installed: {missing}\n"
              "install the perf extra: .venv/bin/pip install -e '.[test,perf]' (make bench does)",
              file=sys.stderr)  # fmt: skip
        return 2
    wrk_path = ensure_wrk()
    args.generator_scheduling = usable_scheduling(args.generator_scheduling)
    run_dir = args.data_root / time.strftime("peers-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    conditions = describe_machine(PACKAGES_SHOWN)
    parameters = run_parameters(args, scenario_set, run_dir)
    print_conditions(conditions, parameters)
    started = time.monotonic()
    h = Harness(args, scenario_set, run_dir, wrk_path)
    try:
        rounds, failures, sweeps = run_rounds(h, args)
    finally:
        h.shutdown()
        if not args.keep_data:
            for path in run_dir.glob("*.tokens"):
                path.unlink()
    document = results_document(h, conditions, parameters, rounds, failures)
    document["run_s"] = round(time.monotonic() - started, 1)
    print_report(document)
    write_json(args.out, document)
    print(f"\nwrote {args.out}; logs in {run_dir}")
    if not args.no_plots:
        write_plots(document, args.out.parent)
    status = exit_status(document)
    if not args.no_sweep:
        sweep = sweep_document(conditions, parameters, args, document["peers"], sweeps)
        print_sweep(sweep)
        write_json(args.sweep_out, sweep)
        print(f"wrote {args.sweep_out}")
        sweep_failed = any(case["errors"] for cases in sweeps.values() for case in cases.values())
        if sweep_failed or not sweep["integrity"]["ok"]:
            status = 1
    if not document["integrity"]["ok"]:
        print("\n!! integrity checks failed: the ratios of the peers concerned are INVALID",
              file=sys.stderr)  # fmt: skip
    return status


if __name__ == "__main__":
    sys.exit(main())
