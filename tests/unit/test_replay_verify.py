"""Proves that verify (replay/verify.py) compares each shard's newest usable snapshot with the
recount at that snapshot's offset: snapshots the engine's own replay produced agree; when the
newest snapshot fails its checksum, verify says so in a note and compares the older one
(recovery would use it too); a snapshot that calls an open poll closed, or misses a voter,
is a difference naming the shard and poll; and a snapshot whose offset falls inside a record
cannot be matched with the log, which is a difference too.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from engine.config import Config
from replay.verify import render, verify
from shards.backends import shard_directory
from shards.records import decode_record, frame_record
from shards.snapshots import DirectorySnapshotStore, freeze
from shards.state import ShardState
from tests.support.records import poll_created, vote_batch
from tests.unit.test_replay_recount import write_log

SHARD = 1
SHARDS_TOTAL = 3


def seeded(tmp_path: Path) -> tuple[Config, list, list[tuple[int, int]], DirectorySnapshotStore]:
    records = [poll_created("a", ["x", "y"])] + [
        vote_batch(SHARD, seq, {"a": [(seq * 10 + voter, voter % 2) for voter in range(10)]})
        for seq in range(6)]
    positions = write_log(tmp_path, SHARD, records)
    store = DirectorySnapshotStore(shard_directory(tmp_path, SHARD) / "snapshots", SHARD, 3)
    return Config(data_dir=str(tmp_path), shards=SHARDS_TOTAL).validate(), records, positions, store


def state_after(records: list, positions: list[tuple[int, int]], count: int) -> ShardState:
    state = ShardState(SHARD, SHARDS_TOTAL)
    for record, (offset, next_offset) in list(zip(records, positions))[:count]:
        state.apply(offset, next_offset, decode_record(frame_record(record)[8:]))
    return state


def run(config: Config):
    return asyncio.run(verify(config, [SHARD]))


def test_engine_snapshots_agree_and_a_damaged_newest_one_is_noted(tmp_path):
    config, records, positions, store = seeded(tmp_path)
    older = state_after(records, positions, 3)
    newer = state_after(records, positions, 6)
    store.write(freeze(older), older.wal_offset_next)
    entry = store.write(freeze(newer), newer.wal_offset_next)
    report = run(config)
    assert report.ok, render(report)
    assert report.shards[0]["snapshot_offset"] == newer.wal_offset_next
    assert report.polls["a"].wal_at_snapshots == newer.polls["a"].counts()

    path = store.directory / entry.name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    report = run(config)
    assert report.ok, render(report)
    assert report.shards[0]["snapshot_offset"] == older.wal_offset_next
    assert any(entry.name in note and "checksum" in note and
               f"the snapshot at offset {older.wal_offset_next} is used" in note
               for note in report.notes), report.notes


def test_closed_flag_and_missing_voter_are_differences(tmp_path):
    config, records, positions, store = seeded(tmp_path)
    state = state_after(records, positions, 4)
    poll = state.polls["a"]
    poll.closed_ms = 1
    poll.voters.remove(next(iter(poll.voters)))
    store.write(freeze(state), state.wal_offset_next)
    report = run(config)
    details = [str(difference) for difference in report.differences]
    assert any(f"shard {SHARD} poll 'a': snapshot says closed, the log says open at" in detail
               for detail in details), details
    assert any("voters bitmap differs" in detail and "0 voter indexes only in the snapshot" in detail
               and "1 only in the log" in detail for detail in details), details


def test_snapshot_offset_inside_a_record_is_a_difference(tmp_path):
    config, records, positions, store = seeded(tmp_path)
    state = state_after(records, positions, 2)
    state.wal_offset_next = positions[2][0] + 5
    store.write(freeze(state), state.wal_offset_next)
    report = run(config)
    assert not report.ok
    assert "not at a record boundary" in str(report.differences[0])
