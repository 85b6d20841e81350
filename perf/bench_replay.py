"""How fast the replay tool rebuilds a shard and recounts it (replay/, `votes replay`).

The scenario, on one shard of an embedded log (no HTTP, no services). The log is the one of
the shard's fencing group (`--shards` in `--groups`; DATA/groups/group-<gggg>/wal), starting
with the group's LogHeader; only `--shard` writes votes into it, so the figures are one
shard's, read through the group layout (a group's log is read once for all its shards, so a
group of n equally busy shards takes about n times as long, once):

1. A writer appends, with the engine's record encoder and segment log (shards/records.py,
   shards/segment_log.py), the header, a poll and `--voters` distinct voters of one shard in VoteBatch
   records of `--batch-votes` votes (each a batch of the shard's group holding one vote group,
   the shard's; voters in a scrambled order, options at random;
   signature fields zeroed: neither rebuild nor the recount checks them), `--records-per-append`
   records per fsync'd append. After `--snapshot-fraction` of the voters, `rebuild --from-wal`
   writes a snapshot there; then the rest is appended.
2. rebuild from the newest snapshot + the WAL tail (thaw, replay the tail, freeze, save).
3. rebuild from the WAL alone (--from-wal): the replay loop's votes/s through the fast path
   (decode_record + ShardState.apply -> the compiled apply_group) is figure (a).
4. verify's independent recount of the whole shard (own frame reader, untyped decoding,
   bulk BitMap counting), without and with the export hash chain, and verify itself (with
   its batch signature check off: the batches are unsigned).
Steps 2-4 run `--repeats` times (the chain once) and the fastest run is reported, since the
machine may be shared; every run's time is kept in the JSON.
The rebuilt snapshots and the recounts must agree exactly, else the bench fails.

Prints its conditions and figures and writes perf/results/replay.json (one case per voter
count and batch size). The log was just written, so it is read from the page cache.

    python -m perf.bench_replay [--voters 10000000] [--batch-votes 4096]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

from engine import fastpath
from engine.config import Config
from perf import PERF_DIR
from perf.machine import describe_machine
from perf.output import merged_results, print_conditions, write_json
from replay.rebuild import RebuildOptions, RebuildResult, rebuild
from replay.recount import recount_shard
from replay.verify import verify
from shards.backends import group_directory, shard_directory
from shards.records import PollCreated, VoteBatch, VoteGroup, encode_record, frame
from shards.recovery import log_header
from shards.segment_log import SegmentLog

POLL = "bench"
OPTIONS = ["a", "b", "c"]
CREATED_MS = 1_700_000_000_000
# Voter index of write position p: (p * SCRAMBLE_MULTIPLIER + SCRAMBLE_OFFSET) mod voters, a
# bijection of 0..voters-1 (the multiplier is a prime that must not divide --voters), so each
# batch holds voters spread over the whole range, as live traffic does.
SCRAMBLE_MULTIPLIER = 2_654_435_761
SCRAMBLE_OFFSET = 12_345


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--voters", type=int, default=10_000_000)
    parser.add_argument("--batch-votes", type=int, default=4096)
    parser.add_argument("--records-per-append", type=int, default=32)
    parser.add_argument("--snapshot-fraction", type=float, default=0.9)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--groups", type=int, default=0,
                        help="fencing groups (0: as the engine chooses for --shards)")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each measurement; the fastest is reported (others share "
                             "the machine)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the log is written (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=PERF_DIR / "results" / "replay.json")
    return parser.parse_args(argv)


class Writer:
    """Appends vote batches of voters first..last (in scrambled order) to the log of the
    shard's group, its LogHeader first when the log is new."""

    def __init__(self, config: Config, args: argparse.Namespace) -> None:
        self.args = args
        group = self.group = config.group_of(args.shard)
        self.log = SegmentLog(group_directory(config.data_path, group) / "wal",
                              config.segment_bytes_max)
        if not self.log.try_lock():
            raise RuntimeError("the bench's log is locked by another process")
        if self.log.recover() == 0:
            self.log.append(frame(encode_record(log_header(config, group))))
        self.rng = random.Random(args.seed)
        self.batch_seq = 0  # the group's batch sequence (only this shard's batches here)
        self.records = 0
        self.bytes = 0

    def append(self, payloads: list[bytes]) -> None:
        data = b"".join(frame(payload) for payload in payloads)
        self.log.append(data)
        self.records += len(payloads)
        self.bytes += len(data)

    def control(self, record) -> None:
        self.append([encode_record(record)])

    def votes(self, first: int, last: int) -> None:
        step, total = self.args.batch_votes, self.args.voters
        pending = []
        for start in range(first, last, step):
            end = min(start + step, last)
            voters = array.array("I", [(position * SCRAMBLE_MULTIPLIER + SCRAMBLE_OFFSET) % total
                                       for position in range(start, end)])
            options = array.array("H", self.rng.choices(range(len(OPTIONS)), k=end - start))
            pending.append(encode_record(VoteBatch(
                group=self.group, batch_seq=self.batch_seq, time_ms=CREATED_MS,
                groups=[VoteGroup(shard=self.args.shard, poll=POLL, voters=voters.tobytes(),
                                  options=options.tobytes())],
                batch_position=0, batch_nodes=[bytes(32)], signature=bytes(64), key_id="bench")))
            self.batch_seq += 1
            if len(pending) >= self.args.records_per_append:
                self.append(pending)
                pending = []
        if pending:
            self.append(pending)

    def close(self) -> None:
        self.log.close()


def check_coprime(voters: int) -> None:
    import math

    if math.gcd(SCRAMBLE_MULTIPLIER, voters) != 1:
        raise SystemExit(f"--voters {voters} shares a factor with the scramble multiplier; "
                         "pick another count")


async def rebuild_once(config: Config, shard: int, from_wal: bool) -> tuple[RebuildResult, float]:
    results: list[RebuildResult] = []
    started = time.perf_counter()
    await rebuild(config, [shard], RebuildOptions(from_wal=from_wal, restart=True,
                                                  checkpoint_interval_s=3600,
                                                  checkpoint_records=10**9),
                  lambda _: (lambda votes: None), results.append)
    return results[0], time.perf_counter() - started


def describe_rebuild(result: RebuildResult, wall_s: float) -> dict:
    return {"records": result.records, "votes": result.votes, "replay_s": round(result.seconds, 4),
            "replay_votes_per_s": round(result.votes_per_s), "wall_s": round(wall_s, 4),
            "wall_votes_per_s": round(result.votes / wall_s) if wall_s else None,
            "started_from": result.started_from, "snapshot_bytes": result.snapshot_bytes}


async def timed_recount(config: Config, shard: int, chain: bool) -> dict:
    started = time.perf_counter()
    result = await recount_shard(config, shard, chain=chain)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 4), "votes": result.votes_seen,
            "votes_per_s": round(result.votes_seen / seconds), "records": result.records,
            "counts": result.polls[POLL].counts}


def write_until_cut(config: Config, args: argparse.Namespace, cut: int) -> int:
    """The poll and the votes of voters [0, cut) into the WAL; returns the next batch seq."""
    writer = Writer(config, args)
    started = time.perf_counter()
    try:
        writer.control(PollCreated(poll=POLL, options=OPTIONS, opens_at_ms=None,
                                   closes_at_ms=None, embargo=False, created_ms=CREATED_MS))
        writer.votes(0, cut)
        batch_seq_next = writer.batch_seq
    finally:
        writer.close()
    write_s = time.perf_counter() - started
    print(f"== wrote {writer.records:,} records ({writer.bytes:,} bytes) for {cut:,} voters "
          f"in {write_s:.1f} s; snapshot at {cut:,} voters ...", flush=True)
    return batch_seq_next


async def run(args: argparse.Namespace, work_dir: Path) -> dict:
    config = Config(data_dir=str(work_dir), shards=args.shards, groups=args.groups).validate()
    check_coprime(args.voters)
    cut = int(args.voters * args.snapshot_fraction)
    batch_seq_next = write_until_cut(config, args, cut)
    first_snapshot, _ = await rebuild_once(config, args.shard, from_wal=True)
    writer = Writer(config, args)
    writer.batch_seq = batch_seq_next
    try:
        writer.votes(cut, args.voters)
        tail_records = writer.records
    finally:
        writer.close()
    print(f"== appended {tail_records:,} records after the snapshot", flush=True)

    snapshots = shard_directory(config.data_path, args.shard) / "snapshots"
    first_snapshots = {path.name: path.read_bytes() for path in snapshots.iterdir()}
    runs: dict[str, list] = {"snapshot_plus_wal": [], "wal_only": [], "recount": [],
                             "recount_with_chain": []}
    for _ in range(args.repeats):
        # Each run from the snapshot starts from the one taken at the cut.
        for path in snapshots.iterdir():
            path.unlink()
        for name, data in first_snapshots.items():
            (snapshots / name).write_bytes(data)
        runs["snapshot_plus_wal"].append(await rebuild_once(config, args.shard, from_wal=False))
        runs["wal_only"].append(await rebuild_once(config, args.shard, from_wal=True))
        runs["recount"].append(await timed_recount(config, args.shard, chain=False))
    runs["recount_with_chain"].append(await timed_recount(config, args.shard, chain=True))
    snapshot_plus_wal, snapshot_wall_s = min(runs["snapshot_plus_wal"], key=lambda run: run[1])
    wal_only, wal_wall_s = min(runs["wal_only"], key=lambda run: run[0].seconds)
    recount_plain = min(runs["recount"], key=lambda run: run["seconds"])
    recount_chain = runs["recount_with_chain"][0]
    started = time.perf_counter()
    # The writer zeroes the signature fields (step 1), so verify's signature check is off:
    # this figure is the recount's, not the Ed25519 checks'.
    report = await verify(config, [args.shard], check_signatures=False)
    verify_s = time.perf_counter() - started
    expected = wal_only.polls[POLL]
    if not report.ok or snapshot_plus_wal.polls[POLL] != expected or \
            recount_plain["counts"] != expected or recount_chain["counts"] != expected:
        raise SystemExit(f"results differ: rebuild {expected}, rebuild from snapshot "
                         f"{snapshot_plus_wal.polls[POLL]}, recount {recount_plain['counts']}, "
                         f"verify ok={report.ok} {report.differences[:3]}")
    if sum(expected.values()) != args.voters:
        raise SystemExit(f"counted {sum(expected.values())} votes, wrote {args.voters}")
    return {
        "log": {"records": first_snapshot.records + tail_records,
                "records_after_snapshot": tail_records, "end_offset": wal_only.end_offset,
                "snapshot_offset": snapshot_plus_wal.start_offset},
        "rebuild_snapshot_plus_wal": describe_rebuild(snapshot_plus_wal, snapshot_wall_s),
        "rebuild_wal_only": describe_rebuild(wal_only, wal_wall_s),
        "repeats": args.repeats,
        "all_runs_s": {
            "rebuild_snapshot_plus_wal_wall": [round(run[1], 4) for run in runs["snapshot_plus_wal"]],
            "rebuild_wal_only_replay": [round(run[0].seconds, 4) for run in runs["wal_only"]],
            "recount": [run["seconds"] for run in runs["recount"]]},
        "recount": {key: value for key, value in recount_plain.items() if key != "counts"},
        "recount_with_chain": {key: value for key, value in recount_chain.items()
                               if key != "counts"},
        "verify_s": round(verify_s, 4),
        "counts": expected,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    conditions = describe_machine(extra_packages=("pyroaring", "cython"))
    conditions["fastpath"] = fastpath.IMPLEMENTATION
    conditions["batch_votes"] = args.batch_votes
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as temporary:
        work_dir = args.work_dir or Path(temporary)
        conditions["wal_directory"] = str(work_dir)
        print_conditions(conditions, {key: str(value) for key, value in vars(args).items()})
        result = asyncio.run(run(args, work_dir))
    plus, alone = result["rebuild_snapshot_plus_wal"], result["rebuild_wal_only"]
    print("== results")
    print(f"  shard                       {args.voters:,} voters, {result['log']['records']:,} "
          f"records, snapshot at offset {result['log']['snapshot_offset']:,}")
    print(f"  (a) rebuild replay rate     {alone['replay_votes_per_s']:,} votes/s "
          f"({alone['votes']:,} votes in {alone['replay_s']:.3f} s, fast path: "
          f"{fastpath.IMPLEMENTATION})")
    print(f"  (b) rebuild, WAL alone      {alone['wall_s']:.3f} s wall (replay "
          f"{alone['replay_s']:.3f} s + freeze and save of {alone['snapshot_bytes']:,} bytes)")
    print(f"  (b) rebuild, snapshot+tail  {plus['wall_s']:.3f} s wall (load snapshot, replay "
          f"{plus['votes']:,} votes in {plus['replay_s']:.3f} s, freeze and save)")
    print(f"  (c) verify recount rate     {result['recount']['votes_per_s']:,} votes/s "
          f"({result['recount']['seconds']:.3f} s); with the export chain "
          f"{result['recount_with_chain']['votes_per_s']:,} votes/s; verify "
          f"{result['verify_s']:.3f} s")
    case = {"conditions": conditions, "parameters": {key: str(value) for key, value
                                                     in vars(args).items()}, **result}
    write_json(args.out, merged_results(args.out, "replay", f"{args.voters}-{args.batch_votes}", case))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
