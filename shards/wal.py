"""The asynchronous face of a shard's write-ahead log, as the shard owner uses it.

Every WAL implementation (the embedded segment log here; Kafka in its own module) offers:
`acquire()` take the fence (waits while another owner holds it), `recover_blocking()` find
the durable end (called off the loop), `replay_from(offset)` iterate (offset, next offset, payload) up to that end
(blocking; called off the loop), `append(payloads)` make records durable and return their
(offset, next offset) pairs or raise WalUnavailable / OutcomeUnknown, `read_at(offset)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from shards.records import frame
from shards.segment_log import SegmentLog

LOCK_RETRY_S = 0.2


class EmbeddedWal:
    durability = SegmentLog.durability

    def __init__(self, log: SegmentLog) -> None:
        self.log = log
        # One thread per shard: appends are sequential per shard by design, and several
        # shards fsync in parallel (os.fsync releases the GIL).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal")

    async def acquire(self) -> None:
        while not self.log.try_lock():
            await asyncio.sleep(LOCK_RETRY_S)

    def recover_blocking(self) -> int:
        return self.log.recover()

    def replay_from(self, offset: int) -> Iterator[tuple[int, int, memoryview]]:
        return self.log.read_from(offset)

    async def append(self, payloads: list[bytes]) -> list[tuple[int, int]]:
        frames = [frame(payload) for payload in payloads]
        start = await self._run(self.log.append, b"".join(frames))
        positions = []
        for framed in frames:
            positions.append((start, start + len(framed)))
            start += len(framed)
        return positions

    async def read_at(self, offset: int) -> bytes:
        return await self._run(self.log.read_at, offset)

    async def _run(self, function, *arguments):
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *arguments)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.log.close()
