"""One shard's raw log, whichever kind the config names, behind one async interface.

`ShardLog.read(consume, ...)` calls `consume(frame)` for every record from an offset to the
log's end (or to `until_offset`), in log order, and returns where it stopped and a note
about an ignored torn tail; a ShardLog can read several times (verify resumes where it
stopped) and must be closed. `read_frames` is the one-shot form. The embedded log is read in
a worker thread, so a caller's event loop keeps running; Kafka is read on the loop, with one
consumer per ShardLog (aiokafka is imported only when Kafka is configured).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from engine.config import Config
from replay.rawlog import Frame, SegmentReader
from shards.backends import shard_directory


class ReadEnd(NamedTuple):
    end_offset: int
    torn_tail: str | None


def wal_directory(config: Config, shard: int) -> Path:
    return shard_directory(config.data_path, shard) / "wal"


class ShardLog:
    def __init__(self, config: Config, shard: int) -> None:
        self.config = config
        self.shard = shard
        self._kafka = None
        if config.uses_kafka:
            from replay.kafka_source import KafkaReader

            self._kafka = KafkaReader(config, shard)

    async def read(self, consume: Callable[[Frame], None], *, from_offset: int = 0,
                   until_offset: int | None = None) -> ReadEnd:
        if self._kafka is not None:
            async for frame in self._kafka.frames(from_offset, until_offset):
                consume(frame)
            return ReadEnd(self._kafka.end_offset, None)
        reader = SegmentReader(wal_directory(self.config, self.shard))

        def run() -> None:
            for frame in reader.frames(from_offset, until_offset):
                consume(frame)

        await asyncio.to_thread(run)
        return ReadEnd(reader.end_offset, reader.torn_tail)

    async def read_at(self, offset: int) -> bytes:
        if self._kafka is not None:
            return await self._kafka.read_at(offset)
        reader = SegmentReader(wal_directory(self.config, self.shard))
        return await asyncio.to_thread(reader.read_at, offset)

    async def close(self) -> None:
        if self._kafka is not None:
            await self._kafka.close()


async def read_frames(config: Config, shard: int, consume: Callable[[Frame], None], *,
                      from_offset: int = 0, until_offset: int | None = None) -> ReadEnd:
    log = ShardLog(config, shard)
    try:
        return await log.read(consume, from_offset=from_offset, until_offset=until_offset)
    finally:
        await log.close()


async def read_record(config: Config, shard: int, offset: int) -> bytes:
    """The payload of the record at `offset` of the shard's log."""
    log = ShardLog(config, shard)
    try:
        return await log.read_at(offset)
    finally:
        await log.close()
