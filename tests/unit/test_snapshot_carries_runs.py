"""Proves that a snapshot carries the locator runs it relies on, so a host without the run
files (a group moved or taken over) recovers from the snapshot and replays the log only from
the snapshot's offset, with every repeat's original receipt; that a snapshot of the release
before, which carried no runs, still falls back to a rebuild from the log; that a merge
removing a run file between the freeze and the encoding loses nothing; and that a snapshot
records its layout's groups and is refused by another layout.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import msgspec
import pytest

from engine.config import Config
from engine.errors import LogCorrupt
from shards.locator_runs import poll_directory
from shards.recovery import log_header, recover_group
from shards.records import Record, encode_record
from shards.snapshots import DirectorySnapshotStore, ShardSnapshot, freeze, freeze_deferred, thaw
from shards.state import ShardState
from tests.support.records import check_answers, poll_created, vote_batch

SHARD = 1
SHARDS_TOTAL = 2
GROUPS = 2  # shard 1 is alone in group 1
RUN_ENTRIES = 1024
SEED = 20261203


class RecordedLog:
    """An in-memory group log that remembers where each replay started."""

    durability = "memory"
    appends_in_flight_max = 1

    def __init__(self) -> None:
        self.records: list[tuple[int, int, bytes]] = []
        self.replayed_from: list[int] = []

    async def replay(self, from_offset: int, apply) -> int:
        self.replayed_from.append(from_offset)
        for offset, next_offset, payload in self.records:
            if offset >= from_offset:
                apply(offset, next_offset, payload)
        return self.records[-1][1] if self.records else 0

    async def append(self, payloads: list[bytes]) -> list[tuple[int, int]]:
        raise AssertionError("a log with records gets no header")

    def location(self) -> str:
        return "recorded in-memory log"


class Host:
    """A shard state on one host's locator directory, fed the group's log record by record;
    `counted` is the model: voter -> offset of the record that counted it."""

    def __init__(self, data_dir: Path, log: RecordedLog) -> None:
        self.state = ShardState(SHARD, SHARDS_TOTAL, RUN_ENTRIES, groups=GROUPS)
        self.state.attach_locator_fresh(data_dir / "shards" / f"shard-{SHARD:04d}" / "locator",
                                        RUN_ENTRIES)
        self.log = log
        self.counted: dict[int, int] = {}
        self.batch_seq = 0

    def apply(self, record: Record) -> None:
        offset = self.log.records[-1][1] if self.log.records else 0
        self.log.records.append((offset, offset + 100, encode_record(record)))
        self.state.apply(offset, offset + 100, record)

    def cast(self, voters: list[int], batch_votes: int = 300) -> None:
        for start in range(0, len(voters), batch_votes):
            part = voters[start:start + batch_votes]
            offset = self.log.records[-1][1]
            self.apply(vote_batch(SHARD, self.batch_seq, {"song": [(voter, voter % 2) for voter in part]},
                                  group=SHARD % GROUPS))
            self.batch_seq += 1
            for voter in part:
                self.counted.setdefault(voter, offset)


def config_of(data_dir: Path, groups: int = GROUPS) -> Config:
    return Config(data_dir=str(data_dir), shards=SHARDS_TOTAL, groups=groups,
                  locator_run_entries=RUN_ENTRIES).validate()


def voters_and_absent(count: int, seed: int) -> tuple[list[int], list[int]]:
    print(f"seed {seed}")
    pool = random.Random(seed).sample(range(4 * count), count + 200)
    return pool[:count], pool[count:]


def snapshot_on_host_a(tmp_path: Path, votes: int, seed: int) -> tuple[Host, DirectorySnapshotStore, int, list[int]]:
    """Host A casts `votes` (many runs), snapshots into a store, then casts 2000 more."""
    host = Host(tmp_path / "host-a", RecordedLog())
    host.apply(log_header(config_of(tmp_path), 1))
    host.apply(poll_created("song", ["a", "b"]))
    voters, absent = voters_and_absent(votes + 2000, seed)
    host.cast(voters[:votes])
    host.state.polls["song"].locator.wait_idle()
    assert len(host.state.polls["song"].locator.runs) >= 2, "the snapshot must rely on runs"
    store = DirectorySnapshotStore(tmp_path / "store", SHARD, 2)
    host.state.advance_to(host.log.records[-1][1])
    store.write(freeze(host.state), host.state.wal_offset_next)
    snapshot_offset = host.state.wal_offset_next
    host.cast(voters[votes:])
    return host, store, snapshot_offset, absent


def test_a_new_host_recovers_from_the_snapshot_and_the_runs_it_carries(tmp_path: Path) -> None:
    host, store, snapshot_offset, absent = snapshot_on_host_a(tmp_path, 12_000, SEED)
    host_b = tmp_path / "host-b"  # no locator directory at all

    states, _ = asyncio.run(recover_group(1, config_of(host_b), host.log, {SHARD: store}))

    assert host.log.replayed_from == [snapshot_offset] and snapshot_offset > 0
    recovered = states[SHARD]
    assert recovered.groups == GROUPS
    check_answers(recovered, host.counted, absent)
    locator = recovered.polls["song"].locator
    written = sorted(poll_directory(host_b / "shards" / f"shard-{SHARD:04d}" / "locator",
                                    "song").glob("run-*.bin"))
    assert written and all(run.voters is None for run in locator.runs if run.offset_next <= snapshot_offset)
    # RAM holds the open run and fences, not the carried entries.
    assert locator.nbytes_ram <= 12 * 2 * RUN_ENTRIES + 4 * 14_000 // 1024 + 64
    locator.wait_idle()
    check_answers(recovered, host.counted, absent)


def test_a_snapshot_that_carries_no_runs_falls_back_to_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A snapshot of the release before (runs only beside it) on a new host: rebuilt from
    offset 0, logged, every receipt right."""
    host, store, snapshot_offset, absent = snapshot_on_host_a(tmp_path, 6000, SEED + 1)
    entry = store.read_manifest().snapshots[0]
    snapshot = msgspec.msgpack.decode((store.directory / entry.name).read_bytes(), type=ShardSnapshot)
    old_format = msgspec.structs.replace(
        snapshot, polls=[msgspec.structs.replace(poll, locator_runs=[]) for poll in snapshot.polls])
    store.write(msgspec.msgpack.encode(old_format), snapshot_offset)

    with caplog.at_level("WARNING", logger="votes.recovery"):
        states, _ = asyncio.run(recover_group(1, config_of(tmp_path / "host-b"), host.log,
                                              {SHARD: store}))

    assert host.log.replayed_from == [0]
    assert any("does not carry them" in record.message for record in caplog.records)
    check_answers(states[SHARD], host.counted, absent)


def test_a_run_file_merged_away_after_the_freeze_is_still_carried(tmp_path: Path) -> None:
    """The freeze opens the run files; a merge that removes them before the snapshot writer
    reads them takes nothing from the snapshot."""
    host = Host(tmp_path / "host-a", RecordedLog())
    host.apply(poll_created("song", ["a", "b"]))
    voters, absent = voters_and_absent(8000, SEED + 2)
    host.cast(voters)
    locator = host.state.polls["song"].locator
    locator.wait_idle()
    frozen = freeze_deferred(host.state)
    for run in locator.runs:
        assert run.path is not None
        run.path.unlink()  # as a merge does with its inputs

    restored = thaw(frozen.encode())
    assert sum(run.entries for run in restored.polls["song"].locator.runs) > 0
    check_answers(restored, host.counted, absent)


def layout_store(tmp_path: Path, groups: int) -> tuple[RecordedLog, DirectorySnapshotStore]:
    log = RecordedLog()
    state = ShardState(SHARD, SHARDS_TOTAL, groups=groups)
    log.records.append((0, 100, encode_record(log_header(config_of(tmp_path), 1))))
    log.records.append((100, 200, encode_record(poll_created("song", ["a", "b"]))))
    state.apply(100, 200, poll_created("song", ["a", "b"]))
    store = DirectorySnapshotStore(tmp_path / "store", SHARD, 2)
    store.write(freeze(state), state.wal_offset_next)
    return log, store


def test_a_snapshot_of_another_group_count_is_refused(tmp_path: Path) -> None:
    """Written with 1 group (shard 1 in group 0), read with 2 (shard 1 in group 1): its
    offsets are in group 0's log. Refused, saying what to do."""
    log, store = layout_store(tmp_path, groups=1)
    assert thaw((store.directory / store.read_manifest().snapshots[0].name).read_bytes()).groups == 1

    with pytest.raises(LogCorrupt, match="layout of 1 fencing groups, not 2.*Start with groups = 1"):
        asyncio.run(recover_group(1, config_of(tmp_path), log, {SHARD: store}))
    assert log.replayed_from == []


def test_a_snapshot_that_does_not_record_its_groups_is_rebuilt_from_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log, store = layout_store(tmp_path, groups=0)
    with caplog.at_level("WARNING", logger="votes.recovery"):
        states, _ = asyncio.run(recover_group(1, config_of(tmp_path), log, {SHARD: store}))
    assert log.replayed_from == [0] and "song" in states[SHARD].polls
    assert any("does not record its fencing groups" in record.message for record in caplog.records)


def test_snapshots_held_encoded_at_once_are_bounded(tmp_path: Path, monkeypatch) -> None:
    """Each snapshot being encoded or saved holds a copy of its shard's runs: while
    SNAPSHOTS_IN_FLIGHT_MAX saves are stuck, the next snapshot is not even encoded."""
    from shards import snapshots
    from shards.snapshots import FrozenShard

    monkeypatch.setattr(snapshots, "SNAPSHOTS_IN_FLIGHT_MAX", 2)
    encoded: list[int] = []

    class Counted(FrozenShard):
        def encode(self) -> bytes:
            encoded.append(self.snapshot.wal_offset_next)
            return super().encode()

    class StuckStore:
        def __init__(self) -> None:
            self.release = asyncio.Event()

        async def save(self, data: bytes, wal_offset_next: int):
            await self.release.wait()
            return wal_offset_next

    async def scenario() -> None:
        store = StuckStore()
        frozen = [Counted(ShardSnapshot(SHARD, SHARDS_TOTAL, offset, 0, 0, [], groups=GROUPS), [])
                  for offset in (100, 200, 300)]
        saving = [asyncio.ensure_future(item.save_to(store, item.snapshot.wal_offset_next))  # type: ignore[arg-type]
                  for item in frozen]
        await asyncio.sleep(0.2)
        assert encoded == [100, 200]  # the third waits for a slot
        store.release.set()
        assert await asyncio.wait_for(asyncio.gather(*saving), 5) == [100, 200, 300]
        assert encoded == [100, 200, 300]

    asyncio.run(scenario())
