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

The results role's streams (`subscribe`) have no loop of their own: each wake runs one
broadcast per poll (`_broadcast`) that encodes the event once and hands the same bytes to
every subscriber's send in one synchronous sweep (a task per stream woken per event, each
encoding and sending for itself, was most of the cost per delivery). A send the transport
did not take at once is awaited in a task of its own and marks the subscriber busy: the
sweep skips it, and when it completes it is offered the latest broadcast (one send in
flight per subscriber; a slow client folds events, it never queues them). `stream_results`
stays the loop of the ingest role's own stream (engine/results_page.py).

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


class Subscriber:
    """One stream of the results role, sent to by its poll's broadcast: no task of its own
    wakes per event. `busy` while a send the transport did not take at once is awaited (one
    at a time: a slow client is sent the latest event when it catches up, never a backlog);
    `ended` resolves when the final event went out or a send failed."""

    __slots__ = ("send", "sent_id", "sent_at", "busy", "ended")

    def __init__(self, send: Callable[[bytes], Awaitable[None]], last_event_id: str | None,
                 ended: asyncio.Future[None]) -> None:
        self.send = send
        self.sent_id = last_event_id
        self.sent_at = time.monotonic()
        self.busy = False
        self.ended = ended


class PollWatch:
    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.changed = asyncio.Event()
        self.reading: SharedRead | None = None  # the read in flight, shared
        self.generation = 0  # raised by every change: a read of an older one is stale
        self.refresh: asyncio.Task[None] | None = None  # the read-then-wake in flight
        self.woken_at = 0.0
        self.subscribers: set[Subscriber] = set()  # bounded by the hub's subscribers_max
        self.delivered: Snapshot | None = None  # what the last broadcast sent
        self.broadcasting: asyncio.Task[None] | None = None  # one sweep in flight per poll
        self.broadcast_again = False  # woken during a sweep: one more after it
        self.draining: set[asyncio.Task[None]] = set()  # at most one per subscriber (busy)

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
    def __init__(self, redis: Any, subscribers_max: int,
                 sent_at_once: Callable[[Awaitable[None]], bool] = lambda pending: False) -> None:
        self.redis = redis
        self.subscribers_max = subscribers_max
        # Whether a send's awaitable is already complete (Granian's for a send its channel
        # took at once), so the sweep need not await it; any other is awaited off the sweep.
        self.sent_at_once = sent_at_once
        self.subscribers = 0
        self.watches: dict[str, PollWatch] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._tasks = [loop.create_task(self._listen(), name="results-listener"),
                       loop.create_task(self._tick(), name="results-keepalive")]

    async def stop(self) -> None:
        refreshes = [task for watch in self.watches.values()
                     for task in (watch.refresh, watch.broadcasting, *watch.draining) if task]
        for task in [*self._tasks, *refreshes]:
            task.cancel()
        await self.redis.aclose()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_TICK_S)
            for poll, watch in list(self.watches.items()):
                self._wake(poll, watch)

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
                for poll, watch in list(self.watches.items()):
                    watch.invalidate()
                    self._wake(poll, watch)
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
            self._wake(poll, watch)

    def _wake(self, poll: str, watch: PollWatch) -> None:
        """Wake the poll's `stream_results` loops and broadcast to its subscribers."""
        watch.wake()
        if not watch.subscribers:
            return
        if watch.broadcasting is None:
            watch.broadcasting = asyncio.ensure_future(self._broadcast(poll, watch))
        else:
            watch.broadcast_again = True

    def watch(self, poll: str) -> PollWatch:
        watch = self.watches.get(poll)
        if watch is None:
            if len(self.watches) >= WATCHES_MAX:  # drop the oldest unwatched: re-read on demand
                idle = next((name for name, old in self.watches.items() if not old.subscribers),
                            next(iter(self.watches)))
                self.watches.pop(idle)
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

    # --- the broadcast: one sweep per wake sends one encoding to every subscriber ----------

    def subscribe(self, poll: str, send: Callable[[bytes], Awaitable[None]],
                  last_event_id: str | None, snapshot: Snapshot) -> Subscriber:
        """Join the poll's broadcast and get `snapshot` (or a newer one already broadcast)
        at once, unless the client's Last-Event-ID is its id. Admit first (`admit`)."""
        watch = self.watch(poll)
        subscriber = Subscriber(send, last_event_id, asyncio.get_running_loop().create_future())
        watch.subscribers.add(subscriber)
        latest = watch.delivered
        if latest is None or latest.read_at < snapshot.read_at:
            latest = snapshot
        self._offer(watch, subscriber, latest, sse_event(latest), time.monotonic())
        return subscriber

    def unsubscribe(self, poll: str, subscriber: Subscriber) -> None:
        watch = self.watches.get(poll)
        if watch is not None:
            watch.subscribers.discard(subscriber)

    async def _broadcast(self, poll: str, watch: PollWatch) -> None:
        try:
            while True:
                watch.broadcast_again = False
                try:
                    snapshot = await self.snapshot(poll)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - Redis away: the next tick retries
                    log.warning("results broadcast of %s: %r", poll, exc)
                    return
                watch.delivered = snapshot
                event, now = sse_event(snapshot), time.monotonic()  # encoded once for all
                for subscriber in list(watch.subscribers):  # a failed send leaves the set
                    if not subscriber.busy:
                        self._offer(watch, subscriber, snapshot, event, now)
                if not watch.broadcast_again:
                    return
        finally:
            watch.broadcasting = None

    def _offer(self, watch: PollWatch, subscriber: Subscriber, snapshot: Snapshot,
               event: bytes, now: float) -> None:
        """Send the event if the subscriber has not seen it, else a keep-alive if due."""
        if subscriber.sent_id != snapshot.event_id:
            self._send(watch, subscriber, event, snapshot.event_id, now,
                       bool(snapshot.document["final"]))
        elif now - subscriber.sent_at >= KEEPALIVE_S:
            self._send(watch, subscriber, KEEPALIVE_BYTES, subscriber.sent_id, now, False)

    def _send(self, watch: PollWatch, subscriber: Subscriber, data: bytes,
              event_id: str | None, now: float, final: bool) -> None:
        try:
            pending = subscriber.send(data)
        except Exception as exc:  # noqa: BLE001 - the client went away
            self._end(watch, subscriber, exc)
            return
        subscriber.sent_id, subscriber.sent_at = event_id, now
        if not self.sent_at_once(pending):
            subscriber.busy = True
            task = asyncio.ensure_future(self._drain(watch, subscriber, pending, final))
            watch.draining.add(task)  # held: the loop keeps only a weak reference
            task.add_done_callback(watch.draining.discard)
        elif final:
            self._end(watch, subscriber, None)

    async def _drain(self, watch: PollWatch, subscriber: Subscriber, pending: Awaitable[None],
                     final: bool) -> None:
        """Await a send the transport queued, then offer what was broadcast meanwhile."""
        try:
            await pending
        except Exception as exc:  # noqa: BLE001 - the client went away
            self._end(watch, subscriber, exc)
            return
        subscriber.busy = False
        if final:
            self._end(watch, subscriber, None)
        elif watch.delivered is not None and subscriber in watch.subscribers:
            latest = watch.delivered
            self._offer(watch, subscriber, latest, sse_event(latest), time.monotonic())

    @staticmethod
    def _end(watch: PollWatch, subscriber: Subscriber, error: Exception | None) -> None:
        watch.subscribers.discard(subscriber)
        if not subscriber.ended.done():
            subscriber.ended.set_result(None)
        if error is not None:
            log.info("results stream ended: %r", error)

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
