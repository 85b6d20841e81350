"""Read one fencing group's partition of the Kafka WAL topic, read-only, for every verb.

Partition `group` of `config.wal_topic`, with a consumer of no group (`group_id=None`, nothing
committed) in `read_committed`, from an offset to the partition's last stable offset taken
when the read starts. Owner markers (shards/kafka_wal.is_owner_marker) are skipped; a
record's next offset is its offset + 1 (transaction markers take offsets, so offsets have
gaps). Every wait is bounded: starting the consumer and asking for the end offset by
`kafka_request_timeout_s`, a read by `kafka_read_stall_s` without progress; past a bound the
reader raises `Unavailable`, which the command line reports in one line.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from engine.config import Config
from replay.errors import BadInput, Unavailable
from replay.rawlog import Frame
from shards.kafka_wal import committed_reader, is_owner_marker

READ_POLL_MS = 200
READ_RECORDS_MAX = 2000
CLOSE_TIMEOUT_S = 5.0


class KafkaReader:
    def __init__(self, config: Config, group: int) -> None:
        self.config = config
        self.group = group
        self.partition = TopicPartition(config.wal_topic, group)
        self.end_offset = 0
        self.torn_tail: str | None = None  # Kafka has no torn writes; kept for symmetry
        self._consumer: AIOKafkaConsumer | None = None

    def __repr__(self) -> str:
        return f"{self.config.wal_topic}/{self.group}"

    async def _started(self) -> AIOKafkaConsumer:
        if self._consumer is not None:
            return self._consumer
        config = self.config
        consumer = committed_reader(config, f"votes-replay-g{self.group}")
        try:
            await asyncio.wait_for(consumer.start(), config.kafka_request_timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            await self._stop(consumer)
            raise Unavailable(f"Kafka at {config.kafka_bootstrap_servers} did not answer "
                              f"within {config.kafka_request_timeout_s} s: {exc!r}") from None
        except BaseException:  # cancelled: still release the connections
            await self._stop(consumer)
            raise
        consumer.assign([self.partition])
        self._consumer = consumer
        return consumer

    async def stable_end(self) -> int:
        consumer = await self._started()
        try:
            ends = await asyncio.wait_for(consumer.end_offsets([self.partition]),
                                          self.config.kafka_request_timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise Unavailable(f"{self!r}: cannot read the end offset: {exc!r}") from None
        return ends[self.partition]

    async def frames(self, from_offset: int = 0,
                     until_offset: int | None = None) -> AsyncIterator[Frame]:
        """Every committed record from `from_offset` up to the last stable offset (or up to
        `until_offset`), owner markers skipped; sets `end_offset` to where it stopped."""
        end = await self.stable_end()
        if until_offset is not None:
            end = min(end, until_offset)
        self.end_offset = max(end, from_offset)
        if from_offset >= end:
            return
        consumer = await self._started()  # started by stable_end: the same consumer
        loop = asyncio.get_running_loop()
        consumer.seek(self.partition, from_offset)
        position = from_offset
        progress_s = loop.time()
        while position < end:
            try:
                fetched = await consumer.getmany(self.partition, timeout_ms=READ_POLL_MS,
                                                 max_records=READ_RECORDS_MAX)
                now_position = await asyncio.wait_for(consumer.position(self.partition),
                                                      self.config.kafka_request_timeout_s)
            except (KafkaError, OSError, TimeoutError) as exc:
                raise Unavailable(f"{self!r}: reading at offset {position} failed: {exc!r}") from None
            for record in fetched.get(self.partition, ()):
                if record.offset >= end:
                    return
                if not is_owner_marker(record.headers):
                    yield Frame(record.offset, record.offset + 1, record.value or b"")
            if now_position > position:
                position, progress_s = now_position, loop.time()
            elif loop.time() - progress_s > self.config.kafka_read_stall_s:
                raise Unavailable(f"{self!r}: no progress at offset {position} for "
                                  f"{self.config.kafka_read_stall_s} s (end {end})")

    async def read_at(self, offset: int) -> bytes:
        """The value of the committed, non-marker record at `offset`."""
        end = await self.stable_end()
        if not 0 <= offset < end:
            raise BadInput(f"{self!r}: no record at offset {offset} (the log ends at {end})")
        async for frame in self.frames(offset, offset + 1):
            if frame.offset == offset:
                return frame.payload
        raise BadInput(f"{self!r}: no committed vote record at offset {offset}")

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await self._stop(consumer)

    @staticmethod
    async def _stop(consumer: AIOKafkaConsumer) -> None:
        try:
            await asyncio.wait_for(consumer.stop(), CLOSE_TIMEOUT_S)
        except (KafkaError, OSError, TimeoutError):
            pass
