"""The results role's shared state: merged results per poll read from Redis, change
notifications, and the Server-Sent Events loop of one subscriber.

One process holds one pub/sub connection (PSUBSCRIBE on every poll's `changed` channel) and,
per poll being watched, one `PollWatch`: the last snapshot read and an event that is set and
replaced to wake the poll's streams, so a change costs one Redis read per process and one
wake-up per subscriber, whatever the number of subscribers. On a change the hub reads the
snapshot first and wakes the streams after (`_refresh`), so woken streams find it cached
(reading after the wake made every stream wait a second time, on the read). The hub wakes
a poll's streams at most once per EVENT_INTERVAL_S (changes in between are folded into the
next wake), so a stream sends about ten events per second at most, with no timer of its
own. Bounds: `subscribers_max` streams per process (beyond: 503 `overloaded`), one refresh
in flight per poll, polls watched at most WATCHES_MAX.
Every KEEPALIVE_TICK_S the hub wakes every stream (one timer per process, not one per
subscriber per wait: those timers were a third of the process's CPU at 5,000 subscribers);
a woken stream re-reads the snapshot, so a lost notification delays an event by at most
KEEPALIVE_TICK_S, and sends a keep-alive comment after KEEPALIVE_S of silence.

Reads are single-flight per poll: the subscribers woken by one change share one Redis read
(without it, thousands of woken streams each opened a pipeline and exhausted the client's
connection pool, MaxConnectionsError). A read started before a change never serves the
subscribers woken by it: `invalidate` drops it, and its snapshot is not cached.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from engine import crdt
from engine.errors import Overloaded, PollNotFound
from engine.results_publisher import KEY_PREFIX, definition_key, merged_key, version_key
from engine.results_view import parse_definition, results_document

log = logging.getLogger("votes.results")

EVENT_INTERVAL_S = 0.1  # a poll's streams are woken at most this often: ~10 events/s
KEEPALIVE_S = 10.0  # a comment once a stream has sent nothing for this long...
KEEPALIVE_TICK_S = 5.0  # ...checked when the hub wakes every stream: silence <= 15 s
WATCHES_MAX = 1024
# A request within this of the last read reuses it. A change drops the snapshot at once;
# the age only bounds a notification lost without a listener error, and lets a herd of
# 20,000 woken streams (longer than 50 ms to serve) share one read.
SNAPSHOT_FRESH_S = 0.5
CHANNEL_PATTERN = KEY_PREFIX + "{*}:changed"
RESUBSCRIBE_S = 1.0


class Snapshot(NamedTuple):
    document: dict[str, Any]
    body: bytes  # the JSON of `document`
    event_id: str  # the document's version: ETag and SSE id
    read_at: float


class SharedRead:
    """One read awaited by many subscribers. They wait on an Event, not on the task itself:
    a subscriber leaving cancels only its own wait, never the read (asyncio.shield would do
    the same with two futures and two callbacks per waiter; this is one future)."""

    def __init__(self, read: Awaitable[Snapshot]) -> None:
        self.finished = asyncio.Event()
        self.task = asyncio.ensure_future(self._run(read))
        # Waiters that left never fetch a failure: fetch it here, or asyncio logs it.
        self.task.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _run(self, read: Awaitable[Snapshot]) -> Snapshot:
        try:
            return await read
        finally:
            self.finished.set()

    async def result(self) -> Snapshot:
        await self.finished.wait()
        return self.task.result()


class PollWatch:
    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.changed = asyncio.Event()
        self.reading: SharedRead | None = None  # the read in flight, shared
        self.generation = 0  # raised by every change: a read of an older one is stale
        self.refresh: asyncio.Task[None] | None = None  # the read-then-wake in flight
        self.woken_at = 0.0

    def invalidate(self) -> None:
        self.snapshot = None
        self.reading = None
        self.generation += 1

    def notify(self) -> None:
        """Invalidate and wake at once (the streams read for themselves)."""
        self.invalidate()
        self.wake()

    def wake(self) -> None:
        """Wake every stream of this poll (they re-read a snapshot older than
        SNAPSHOT_FRESH_S, and send a keep-alive if due)."""
        self.woken_at = time.monotonic()
        self.changed.set()
        self.changed = asyncio.Event()


class ResultsHub:
    def __init__(self, redis: Any, subscribers_max: int) -> None:
        self.redis = redis
        self.subscribers_max = subscribers_max
        self.subscribers = 0
        self.watches: dict[str, PollWatch] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._tasks = [loop.create_task(self._listen(), name="results-listener"),
                       loop.create_task(self._tick(), name="results-keepalive")]

    async def stop(self) -> None:
        refreshes = [watch.refresh for watch in self.watches.values() if watch.refresh]
        for task in [*self._tasks, *refreshes]:
            task.cancel()
        await self.redis.aclose()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_TICK_S)
            for watch in list(self.watches.values()):
                watch.wake()

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self.redis.pubsub()
                await pubsub.psubscribe(CHANNEL_PATTERN)
                async for message in pubsub.listen():
                    if message.get("type") == "pmessage":
                        self._changed(message["channel"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: keep-alive re-reads cover it
                log.warning("results listener: %r; subscribing again", exc)
                for watch in self.watches.values():
                    watch.notify()
                await asyncio.sleep(RESUBSCRIBE_S)

    def _changed(self, channel: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        poll = name[len(KEY_PREFIX) + 1:name.rfind("}")]
        watch = self.watches.get(poll)
        if watch is not None:
            watch.invalidate()
            if watch.refresh is None:  # one in flight: later changes fold into its wake
                watch.refresh = asyncio.ensure_future(self._refresh(poll, watch))

    async def _refresh(self, poll: str, watch: PollWatch) -> None:
        """Read the poll once, then wake its streams (no sooner than EVENT_INTERVAL_S after
        the last wake). A change during the read invalidates it again: the woken streams
        then share the next read, so none sends what was read before that change."""
        try:
            await asyncio.sleep(max(0.0, watch.woken_at + EVENT_INTERVAL_S - time.monotonic()))
            await self.snapshot(poll)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001, S110 - the woken streams read again and meet it
            pass
        finally:
            watch.refresh = None
            watch.wake()

    def watch(self, poll: str) -> PollWatch:
        watch = self.watches.get(poll)
        if watch is None:
            if len(self.watches) >= WATCHES_MAX:  # drop the oldest: it is re-read on demand
                self.watches.pop(next(iter(self.watches)))
            watch = self.watches[poll] = PollWatch()
        return watch

    async def snapshot(self, poll: str) -> Snapshot:
        """The poll's merged results now (PollNotFound if no owner published it yet)."""
        watch = self.watch(poll)
        cached = watch.snapshot
        if cached is not None and time.monotonic() - cached.read_at < SNAPSHOT_FRESH_S:
            return cached
        reading = watch.reading
        if reading is None:
            reading = watch.reading = SharedRead(self._read(poll, watch, watch.generation))
        return await reading.result()

    async def _read(self, poll: str, watch: PollWatch, generation: int) -> Snapshot:
        try:
            snapshot = await self._read_redis(poll)
        finally:
            if watch.generation == generation:
                watch.reading = None
        if watch.generation == generation:
            watch.snapshot = snapshot
        return snapshot

    async def _read_redis(self, poll: str) -> Snapshot:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(definition_key(poll))
            pipe.get(version_key(poll))
            pipe.hgetall(merged_key(poll))
            raw_definition, raw_version, fields = await pipe.execute()
        if raw_definition is None:
            raise PollNotFound("no published results for this poll")
        state = crdt.counters_from_fields(poll, [(name.decode(), int(value))
                                                 for name, value in fields.items()])
        document = results_document(poll, parse_definition(raw_definition), state,
                                    int(raw_version or 0))
        event_id = f"{document['version']}{'f' if document['final'] else ''}"
        return Snapshot(document, json.dumps(document, separators=(",", ":")).encode(),
                        event_id, time.monotonic())

    def admit(self) -> None:
        if self.subscribers >= self.subscribers_max:
            raise Overloaded(f"this results process already streams to {self.subscribers_max} "
                             f"subscribers; retry shortly or poll GET .../results")
        self.subscribers += 1

    def leave(self) -> None:
        self.subscribers -= 1


def sse_event(snapshot: Snapshot) -> bytes:
    return b"id: " + snapshot.event_id.encode() + b"\nevent: results\ndata: " + \
        snapshot.body + b"\n\n"


KEEPALIVE_BYTES = b": keep-alive\n\n"


async def stream_results(read: Callable[[], Awaitable[Snapshot]],
                         changed: Callable[[], asyncio.Event],
                         send: Callable[[bytes], Awaitable[None]],
                         last_event_id: str | None) -> None:
    """Send an event whenever the snapshot's id changes, a comment once nothing was sent
    for KEEPALIVE_S, and stop after the final event. The caller cancels it when the client
    goes away. With `last_event_id` equal to the current id (a resuming client that saw
    it), nothing is sent until the next change. `changed()` paces the stream: its event
    must be set at most about every EVENT_INTERVAL_S and at least every KEEPALIVE_TICK_S
    (ResultsHub: its refresh and tick; the ingest role: a timer of EVENT_INTERVAL_S). No
    timer is armed here: one per subscriber per wait was most of the cost of a delivery."""
    sent_id = last_event_id
    sent_at = 0.0
    while True:
        event = changed()  # taken before the read, so no change between them is missed
        snapshot = await read()
        if snapshot.event_id != sent_id:
            await send(sse_event(snapshot))
            sent_id, sent_at = snapshot.event_id, time.monotonic()
        if snapshot.document["final"]:
            return
        await event.wait()
        if time.monotonic() - sent_at >= KEEPALIVE_S:
            await send(KEEPALIVE_BYTES)
            sent_at = time.monotonic()
