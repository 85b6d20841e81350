"""Layout checks at a group's recovery: its log gets its LogHeader before its first record,
wherever the log's end is; a log or a snapshot of another layout is refused, never misread.

Kafka's log of a group starts with owner markers (shards/kafka_wal.py), which replay skips:
a new partition's end is past 0 with no record in it. The header must still be written, or
the next reader (a fresh owner, the replay tool) finds a poll record first and refuses the
log as another layout's. MarkedLog stands in for that log here; the real one is exercised by
tests/integration/test_kafka_engine.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from engine.config import Config
from engine.errors import LogCorrupt
from shards.recovery import log_header, recover_group
from shards.records import decode_record, encode_record
from shards.snapshots import DirectorySnapshotStore
from tests.support.records import poll_created

MARKER_OFFSETS = 2  # an owner marker and its commit marker, as a fence leaves them


class MarkedLog:
    """An in-memory log whose first offsets hold markers replay does not hand out."""

    durability = "memory"
    appends_in_flight_max = 1

    def __init__(self) -> None:
        self.records: list[tuple[int, bytes]] = []
        self.end = MARKER_OFFSETS

    async def acquire(self) -> None:
        self.end += MARKER_OFFSETS  # each new owner leaves its own marker

    async def replay(self, from_offset: int, apply) -> int:
        for offset, payload in self.records:
            if offset >= from_offset:
                apply(offset, offset + 1, payload)
        return self.end

    async def append(self, payloads: list[bytes]) -> list[tuple[int, int]]:
        positions = []
        for payload in payloads:
            self.records.append((self.end, payload))
            positions.append((self.end, self.end + 1))
            self.end += 2  # the record and its transaction's commit marker
        return positions

    async def read_at(self, offset: int) -> bytes:
        return dict(self.records)[offset]

    def location(self) -> str:
        return "marked in-memory log"

    async def close(self) -> None:
        return None


def stores(tmp_path: Path, config: Config, group: int, name: str):
    return {shard: DirectorySnapshotStore(tmp_path / name / str(shard), shard, 2)
            for shard in config.shards_of_group(group)}


def test_new_log_behind_markers_gets_its_header_and_the_next_owner_accepts_it(
        tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path), shards=4, groups=2).validate()
    log = MarkedLog()

    async def scenario() -> None:
        await log.acquire()
        _, end = await recover_group(1, config, log, stores(tmp_path, config, 1, "first"))
        assert [decode_record(payload) for _, payload in log.records] == [log_header(config, 1)]
        assert log.records[0][0] == 2 * MARKER_OFFSETS and end == log.end - 1
        await log.append([encode_record(poll_created("p", ["a", "b"]))])
        # A second owner with no snapshots replays from 0: header first, then the poll.
        await log.acquire()
        states, _ = await recover_group(1, config, log, stores(tmp_path, config, 1, "second"))
        assert all("p" in state.polls for state in states.values())

    asyncio.run(scenario())


def test_log_whose_first_record_is_not_a_header_is_refused(tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path), shards=4, groups=2).validate()
    log = MarkedLog()
    log.records.append((log.end, encode_record(poll_created("p", ["a"]))))
    log.end += 2

    with pytest.raises(LogCorrupt, match="PollCreated record"):
        asyncio.run(recover_group(1, config, log, stores(tmp_path, config, 1, "only")))


def test_log_of_format_2_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """A group log written by the release before group batches (format 2: one vote batch
    per shard per cycle, each naming its shard) would decode its batches' shard as a group:
    its header refuses it first, naming the format and what to do."""
    config = Config(data_dir=str(tmp_path), shards=4, groups=2).validate()
    log = MarkedLog()
    old_header = msgspec.structs.replace(log_header(config, 1), format=2)
    log.records.append((log.end, encode_record(old_header)))
    log.end += 2

    with pytest.raises(LogCorrupt, match="log format 2 .*release that wrote it"):
        asyncio.run(recover_group(1, config, log, stores(tmp_path, config, 1, "only")))


def test_snapshot_of_another_shard_count_is_refused(tmp_path: Path) -> None:
    """A snapshot store left by a layout of 8 shards, read by a layout of 4: refused, never
    loaded (its bitmap positions are voter_id div 8)."""
    from shards.snapshots import freeze
    from shards.state import ShardState

    config = Config(data_dir=str(tmp_path), shards=4, groups=2).validate()
    old_layout = ShardState(1, 8)
    old_layout.advance_to(10)
    store = DirectorySnapshotStore(tmp_path / "shared" / "1", 1, 2)
    asyncio.run(store.save(freeze(old_layout), old_layout.wal_offset_next))
    snapshot_stores = {1: store, 3: DirectorySnapshotStore(tmp_path / "shared" / "3", 3, 2)}

    with pytest.raises(LogCorrupt, match="shard 1 of 8, not shard 1 of 4"):
        asyncio.run(recover_group(1, config, MarkedLog(), snapshot_stores))
