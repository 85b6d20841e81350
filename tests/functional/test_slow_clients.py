"""Slow and oversized request heads over raw sockets, against a real `votes serve`.

- 500 slowloris connections (a request head sent a few bytes at a time, never finished):
  while they are open the server answers other clients as before (every request answered,
  p99 within a bound far under the slow clients' hold), and it closes each slow connection
  once header_read_timeout_ms has passed without a whole head;
- a head over request_head_bytes_max is refused (no 2xx; 431 or the connection closed),
  and the server goes on answering.
The limits are Granian's HTTP/1 settings, configured by `votes serve` (engine/cli.py).
"""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

SLOW_CLIENTS = 500
HEADER_READ_TIMEOUT_MS = 1500
SLOW_ENV = {"VOTES_HEADER_READ_TIMEOUT_MS": str(HEADER_READ_TIMEOUT_MS)}
PROBES = 40
# Far below the slow clients' hold: a server they starved would answer after they are cut.
PROBE_P99_S_MAX = 0.5
CLOSE_MARGIN_S = 5.0
SLOW_HEAD = b"POST /v1/polls/p/votes HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory(env=SLOW_ENV)


async def probe_latencies(port: int, count: int) -> list[float]:
    """GET /healthz `count` times on one keep-alive connection; the seconds each took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    latencies = []
    try:
        for _ in range(count):
            started = time.monotonic()
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            latencies.append(time.monotonic() - started)
    finally:
        writer.close()
    return latencies


async def slow_client(port: int, stop: asyncio.Event) -> float | None:
    """Trickle a request head that never ends; the seconds until the server closed the
    connection, or None if it was still open when `stop` was set."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(SLOW_HEAD)
        await writer.drain()
        while not stop.is_set():
            try:
                writer.write(b"x")
                await writer.drain()
            except ConnectionError:
                return time.monotonic() - started
            try:
                if await asyncio.wait_for(reader.read(4096), 0.2) == b"":
                    return time.monotonic() - started
                return time.monotonic() - started  # an answer (408) ends it too
            except TimeoutError:
                continue
            except ConnectionError:
                return time.monotonic() - started
        return None
    finally:
        writer.close()


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def test_slow_clients_do_not_starve_others_and_are_cut(server) -> None:
    async def scenario() -> tuple[list[float], list[float], list[float | None]]:
        before = await probe_latencies(server.port, PROBES)
        stop = asyncio.Event()
        slow = [asyncio.create_task(slow_client(server.port, stop)) for _ in range(SLOW_CLIENTS)]
        await asyncio.sleep(0.5)  # every slow connection open and trickling
        during = await probe_latencies(server.port, PROBES)
        await asyncio.sleep(HEADER_READ_TIMEOUT_MS / 1000 + CLOSE_MARGIN_S)
        stop.set()
        return before, during, await asyncio.gather(*slow)

    before, during, closed_after = asyncio.run(scenario())
    cut = [seconds for seconds in closed_after if seconds is not None]
    print(f"\n[slow clients] /healthz p99 {p99(before) * 1000:.1f} ms alone, "
          f"{p99(during) * 1000:.1f} ms with {SLOW_CLIENTS} slow connections open; "
          f"{len(cut)} of {SLOW_CLIENTS} cut by the server, after "
          f"{min(cut, default=0):.1f}..{max(cut, default=0):.1f} s")
    assert len(during) == PROBES and p99(during) <= PROBE_P99_S_MAX
    assert len(cut) == SLOW_CLIENTS, "slow connections the server never closed"
    assert min(cut) >= HEADER_READ_TIMEOUT_MS / 1000 * 0.5


def test_oversized_head_is_refused_and_the_server_goes_on(server) -> None:
    async def scenario() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         + b"X-Big: " + b"a" * (256 * 1024) + b"\r\n\r\n")
            try:
                await writer.drain()
                return await asyncio.wait_for(reader.read(4096), 10)
            except ConnectionError:
                return b""
        finally:
            writer.close()

    answer = asyncio.run(scenario())
    print(f"\n[oversized head] answer: {answer[:60]!r}")
    assert not answer.startswith(b"HTTP/1.1 2"), answer[:200]
    assert asyncio.run(probe_latencies(server.port, 3))
