"""The write-ahead log's contract (`Wal`), and its embedded implementation.

`Wal` is the face every log offers the shard owner (the embedded segment log here, Kafka in
shards/kafka_wal.py; which one is chosen once at start-up, shards/backends.py). The rules a
caller and an implementation keep (docs/design.md "Durability"):
- `acquire()` takes the fence; it waits while another owner holds it.
- `replay(from_offset, apply)` finds the durable end (cutting a torn tail where that is the
  log's rule), calls `apply(offset, next_offset, payload)` for every record from
  `from_offset` to that end, in order, and returns the end offset.
- `append(payloads)` makes the records durable and gives one (offset, next offset) pair per
  payload, in order, each after the last record applied; or raises WalUnavailable
  (settled: nothing written) / OutcomeUnknown. The owner checks this answer
  (shards/pending.py `check_positions`): a log that breaks it stops the shard.
- At most `appends_in_flight_max` appends begun and not yet ended; they end in the order
  they began.
- `read_at(offset)` gives the payload of one record (receipts of repeat votes).
- `location()` says where the log's end is (a segment file, a topic partition), for messages
  that must name what an operator should look at.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from shards.log_writer import LogWriter, shared_writer
from shards.records import frame
from shards.segment_log import SEGMENT_SUFFIX, SegmentLog

# One record as the log holds it: its offset, the offset after it, its payload.
ApplyRecord = Callable[[int, int, bytes | memoryview], None]
Positions = list[tuple[int, int]]
_Result = TypeVar("_Result")


class Wal(Protocol):
    durability: str
    appends_in_flight_max: int

    async def acquire(self) -> None: ...

    async def replay(self, from_offset: int, apply: ApplyRecord) -> int: ...

    def append(self, payloads: list[bytes]) -> Awaitable[Positions]: ...

    async def read_at(self, offset: int) -> bytes: ...

    def location(self) -> str: ...

    async def close(self) -> None: ...


LOCK_RETRY_S = 0.2
# Appends of one fencing group queued at the writer at once: while one round fsyncs, the next cycles'
# appends wait behind it and share the next round's write and fsync.
APPENDS_IN_FLIGHT_MAX = 8
RECENT_READ_BYTES = 32 << 20  # see EmbeddedWal.read_at


class EmbeddedWal:
    durability = SegmentLog.durability
    appends_in_flight_max = APPENDS_IN_FLIGHT_MAX

    def __init__(self, log: SegmentLog, writer: LogWriter | None = None) -> None:
        self.log = log
        self._writer = writer
        # Recovery and reads of old records (receipts of repeat votes) run here, apart from
        # the writer, so a long replay at start-up does not hold up other shards' appends.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-read")
        self._loop: asyncio.AbstractEventLoop | None = None  # see GroupOwner._loop

    def location(self) -> str:
        bases = self.log.segment_bases()
        if not bases:
            return f"{self.log.directory} (no segment)"
        return str(self.log.directory / f"{bases[-1]:020d}{SEGMENT_SUFFIX}")

    async def acquire(self) -> None:
        self._loop = asyncio.get_running_loop()
        while not self.log.try_lock():
            await asyncio.sleep(LOCK_RETRY_S)

    async def replay(self, from_offset: int, apply: ApplyRecord) -> int:
        def run() -> int:
            end_offset = self.log.recover()
            if from_offset <= end_offset:
                for offset, next_offset, payload in self.log.read_from(from_offset):
                    apply(offset, next_offset, payload)
            return end_offset

        return await self._run(run)

    @property
    def writer(self) -> LogWriter:
        if self._writer is None:
            self._writer = shared_writer()
        return self._writer

    def append(self, payloads: list[bytes]) -> asyncio.Future[Positions]:
        """A future of the records' positions, answered once they are fsync'd (log_writer)."""
        loop = self._loop or asyncio.get_running_loop()
        return self.writer.append(self.log, [frame(payload) for payload in payloads], loop)

    async def read_at(self, offset: int) -> bytes:
        # A record among the log's last RECENT_READ_BYTES was written moments ago and sits
        # in the page cache: read it here (a few microseconds) rather than through the
        # executor, whose hand-off cost the event loop ~70 us of CPU per 409 on this VM.
        # Older records may need the disk: the executor keeps that wait off the loop.
        if 0 <= self.log.end_offset - offset <= RECENT_READ_BYTES:
            return self.log.read_at(offset)
        return await self._run(self.log.read_at, offset)

    async def _run(self, function: Callable[..., _Result], *arguments: Any) -> _Result:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *arguments)

    async def close(self) -> None:
        # Through the writer, so appends queued before the close are written first.
        await self.writer.call(self.log, self.log.close)
        self._executor.shutdown(wait=False)
