"""Freshness of the live results (issue 13): from a vote's 201 to the SSE event showing it.

    python -m perf.bench_results_freshness [--rate 200] [--duration-s 10] [--workers 1]

Starts a private redis-server (deploy/local/redis_server.py), a `votes serve` publishing its
tallies to it every `results_publish_ms`, and a `votes results` process; opens one SSE stream
on the results role and one on the ingest role's own stream, then sends votes at a paced
rate over a few keep-alive connections. The k-th 201 (in order of arrival) got its answer at
t_k; a stream first showed a total >= k at s_k; the freshness of vote k is s_k - t_k (both on
this process's monotonic clock; negative when an event showed the vote before its 201 came
back). Prints p50/p99/max per stream, PASS/FAIL against p99 <= 250 ms for one region, then
the cross-region row (perf/bench_results_freshness_regions.py: 201 in region A to region B's
stream through `votes replicator`, p99 <= 1 s), and writes
perf/results/freshness.json. Every wait is bounded; every process started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from perf import RESULTS_DIR, BenchError
from perf.cpu_sampling import CpuSampler
from perf.machine import describe_machine
from perf.output import print_conditions, print_table, write_json
from perf.processes import ServerProcess, free_port, http_request, wait_for_http

FRESHNESS_TARGET_MS = 250.0
CROSS_REGION_TARGET_MS = 1000.0
VENV_BIN = Path(sys.executable).parent
READY_WAIT_S = 30.0
SETTLE_WAIT_S = 5.0  # after the last 201, until every stream shows the final total
HTTP_READ_BYTES_MAX = 1 << 16
EVENT_BYTES_MAX = 1 << 20  # one SSE event line, bounded
TOKEN_TTL_S = 3600


# --- services -------------------------------------------------------------------------------

def start_redis(run_dir: Path) -> tuple[ServerProcess, str]:
    """A private redis-server without persistence (the local stack's own argv)."""
    from deploy.local.redis_server import ensure_redis, redis_argv, redis_ping

    port = free_port()
    (run_dir / "redis").mkdir(parents=True, exist_ok=True)
    server = ServerProcess("redis", redis_argv(ensure_redis(), port, run_dir / "redis"),
                           run_dir / "redis.log")
    deadline = time.monotonic() + READY_WAIT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(f"redis-server exited\n{server.log_tail()}")
        if redis_ping(port):
            return server, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.1)
    server.stop()
    raise BenchError(f"redis-server did not answer PING on {port}\n{server.log_tail()}")


def start_results_role(run_dir: Path, redis_url: str, subscribers_max: int) -> tuple[ServerProcess, str]:
    port = free_port()
    environment = {**os.environ, "VOTES_RESULTS_SUBSCRIBERS_MAX": str(subscribers_max)}
    server = ServerProcess("results", [str(VENV_BIN / "votes"), "results", "--port", str(port),
                                       "--redis-url", redis_url],
                           run_dir / "results.log", env=environment)
    base_url = f"http://127.0.0.1:{port}"
    wait_for_http(base_url + "/healthz", READY_WAIT_S, server=server)
    return server, base_url


def start_engine(run_dir: Path, redis_url: str, workers: int) -> tuple[ServerProcess, str, Path]:
    port = free_port()
    data_dir = run_dir / "engine-data"
    environment = {**os.environ, "VOTES_REDIS_URL": redis_url}
    server = ServerProcess("engine", [str(VENV_BIN / "votes"), "serve", "--data-dir", str(data_dir),
                                      "--port", str(port), "--workers", str(workers)],
                           run_dir / "engine.log", env=environment)
    base_url = f"http://127.0.0.1:{port}"
    wait_for_http(base_url + "/readyz", READY_WAIT_S, server=server)
    return server, base_url, data_dir


@contextmanager
def stopping(servers: list[ServerProcess]):
    try:
        yield servers
    finally:
        for server in reversed(servers):
            server.stop()


def create_poll(base_url: str, data_dir: Path, poll: str) -> None:
    from engine.keys import load_keys
    from engine.tokens import issue_admin_token

    admin = issue_admin_token(load_keys(data_dir), ttl_s=TOKEN_TTL_S)
    status, body = http_request("POST", base_url + "/v1/polls",
                                {"id": poll, "options": ["a", "b"]}, token=admin)
    if status != 201:
        raise BenchError(f"creating poll {poll}: {status} {body[:200]!r}")


def wait_results(base_url: str, poll: str, timeout_s: float = READY_WAIT_S) -> None:
    """Until `base_url` serves the poll's results (the first publish reached Redis)."""
    wait_for_http(f"{base_url}/v1/polls/{poll}/results", timeout_s)


# --- clients --------------------------------------------------------------------------------

def parse_url(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").split(":")
    return host, int(port)


class StreamWatcher:
    """One SSE stream read with raw asyncio streams: (receipt time, total) per event."""

    def __init__(self, name: str, base_url: str, poll: str) -> None:
        self.name = name
        self.base_url = base_url
        self.poll = poll
        self.events: list[tuple[float, int]] = []
        self.task: asyncio.Task | None = None

    async def open(self) -> None:
        host, port = parse_url(self.base_url)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, limit=EVENT_BYTES_MAX), READY_WAIT_S)
        writer.write(f"GET /v1/polls/{self.poll}/results/stream HTTP/1.1\r\nHost: {host}\r\n"
                     f"Accept: text/event-stream\r\n\r\n".encode())
        status = await asyncio.wait_for(reader.readline(), READY_WAIT_S)
        if b" 200 " not in status:
            raise BenchError(f"{self.name} stream answered {status!r}")
        self.writer = writer
        self.task = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            index = line.find(b"data: ")
            if index >= 0:  # a chunk-size line may come first: the data line is found anyway
                document = json.loads(line[index + 6:])
                self.events.append((time.monotonic(), int(document["total"])))

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writer.close()

    def total(self) -> int:
        return self.events[-1][1] if self.events else 0


async def send_votes(base_url: str, poll: str, tokens: list[str], rate_per_s: float,
                     connections: int) -> tuple[list[float], int, float]:
    """Send one vote per token at `rate_per_s` (intended send times fixed in advance),
    over `connections` keep-alive connections, one request at a time on each. Returns the
    201 times, the count of other answers, and the worst lateness of a send in seconds."""
    host, port = parse_url(base_url)
    queue: asyncio.Queue[tuple[float, str]] = asyncio.Queue(maxsize=len(tokens))
    times_201: list[float] = []
    others = [0]
    lateness_s = [0.0]
    start = time.monotonic() + 0.2

    async def connection_loop() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                due, token = await queue.get()
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                lateness_s[0] = max(lateness_s[0], time.monotonic() - due)
                body = b'{"option":"a"}'
                writer.write(f"POST /v1/polls/{poll}/votes HTTP/1.1\r\nHost: {host}\r\n"
                             f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READY_WAIT_S)
                length = 0
                for header in head.split(b"\r\n"):
                    if header.lower().startswith(b"content-length:"):
                        length = int(header.split(b":")[1])
                await reader.readexactly(length)
                if head.startswith(b"HTTP/1.1 201"):
                    times_201.append(time.monotonic())
                else:
                    others[0] += 1
                queue.task_done()
        finally:
            writer.close()

    # Each connection takes the next due vote when it is free: a slow answer on one
    # connection does not hold back the votes due meanwhile on the others.
    for index, token in enumerate(tokens):
        queue.put_nowait((start + index / rate_per_s, token))
    workers = [asyncio.ensure_future(connection_loop()) for _ in range(connections)]
    try:
        await asyncio.wait_for(queue.join(), len(tokens) / rate_per_s + READY_WAIT_S)
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return sorted(times_201), others[0], lateness_s[0]


# --- figures --------------------------------------------------------------------------------

def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-fraction * len(sorted_values) // 1))))
    return sorted_values[rank - 1]


def freshness_ms(times_201: list[float], events: list[tuple[float, int]]) -> tuple[list[float], int]:
    """Per vote k (k-th 201), ms from its 201 to the first event with a total >= k; and the
    number of votes no event showed."""
    values: list[float] = []
    event_index = 0
    for k, answered_at in enumerate(times_201, start=1):
        while event_index < len(events) and events[event_index][1] < k:
            event_index += 1
        if event_index == len(events):
            return sorted(values), len(times_201) - k + 1
        values.append((events[event_index][0] - answered_at) * 1000)
    return sorted(values), 0


def summary(values_ms: list[float], missing: int) -> dict:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    p99 = percentile(values_ms, 0.99)
    verdict = "PASS" if p99 is not None and p99 <= FRESHNESS_TARGET_MS and missing == 0 else "FAIL"
    return {"votes": len(values_ms) + missing, "missing": missing,
            "p50_ms": rounded(percentile(values_ms, 0.50)), "p99_ms": rounded(p99),
            "max_ms": rounded(values_ms[-1] if values_ms else None),
            "min_ms": rounded(values_ms[0] if values_ms else None),
            "target_p99_ms": FRESHNESS_TARGET_MS, "verdict": verdict}


async def measure(engine_url: str, results_url: str, data_dir: Path, poll: str,
                  args: argparse.Namespace) -> dict:
    from engine.keys import load_keys
    from engine.tokens import issue_voter_tokens

    count = int(args.rate * args.duration_s)
    tokens = list(issue_voter_tokens(load_keys(data_dir), 1, count, ttl_s=TOKEN_TTL_S))
    watchers = [StreamWatcher("results role (Redis, votes results)", results_url, poll),
                StreamWatcher("ingest role (its own stream)", engine_url, poll)]
    for watcher in watchers:
        await watcher.open()
    await asyncio.sleep(0.5)  # the first event (total 0) arrives
    times_201, others, lateness_s = await send_votes(engine_url, poll, tokens, args.rate,
                                                     args.connections)
    deadline = time.monotonic() + SETTLE_WAIT_S
    while time.monotonic() < deadline and any(w.total() < len(times_201) for w in watchers):
        await asyncio.sleep(0.05)
    for watcher in watchers:
        watcher.close()
    rows = {}
    for watcher in watchers:
        values, missing = freshness_ms(times_201, watcher.events)
        rows[watcher.name] = {**summary(values, missing), "events": len(watcher.events),
                              "last_total": watcher.total()}
    return {"votes_sent": count, "answers_201": len(times_201), "answers_other": others,
            "send_lateness_ms_max": round(lateness_s * 1000, 1), "streams": rows}


def run(args: argparse.Namespace) -> dict:
    from engine.config import Config
    from engine.results_sse import EVENT_INTERVAL_S

    run_dir = Path(tempfile.mkdtemp(prefix="votes-freshness-", dir=args.data_root))
    poll = "freshness"
    try:
        redis, redis_url = start_redis(run_dir)
        with stopping([redis]) as servers:
            engine, engine_url, data_dir = start_engine(run_dir, redis_url, args.workers)
            servers.append(engine)
            results, results_url = start_results_role(run_dir, redis_url, subscribers_max=16)
            servers.append(results)
            create_poll(engine_url, data_dir, poll)
            wait_results(results_url, poll)
            sampler = CpuSampler({"engine": engine.pid, "results": results.pid,
                                  "redis": redis.pid, "client": os.getpid()}).start()
            measured = asyncio.run(measure(engine_url, results_url, data_dir, poll, args))
            usage = sampler.stop()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    measured["cpu_percent"] = usage.cpu_percent
    measured["machine_busy_percent"] = usage.machine_busy_percent
    measured["parameters"] = {"rate_per_s": args.rate, "duration_s": args.duration_s,
                              "connections": args.connections, "workers": args.workers,
                              "results_publish_ms": Config().results_publish_ms,
                              "sse_event_interval_ms": EVENT_INTERVAL_S * 1000}
    # Imported here: the cross-region bench reuses this module's services and clients.
    from perf import bench_results_freshness_regions

    measured["cross_region"] = bench_results_freshness_regions.run(args)
    return measured


def report(measured: dict) -> None:
    rows = [[name, row["votes"], row["missing"], row["p50_ms"], row["p99_ms"], row["max_ms"],
             row["events"], row["verdict"]] for name, row in measured["streams"].items()]
    cross = measured["cross_region"]
    rows.append([f"across regions (A -> replicator {cross['parameters']['replicator_interval_ms']}"
                 f" ms -> B)", cross["answers_201"], cross["missing"], cross["p50_ms"],
                 cross["p99_ms"], cross["max_ms"], cross["events"], cross["verdict"]])
    print(f"\n== freshness, 201 -> SSE event (ms; target p99 <= {FRESHNESS_TARGET_MS:.0f} one "
          f"region, <= {CROSS_REGION_TARGET_MS:.0f} across regions)")
    print_table(["stream", "votes", "missing", "p50", "p99", "max", "events", "verdict"], rows)
    print(f"  201s {measured['answers_201']} of {measured['votes_sent']} sent "
          f"(other answers {measured['answers_other']}), worst send lateness "
          f"{measured['send_lateness_ms_max']} ms; CPU % of a core {measured['cpu_percent']}, "
          f"machine busy {measured['machine_busy_percent']} % of 200")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="votes per second")
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="`votes serve --workers`")
    parser.add_argument("--interval-ms", type=int, default=200,
                        help="the cross-region replicator's interval")
    parser.add_argument("--data-root", default="/var/tmp")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "freshness.json")
    args = parser.parse_args(argv)
    if not (1 <= args.rate <= 5000 and 1 <= args.duration_s <= 120 and 1 <= args.connections <= 64):
        parser.error("bounds: --rate 1..5000, --duration-s 1..120, --connections 1..64")
    return args


def measure_and_write(benchmark: str, args: argparse.Namespace,
                      run_bench: Callable[[argparse.Namespace], dict],
                      report_bench: Callable[[dict], None]) -> int:
    """Print the conditions, run, print the table, write the JSON (this bench's and the
    cross-region one's, perf/bench_results_freshness_regions.py)."""
    conditions = describe_machine(("votes-engine", "granian", "redis"))
    print_conditions(conditions, vars(args) | {"output": str(args.output)})
    measured = run_bench(args)
    report_bench(measured)
    write_json(args.output, {"benchmark": benchmark, "conditions": conditions, **measured})
    print(f"  wrote {args.output}")
    return 0  # a FAIL is a verdict, printed and in the JSON; a run that broke raises


def main(argv: list[str] | None = None) -> int:
    return measure_and_write("results_freshness", parse_args(argv), run, report)


if __name__ == "__main__":
    sys.exit(main())
