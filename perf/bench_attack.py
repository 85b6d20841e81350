"""Attack simulation: honest voters mixed with bots against the engine with every defence on.

The engine (`votes serve`, default shards, one worker) runs with local and global rate
limits on a private three-master Redis Cluster and 127.0.0.1 as its trusted proxy
(perf/defended_engine.py "defended"); the generator, on loopback only, plays the edge
proxy and names each client's address in X-Forwarded-For. Two phases, both bounded:

1. Mixed (``--window-s``): honest voters (valid tokens, one vote each, 200 per /24, paced)
   at once with bots that (a) replay stolen valid tokens from ever-changing addresses,
   (b) send forged tokens (bad MAC, unknown key id, altered claims) and expired ones,
   (c) send one valid token many times at once over 8 connections, (d) flood from one /24
   with fresh valid tokens, (e) vote with fresh valid tokens from one address (past its
   burst, so suspicious) and solve proof-of-work challenges at a fixed compute budget
   whenever the engine answers 428 (perf/attack_bots.py PowBot; "PoW not built" when
   `GET /v1/challenge` is 404 and the engine never asks). Honest voters solve a 428 too,
   within 2 s, as the results page's solver would. Every answer is recorded per token,
   and the poll's settled total is checked against the 201s (perf/attack_bots.py Ledger).
2. CPU per request class (``--class-s`` each): each class alone under wrk (64 connections),
   the server process tree's CPU time per answer (perf/cpu_sampling.py): accepted votes,
   forged tokens (401), rate-limited (429: one address past its burst), duplicates (409).

Targets (issue 12): honest votes accepted >= 99.9 %; votes accepted for invalid tokens: 0;
at most one accepted vote per valid token (stolen, reused); server CPU per rejected request
<= a quarter of an accepted vote's; and the flood's accepted votes within the prefix limit.
An integrity failure (an invalid token's vote accepted, a token counted twice, a total that
does not match the 201s) exits 1. Writes perf/results/attack.json with ``targets`` rows
that perf/targets_report.py prints.

    python -m perf.bench_attack [--quick] [--window-s 12] [--class-s 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from pathlib import Path

from perf import RESULTS_DIR, BenchError
from perf.attack_bots import FLOOD_PREFIX, ROAMING_NETWORK
from perf.attack_run import MixedResult, Plan, forged_tokens, run_mixed
from perf.attack_targets import attack_targets, cpu_ratios, print_report
from perf.defended_engine import EngineUnderTest, RedisClusterUnderTest, wrk_votes
from perf.machine import describe_machine
from perf.output import print_conditions, write_json
from perf.processes import ServerProcess, free_port, wait_for_http
from perf.wrk import ensure_wrk

POLL = "attack"
TOKEN_TTL_S = 7200
# Voter id ranges of the classes: disjoint, so a token's voter says whose it is.
VOTER_BASE = {"honest": 1, "stolen": 1_000_000, "reused": 2_000_000, "flood": 3_000_000,
              "pow": 4_000_000, "forged": 5_000_000, "expired": 6_000_000,
              "cpu": 10_000_000}
CPU_CONNECTIONS = 64
CPU_TOKENS_PER_S = 12_000  # tokens per second of a class run: above any rate seen here


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="windows of 5 s and 2 s")
    parser.add_argument("--window-s", type=float, default=12.0, help="the mixed phase")
    parser.add_argument("--class-s", type=float, default=4.0, help="each CPU class run")
    parser.add_argument("--honest-per-s", type=float, default=250.0)
    parser.add_argument("--stolen-tokens", type=int, default=20)
    parser.add_argument("--replays-per-token", type=int, default=40)
    parser.add_argument("--reused-tokens", type=int, default=10)
    parser.add_argument("--votes-per-reused-token", type=int, default=96)
    parser.add_argument("--forged-tokens", type=int, default=2000)
    parser.add_argument("--flood-tokens", type=int, default=30_000)
    parser.add_argument("--pow-tokens", type=int, default=400,
                        help="PoW bot votes, all from one address: past its burst of 200")
    parser.add_argument("--pow-budget-s", type=float, default=0.05,
                        help="compute a PoW bot spends on one challenge at most")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="one request's bound")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--stack-base-port", type=int, default=None,
                        help="the Redis Cluster's base port (default $VOTES_STACK_BASE_PORT)")
    parser.add_argument("--data-root", type=Path, default=Path("/var/tmp/votes-bench"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "attack.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.window_s, args.class_s = min(args.window_s, 5.0), min(args.class_s, 2.0)
        args.flood_tokens = min(args.flood_tokens, 15_000)
    return args


class Minter:
    """Voter tokens of the run's key directory, minted in-process (microseconds each)."""

    def __init__(self, keys_data_dir: Path) -> None:
        from engine.keys import ensure_keys, load_keys
        from engine.tokens import issue_admin_token

        ensure_keys(keys_data_dir)
        self.keyring = load_keys(keys_data_dir)
        self.admin_token = issue_admin_token(self.keyring, ttl_s=TOKEN_TTL_S)

    def tokens(self, first_voter: int, count: int, expired: bool = False) -> list[tuple[int, str]]:
        from engine.tokens import issue_voter_tokens

        # An expired token was validly signed once: minted with an expiry in the past.
        now_s = int(time.time()) - 2 * TOKEN_TTL_S if expired else None
        tokens = issue_voter_tokens(self.keyring, first_voter, count, ttl_s=TOKEN_TTL_S,
                                    now_s=now_s)
        return list(zip(range(first_voter, first_voter + count), tokens))


def make_plan(args: argparse.Namespace, minter: Minter) -> Plan:
    honest = int(args.honest_per_s * args.window_s * 0.9)  # all sent well inside the window
    forged_base = [token for _, token in minter.tokens(VOTER_BASE["forged"], args.forged_tokens)]
    expired = [token for _, token in minter.tokens(VOTER_BASE["expired"],
                                                   max(1, args.forged_tokens // 4), True)]
    return Plan(
        honest=minter.tokens(VOTER_BASE["honest"], honest),
        stolen=minter.tokens(VOTER_BASE["stolen"], args.stolen_tokens),
        reused=minter.tokens(VOTER_BASE["reused"], args.reused_tokens),
        flood=minter.tokens(VOTER_BASE["flood"], args.flood_tokens),
        pow_tokens=minter.tokens(VOTER_BASE["pow"], args.pow_tokens),
        forged=forged_tokens(forged_base[: len(forged_base) * 3 // 4], expired),
        replays_per_token=args.replays_per_token,
        votes_per_reused_token=args.votes_per_reused_token,
        honest_per_s=args.honest_per_s, window_s=args.window_s, timeout_s=args.timeout_s,
        pow_budget_s=args.pow_budget_s, seed=args.seed)


def write_tokens(path: Path, tokens: list[str]) -> Path:
    path.write_text("\n".join(tokens) + "\n")
    return path


def cpu_classes(args, engine: EngineUnderTest, minter: Minter, run_dir: Path,
                wrk_path: str) -> dict:
    """Each request class alone under wrk: the server's CPU per answer."""
    from perf.attack_bots import forge

    count = int(CPU_TOKENS_PER_S * (args.class_s + 1))
    fresh = [token for _, token in minter.tokens(VOTER_BASE["cpu"], count)]
    limited = [token for _, token in minter.tokens(VOTER_BASE["cpu"] + count, count)]
    for poll in ("cpu-accepted", "cpu-forged", "cpu-limited"):
        engine.create_poll(minter.admin_token, poll, ["a", "b"])
    runs = {}

    def run(name: str, tokens: list[str], poll: str, forwarded_for: str) -> dict:
        path = write_tokens(run_dir / f"tokens-{name}.txt", tokens)
        runs[name] = wrk_votes(engine.url, engine.pid, path, poll, args.class_s,
                               CPU_CONNECTIONS, forwarded_for, wrk_path)
        print(f"  {name:14} {runs[name]['statuses']} in {runs[name]['duration_s']:.1f}s, "
              f"server {runs[name]['server_cpu_us_per_answer']} us CPU per answer", flush=True)
        return runs[name]

    accepted = run("accepted", fresh, "cpu-accepted", "spread")
    sent = fresh[: accepted["votes_sent"]]
    # Each voter of the accepted run again, three times over: every answer a 409.
    run("duplicate", sent * 3, "cpu-accepted", "spread")
    run("forged", [forge(token, "bad-mac") for token in fresh], "cpu-forged", "spread")
    # One address past its burst: every answer after the first `burst` is a 429.
    run("rate-limited", limited, "cpu-limited", f"{FLOOD_PREFIX}.99")
    runs["http-floor"] = ceiling_run(args, run_dir, wrk_path)
    return runs


def ceiling_run(args, run_dir: Path, wrk_path: str) -> dict:
    """The HTTP floor beside the classes: perf/ceiling.py (bare Granian, a fixed 201, no
    parsing) sent the same requests, for what any answer costs on this server stack."""
    port = free_port()
    ceiling = ServerProcess("ceiling", [sys.executable, "-m", "perf.ceiling", "--port",
                                        str(port), "--workers", "1"], run_dir / "ceiling.log")
    try:
        wait_for_http(f"http://127.0.0.1:{port}/readyz", 30.0, 201, ceiling)
        result = wrk_votes(f"http://127.0.0.1:{port}", ceiling.pid,
                           run_dir / "tokens-forged.txt", "cpu-forged", args.class_s,
                           CPU_CONNECTIONS, "spread", wrk_path)
    finally:
        ceiling.stop()
    print(f"  {'http-floor':14} {result['statuses']} in {result['duration_s']:.1f}s, "
          f"server {result['server_cpu_us_per_answer']} us CPU per answer (perf/ceiling.py)",
          flush=True)
    return result


def run(args: argparse.Namespace, run_dir: Path) -> tuple[dict, list[str]]:
    cluster = RedisClusterUnderTest(run_dir, args.stack_base_port)
    engine = None
    try:
        print(f"  Redis Cluster on {cluster.url} (state in {run_dir / 'redis-cluster'})",
              flush=True)
        cluster.up()
        minter = Minter(run_dir / "keys-data")
        engine = EngineUnderTest("defended", run_dir, run_dir / "keys-data" / "keys", cluster.url)
        engine.create_poll(minter.admin_token, POLL, ["a", "b"])
        plan = make_plan(args, minter)
        print(f"== mixed phase: {args.window_s:g} s, honest {len(plan.honest)} at "
              f"{args.honest_per_s:g}/s, {len(plan.stolen)} stolen tokens x "
              f"{plan.replays_per_token}, {len(plan.forged)} forged, {len(plan.reused)} "
              f"reused x {plan.votes_per_reused_token}, flood of {len(plan.flood)} from "
              f"{FLOOD_PREFIX}.0/24, {len(plan.pow_tokens)} PoW bots", flush=True)
        mixed = asyncio.run(run_mixed(engine.port, POLL, plan))
        results = engine.settled_results(POLL)
        failures = mixed.ledger.integrity_failures(int(results.get("total", -1)))
        print("== CPU per request class, each alone (wrk, "
              f"{CPU_CONNECTIONS} connections, {args.class_s:g} s)", flush=True)
        cpu = cpu_classes(args, engine, minter, run_dir, ensure_wrk())
        document = result_document(args, mixed, results, cpu, failures,
                                   engine.metric_total("vote_ratelimit_fail_open_total"))
        document["redis_cluster"] = {"url": cluster.url, "up_s": cluster.up_s}
        return document, failures
    finally:
        if engine is not None:
            engine.stop()
        cluster.down()


def result_document(args, mixed: MixedResult, results: dict, cpu: dict, failures: list[str],
                    fail_open: float) -> dict:
    from engine.config import Config

    config = Config()
    ledger = mixed.ledger
    bots = {bot: {"sent": ledger.sent[bot], "accepted": ledger.accepted(bot),
                  "statuses": {str(k): v for k, v in sorted(counts.items())}}
            for bot, counts in sorted(ledger.statuses.items())}
    pow_bot = mixed.pow
    pow_built = bool(pow_bot and pow_bot.challenges) or mixed.challenge_endpoint_status == 200
    return {
        "mixed": {"window_s": args.window_s, "elapsed_s": mixed.elapsed_s, "bots": bots,
                  "honest_send_lag_ms_max": round(mixed.honest_send_lag_ms_max, 1),
                  "tokens_accepted_max": max(ledger.accepted_by_token.values(), default=0),
                  "results_total": results.get("total"), "rejected": results.get("rejected"),
                  "unanswered": ledger.unanswered(), "fail_open": fail_open,
                  "honest_challenges": mixed.honest_pow.challenges,
                  "honest_challenges_solved": mixed.honest_pow.solved},
        "pow": {"built": pow_built, "challenge_endpoint_status": mixed.challenge_endpoint_status,
                "budget_s": args.pow_budget_s,
                **({k: getattr(pow_bot, k) for k in ("challenges", "solved", "unsolved",
                                                     "solve_s", "hashes")} if pow_bot else {})},
        "limits": {"prefix_per_s": config.ratelimit_prefix_per_s,
                   "prefix_burst": config.ratelimit_prefix_burst,
                   "address_per_s": config.ratelimit_address_per_s,
                   "address_burst": config.ratelimit_address_burst,
                   "voter_per_s": config.ratelimit_voter_per_s,
                   "voter_burst": config.ratelimit_voter_burst, "workers": 1},
        "cpu_classes": cpu,
        "cpu_ratios": cpu_ratios(cpu),
        "integrity": {"failures": failures},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    conditions = describe_machine(("redis",))
    parameters = {key: (str(value) if isinstance(value, Path) else value)
                  for key, value in vars(args).items()}
    parameters["engine"] = ("votes serve, default config (32 shards in 4 groups), 1 worker, "
                            "trusted_proxies=127.0.0.1/32, ratelimit_exempt_networks='', "
                            "global limits on a private 3-master Redis Cluster")
    parameters["addresses"] = (f"X-Forwarded-For: honest 198.18.0.0/15, replay and forgery "
                               f"{ROAMING_NETWORK}, flood {FLOOD_PREFIX}.0/24")
    print_conditions(conditions, parameters)
    run_dir = args.data_root / f"attack-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        document, failures = run(args, run_dir)
    except BenchError as error:
        print(f"!! {error}\n  (logs kept in {run_dir})", file=sys.stderr)
        return 1
    if failures:
        print(f"  logs kept in {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    document = {"benchmark": "attack", "conditions": conditions, "parameters": parameters,
                **document}
    document["targets"] = attack_targets(document)
    print_report(document)
    write_json(args.out, document)
    print(f"  wrote {args.out}")
    for failure in failures:
        print(f"  INTEGRITY FAILURE {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
