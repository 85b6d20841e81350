"""One peer through every scenario: warm-up, then each scenario with its checks.

Every peer starts with fresh state and the first voters of the token pool (all peers see
the same tokens). A stateful peer's results total is read, settled, before and after each
run for the integrity cross-check (perf/integrity.py); a scenario that fails is recorded
with the server's log tail and the peer goes on with the next one.
"""

from __future__ import annotations

import math
import subprocess
import time
from dataclasses import replace

from perf import BenchError
from perf.closed_loop import run_closed
from perf.integrity import cross_check, repeat_check
from perf.open_loop import run_open
from perf.peer_api import commit_counters, create_poll, settled_total, wal_commits
from perf.peer_servers import Harness, RunningPeer
from perf.report import print_scenario_line
from perf.scenarios import ENGINES, PEERS, Scenario

# The least rate a token file is sized for, votes/s: a warm-up that barely ran still
# leaves the next file enough voters.
RATE_BOUND_MIN_PER_S = 200.0


def closed_tokens_needed(h: Harness, rate_per_s: float, duration_s: float, connections: int) -> int:
    return min(h.args.tokens_max, math.ceil(3 * rate_per_s * duration_s) + 4 * connections)


def kafka_connection_counts(args) -> list[int]:
    try:
        counts = [int(count) for count in args.kafka_connections.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise BenchError(f"--kafka-connections {args.kafka_connections!r}: give positive "
                         "integers separated by commas, or 0")
    return counts


def scenario_polls(h: Harness, peer: RunningPeer, scenario: Scenario) -> list[str]:
    """The polls a scenario votes in, created first when they are its own."""
    if scenario.polls > 1:
        polls = [f"{scenario.name}-{index:02d}" for index in range(scenario.polls)]
        for poll in polls:
            create_poll(peer, poll, h.set.options, h.admin_token)
        return polls
    if scenario.new_poll:
        create_poll(peer, scenario.name, h.set.options, h.admin_token)
        return [scenario.name]
    return ["bench"]


def counted_total(h: Harness, peer: RunningPeer, polls: list[str]) -> int | None:
    """The peer's settled results total over ``polls``; None for a stateless peer."""
    if not PEERS[peer.name].stateful:
        return None
    return settled_total(peer, polls, h.admin_token, h.args.settle_timeout_s)


def paced_rate(scenario: Scenario, state: dict) -> float | None:
    if not scenario.paced_fraction_of_max:
        return None
    if "max_rate" not in state:
        raise BenchError(f"{scenario.name}: no closed_max rate for this peer")
    return max(scenario.paced_fraction_of_max * state["max_rate"], 1.0)


def run_wrk_scenario(h: Harness, peer: RunningPeer, scenario: Scenario, state: dict,
                     polls: list[str], connections: int) -> tuple[dict, int | None]:  # fmt: skip
    """A closed-loop scenario, once more with twice the tokens if wrk ran out; (run, counted)."""
    rate_per_s = paced_rate(scenario, state)
    count = closed_tokens_needed(h, rate_per_s or state.get("rate_bound", 0.0),
                                 scenario.duration_s, connections)  # fmt: skip
    for _attempt in range(2):
        repeats: list[int] = []
        if scenario.repeat_share:
            tokens, repeats = h.pool.take_with_repeats(
                count, scenario.repeat_share, h.set.repeat_gap, h.args.seed, scenario.name)  # fmt: skip
        else:
            tokens = h.pool.take(count, scenario.name)
        before = counted_total(h, peer, polls)
        run = run_closed(h, peer, tokens, scenario.duration_s, polls, connections,
                         rate_per_s=rate_per_s)  # fmt: skip
        after = counted_total(h, peer, polls)
        if not h.args.keep_data:
            tokens.unlink()
        if not run["exhausted"] or count >= h.args.tokens_max:
            break
        print(f"  {scenario.name}: ran out of {count} tokens; once more with twice as many", flush=True)
        count = min(h.args.tokens_max, 2 * count)
    if run["exhausted"]:
        raise BenchError(f"{scenario.name}: wrk ran out of tokens ({count}); raise --tokens-max")
    if scenario.repeat_share:
        # One wrk thread sends the file's lines in order: the repeats among the lines
        # it sent are the 409s to expect (a few fewer if some were still in flight).
        sent = run["votes_sent"]
        run["repeat_share_planned"] = scenario.repeat_share
        run["repeats_sent"] = sum(1 for position in repeats if position < sent)
        run["repeat_gap"] = h.set.repeat_gap
        run["repeat_check"] = repeat_check(run["statuses"].get("409", 0), run["repeats_sent"],
                                           sent, run["created"])  # fmt: skip
    return run, None if before is None else after - before


def run_open_scenario(h: Harness, peer: RunningPeer, scenario: Scenario, state: dict,
                      polls: list[str], connections: int) -> tuple[dict, int | None]:  # fmt: skip
    """An open-loop scenario at the profile's rates; (run, votes counted)."""
    segments = []
    for segment in scenario.profile:
        rate = segment.get("rate_per_s")
        if rate is None:
            if "max_rate" not in state:
                raise BenchError(f"{scenario.name}: no closed_max rate for this peer")
            rate = segment["fraction_of_max"] * state["max_rate"]
        # Rounded as run_open passes it to loadgen (3 decimals), so the token count here
        # is the request count loadgen schedules from the same rate.
        segments.append((segment["duration_s"], round(max(rate, 1.0), 3)))
    tokens = h.pool.take(sum(round(d * r) for d, r in segments), scenario.name)
    before = counted_total(h, peer, polls)
    run = run_open(h, peer, tokens, segments, polls, connections)
    after = counted_total(h, peer, polls)
    if not h.args.keep_data:
        tokens.unlink()
    return run, None if before is None else after - before


def run_scenario(h: Harness, peer: RunningPeer, scenario: Scenario, state: dict) -> dict:
    connections = scenario.connections or h.set.connections
    if peer.name == "kafka" and scenario.connections is None and h.args.kafka_connections != "0":
        # The first count: at 2048 the open-loop runs once answered half their schedule and
        # left requests unanswered past the drain (docs/performance.md).
        connections = kafka_connection_counts(h.args)[0]
    polls = scenario_polls(h, peer, scenario)
    run_kind = run_wrk_scenario if scenario.generator == "wrk" else run_open_scenario
    wants_commits = h.args.wal_commits and peer.name in ENGINES
    commits_before = commit_counters(peer.base_url) if wants_commits else None
    run, counted = run_kind(h, peer, scenario, state, polls, connections)
    document: dict = {"title": scenario.title, "polls": len(polls), **run}
    if wants_commits:
        # wrk names a run's length duration_s, the open loop wall_s.
        length_s = document.get("duration_s") or document.get("wall_s") or 0.0
        document["wal_commits"] = wal_commits(commits_before, commit_counters(peer.base_url),
                                              length_s)
    document["cross_check"] = cross_check(document["created"], counted, document["in_flight_at_end"])
    if document["created"] == 0:
        raise BenchError(f"{scenario.name}: no 201 at all: statuses {document['statuses']}, "
                         f"first bodies {document.get('bodies_not_created') or document.get('samples')}")  # fmt: skip
    return document


def run_best_of_connections(h: Harness, peer: RunningPeer, scenario: Scenario, state: dict) -> dict:
    """The scenario at each of its connections_tried (one run each, each cross-checked), the
    best by 201/s kept, with every count's rate beside it. The kafka peer tries its own
    counts (--kafka-connections)."""
    tried = scenario.connections_tried if scenario.generator == "wrk" else []
    if peer.name == "kafka" and tried:
        tried = kafka_connection_counts(h.args) if h.args.kafka_connections != "0" else tried
    if len(tried) < 2:
        return run_scenario(h, peer, scenario, state)
    results = {}
    for connections in tried:
        results[connections] = run_scenario(h, peer, replace(scenario, connections=connections), state)
        print(f"  {scenario.name} at {connections} connections: "
              f"{results[connections]['created_per_s']:,.0f} 201/s", flush=True)
    best = max(results.values(), key=lambda result: result["created_per_s"])
    best["connections_tried"] = {str(count): result["created_per_s"] for count, result in results.items()}
    # The kept run must not hide a sibling whose counts did not add up.
    for connections, result in results.items():
        if result is not best and result.get("cross_check") and not result["cross_check"]["ok"]:
            best["cross_check"] = {**result["cross_check"], "at_connections": connections}
    return best


def warm_up(h: Harness, peer: RunningPeer, ceiling_rate: float | None) -> tuple[float, float]:
    """Closed loop on fresh voters, not measured; (its 201/s, the bound for token files)."""
    bound = ceiling_rate if ceiling_rate else h.args.ceiling_rate_max
    connections = h.set.connections
    if peer.name == "kafka" and h.args.kafka_connections != "0":
        connections = kafka_connection_counts(h.args)[0]
    warmup_s = h.set.warmup_s
    if peer.name == "kafka":
        # Three fresh JVMs interpret and JIT-compile for their first minute or so: on a
        # new stack the engine went 6.2k -> 10.5k -> 14.5k votes/s over three 14 s runs
        # (docs/performance.md). Production brokers run warm.
        warmup_s = max(warmup_s, h.args.kafka_warmup_s)
    warm_tokens = h.pool.take(closed_tokens_needed(h, bound, warmup_s, connections), "warmup")
    warm = run_closed(h, peer, warm_tokens, warmup_s, ["bench"], connections, measure=False)
    if not h.args.keep_data:
        warm_tokens.unlink()
    print(f"  warm-up: {warm['created_per_s']:,.0f} 201/s", flush=True)
    return warm["created_per_s"], bound


def run_scenarios(h: Harness, peer: RunningPeer, document: dict, bound: float, state: dict) -> None:
    """Every scenario that applies to the peer, into ``document``; failures recorded."""
    for scenario in h.set.scenarios:
        if not scenario.applies_to(peer.name):
            continue
        started = time.monotonic()
        try:
            result = run_best_of_connections(h, peer, scenario, state)
        except (BenchError, subprocess.TimeoutExpired, OSError) as error:
            print(f"  !! {scenario.name} failed: {error}", flush=True)
            document["errors"][scenario.name] = f"{error}\n{peer.server.log_tail(15)}"
            continue
        document["scenarios"][scenario.name] = result
        if scenario.name == "closed_max":
            state["max_rate"] = result["created_per_s"]
            state["rate_bound"] = min(bound, max(result["created_per_s"], RATE_BOUND_MIN_PER_S))
        print_scenario_line(scenario.name, result, time.monotonic() - started)
        if peer.server.proc.poll() is not None:
            raise BenchError(f"{peer.name} exited with {peer.server.proc.returncode}\n"
                             f"{peer.server.log_tail()}")  # fmt: skip


def run_peer(h: Harness, name: str, ceiling_rate: float | None) -> dict:
    kind = PEERS[name]
    print(f"\n== {name}: {kind.label} ({kind.durability})", flush=True)
    h.pool.rewind()
    peer = h.start(name)
    document: dict = {"peer": name, "label": kind.label, "durability": kind.durability,
                      "info": peer.info, "scenarios": {}, "errors": {}}  # fmt: skip
    try:
        if kind.stateful:
            create_poll(peer, "bench", h.set.options, h.admin_token)
        warm_rate, bound = warm_up(h, peer, ceiling_rate)
        document["warmup_created_per_s"] = warm_rate
        state = {"rate_bound": min(bound, max(warm_rate, RATE_BOUND_MIN_PER_S))}
        run_scenarios(h, peer, document, bound, state)
    finally:
        # The kafka peer's stack stays up for its sweep: bench_peers.run_rounds stops it.
        peer.stop()
    return document
