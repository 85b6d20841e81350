"""One fencing group's raw log, whichever kind the config names, behind one async interface.

Each fencing group has one log (embedded: `DATA/groups/group-<gggg>/wal/`; Kafka: partition g
of the WAL topic) holding the records of all its shards. `GroupLog.read(consume, ...)` calls
`consume(frame)` for every record from an offset to the log's end (or to `until_offset`), in
log order, and returns where it stopped and a note about an ignored torn tail; a GroupLog can
read several times (verify resumes where it stopped) and must be closed. `read_frames` is the
one-shot form. The embedded log is read in a worker thread, so a caller's event loop keeps
running; Kafka is read on the loop, with one consumer per GroupLog (aiokafka is imported only
when Kafka is configured).

The log's first record must be the `LogHeader` of this layout and this group (format, shards,
groups, group): a log that starts with anything else was written by another layout (format 1
had no header) or for another group, and is refused (`WrongLayout`, naming the file or the
partition), never misread. Reading from offset 0 checks the first record as it passes; a read
from a later offset first reads the header. An empty log has nothing to misread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from engine.config import Config
from replay.errors import WrongLayout
from replay.rawlog import Frame, Header, SegmentReader, decode_raw, segment_bases, segment_path
from shards.backends import group_directory
from shards.records import LOG_FORMAT


class ReadEnd(NamedTuple):
    end_offset: int
    torn_tail: str | None


def wal_directory(config: Config, group: int) -> Path:
    return group_directory(config.data_path, group) / "wal"


def expected_header(config: Config, group: int) -> Header:
    return Header(LOG_FORMAT, config.shards, config.groups, group)


def check_first_frame(config: Config, group: int, frame: Frame, location: str) -> None:
    """Refuse a log whose first record is not this layout's header for this group."""
    expected = expected_header(config, group)
    record = decode_raw(frame.payload, f"{location} record at offset {frame.offset}")
    if record == expected:
        return
    found = (f"the header {tuple(record)!r} (format, shards, groups, group)"
             if isinstance(record, Header)
             else f"a {type(record).__name__.lower()} record, not a log header (a log of "
                  f"layout format 1, one log per shard, has no header)")
    raise WrongLayout(
        f"{location} starts at offset {frame.offset} with {found}; this data dir's layout "
        f"expects {tuple(expected)!r}: the log was written by another layout or for another "
        f"group. Read it with the release and data dir that wrote it.")


class GroupLog:
    def __init__(self, config: Config, group: int) -> None:
        self.config = config
        self.group = group
        self._kafka = None
        self._header_checked = False
        if config.uses_kafka:
            from replay.kafka_source import KafkaReader

            self._kafka = KafkaReader(config, group)

    def location(self) -> str:
        if self._kafka is not None:
            return f"group {self.group}'s log (Kafka topic {self.config.wal_topic} partition {self.group})"
        directory = wal_directory(self.config, self.group)
        bases = segment_bases(directory) if directory.is_dir() else []
        where = segment_path(directory, bases[0]) if bases else directory
        return f"group {self.group}'s log {where}"

    async def read(self, consume: Callable[[Frame], None], *, from_offset: int = 0,
                   until_offset: int | None = None) -> ReadEnd:
        if from_offset > 0 and not self._header_checked:
            await self.check_header()
        if not self._header_checked:
            consume = self._checking(consume)
        if self._kafka is not None:
            async for frame in self._kafka.frames(from_offset, until_offset):
                consume(frame)
            return ReadEnd(self._kafka.end_offset, None)
        reader = SegmentReader(wal_directory(self.config, self.group))

        def run() -> None:
            for frame in reader.frames(from_offset, until_offset):
                consume(frame)

        await asyncio.to_thread(run)
        return ReadEnd(reader.end_offset, reader.torn_tail)

    def _checking(self, consume: Callable[[Frame], None]) -> Callable[[Frame], None]:
        """`consume`, after checking the first frame it is given (the log's first record)."""

        def first(frame: Frame) -> None:
            if not self._header_checked:
                check_first_frame(self.config, self.group, frame, self.location())
                self._header_checked = True
            consume(frame)

        return first

    async def check_header(self) -> None:
        """Read the log's first record and refuse the log unless it is this layout's header."""
        if self._kafka is not None:
            first = None
            async for frame in self._kafka.frames(0):
                first = frame
                break
        else:
            reader = SegmentReader(wal_directory(self.config, self.group))

            def first_frame() -> Frame | None:
                for frame in reader.frames(0):
                    return frame
                return None

            first = await asyncio.to_thread(first_frame)
        if first is not None:
            check_first_frame(self.config, self.group, first, self.location())
        self._header_checked = True

    async def read_at(self, offset: int) -> bytes:
        if not self._header_checked:
            await self.check_header()
        if self._kafka is not None:
            return await self._kafka.read_at(offset)
        reader = SegmentReader(wal_directory(self.config, self.group))
        return await asyncio.to_thread(reader.read_at, offset)

    async def close(self) -> None:
        if self._kafka is not None:
            await self._kafka.close()


async def read_frames(config: Config, group: int, consume: Callable[[Frame], None], *,
                      from_offset: int = 0, until_offset: int | None = None) -> ReadEnd:
    log = GroupLog(config, group)
    try:
        return await log.read(consume, from_offset=from_offset, until_offset=until_offset)
    finally:
        await log.close()


async def read_record(config: Config, group: int, offset: int) -> bytes:
    """The payload of the record at `offset` of the group's log (its header checked first)."""
    log = GroupLog(config, group)
    try:
        return await log.read_at(offset)
    finally:
        await log.close()
