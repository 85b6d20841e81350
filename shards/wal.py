"""The asynchronous face of a shard's write-ahead log, as the shard owner uses it.

Every WAL implementation (the embedded segment log here; Kafka in its own module) offers:
- `acquire()`: take the fence; waits while another owner holds it.
- `replay(from_offset, apply)`: find the durable end (cutting a torn tail where that is the
  log's rule), call `apply(offset, next_offset, payload)` for every record from
  `from_offset` to that end, in order, and return the end offset.
- `append(payloads)`: make the records durable and return their (offset, next offset)
  pairs, or raise WalUnavailable (settled: nothing written) / OutcomeUnknown.
- `read_at(offset)`: the payload of one record (receipts of repeat votes).
- `close()`.
"""

from __future__ import annotations

import asyncio
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

    async def replay(self, from_offset: int, apply) -> int:
        def run() -> int:
            end_offset = self.log.recover()
            if from_offset <= end_offset:
                for offset, next_offset, payload in self.log.read_from(from_offset):
                    apply(offset, next_offset, payload)
            return end_offset

        return await self._run(run)

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

    async def close(self) -> None:
        await self._run(self.log.close)
        self._executor.shutdown(wait=False)
