"""Proves that the receipt locator kept mostly on disk (shards/locator_runs.py) answers every
counted voter with the offset of the record that counted it, from its open run, from runs not
yet written and from run files alike; that merges keep the runs per poll bounded and lose no
entry; that its RAM stays bounded (open run + fences) while the entries sit on disk; that a
thawed snapshot with the runs it relies on, plus a replay of the records after it, answers
exactly as the live state did; that missing run files are restored from the runs the
snapshot carries, and that a snapshot carrying none makes the shard rebuild from the log
instead of answering "no receipt"; that a damaged run file raises
LogCorrupt rather than a made-up answer; that a failed run write keeps the entries in RAM
and fails the snapshot that would rely on it; and that the group owner publishes a snapshot
only once the runs it relies on are durable.
"""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import Future
from pathlib import Path

import pytest

from engine import signing
from engine.config import Config
from engine.errors import LogCorrupt
from shards import locator_runs
from shards.group_owner import GroupOwner
from shards.locator_runs import RUNS_MAX, PollLocator, poll_directory
from shards.records import Record
from shards.recovery import attach_locator
from shards.snapshots import DirectorySnapshotStore, freeze, thaw
from shards.state import ShardState
from tests.support.records import check_answers, poll_created, vote_batch

SHARD = 1
SHARDS_TOTAL = 4
RUN_ENTRIES = 1024
SEED = 20261202


class Replayable:
    """A shard state fed records at increasing offsets, remembering them for a replay, and
    the model of its locator: voter -> offset of the record that counted it."""

    def __init__(self, state: ShardState) -> None:
        self.state = state
        self.records: list[tuple[int, int, Record]] = []
        self.counted: dict[int, int] = {}
        self.offset = 0
        self.batch_seq = 0

    def apply(self, record: Record) -> None:
        position = (self.offset, self.offset + 100)
        self.records.append((*position, record))
        self.state.apply(*position, record)
        self.offset += 100

    def votes(self, voters: list[int]) -> None:
        offset = self.offset
        self.apply(vote_batch(SHARD, self.batch_seq, {"song": [(voter, voter % 2) for voter in voters]}))
        self.batch_seq += 1
        for voter in voters:
            self.counted.setdefault(voter, offset)

    def replay_onto(self, state: ShardState) -> None:
        for offset, next_offset, record in self.records:
            state.apply(offset, next_offset, record)


def live_state(directory: Path) -> Replayable:
    state = ShardState(SHARD, SHARDS_TOTAL, RUN_ENTRIES)
    state.attach_locator_fresh(directory, RUN_ENTRIES)
    replayable = Replayable(state)
    replayable.apply(poll_created("song", ["a", "b"]))
    return replayable


def cast_votes(replayable: Replayable, voters: list[int], batch_votes: int = 300) -> None:
    for start in range(0, len(voters), batch_votes):
        replayable.votes(voters[start:start + batch_votes])


def random_voters(count: int, seed: int = SEED) -> tuple[list[int], list[int]]:
    print(f"seed {seed}")
    pool = random.Random(seed).sample(range(4 * count), 2 * count)
    return pool[:count], pool[count:count + 200]


def test_every_counted_voter_is_found_in_ram_and_on_disk(tmp_path: Path) -> None:
    replayable = live_state(tmp_path / "locator")
    voters, absent = random_voters(40_000)
    cast_votes(replayable, voters)
    # Duplicates are not counted again and keep their first offset.
    replayable.votes(voters[:50])
    state = replayable.state
    poll = state.polls["song"]
    check_answers(state, replayable.counted, absent)  # some runs are still being written
    poll.locator.wait_idle()
    check_answers(state, replayable.counted, absent)
    files = sorted(poll_directory(tmp_path / "locator", "song").glob("run-*.bin"))
    assert files and len(poll.locator.runs) <= RUNS_MAX + 1
    assert poll.locator.count_set() == len(voters)
    # RAM: the open run (its capacity) and a fence per 1024 entries, not 12 bytes per voter.
    assert poll.locator.nbytes_ram <= 12 * 2 * RUN_ENTRIES + 4 * len(voters) // 1024 + 64


def test_merges_keep_runs_bounded_and_lose_nothing(tmp_path: Path) -> None:
    replayable = live_state(tmp_path / "locator")
    voters, absent = random_voters(60_000, SEED + 1)
    for start in range(0, len(voters), 3000):
        cast_votes(replayable, voters[start:start + 3000])
        replayable.state.polls["song"].locator.wait_idle()
    locator = replayable.state.polls["song"].locator
    assert len(locator.runs) <= RUNS_MAX
    assert any(run.entries > 4 * RUN_ENTRIES for run in locator.runs), "no merge happened"
    check_answers(replayable.state, replayable.counted, absent)
    on_disk = {path for path in poll_directory(tmp_path / "locator", "song").iterdir()}
    assert on_disk == {run.path for run in locator.runs}, "merged inputs left behind"


def test_a_thawed_snapshot_with_its_runs_answers_as_the_live_state(tmp_path: Path) -> None:
    directory = tmp_path / "locator"
    replayable = live_state(directory)
    voters, absent = random_voters(30_000, SEED + 2)
    cast_votes(replayable, voters[:12_000])
    state = replayable.state
    for write in state.locator_writes_pending():  # as GroupOwner does before publishing
        write.result()
    frozen = freeze(state)
    records_in_snapshot = len(replayable.records)
    # The live state goes on: more runs sealed and merged after the snapshot, then a crash.
    cast_votes(replayable, voters[12_000:])
    state.polls["song"].locator.wait_idle()

    restored = thaw(frozen)
    assert restored.attach_locator(directory, RUN_ENTRIES)
    for offset, next_offset, record in replayable.records[records_in_snapshot:]:
        restored.apply(offset, next_offset, record)
    check_answers(restored, replayable.counted, absent)
    restored.polls["song"].locator.wait_idle()
    check_answers(restored, replayable.counted, absent)


def test_missing_runs_are_restored_from_the_snapshot_or_the_shard_is_rebuilt(tmp_path: Path) -> None:
    """A new host: the snapshot came from elsewhere, the run files did not. The runs the
    snapshot carries are written out; a snapshot that carries none (the release before)
    makes the shard rebuild from the log, and never answers "no receipt" meanwhile."""
    import msgspec

    from shards.snapshots import ShardSnapshot

    config = Config(data_dir=str(tmp_path), shards=SHARDS_TOTAL, locator_run_entries=RUN_ENTRIES)
    directory = tmp_path / "shards" / f"shard-{SHARD:04d}" / "locator"
    replayable = live_state(directory)
    voters, absent = random_voters(10_000, SEED + 3)
    cast_votes(replayable, voters)
    replayable.state.polls["song"].locator.wait_idle()
    frozen = freeze(replayable.state)
    for path in poll_directory(directory, "song").glob("run-*.bin"):
        path.unlink()

    restored = attach_locator(config, SHARD, thaw(frozen))
    assert restored.wal_offset_next == replayable.state.wal_offset_next  # the snapshot is used
    assert sorted(poll_directory(directory, "song").glob("run-*.bin"))
    check_answers(restored, replayable.counted, absent)

    for path in poll_directory(directory, "song").glob("run-*.bin"):
        path.unlink()
    snapshot = msgspec.msgpack.decode(frozen, type=ShardSnapshot)
    carrying_none = msgspec.msgpack.encode(msgspec.structs.replace(
        snapshot, polls=[msgspec.structs.replace(poll, locator_runs=[]) for poll in snapshot.polls]))
    detached = thaw(carrying_none)
    with pytest.raises(LogCorrupt):  # never "no receipt" for a voter the runs would hold
        detached.record_of_voter(detached.polls["song"], next(iter(replayable.counted)))
    recovered = attach_locator(config, SHARD, thaw(carrying_none))
    assert recovered.polls == {} and recovered.wal_offset_next == 0  # rebuilt from the log
    replayable.replay_onto(recovered)
    check_answers(recovered, replayable.counted, absent)


def test_a_damaged_run_file_raises_log_corrupt(tmp_path: Path) -> None:
    replayable = live_state(tmp_path / "locator")
    voters, _ = random_voters(5_000, SEED + 4)
    cast_votes(replayable, voters)
    locator = replayable.state.polls["song"].locator
    locator.wait_idle()
    run = locator.runs[0]
    assert run.path is not None and run.voters is None  # answered from its file
    data = bytearray(run.path.read_bytes())
    data[-100] ^= 0x40  # inside the last block
    run.path.write_bytes(bytes(data))
    voter = run.fences[-1]  # the first voter of the last block
    with pytest.raises(LogCorrupt, match="checksum"):
        locator.get(voter)


def test_a_failed_run_write_keeps_entries_in_ram_and_fails_the_snapshot(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"")  # a file where the poll's directory should be: mkdir fails
    locator = PollLocator(RUN_ENTRIES)
    locator.directory = blocked / "poll"
    for voter in range(RUN_ENTRIES):
        locator.open_run.set(voter, voter + 1)
    locator.after_apply(500)
    pending = locator.writes_pending()
    assert pending
    with pytest.raises(OSError):
        pending[0].result()
    locator.wait_idle()
    assert locator.get(7) == 8 and locator.runs[0].voters is not None
    with pytest.raises(OSError):  # retried, fails again: no snapshot may rely on it
        locator.writes_pending()[0].result()


def test_locator_run_entries_is_checked() -> None:
    with pytest.raises(Exception, match="locator_run_entries"):
        Config(locator_run_entries=10).validate()
    assert locator_runs.RUN_ENTRIES_DEFAULT == Config().locator_run_entries


def test_a_snapshot_is_published_only_once_its_runs_are_durable(tmp_path: Path, keyring) -> None:
    """GroupOwner._write_snapshot waits for the run writes frozen with it (FrozenShard.encoded): while one is in
    flight the manifest does not name the snapshot; a failed one means no snapshot at all."""

    async def scenario() -> None:
        config = Config(data_dir=str(tmp_path), shards=SHARDS_TOTAL, groups=2).validate()
        shards = list(config.shards_of_group(SHARD % 2))
        stores = {shard: DirectorySnapshotStore(tmp_path / f"snapshots-{shard}", shard, 2)
                  for shard in shards}
        owner = GroupOwner(SHARD % 2, config, wal=None, snapshot_stores=stores,  # type: ignore[arg-type]
                           keyring=keyring, hasher=signing.VoterHasher(keyring.voter_hash_secret))
        store = stores[SHARD]
        pending: Future = Future()
        writing = asyncio.ensure_future(owner._write_snapshot(SHARD, frozen_empty([pending]), 700))
        await asyncio.sleep(0.05)
        assert store.read_manifest().snapshots == []  # the run is not durable yet
        pending.set_result(None)
        await asyncio.wait_for(writing, 5)
        assert [entry.wal_offset_next for entry in store.read_manifest().snapshots] == [700]

        failed: Future = Future()
        failed.set_exception(OSError("disk full"))
        await owner._write_snapshot(SHARD, frozen_empty([failed]), 900)
        assert [entry.wal_offset_next for entry in store.read_manifest().snapshots] == [700]

    asyncio.run(scenario())


def frozen_empty(writes: list[Future]):
    """A frozen shard with no poll, frozen while these run writes were in flight."""
    from shards.snapshots import FrozenShard, ShardSnapshot

    return FrozenShard(ShardSnapshot(SHARD, SHARDS_TOTAL, 0, 0, 0, [], groups=2), [], writes)


@pytest.mark.parametrize("runs_kept", [True, False], ids=["runs-kept", "runs-lost-new-host"])
def test_repeats_get_their_original_receipt_after_a_restart_from_snapshot_and_runs(
        tmp_path: Path, keyring, caplog: pytest.LogCaptureFixture, runs_kept: bool) -> None:
    """End to end on the embedded log: votes sealed into run files, a snapshot in the middle,
    more votes after it; a new owner recovers from the snapshot + runs + replay (with the run
    files lost, as on a new host, the runs the snapshot carries) and every repeat answers 409
    with exactly the 201 body its voter got the first time."""
    import json
    import shutil

    from engine.errors import AlreadyVoted
    from shards.segment_log import SegmentLog
    from shards.wal import EmbeddedWal

    config = Config(data_dir=str(tmp_path), shards=1, groups=1, group_commit_ms=1.0,
                    locator_run_entries=RUN_ENTRIES).validate()
    voters = random.Random(SEED + 5).sample(range(200_000), 6000)
    print(f"seed {SEED + 5}")

    def new_owner() -> GroupOwner:
        wal = EmbeddedWal(SegmentLog(tmp_path / "wal", config.segment_bytes_max))
        stores = {0: DirectorySnapshotStore(tmp_path / "snapshots", 0, 2)}
        return GroupOwner(0, config, wal, stores, keyring,
                          signing.VoterHasher(keyring.voter_hash_secret))

    async def cast(owner: GroupOwner, chosen: list[int]) -> dict[int, dict]:
        bodies = {}
        for start in range(0, len(chosen), 500):
            part = chosen[start:start + 500]
            answers = await asyncio.gather(*(owner.submit_vote("song", voter, "a") for voter in part))
            bodies.update({voter: json.loads(body) for voter, body in zip(part, answers, strict=True)})
        return bodies

    async def scenario() -> None:
        owner = new_owner()
        await owner.start()
        try:
            assert await owner.create_poll(poll_created("song", ["a", "b"]))
            first = await cast(owner, voters[:3000])
            await asyncio.gather(*owner.snapshot_all())
            first.update(await cast(owner, voters[3000:]))
            assert len(owner.states[0].polls["song"].locator.runs) >= 2
        finally:
            await owner.stop()
        if not runs_kept:
            shutil.rmtree(tmp_path / "shards" / "shard-0000" / "locator")
        restarted = new_owner()
        with caplog.at_level("WARNING", logger="votes.recovery"):
            await restarted.start()
        rebuilt = any("rebuilding the shard from the log" in record.message
                      for record in caplog.records)
        assert not rebuilt  # the snapshot is used either way: it carries its runs
        try:
            for voter in voters[::20] + [voters[0], voters[2999], voters[-1]]:
                with pytest.raises(AlreadyVoted) as repeat:
                    await restarted.submit_vote("song", voter, "b")
                assert repeat.value.extra["receipt"] == first[voter], voter
        finally:
            await restarted.stop()

    asyncio.run(scenario())
