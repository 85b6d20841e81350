"""Proves the results role's hub (engine/results_sse.py) against an in-memory Redis stand-in,
under asyncio and uvloop: streams woken by one change share one Redis read (thousands of
separate reads exhausted the client's connection pool); a read begun before a change never
serves, nor is cached for, the streams woken by that change; a stream leaving does not cancel
the read the others wait for; changes within EVENT_INTERVAL_S of the last wake fold into one
wake, read once before it; and a stream with no change still gets a keep-alive comment from
the hub's tick, with no timer of its own.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import uvloop

from engine import crdt, results_sse
from engine.results_sse import KEEPALIVE_BYTES, ResultsHub, stream_results

POLL = "hub"
DEFINITION = json.dumps({"options": ["a", "b"], "embargo": False, "shards": 1}).encode()


class FakeRedis:
    """The three reads of a snapshot; every pipeline execute counts as one read and takes
    `delay_s`, so concurrent readers overlap as they would on a real connection."""

    def __init__(self, delay_s: float = 0.01) -> None:
        self.total = 1
        self.reads = 0
        self.delay_s = delay_s

    def pipeline(self, transaction: bool = False) -> FakePipeline:
        return FakePipeline(self)


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc_info) -> None:
        return None

    def get(self, key: str) -> None:
        return None

    def hgetall(self, key: str) -> None:
        return None

    async def execute(self) -> list:
        self.redis.reads += 1
        total = self.redis.total  # the value at the read's start: a slow read is stale
        await asyncio.sleep(self.redis.delay_s)
        state = crdt.Counters()
        state.tallies[("local", 0, POLL, "a")] = total
        fields = {name.encode(): str(value).encode()
                  for name, value in crdt.poll_fields(state, POLL).items()}
        return [DEFINITION, str(total).encode(), fields]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run_coroutine(coroutine):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coroutine)
    return run_coroutine


def test_streams_woken_by_one_change_share_one_read(run) -> None:
    async def scenario() -> tuple[int, set[int]]:
        redis = FakeRedis()
        hub = ResultsHub(redis, subscribers_max=10)
        snapshots = await asyncio.gather(*(hub.snapshot(POLL) for _ in range(1000)))
        return redis.reads, {snapshot.document["total"] for snapshot in snapshots}

    reads, totals = run(scenario())
    assert reads == 1 and totals == {1}


def test_a_read_begun_before_a_change_does_not_serve_after_it(run) -> None:
    async def scenario() -> tuple[int, int, int]:
        redis = FakeRedis(delay_s=0.05)
        hub = ResultsHub(redis, subscribers_max=10)
        before = asyncio.ensure_future(hub.snapshot(POLL))
        await asyncio.sleep(0.01)  # its read is in flight, holding total 1
        redis.total = 2
        hub.watch(POLL).notify()
        after = await hub.snapshot(POLL)
        stale = await before
        cached = await hub.snapshot(POLL)
        return stale.document["total"], after.document["total"], cached.document["total"]

    stale, after, cached = run(scenario())
    assert (stale, after, cached) == (1, 2, 2)


def test_a_stream_leaving_does_not_cancel_the_shared_read(run) -> None:
    async def scenario() -> int:
        hub = ResultsHub(FakeRedis(delay_s=0.05), subscribers_max=10)
        leaving = asyncio.ensure_future(hub.snapshot(POLL))
        staying = asyncio.ensure_future(hub.snapshot(POLL))
        await asyncio.sleep(0.01)
        leaving.cancel()
        return (await staying).document["total"]

    assert run(scenario()) == 1


def test_changes_fold_into_one_read_and_one_wake_per_interval(run) -> None:
    async def scenario() -> tuple[int, list[list[int]]]:
        redis = FakeRedis(delay_s=0.005)
        hub = ResultsHub(redis, subscribers_max=500)
        totals: list[list[int]] = [[] for _ in range(200)]

        def sender(seen: list[int]):
            async def send(data: bytes) -> None:
                seen.append(json.loads(data.split(b"data: ")[1])["total"])
            return send

        streams = [asyncio.ensure_future(stream_results(
            lambda: hub.snapshot(POLL), lambda: hub.watch(POLL).changed, sender(seen), None))
            for seen in totals]
        await asyncio.sleep(0.05)  # every stream sent total 1
        for total in (2, 3, 4):  # 2 wakes at once; 3 and 4 come within the interval
            redis.total = total
            hub._changed(f"results:{{{POLL}}}:changed".encode())
            await asyncio.sleep(0.03)
        await asyncio.sleep(0.2)
        for stream in streams:
            stream.cancel()
        return redis.reads, totals

    reads, totals = run(scenario())
    assert all(seen == [1, 2, 4] for seen in totals), totals[:3]
    assert reads == 3


def test_the_hub_tick_brings_a_quiet_stream_its_keep_alive(run, monkeypatch) -> None:
    monkeypatch.setattr(results_sse, "KEEPALIVE_S", 0.05)
    monkeypatch.setattr(results_sse, "KEEPALIVE_TICK_S", 0.02)

    async def scenario() -> list[bytes]:
        hub = ResultsHub(FakeRedis(delay_s=0.0), subscribers_max=10)
        sent: list[bytes] = []

        async def send(data: bytes) -> None:
            sent.append(data)

        ticking = asyncio.ensure_future(hub._tick())
        streaming = asyncio.ensure_future(stream_results(
            lambda: hub.snapshot(POLL), lambda: hub.watch(POLL).changed, send, None))
        await asyncio.sleep(0.3)
        for task in (ticking, streaming):
            task.cancel()
        return sent

    sent = run(scenario())
    assert sent[0].startswith(b"id: 1\nevent: results\n")
    assert KEEPALIVE_BYTES in sent[1:] and all(data == KEEPALIVE_BYTES for data in sent[1:])


def test_a_broadcast_sends_one_encoding_to_all_and_a_slow_stream_gets_the_latest(run) -> None:
    """The results role's streams are sent to by one sweep per change (ResultsHub.subscribe):
    every fast subscriber gets each change as the same bytes object (encoded once), while a
    subscriber whose send is still pending holds nothing back and, once it completes, gets
    only the latest event, never a backlog (one send in flight per subscriber)."""
    async def scenario() -> tuple[list[list[bytes]], list[int], int]:
        redis = FakeRedis(delay_s=0.0)
        hub = ResultsHub(redis, subscribers_max=100, sent_at_once=lambda pending: pending is None)
        fast: list[list[bytes]] = [[] for _ in range(50)]
        slow_seen: list[int] = []
        release = asyncio.get_running_loop().create_future()

        def fast_send(seen: list[bytes]):
            return lambda data: seen.append(data)  # None: taken at once

        def slow_send(data: bytes):
            slow_seen.append(json.loads(data.split(b"data: ")[1])["total"])
            return release if len(slow_seen) == 1 else None

        first = await hub.snapshot(POLL)
        hub.subscribe(POLL, slow_send, None, first)
        for seen in fast:
            hub.subscribe(POLL, fast_send(seen), None, first)
        for total in (2, 3, 4):  # apart by more than EVENT_INTERVAL_S: no folding
            redis.total = total
            hub._changed(f"results:{{{POLL}}}:changed".encode())
            await asyncio.sleep(results_sse.EVENT_INTERVAL_S + 0.05)
        release.set_result(None)
        await asyncio.sleep(0.05)
        return fast, slow_seen, len(hub.watch(POLL).subscribers)

    fast, slow_seen, subscribers = run(scenario())
    totals = [[json.loads(data.split(b"data: ")[1])["total"] for data in seen] for seen in fast]
    assert all(seen == [1, 2, 3, 4] for seen in totals), totals[:3]
    assert all(fast[0][k] is seen[k] for seen in fast for k in range(1, 4))  # one encoding
    assert slow_seen == [1, 4] and subscribers == 51
