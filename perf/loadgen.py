"""Open-loop vote generator: requests leave on a schedule, latency counts from the schedule.

wrk (perf/wrk/votes.lua) is a closed loop: a connection sends its next vote only after the
answer to the last one, so when the server stalls the client stops sending, and the
waiting it would have caused is in no percentile (coordinated omission). wrk2 fixes that
but is not packaged on Debian, and oha (crates.io) can send only one fixed body and
header set, not one distinct signed token per request. So this is a purpose-built
open-loop generator:

- Request ``k`` has an intended send time fixed before the run from a rate profile
  (segments of constant rate; one segment = constant rate). The generator sends it at
  that time whatever happened to earlier requests, over ``--connections`` keep-alive
  HTTP/1.1 connections in turn, pipelining when a connection still has answers pending
  (the server answers them in order).
- Latency is measured from the intended send time to the arrival of the complete
  response. A request the generator itself sent late (it was busy) carries that lateness
  in its latency, and the send lag is reported on its own, so a late generator is seen.
- Every request is a vote from the next line of the token file: ``POST
  /v1/polls/<poll>/votes``, ``Authorization: Bearer <token>``, ``{"option":"<opt>"}``,
  polls and options taken in turn. The file decides which voters repeat.
- Requests still unanswered ``--drain-timeout-s`` after the last send are counted as
  unanswered and enter the latency histogram at that moment (a lower bound of their
  latency). If more than ``--outstanding-max`` requests are unanswered at once, sending
  stops and the run says ``overloaded``: the server fell behind the schedule by more than
  that.

Latencies are kept exactly (microseconds, one array entry per request: 8 bytes, so ten
million requests take 80 MB) and percentiles are exact nearest-rank values over all of
them: no histogram bins, so no quantisation to correct for. The last line
of stdout is ``VOTES_LOADGEN_SUMMARY {json}``; ``VOTES_LOADGEN_READY`` goes to stderr once
the tokens are loaded and every connection is open, so a harness can start sampling CPU.

    python -m perf.loadgen --url http://127.0.0.1:8000 --tokens tokens.txt \\
        --profile 5:2000 --connections 64 --polls bench --options a,b,c
"""

from __future__ import annotations

import argparse
import array
import asyncio
import gc
import json
import math
import sys
import time
from collections import deque
from urllib.parse import urlsplit

SUMMARY_TAG = "VOTES_LOADGEN_SUMMARY "
READY_TAG = "VOTES_LOADGEN_READY"
PERCENTILES = (50, 90, 99, 99.9, 99.99)
# Points of the latency-by-percentile curve kept in the summary, for plots.
SPECTRUM_PERCENTILES = (
    0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 99.999, 100,
)  # fmt: skip
# uvloop's timers (like epoll's timeout) have 1 ms resolution, and a shorter sleep spins
# the CPU; so the schedule is served in ticks of about 1 ms, and a request due inside a
# tick leaves up to ~1 ms late. That lateness is in its latency and in the send lag.
SLEEP_S_MIN = 0.001
BODY_SAMPLE_CHARS = 300


class ScheduleError(ValueError):
    """The profile or the token file cannot make the requested run."""


def parse_profile(text: str) -> list[tuple[float, float]]:
    """``"2:500,1:4000,4:500"`` → [(2.0, 500.0), (1.0, 4000.0), (4.0, 500.0)]:
    segments of (duration in seconds, requests per second)."""
    segments = []
    for part in text.split(","):
        duration, _, rate = part.partition(":")
        segment = (float(duration), float(rate))
        if segment[0] <= 0 or segment[1] < 0:
            raise ScheduleError(f"bad profile segment {part!r}: need duration>0 and rate>=0")
        segments.append(segment)
    if not segments:
        raise ScheduleError("empty profile")
    return segments


def intended_offsets_ns(segments: list[tuple[float, float]]) -> array.array:
    """Intended send time of every request, in ns from the start, evenly spaced per segment."""
    offsets = array.array("q")
    start_ns = 0
    for duration_s, rate_per_s in segments:
        count = round(duration_s * rate_per_s)
        if count:
            interval_ns = 1e9 / rate_per_s
            offsets.extend(start_ns + int(i * interval_ns) for i in range(count))
        start_ns += int(duration_s * 1e9)
    return offsets


def parse_responses(buffer: bytes, start: int) -> tuple[list[tuple[int, int, int]], int]:
    """Complete HTTP/1.1 responses in ``buffer`` from ``start``.

    Returns ([(status, body start, body end)], where the unparsed rest begins). Responses
    must carry Content-Length (every peer's server does); a response without it raises
    ValueError, since its end cannot be found without chunked decoding.
    """
    found = []
    position = start
    while True:
        head_end = buffer.find(b"\r\n\r\n", position)
        if head_end < 0:
            return found, position
        head = buffer[position:head_end]
        if not head.startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1.x response: {head[:80]!r}")
        status = int(head[9:12])
        index = head.find(b"\ncontent-length:")
        if index < 0:
            index = head.lower().find(b"\ncontent-length:")
            if index < 0:
                raise ValueError(f"response without content-length: {head[:300]!r}")
        line_end = head.find(b"\r", index + 16)
        length = int(head[index + 16 : line_end if line_end >= 0 else len(head)])
        body_end = head_end + 4 + length
        if body_end > len(buffer):
            return found, position
        found.append((status, head_end + 4, body_end))
        position = body_end


class Recorder:
    """Exact per-request outcomes, kept in flat arrays (cheap to append, summarised later)."""

    def __init__(self, count: int):
        self.latency_us = array.array("q")
        self.done_ms = array.array("q")  # completion time since the start, ms
        self.intended_ms = array.array("q")
        self.status = array.array("H")
        self.send_lag_us = array.array("q")
        self.samples: dict[int, str] = {}
        self.count = count

    def sent(self, lag_ns: int) -> None:
        self.send_lag_us.append(lag_ns // 1000)

    def answered(self, status: int, intended_ns: int, now_ns: int, body: bytes | None) -> None:
        self.latency_us.append((now_ns - intended_ns) // 1000)
        self.done_ms.append(now_ns // 1_000_000)
        self.intended_ms.append(intended_ns // 1_000_000)
        self.status.append(status)
        if body is not None and status not in self.samples:
            self.samples[status] = body[:BODY_SAMPLE_CHARS].decode(errors="replace")


class Connection(asyncio.Protocol):
    """One keep-alive connection; answers arrive in request order (HTTP/1.1 pipelining)."""

    def __init__(self, generator: OpenLoopGenerator):
        self.generator = generator
        self.transport: asyncio.Transport | None = None
        self.pending: deque[int] = deque()  # intended send times (absolute ns), in order
        self.buffer = b""
        self.alive = False
        self.opened = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.alive = True
        self.opened.set_result(None)

    def data_received(self, data: bytes) -> None:
        now_ns = time.monotonic_ns()
        buffer = self.buffer + data if self.buffer else data
        try:
            responses, rest = parse_responses(buffer, 0)
        except ValueError as error:
            self.generator.protocol_error(str(error))
            self.transport.close()
            return
        recorder = self.generator.recorder
        samples = recorder.samples
        for status, body_start, body_end in responses:
            if not self.pending:
                self.generator.protocol_error("a response arrived for no request")
                self.transport.close()
                return
            body = buffer[body_start:body_end] if status != 201 and status not in samples else None
            recorder.answered(status, self.pending.popleft(), now_ns, body)
        self.generator.outstanding -= len(responses)
        self.buffer = buffer[rest:] if rest < len(buffer) else b""
        if self.generator.draining and self.generator.outstanding == 0:
            self.generator.all_answered.set()

    def connection_lost(self, exc) -> None:
        self.alive = False
        if self.pending:
            self.generator.connection_lost(len(self.pending))
            self.pending.clear()
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed before it opened"))


class OpenLoopGenerator:
    def __init__(self, args: argparse.Namespace, tokens: list[bytes]):
        self.args = args
        self.tokens = tokens
        self.segments = parse_profile(args.profile)
        self.offsets = intended_offsets_ns(self.segments)
        if len(self.offsets) > len(tokens):
            raise ScheduleError(
                f"the profile schedules {len(self.offsets)} requests but the token file "
                f"holds {len(tokens)}: every request needs its own line"
            )
        self.recorder = Recorder(len(self.offsets))
        self.outstanding = 0
        self.lost = 0
        self.errors: list[str] = []
        self.draining = False
        self.all_answered = asyncio.Event()
        self.overloaded_at_s: float | None = None
        split = urlsplit(args.url)
        self.host, self.port = split.hostname or "127.0.0.1", split.port or 80
        polls = [p for p in args.polls.split(",") if p]
        options = [o for o in args.options.split(",") if o]
        # Every (poll, option) request head is built once; only the token changes.
        self.heads = []
        self.bodies = []
        for index in range(max(len(polls), len(options))):
            poll, option = polls[index % len(polls)], options[index % len(options)]
            body = b'{"option":"' + option.encode() + b'"}'
            self.bodies.append(body)
            self.heads.append(
                f"POST /v1/polls/{poll}/votes HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Authorization: Bearer ".encode()
            )
        # With as many (poll, option) pairs as max(polls, options), request k uses pair
        # k mod n: each poll gets an equal share and every option comes up in each poll
        # only when the counts are coprime, which is enough for a load test.
        self.connections: list[Connection] = []

    def protocol_error(self, message: str) -> None:
        if len(self.errors) < 10:
            self.errors.append(message)

    def connection_lost(self, pending: int) -> None:
        self.lost += pending
        self.outstanding -= pending
        if self.draining and self.outstanding <= 0:
            self.all_answered.set()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.args.connections):
            _, protocol = await loop.create_connection(
                lambda: Connection(self), self.host, self.port
            )
            await protocol.opened
            self.connections.append(protocol)

    async def run(self) -> dict:
        await self.connect()
        print(READY_TAG, file=sys.stderr, flush=True)
        offsets, tokens, heads, bodies = self.offsets, self.tokens, self.heads, self.bodies
        pairs = len(heads)
        connections = self.connections
        connection_count = len(connections)
        outstanding_max = self.args.outstanding_max
        recorder = self.recorder
        total = len(offsets)
        start_ns = time.monotonic_ns() + 20_000_000
        self.start_ns = start_ns
        k = 0
        turn = 0
        while k < total:
            now_ns = time.monotonic_ns()
            due_ns = now_ns - start_ns
            while k < total and offsets[k] <= due_ns:
                if self.outstanding >= outstanding_max:
                    self.overloaded_at_s = round((now_ns - start_ns) / 1e9, 3)
                    break
                for _ in range(connection_count):
                    connection = connections[turn]
                    turn = turn + 1 if turn + 1 < connection_count else 0
                    if connection.alive:
                        break
                else:
                    raise ConnectionError("every connection to the server has closed")
                pair = k % pairs
                connection.transport.write(heads[pair] + tokens[k] + b"\r\n\r\n" + bodies[pair])
                intended_ns = start_ns + offsets[k]
                connection.pending.append(intended_ns)
                recorder.sent(now_ns - intended_ns)
                self.outstanding += 1
                k += 1
            if self.overloaded_at_s is not None:
                break
            if k < total:
                wait_s = (start_ns + offsets[k] - time.monotonic_ns()) / 1e9
                await asyncio.sleep(max(wait_s, SLEEP_S_MIN))
        self.sent = k
        self.last_send_ns = time.monotonic_ns()
        await self.drain()
        return self.summary()

    async def drain(self) -> None:
        self.draining = True
        if self.outstanding > 0:
            try:
                await asyncio.wait_for(self.all_answered.wait(), self.args.drain_timeout_s)
            except TimeoutError:
                pass
        self.end_ns = time.monotonic_ns()
        # What is still unanswered enters the histogram now: a lower bound of its latency.
        self.unanswered = 0
        for connection in self.connections:
            for intended_ns in connection.pending:
                self.recorder.answered(0, intended_ns, self.end_ns, None)
                self.unanswered += 1
            if connection.transport is not None:
                connection.transport.close()

    def summary(self) -> dict:
        recorder = self.recorder
        start_ms = self.start_ns // 1_000_000
        statuses: dict[str, int] = {}
        for status in recorder.status:
            statuses[str(status)] = statuses.get(str(status), 0) + 1
        statuses.pop("0", None)
        schedule_s = sum(duration for duration, _ in self.segments)
        created = statuses.get("201", 0)
        return {
            "generator": "perf/loadgen.py (open loop, latency from intended send time)",
            "profile": [{"duration_s": d, "rate_per_s": r} for d, r in self.segments],
            "connections": self.args.connections,
            "scheduled": len(self.offsets),
            "sent": self.sent,
            "answered": len(recorder.status) - self.unanswered,
            "unanswered": self.unanswered,
            "connection_lost_pending": self.lost,
            "overloaded_at_s": self.overloaded_at_s,
            "protocol_errors": self.errors,
            "statuses": statuses,
            "samples": {str(k): v for k, v in recorder.samples.items()},
            "schedule_s": schedule_s,
            "wall_s": round((self.end_ns - self.start_ns) / 1e9, 3),
            "drain_s": round((self.end_ns - self.last_send_ns) / 1e9, 3),
            "created": created,
            "created_per_s": round(created / schedule_s, 1),
            "latency_us": summarize_us(recorder.latency_us),
            "latency_spectrum_us": spectrum_us(recorder.latency_us),
            "send_lag_us": summarize_us(recorder.send_lag_us),
            "series": per_second_series(recorder, start_ms, schedule_s),
        }


def percentile_of(sorted_values: list[int], percentile: float) -> int:
    """Nearest-rank percentile of already sorted values: the smallest value with at least
    ``percentile`` % of all values at or below it."""
    # The epsilon keeps float error (99.9 / 100 * 1000 = 999.0000000000001) off the rank.
    rank = max(1, math.ceil(percentile * len(sorted_values) / 100 - 1e-9))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_us(values_us: array.array) -> dict:
    """Exact p50 … p99.99, min, mean and max of µs values (every request kept, no bins)."""
    if not values_us:
        return {}
    ordered = sorted(values_us)
    summary = {f"p{p:g}": percentile_of(ordered, p) for p in PERCENTILES}
    summary["min"] = max(0, ordered[0])
    summary["mean"] = round(sum(ordered) / len(ordered), 1)
    summary["max"] = ordered[-1]
    return summary


def spectrum_us(values_us: array.array) -> list[list[float]]:
    if not values_us:
        return []
    ordered = sorted(values_us)
    return [[p, percentile_of(ordered, p)] for p in SPECTRUM_PERCENTILES]


def per_second_series(recorder: Recorder, start_ms: int, schedule_s: float) -> dict:
    """Per second of the run: 201s and other answers by completion time, and the p50/p99
    latency of the requests scheduled in that second (what a voter sending then saw)."""
    seconds = int(schedule_s) + 1
    for done in recorder.done_ms:
        seconds = max(seconds, (done - start_ms) // 1000 + 1)
    created = [0] * seconds
    other = [0] * seconds
    by_intended: list[list[int]] = [[] for _ in range(seconds)]
    for done, intended, status, latency in zip(
        recorder.done_ms, recorder.intended_ms, recorder.status, recorder.latency_us
    ):
        second = max(0, (done - start_ms) // 1000)
        if status == 201:
            created[second] += 1
        elif status:
            other[second] += 1
        by_intended[min(seconds - 1, max(0, (intended - start_ms) // 1000))].append(latency)
    p50, p99 = [], []
    for latencies in by_intended:
        latencies.sort()
        p50.append(latencies[len(latencies) // 2] if latencies else None)
        p99.append(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None)
    return {
        "second": list(range(seconds)),
        "created": created,
        "other": other,
        "latency_p50_us": p50,
        "latency_p99_us": p99,
    }


def load_tokens(path: str, first: int, count: int | None) -> list[bytes]:
    tokens = []
    with open(path, "rb") as lines:
        for index, line in enumerate(lines):
            if index < first:
                continue
            if count is not None and len(tokens) >= count:
                break
            line = line.strip()
            if line:
                tokens.append(line)
    return tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--tokens", required=True, help="token file, one token per line")
    parser.add_argument("--profile", required=True,
                        help="rate profile: duration_s:rate_per_s[,duration_s:rate_per_s...]")  # fmt: skip
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--polls", default="bench", help="comma-separated polls, used in turn")
    parser.add_argument("--options", default="a,b,c", help="comma-separated options, in turn")
    parser.add_argument("--drain-timeout-s", type=float, default=10.0)
    parser.add_argument("--outstanding-max", type=int, default=100_000)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    segments = parse_profile(args.profile)
    needed = sum(round(d * r) for d, r in segments)
    tokens = load_tokens(args.tokens, 0, needed)
    generator_holder: list[OpenLoopGenerator] = []

    async def go() -> dict:
        generator = OpenLoopGenerator(args, tokens)
        generator_holder.append(generator)
        return await generator.run()

    # The hot loop allocates no cycles worth collecting; a collection pause would show
    # up as send lag, so the collector is off for the run.
    gc.collect()
    gc.disable()
    if args.loop == "uvloop":
        import uvloop

        summary = uvloop.run(go())
    else:
        summary = asyncio.run(go())
    gc.enable()
    sys.stdout.write(SUMMARY_TAG + json.dumps(summary, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
