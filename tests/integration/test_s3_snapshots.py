"""Proves that shard snapshots in S3 (shards/s3_snapshots.py, against the stack's SeaweedFS)
thaw to exactly the state they froze (polls, bitmaps, tallies, locators, a closed poll), that
the store keeps exactly `snapshots_kept` objects, that a corrupted or missing newest object
makes loading fall back to the previous snapshot, that a failure between the object upload
and the manifest PUT leaves the previous snapshot in use with exact counts, that a shard
without a manifest loads as None, that an unreachable S3 raises an OSError (which the shard
owner's snapshot writer logs) after a bounded number of attempts, and that a silent one is cut
off at the store's deadline.

The engine-level test, once per WAL kind (embedded log, Kafka), seeds one shard's WAL with
1,000,000 distinct voters through the engine's own record encoder (perf/bench_shard_recovery.py,
which this file imports), saves a snapshot to S3 at 900,000 voters, kills the owner, and times
a fresh GroupOwner (one shard per group) until it serves: the counts must come back exactly, the replay must start at
the snapshot's offset, and a new vote must be accepted. Each test uses its own S3 prefix.

The new-host test: an owner takes several times locator_run_entries votes (its receipt locator
seals them into run files), snapshots to S3, takes more and stops; an owner with a fresh
data dir (the group moved: same log, no run files) recovers from the S3 snapshot, which
carries the runs, with the log replayed from the snapshot's offset only, and every repeat
vote answers 409 with exactly the receipt its voter got the first time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from pathlib import Path

import msgspec
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from engine.config import Config
from engine.keys import ensure_keys, load_keys
from shards import s3_snapshots
from shards.group_owner import GroupOwner
from shards.records import PollClosed
from shards.s3_snapshots import S3SnapshotStore, SnapshotStoreUnavailable
from shards.snapshots import Manifest, freeze, snapshot_name
from shards.state import ShardState
from tests.support.records import Log, fingerprint, poll_created

pytestmark = pytest.mark.integration

# Bounds a call to an unreachable or silent S3 to fail, not hang (a wait, not a timing).
UNREACHABLE_FAILS_WAIT_S = 60.0

SHARD = 5
SHARDS_TOTAL = 8
KEPT = 2
RECOVERY_VOTERS = 1_000_000


def load_bench():
    """perf/bench_shard_recovery.py, whose S3 helpers and recovery timing these tests share."""
    from perf import bench_shard_recovery

    return bench_shard_recovery


@pytest.fixture
def s3_prefix(local_stack, tmp_path: Path):
    """A prefix of this test's own in the stack's bucket, emptied afterwards."""
    prefix = f"test-s3-snapshots/{uuid.uuid4().hex}"
    yield prefix
    asyncio.run(load_bench().delete_prefix(s3_config(local_stack, tmp_path, prefix)))


def s3_config(local_stack, tmp_path: Path, prefix: str, **extra) -> Config:
    s3 = local_stack.endpoints()["s3"]
    values = {
        "data_dir": str(tmp_path), "shards": SHARDS_TOTAL, "groups": SHARDS_TOTAL,
        "snapshots_kept": KEPT,
        "s3_endpoint_url": s3["endpoint_url"], "s3_bucket": s3["bucket"], "s3_region": s3["region"],
        "s3_access_key_id": s3["access_key_id"], "s3_secret_access_key": s3["secret_access_key"],
        "s3_prefix": prefix,
    }
    values.update(extra)
    return Config(**values).validate()


@contextlib.asynccontextmanager
async def raw_client(config: Config):
    async with get_session().create_client(
        "s3", endpoint_url=config.s3_endpoint_url, region_name=config.s3_region,
        aws_access_key_id=config.s3_access_key_id,
        aws_secret_access_key=config.s3_secret_access_key,
        config=AioConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    ) as client:
        yield client


async def object_names(config: Config, store: S3SnapshotStore) -> list[str]:
    async with raw_client(config) as client:
        page = await client.list_objects_v2(Bucket=config.s3_bucket, Prefix=store.prefix)
    return sorted(item["Key"][len(store.prefix):] for item in page.get("Contents", []))


async def read_object(config: Config, key: str) -> bytes:
    async with raw_client(config) as client:
        response = await client.get_object(Bucket=config.s3_bucket, Key=key)
        async with response["Body"] as stream:
            return await stream.read()


def run_with_store(config: Config, scenario) -> None:
    async def main() -> None:
        store = S3SnapshotStore(config, SHARD)
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(main())


# A small shard state with every feature a snapshot must carry -------------------------------


# Vote batches here carry signature fields of the right shape (applying does not check them).
SIGNATURE_FIELDS = {"batch_position": 0, "batch_nodes": [bytes(32)], "signature": bytes(64),
                    "key_id": "test"}


def busy_state() -> ShardState:
    state = ShardState(SHARD, SHARDS_TOTAL)
    log = Log(state, **SIGNATURE_FIELDS)
    log.apply(poll_created("song", ["a", "b", "c"]))
    log.apply(poll_created("quiz", ["yes", "no"]))
    log.votes({"song": [(1, 0), (2, 2), (1, 1), (70_000, 2)], "quiz": [(5, 1)]})
    log.apply(PollClosed(poll="quiz", closed_ms=1_700_000_000_500))
    log.votes({"song": [(3, 1), (2, 0)], "quiz": [(6, 0)]})  # repeat of 2; quiz is closed
    return state


def more_votes(state: ShardState, first_voter: int, count: int) -> None:
    """Votes for `count` new voters of 'song', so each snapshot differs from the last."""
    Log(state, **SIGNATURE_FIELDS).votes(
        {"song": [(first_voter + index, index % 3) for index in range(count)]})


# The store against S3 --------------------------------------------------------------------------


def test_roundtrip_through_s3_keeps_everything(local_stack, tmp_path: Path, s3_prefix: str) -> None:
    config = s3_config(local_stack, tmp_path, s3_prefix)
    state = busy_state()

    async def scenario(store: S3SnapshotStore) -> None:
        entry = await store.save(freeze(state), state.wal_offset_next)
        assert entry.name == snapshot_name(state.wal_offset_next)
        loaded = await store.load()
        assert loaded is not None
        assert fingerprint(loaded) == fingerprint(state)
        assert loaded.polls["quiz"].closed
        assert loaded.polls["song"].counts() == {"a": 1, "b": 1, "c": 2}
        assert loaded.polls["quiz"].counts() == {"yes": 0, "no": 1}
        # The manifest is the directory store's JSON, at the documented key.
        manifest = msgspec.json.decode(
            await read_object(config, f"{config.s3_prefix}/shard-{SHARD:04d}/MANIFEST.json"),
            type=Manifest)
        assert manifest == Manifest(shard=SHARD, snapshots=[entry])
        assert await object_names(config, store) == ["MANIFEST.json", entry.name]

    run_with_store(config, scenario)


def test_retention_keeps_exactly_the_newest(local_stack, tmp_path: Path, s3_prefix: str) -> None:
    config = s3_config(local_stack, tmp_path, s3_prefix)
    state = busy_state()

    async def scenario(store: S3SnapshotStore) -> None:
        names = []
        for round_number in range(KEPT + 3):
            more_votes(state, 1000 * (round_number + 1), 10)
            names.append((await store.save(freeze(state), state.wal_offset_next)).name)
        newest_first = names[::-1][:KEPT]
        manifest = await store.read_manifest()
        assert [entry.name for entry in manifest.snapshots] == newest_first
        assert await object_names(config, store) == sorted(["MANIFEST.json", *newest_first])
        assert fingerprint(await store.load()) == fingerprint(state)

    run_with_store(config, scenario)


@pytest.mark.parametrize("damage", ["flipped-bytes", "deleted"])
def test_damaged_newest_object_falls_back_to_previous(local_stack, tmp_path: Path, s3_prefix: str,
                                                      damage: str) -> None:
    config = s3_config(local_stack, tmp_path, s3_prefix)
    state = busy_state()

    async def scenario(store: S3SnapshotStore) -> None:
        await store.save(freeze(state), state.wal_offset_next)
        previous = fingerprint(state)
        more_votes(state, 5000, 50)
        newest = await store.save(freeze(state), state.wal_offset_next)
        key = store.object_key(newest.name)
        async with raw_client(config) as client:
            if damage == "deleted":
                await client.delete_object(Bucket=config.s3_bucket, Key=key)
            else:
                data = await read_object(config, key)
                flipped = bytes(byte ^ 0xFF for byte in data)
                await client.put_object(Bucket=config.s3_bucket, Key=key, Body=flipped)
        loaded = await store.load()
        assert loaded is not None
        assert fingerprint(loaded) == previous
        assert loaded.polls["song"].counts() == {"a": 1, "b": 1, "c": 2}

    run_with_store(config, scenario)


def test_failure_between_upload_and_manifest_keeps_previous(local_stack, tmp_path: Path,
                                                            s3_prefix: str, monkeypatch) -> None:
    config = s3_config(local_stack, tmp_path, s3_prefix)
    state = busy_state()

    async def scenario(store: S3SnapshotStore) -> None:
        first = await store.save(freeze(state), state.wal_offset_next)
        previous = fingerprint(state)
        more_votes(state, 9000, 100)

        async def manifest_put_fails(manifest) -> None:
            raise SnapshotStoreUnavailable("injected: the manifest PUT did not happen")

        with monkeypatch.context() as patch:
            patch.setattr(store, "write_manifest", manifest_put_fails)
            with pytest.raises(OSError):
                await store.save(freeze(state), state.wal_offset_next)
        orphan = snapshot_name(state.wal_offset_next)
        # The object was uploaded, the manifest still names only the first snapshot.
        assert await object_names(config, store) == sorted(["MANIFEST.json", first.name, orphan])
        assert [entry.name for entry in (await store.read_manifest()).snapshots] == [first.name]
        loaded = await store.load()
        assert fingerprint(loaded) == previous
        assert loaded.polls["song"].counts() == {"a": 1, "b": 1, "c": 2}
        assert loaded.votes_applied == 5

        # The next save takes over and removes the orphan, which is older than it.
        more_votes(state, 20_000, 10)
        latest = await store.save(freeze(state), state.wal_offset_next)
        assert await object_names(config, store) == sorted(["MANIFEST.json", first.name,
                                                            latest.name])
        assert fingerprint(await store.load()) == fingerprint(state)

    run_with_store(config, scenario)


def test_missing_manifest_loads_none(local_stack, tmp_path: Path, s3_prefix: str) -> None:
    config = s3_config(local_stack, tmp_path, s3_prefix)

    async def scenario(store: S3SnapshotStore) -> None:
        assert await store.load() is None
        assert (await store.read_manifest()).snapshots == []

    run_with_store(config, scenario)


def test_unreachable_s3_raises_an_oserror_in_time(local_stack, tmp_path: Path, caplog,
                                                  monkeypatch) -> None:
    # Two attempts instead of three keep the retries' back-off (seconds each) short here.
    monkeypatch.setattr(s3_snapshots, "S3_ATTEMPTS_MAX", 2)
    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = s3_config(local_stack, tmp_path, "test-s3-snapshots/unreachable",
                       s3_endpoint_url=f"http://127.0.0.1:{port}")
    state = busy_state()

    async def scenario(store: S3SnapshotStore) -> None:
        started = time.monotonic()
        # Bounded so a hang fails the test; how long the retries take is printed, not asserted.
        async with asyncio.timeout(UNREACHABLE_FAILS_WAIT_S):
            with pytest.raises(SnapshotStoreUnavailable) as raised:
                await store.save(freeze(state), state.wal_offset_next)
            assert isinstance(raised.value, OSError)
            with pytest.raises(SnapshotStoreUnavailable):
                await store.load()  # unknown is not "no snapshot": start-up must not guess
        print(f"unreachable S3: save and load failed after {time.monotonic() - started:.1f} s")
        # The owner's snapshot writer logs the failure and goes on.
        owner = GroupOwner(SHARD, config, wal=None, snapshot_stores={SHARD: store},
                           keyring=None, hasher=None)
        owner.states = {SHARD: state}
        with caplog.at_level(logging.WARNING, logger="votes.owner"):
            await owner.snapshot_now(SHARD)
        assert f"snapshot of shard {SHARD} failed" in caplog.text

    run_with_store(config, scenario)


def test_silent_s3_hits_the_call_deadline(local_stack, tmp_path: Path, monkeypatch) -> None:
    """A server that accepts and never answers: the call ends at the store's deadline."""
    monkeypatch.setattr(s3_snapshots, "S3_CALL_DEADLINE_S", 1.0)

    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.read()  # until the client gives up and closes
        writer.close()
        await writer.wait_closed()

    async def main() -> None:
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = s3_config(local_stack, tmp_path, "test-s3-snapshots/unreachable",
                       s3_endpoint_url=f"http://127.0.0.1:{port}")
        store = S3SnapshotStore(config, SHARD)
        try:
            started = time.monotonic()
            async with asyncio.timeout(UNREACHABLE_FAILS_WAIT_S):
                with pytest.raises(SnapshotStoreUnavailable, match="took longer than"):
                    await store.load()
            elapsed_s = time.monotonic() - started
            # The deadline ended the call (its message says so), not an earlier give-up.
            assert elapsed_s >= 1.0, elapsed_s
            print(f"silent S3: load ended after {elapsed_s:.2f} s (deadline 1.0 s)")
        finally:
            await store.close()
            server.close()
            for writer in connections:
                writer.close()
            await server.wait_closed()
            await asyncio.sleep(0)  # let the handlers see their connections closed

    asyncio.run(main())


# A group moved to a new host: the receipt locator travels with the S3 snapshot ------------------


NEW_HOST_RUN_ENTRIES = 1024
NEW_HOST_VOTERS_BEFORE = 5000  # ~5 runs sealed before the snapshot
NEW_HOST_VOTERS_AFTER = 1500


def test_a_new_host_recovers_receipts_from_the_s3_snapshot_without_replaying_from_0(
        local_stack, tmp_path: Path, s3_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    import random

    from engine import signing
    from engine.errors import AlreadyVoted
    from shards.segment_log import SegmentLog
    from shards.wal import EmbeddedWal

    bench = load_bench()
    host_a = s3_config(local_stack, tmp_path / "host-a", s3_prefix, shards=1, groups=1,
                       group_commit_ms=1.0, locator_run_entries=NEW_HOST_RUN_ENTRIES)
    host_b = msgspec.structs.replace(host_a, data_dir=str(tmp_path / "host-b"))
    ensure_keys(tmp_path)
    keyring = load_keys(tmp_path)
    voters = random.Random(20261204).sample(range(1_000_000),
                                            NEW_HOST_VOTERS_BEFORE + NEW_HOST_VOTERS_AFTER)
    print("seed 20261204")

    def owner_on(config: Config, wal) -> GroupOwner:
        return GroupOwner(0, config, wal, {0: S3SnapshotStore(config, 0)}, keyring,
                          signing.VoterHasher(keyring.voter_hash_secret))

    def shared_log():  # the group's log, reachable from both hosts (as Kafka would be)
        return EmbeddedWal(SegmentLog(tmp_path / "group-log", host_a.segment_bytes_max))

    async def cast(owner: GroupOwner, chosen: list[int]) -> dict[int, dict]:
        bodies = {}
        for start in range(0, len(chosen), 500):
            part = chosen[start:start + 500]
            answers = await asyncio.gather(*(owner.submit_vote("song", voter, "a") for voter in part))
            bodies.update({voter: json.loads(body) for voter, body in zip(part, answers, strict=True)})
        return bodies

    async def scenario() -> None:
        owner = owner_on(host_a, shared_log())
        await owner.start()
        try:
            assert await owner.create_poll(poll_created("song", ["a", "b"]))
            receipts = await cast(owner, voters[:NEW_HOST_VOTERS_BEFORE])
            await asyncio.gather(*owner.snapshot_all())
            snapshot = (await owner.snapshot_stores[0].read_manifest()).snapshots[0]
            runs = owner.states[0].polls["song"].locator.runs
            assert sum(run.entries for run in runs) > NEW_HOST_RUN_ENTRIES
            receipts.update(await cast(owner, voters[NEW_HOST_VOTERS_BEFORE:]))
        finally:
            await owner.stop()
        assert not (Path(host_b.data_dir) / "shards").exists()

        timed_wal = bench.TimedWal(shared_log())
        moved = owner_on(host_b, timed_wal)
        with caplog.at_level("WARNING", logger="votes.recovery"):
            await moved.start()
        try:
            assert moved.ready, moved.failure
            assert not any("rebuilding the shard" in record.message for record in caplog.records)
            assert 0 < timed_wal.from_offset == snapshot.wal_offset_next
            locator = moved.states[0].polls["song"].locator
            restored = [run for run in locator.runs if run.offset_next <= snapshot.wal_offset_next]
            assert restored and all(run.path is not None and
                                    Path(host_b.data_dir) in run.path.parents for run in restored)
            print(f"\nnew host: snapshot {snapshot.size_bytes:,} bytes at offset "
                  f"{snapshot.wal_offset_next:,} carrying {len(restored)} runs "
                  f"({sum(run.entries for run in restored):,} entries, locator_run_entries "
                  f"{NEW_HOST_RUN_ENTRIES}); replay from offset {timed_wal.from_offset:,}, "
                  f"{timed_wal.records} records")
            for voter in voters:
                with pytest.raises(AlreadyVoted) as repeat:
                    await moved.submit_vote("song", voter, "b")
                assert repeat.value.extra["receipt"] == receipts[voter], voter
        finally:
            await moved.stop()

    asyncio.run(scenario())


# Recovery of a shard holding a million voters --------------------------------------------------


@pytest.mark.parametrize("wal_kind", ["embedded", "kafka"])
def test_fresh_owner_recovers_a_million_voters_from_s3_and_wal(
        local_stack, tmp_path: Path, s3_prefix: str, wal_kind: str) -> None:
    bench = load_bench()
    run_id = uuid.uuid4().hex[:8]
    # Kafka: a fresh topic made like the stack's WAL topic and deleted afterwards, so the run
    # starts from an empty partition and the shared topic does not grow with every run. The
    # transactional id wal-g<group> is still shared with any other user of that group number:
    # the last one is used, which other tests are unlikely to use.
    topic = f"test-s3-recovery-{run_id}"
    config = bench.stack_config(local_stack, tmp_path, wal_kind, s3_prefix, topic,
                                shards=SHARDS_TOTAL)
    shard = config.shards - 1
    plan = bench.Plan(voters=RECOVERY_VOTERS, shard=shard, poll=f"recovery-{run_id}")
    ensure_keys(tmp_path)
    keyring = load_keys(tmp_path)

    async def recover() -> None:
        store = bench.make_snapshot_store(config, shard)
        try:
            seeded = await bench.seed_shard(config, plan, store)
        finally:
            await store.close()
        # The owner is dead and its memory gone; a fresh one gets its own S3 client.
        store = bench.make_snapshot_store(config, shard)
        try:
            owner, recovery = await bench.start_owner(config, shard, store, keyring)
            try:
                print(f"\n{wal_kind} WAL + S3 snapshot, {plan.voters:,} voters "
                      f"({seeded.records} records, {seeded.payload_bytes:,} bytes, snapshot "
                      f"{seeded.snapshot_bytes:,} bytes): ready in {recovery.ready_s:.3f} s "
                      f"(S3 load {recovery.load_s:.3f} s, replay {recovery.replay_s:.3f} s of "
                      f"{recovery.records_replayed} records from offset "
                      f"{recovery.replay_from_offset:,})")
                bench.check_recovery(plan, seeded, recovery, expect_snapshot=True)
                assert recovery.counts[plan.poll] == seeded.expected[plan.poll]
                assert sum(recovery.counts[plan.poll]) == plan.voters
                assert 0 < recovery.replay_from_offset == seeded.snapshot_offset
                assert recovery.replay_from_offset < recovery.replay_end_offset
                # It serves: a new voter of this shard gets a receipt, and counts once.
                voter_id = plan.voters * config.shards + shard
                receipt = json.loads(await owner.submit_vote(plan.poll, voter_id, "a"))
                assert receipt["shard"] == shard
                assert receipt["group"] == config.group_of(shard)
                tallies = owner.poll_summaries(plan.poll)[0][2]
                expected = list(seeded.expected[plan.poll])
                expected[0] += 1
                assert tallies == expected
            finally:
                await owner.stop()
        finally:
            await store.close()

    async def scenario() -> None:
        if wal_kind == "kafka":
            async with bench.fresh_wal_topic(local_stack, topic):
                await recover()
        else:
            await recover()

    asyncio.run(scenario())
