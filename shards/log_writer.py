"""Group commit at the disk: one thread per worker makes every shard's appends durable.

Why one thread and not one per shard: a vote cycle touches most of a worker's shards, and a
hand-off per shard per cycle (an executor job, a wake-up of the event loop when it ends)
cost the event loop more than the votes themselves. Here the loop queues each shard's
append without waiting, and the writer drains everything queued since its last round:
it writes each log's appends as one write and fsyncs each log once (several logs in
parallel on `fsync_threads` threads: fsyncs of different files overlap on the device), then
answers every append of the round with one call into each event loop. While a round's
fsyncs run, the next appends queue up: batches grow with the load and no timer is needed.

Order and failure, per log: appends are written in the order they were queued, and their
futures are answered in that order. A round's appends to one log share one write and one
fsync, so they succeed or fail together (SegmentLog.append rolls the log back to its durable
end and raises WalUnavailable, or OutcomeUnknown if even that fails); appends queued later
go on from the log's durable end.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from shards.segment_log import WRITE_BYTES_MAX, SegmentLog

# A round writes at most this much to one log (SegmentLog refuses bigger writes); what does
# not fit waits for the next round.
ROUND_BYTES_MAX = WRITE_BYTES_MAX // 2
FSYNC_THREADS_MAX = 16

# An append's records' (offset, next offset) pairs (shards/wal.py's Positions).
_Positions = list[tuple[int, int]]
_Result = TypeVar("_Result")
# What the writer hands an event loop: (future, result, error). Appends' and calls' futures
# hold different results in one list, so the future's result type is open here.
_Answer = tuple[asyncio.Future[Any], object, BaseException | None]
_Answers = dict[asyncio.AbstractEventLoop, list[_Answer]]
# One append's outcome in a round: (append, its positions, None) or (append, None, error).
_WriteOutcome = tuple["_Append", _Positions | None, Exception | None]


class _Append:
    __slots__ = ("log", "data", "lengths", "future", "loop")

    def __init__(self, log: SegmentLog, data: bytes, lengths: list[int],
                 future: asyncio.Future[_Positions], loop: asyncio.AbstractEventLoop) -> None:
        self.log = log
        self.data = data
        self.lengths = lengths
        self.future = future
        self.loop = loop


class _Call:
    """A blocking call on a log, run in queue order with its appends (close, reads)."""

    __slots__ = ("log", "function", "future", "loop")

    def __init__(self, log: SegmentLog, function: Callable[[], object],
                 future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.log = log
        self.function = function
        self.future = future
        self.loop = loop


def _resolve(answers: list[_Answer]) -> None:
    """On the event loop: answer a round's futures in queue order."""
    for future, result, error in answers:
        if future.done():  # cancelled by a shutdown; the log decided anyway
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class LogWriter:
    def __init__(self, fsync_threads: int = 8) -> None:
        self._queue: collections.deque[_Append | _Call] = collections.deque()
        self._ready = threading.Condition()
        self._fsync_pool = ThreadPoolExecutor(max_workers=max(1, min(fsync_threads, FSYNC_THREADS_MAX)),
                                              thread_name_prefix="wal-fsync")
        self._thread = threading.Thread(target=self._run, name="wal-writer", daemon=True)
        self._thread.start()

    def append(self, log: SegmentLog, frames: list[bytes],
               loop: asyncio.AbstractEventLoop) -> asyncio.Future[_Positions]:
        """Queue framed records for `log`; the future (of `loop`, the caller's running loop)
        gets their (offset, next offset) pairs."""
        future: asyncio.Future[_Positions] = loop.create_future()
        self._put(_Append(log, b"".join(frames), [len(framed) for framed in frames], future, loop))
        return future

    def call(self, log: SegmentLog, function: Callable[[], _Result]) -> asyncio.Future[_Result]:
        """Run `function()` on the writer after every append to `log` queued before it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Result] = loop.create_future()
        self._put(_Call(log, function, future, loop))
        return future

    def _put(self, job: _Append | _Call) -> None:
        with self._ready:
            self._queue.append(job)
            self._ready.notify()

    # The writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            jobs = self._take_round()
            answers: _Answers = {}  # loop -> [(future, result, error)], in queue order
            for group in self._groups(jobs):
                if isinstance(group, _Call):
                    self._run_call(group, answers)
                    continue
                self._write_groups(group, answers)
            for loop, loop_answers in answers.items():
                try:
                    loop.call_soon_threadsafe(_resolve, loop_answers)
                except RuntimeError:  # that loop is closed: nobody waits for these answers
                    pass

    def _take_round(self) -> list[_Append | _Call]:
        with self._ready:
            while not self._queue:
                self._ready.wait()
            jobs = list(self._queue)
            self._queue.clear()
        return jobs

    @staticmethod
    def _groups(
            jobs: list[_Append | _Call]) -> Iterator[dict[SegmentLog, list[_Append]] | _Call]:
        """Cut the round at calls (a close must follow the appends queued before it): yield
        {log: [appends]} runs with a bounded size per log, and the calls between them."""
        run: dict[SegmentLog, list[_Append]] = {}
        run_bytes: dict[SegmentLog, int] = {}
        for job in jobs:
            if isinstance(job, _Call):
                if run:
                    yield run
                    run, run_bytes = {}, {}
                yield job
                continue
            used = run_bytes.get(job.log, 0)
            if used and used + len(job.data) > ROUND_BYTES_MAX:
                yield run
                run, run_bytes, used = {}, {}, 0
            run.setdefault(job.log, []).append(job)
            run_bytes[job.log] = used + len(job.data)
        if run:
            yield run

    def _write_groups(self, run: dict[SegmentLog, list[_Append]], answers: _Answers) -> None:
        if len(run) == 1:
            outcomes = [self._write_log(*next(iter(run.items())))]
        else:
            outcomes = list(self._fsync_pool.map(lambda item: self._write_log(*item), run.items()))
        for outcome in outcomes:
            for job, result, error in outcome:
                answers.setdefault(job.loop, []).append((job.future, result, error))

    @staticmethod
    def _write_log(log: SegmentLog, appends: list[_Append]) -> list[_WriteOutcome]:
        """One write and one fsync for a log's appends of this round."""
        try:
            start = log.append(b"".join(job.data for job in appends) if len(appends) > 1
                               else appends[0].data)
        except Exception as error:  # WalUnavailable / OutcomeUnknown, settled by the log
            return [(job, None, error) for job in appends]
        outcome: list[_WriteOutcome] = []
        for job in appends:
            positions: _Positions = []
            for length in job.lengths:
                positions.append((start, start + length))
                start += length
            outcome.append((job, positions, None))
        return outcome

    @staticmethod
    def _run_call(call: _Call, answers: _Answers) -> None:
        result: object
        error: Exception | None
        try:
            result, error = call.function(), None
        except Exception as exc:
            result, error = None, exc
        answers.setdefault(call.loop, []).append((call.future, result, error))


_writer: LogWriter | None = None
_writer_pid = 0
_writer_lock = threading.Lock()


def shared_writer() -> LogWriter:
    """The process's writer (one per worker process), started on first use; a forked child
    starts its own (threads do not survive a fork)."""
    global _writer, _writer_pid
    with _writer_lock:
        if _writer is None or _writer_pid != os.getpid():
            _writer, _writer_pid = LogWriter(), os.getpid()
        return _writer
