"""RAM per eligible voter of a poll, and the latency of a repeat vote's receipt lookup.

Issue 10's targets: at 10 million eligible voters and 50 % turnout, in one process, RSS
growth <= 4 bits per eligible voter per poll (bitmap + receipt locator + everything else),
and a 409 under 1,000 repeats/s answering within p99 20 ms.

1. Memory. One process holds the default layout's 32 shards in its fencing groups
   (ShardState each, receipt locator runs in a temporary data dir, `locator_run_entries`
   from engine.config), one poll of `--voters` eligible voters, and applies `--turnout` of
   them (random, distinct) through the real apply path (shards/recovery.apply_record of
   VoteBatch records, `--cycle-votes` votes per commit cycle cut, as the engine cuts them,
   into one record per fencing group holding a vote group per shard of the group), every
   record appended to a real embedded log (SegmentLog, one append and fsync per cycle for
   all the cycle's group records; the engine appends each to its own group's log). RSS (/proc/self/statm) is read
   before the first vote and after the last, once the locator's run writes and merges are
   done; growth per eligible voter is split into bitmap (roaring serialized size, close to
   its in-memory size), locator (open runs, runs not yet written, fences) and other.
   The paged locator this replaced cost 8 bytes per voter index in pages of 4096 where votes
   fell: at 50 % random turnout every page, 64 bits per eligible voter (printed beside it).
2. Receipt lookups. `--lookup-rate` lookups/s for `--lookup-s` seconds of random voters who
   voted, each through the real 409 lookup: ShardState.record_of_voter (open run, then run
   files: one pread of a 12 KiB block) and EmbeddedWal.read_at of the record (a thread hop,
   as in the engine), then decoding it and finding the voter in its shard's vote group.
   Latency is taken from each lookup's scheduled start (open loop: a slow lookup delays the
   next, and that counts).
   The run files and the log were just written: they are read from the page cache.

    python -m perf.bench_memory [--voters 10000000] [--turnout 0.5]

Writes perf/results/memory.json.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from engine.config import Config
from perf import RESULTS_DIR
from perf.machine import describe_machine
from perf.output import print_conditions, write_json
from shards.backends import shard_directory
from shards.records import PollCreated, VoteBatch, VoteGroup, decode_record, frame_record
from shards.recovery import apply_record
from shards.segment_log import SegmentLog
from shards.state import ShardState
from shards.wal import EmbeddedWal

BITS_PER_VOTER_TARGET = 4.0
LOOKUP_P99_MS_TARGET = 20.0
PAGED_LOCATOR_BITS_PER_VOTER = 64.0  # main before this change: 8 B per voter index
POLL = "bench"
# A multiplier coprime with every voter count used here (a prime above them): voter
# (MULTIPLIER * k + OFFSET) mod voters is a permutation of the voters, so the first
# turnout * voters values of k are random-looking distinct voters, without a list of them.
MULTIPLIER = 2_654_435_761
OFFSET = 12_345


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def voter_of(k: int, voters: int) -> int:
    return (MULTIPLIER * k + OFFSET) % voters


def cycle_records(shards: int, groups: int, batch_seqs: list[int],
                  voter_ids: array.array) -> list[VoteBatch]:
    """One commit cycle as the engine plans it (shards/planning.py): a vote batch per fencing
    group with votes, holding one vote group per shard of the group (shard s is in group
    s mod groups), in the order the shards' first votes arrived; each batch takes the next
    number of its group's batch_seq sequence (`batch_seqs`, advanced here)."""
    per_group: list[dict[int, array.array]] = [{} for _ in range(groups)]
    for voter_id in voter_ids:
        shard = voter_id % shards
        indexes = per_group[shard % groups].get(shard)
        if indexes is None:
            indexes = per_group[shard % groups][shard] = array.array("I")
        indexes.append(voter_id // shards)
    records = []
    for group, by_shard in enumerate(per_group):
        if by_shard:
            vote_groups = [VoteGroup(shard, POLL, indexes.tobytes(),
                                     array.array("H", [index & 1 for index in indexes]).tobytes())
                           for shard, indexes in by_shard.items()]
            records.append(VoteBatch(group=group, batch_seq=batch_seqs[group], time_ms=0,
                                     groups=vote_groups, batch_position=0, batch_nodes=[],
                                     signature=b"", key_id=""))
            batch_seqs[group] += 1
    return records


def apply_votes(states: list[ShardState], groups: int, log: SegmentLog, voters: int,
                votes: int, cycle_votes: int) -> float:
    """Every cycle's group batches in one append of the log (the engine appends each to
    its group's log), each applied to its group's shards as a group owner does
    (shards/recovery.apply_record: the batch cut by shard)."""
    started_s = time.perf_counter()
    shards = len(states)
    states_of = [{shard: states[shard] for shard in range(group, shards, groups)}
                 for group in range(groups)]
    batch_seqs = [0] * groups
    for first in range(0, votes, cycle_votes):
        voter_ids = array.array("Q", [voter_of(k, voters) for k in range(first, min(first + cycle_votes, votes))])
        records = cycle_records(shards, groups, batch_seqs, voter_ids)
        framed = [frame_record(record) for record in records]
        offset = log.append(b"".join(framed))
        for record, frame in zip(records, framed, strict=True):
            apply_record(states_of[record.group], record.group, offset, offset + len(frame),
                         record)
            offset += len(frame)
    for state in states:
        state.polls[POLL].locator.wait_idle()
    return time.perf_counter() - started_s


async def lookup_latencies(states: list[ShardState], wal: EmbeddedWal, voters: int, votes: int,
                           rate: float, duration_s: float, seed: int) -> list[float]:
    chooser = random.Random(seed)
    shards = len(states)
    latencies_ms = []
    interval_s = 1.0 / rate
    start_s = time.perf_counter()
    for number in range(int(rate * duration_s)):
        scheduled_s = start_s + number * interval_s
        delay_s = scheduled_s - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        voter_id = voter_of(chooser.randrange(votes), voters)
        state = states[voter_id % shards]
        voter_index = voter_id // shards
        offset = state.record_of_voter(state.polls[POLL], voter_index)
        if offset is None:
            raise SystemExit(f"voter {voter_id} voted but the locator has no record for it")
        batch = decode_record(await wal.read_at(offset))
        if not isinstance(batch, VoteBatch) or not any(
                group.shard == state.shard and voter_index in array.array("I", group.voters)
                for group in batch.groups):
            raise SystemExit(f"the record at {offset} does not hold voter {voter_id}")
        latencies_ms.append((time.perf_counter() - scheduled_s) * 1000)
    return latencies_ms


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--voters", type=int, default=10_000_000)
    parser.add_argument("--turnout", type=float, default=0.5)
    parser.add_argument("--cycle-votes", type=int, default=4096)
    parser.add_argument("--lookup-rate", type=float, default=1000.0)
    parser.add_argument("--lookup-s", type=float, default=5.0)
    parser.add_argument("--run-entries", type=int, default=Config().locator_run_entries,
                        help="locator_run_entries (default: engine.config's)")
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the log and locator runs go (default: a temporary dir)")
    arguments = parser.parse_args(argv)
    if MULTIPLIER % arguments.voters == 0 or arguments.voters > MULTIPLIER:
        raise SystemExit("--voters must be below and coprime with the multiplier")
    return arguments


def new_shards(config: Config, data_path: Path) -> tuple[list[ShardState], SegmentLog]:
    """The layout's shards with the poll created, their locator runs under data_path, and the
    group's log (its first record before the measured votes)."""
    created = PollCreated(poll=POLL, options=["odd", "even"], opens_at_ms=None,
                          closes_at_ms=None, embargo=False, created_ms=0)
    states = []
    for shard in range(config.shards):
        state = ShardState(shard, config.shards, config.locator_run_entries)
        state.attach_locator_fresh(shard_directory(data_path, shard) / "locator",
                                   config.locator_run_entries)
        state.apply(0, 1, created)
        states.append(state)
    log = SegmentLog(data_path / "wal", config.segment_bytes_max)
    log.try_lock()
    log.recover()
    log.append(frame_record(created))
    return states, log


def measure(arguments: argparse.Namespace, config: Config) -> dict:
    voters = arguments.voters
    votes = int(voters * arguments.turnout)
    with tempfile.TemporaryDirectory(dir=arguments.data_dir) as directory:
        data_path = Path(directory)
        states, log = new_shards(config, data_path)
        rss_before = rss_bytes()
        apply_s = apply_votes(states, config.groups, log, voters, votes, arguments.cycle_votes)
        rss_after = rss_bytes()
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        polls = [state.polls[POLL] for state in states]
        counted = sum(len(poll.voters) for poll in polls)
        if counted != votes:
            raise SystemExit(f"{counted} votes counted of {votes} applied")
        results = {
            "votes": votes, "apply_s": apply_s, "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after, "peak_rss_bytes": peak_rss,
            "growth_bits_per_voter": 8 * (rss_after - rss_before) / voters,
            "peak_growth_bits_per_voter": 8 * (peak_rss - rss_before) / voters,
            "bitmap_bits_per_voter": 8 * sum(len(poll.voters.serialize()) for poll in polls) / voters,
            "locator_bits_per_voter": 8 * sum(poll.locator.nbytes_ram for poll in polls) / voters,
            "paged_locator_bits_per_voter": PAGED_LOCATOR_BITS_PER_VOTER,
            "run_files_bytes": sum(path.stat().st_size
                                   for path in data_path.glob("shards/*/locator/*/run-*.bin")),
            "runs_per_shard": [min(len(poll.locator.runs) for poll in polls),
                               max(len(poll.locator.runs) for poll in polls)],
        }
        latencies_ms = asyncio.run(lookup_latencies(
            states, EmbeddedWal(log), voters, votes, arguments.lookup_rate, arguments.lookup_s,
            arguments.seed))
        log.close()
    results.update(lookups=len(latencies_ms), lookup_p50_ms=percentile(latencies_ms, 0.5),
                   lookup_p99_ms=percentile(latencies_ms, 0.99), lookup_max_ms=max(latencies_ms),
                   lookup_mean_ms=statistics.fmean(latencies_ms))
    results["memory_pass"] = results["growth_bits_per_voter"] <= BITS_PER_VOTER_TARGET
    results["lookup_pass"] = results["lookup_p99_ms"] <= LOOKUP_P99_MS_TARGET
    return results


def report(results: dict, arguments: argparse.Namespace, config: Config) -> None:
    r = results
    votes = r["votes"]
    other_bits = r["growth_bits_per_voter"] - r["bitmap_bits_per_voter"] - r["locator_bits_per_voter"]
    print(f"applied {votes:,} votes to {config.shards} shards in {config.groups} fencing groups "
          f"(a batch per group per cycle) in {r['apply_s']:.1f} s "
          f"({votes / r['apply_s']:,.0f} votes/s incl. log appends and run writes)")
    print(f"RSS {r['rss_before_bytes'] / 2**20:.1f} -> {r['rss_after_bytes'] / 2**20:.1f} MiB; "
          f"the highest RSS while applying, {r['peak_rss_bytes'] / 2**20:.1f} MiB, is "
          f"{r['peak_growth_bits_per_voter']:.2f} bits per eligible voter above the start "
          f"(transient: runs waiting for their file, merges)")
    print(f"per eligible voter: {r['growth_bits_per_voter']:.2f} bits of RSS growth = bitmap "
          f"{r['bitmap_bits_per_voter']:.2f} + locator in RAM {r['locator_bits_per_voter']:.2f} "
          f"+ other {other_bits:.2f}  (target <= {BITS_PER_VOTER_TARGET:g}): "
          f"{'PASS' if r['memory_pass'] else 'FAIL'}")
    print(f"  the paged locator it replaces: {PAGED_LOCATOR_BITS_PER_VOTER:g} bits per eligible "
          f"voter for the locator alone; run files on disk: {r['run_files_bytes'] / 2**20:.1f} "
          f"MiB ({8 * r['run_files_bytes'] / votes:.1f} bits per counted vote), runs per shard "
          f"{r['runs_per_shard'][0]}..{r['runs_per_shard'][1]}")
    print(f"receipt lookups: {r['lookups']} at {arguments.lookup_rate:g}/s, p50 "
          f"{r['lookup_p50_ms']:.3f} ms, p99 {r['lookup_p99_ms']:.3f} ms, max "
          f"{r['lookup_max_ms']:.3f} ms, mean {r['lookup_mean_ms']:.3f} ms (target p99 <= "
          f"{LOOKUP_P99_MS_TARGET:g} ms): {'PASS' if r['lookup_pass'] else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    config = Config(locator_run_entries=arguments.run_entries).validate()
    parameters = {"voters": arguments.voters, "turnout": arguments.turnout,
                  "shards": config.shards, "groups": config.groups,
                  "cycle_votes": arguments.cycle_votes,
                  "locator_run_entries": config.locator_run_entries,
                  "lookup_rate_per_s": arguments.lookup_rate, "lookup_s": arguments.lookup_s,
                  "seed": arguments.seed}
    conditions = describe_machine()
    print_conditions(conditions, parameters)
    results = measure(arguments, config)
    report(results, arguments, config)
    write_json(RESULTS_DIR / "memory.json",
               {"conditions": conditions, "parameters": parameters, "results": results,
                "targets": target_rows(results, arguments)})
    # A FAIL is reported (here and in perf/targets_report.py's table), not fatal, as every
    # target of `make bench` is; a broken measurement raises instead.
    return 0


def target_rows(results: dict, arguments: argparse.Namespace) -> list[dict]:
    """Issue 10's two rows in perf/targets_report.py's shape."""
    def verdict(passed: bool) -> str:
        return "PASS" if passed else "FAIL"

    return [
        {"target": "memory_bits_per_voter",
         "description": f"RSS growth per eligible voter per poll, {arguments.voters:,} voters, "
                        f"{arguments.turnout:.0%} turnout, one process",
         "threshold": BITS_PER_VOTER_TARGET, "sense": "<=",
         "measured": round(results["growth_bits_per_voter"], 2),
         "verdict": verdict(results["memory_pass"])},
        {"target": "repeat_receipt_p99_ms",
         "description": f"a repeat vote's original receipt (locator lookup + log read), "
                        f"{arguments.lookup_rate:g} repeats/s, p99",
         "threshold": LOOKUP_P99_MS_TARGET, "sense": "<=",
         "measured": round(results["lookup_p99_ms"], 3),
         "verdict": verdict(results["lookup_pass"])},
    ]


if __name__ == "__main__":
    sys.exit(main())
