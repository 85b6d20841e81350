"""Fan-out of the live results (issue 13): SSE subscribers one `votes results` process holds
while delivering every update, the delay of each delivery, and its memory per subscriber.

    python -m perf.bench_results_fanout [--subscribers 1000,2500,5000,10000,20000] [--updates 30]

Per step of the ramp: a fresh `votes results` (results_subscribers_max raised to the step,
the fd limit raised to its hard maximum, which children inherit) on a private redis-server;
`--clients` client processes (this module with `--client`: uvloop protocols, one short
parse per read) open N streams between them and wait for each stream's first event; the
process tree's RSS is read before and after (growth / N = memory per subscriber); then the
driver publishes `--updates` updates at `--update-rate` per second by running the
publisher's own merge (engine/results_publisher.py, one shard's total rising by one per
update, so update k carries total k). The delivery delay of update k to a subscriber is the
time of its first event with a total >= k minus the time the merge was sent (one monotonic
clock for every process of the machine). Printed per step: p50/p99/max delay, the fraction
of subscribers that reached the last update ("complete") and that got every update as an
event of its own ("distinct": the role folds changes less than 100 ms apart into one
event), the CPU of the results process and of the clients (2 cores shared: a client near
100 % of a core limited the result), and PASS/FAIL against >= 20,000 subscribers with p99
<= 250 ms. JSON to perf/results/fanout.json.

The hard RLIMIT_NOFILE bounds what one process can hold: a step above it minus
FDS_RESERVED is run at that bound and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from types import SimpleNamespace

from perf import RESULTS_DIR, BenchError
from perf.bench_results_freshness import percentile, start_redis, start_results_role
from perf.cpu_sampling import CpuSampler, process_tree
from perf.machine import describe_machine
from perf.output import print_conditions, print_table, write_json
from perf.processes import ServerProcess
from perf.sse_client import ensure_sse_client, go_version

SUBSCRIBERS_TARGET = 20_000
DELAY_TARGET_MS = 250.0
FDS_RESERVED = 200  # the results process's own files, Redis and listening sockets
CONNECTS_IN_FLIGHT_MAX = 256
CONNECT_WAIT_S = 120.0  # for every stream of a step to show its first event
DELIVERY_TAIL_S = 0.5  # after the last update, still inside the CPU window
SETTLE_WAIT_S = 4.5  # then, for every stream to show the last update
CLIENT_ANSWER_WAIT_S = 180.0
READ_TAIL_BYTES_MAX = 4096  # a partial event kept between reads, bounded
TOTAL_MARKER = b'"total":'
POLL = "fanout"


# --- client process -------------------------------------------------------------------------

class Subscriber(asyncio.Protocol):
    """One SSE stream: (receipt time, total) per event, parsed from the raw bytes."""

    def __init__(self, request: bytes, events: list) -> None:
        self.request = request
        self.events = events
        self.pending = b""
        self.closed = False

    def connection_made(self, transport) -> None:
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        data = self.pending + data
        end = data.rfind(b"\n\n")  # events end with a blank line; the rest waits
        if end < 0:
            self.pending = data[-READ_TAIL_BYTES_MAX:]
            return
        self.pending = data[end + 2:][-READ_TAIL_BYTES_MAX:]
        marker = data.rfind(TOTAL_MARKER, 0, end)
        if marker >= 0:
            start = marker + len(TOTAL_MARKER)
            stop = start
            while data[stop:stop + 1].isdigit():
                stop += 1
            self.events.append((now, int(data[start:stop])))

    def connection_lost(self, exc) -> None:
        self.closed = True


async def client_main() -> None:
    """Commands on stdin, one JSON line each; one JSON answer line per command on stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    command = json.loads(await reader.readline())
    host, port, count = command["host"], command["port"], command["count"]
    request = (f"GET /v1/polls/{POLL}/results/stream HTTP/1.1\r\nHost: {host}\r\n"
               f"Accept: text/event-stream\r\n\r\n").encode()
    streams: list[tuple[Subscriber, list]] = []
    failures: list[str] = []
    gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT_MAX)

    async def connect() -> None:
        events: list = []
        async with gate:
            try:
                _, protocol = await asyncio.wait_for(loop.create_connection(
                    lambda: Subscriber(request, events), host, port), 30.0)
            except (OSError, TimeoutError) as error:
                failures.append(repr(error))
                return
            streams.append((protocol, events))
            deadline = time.monotonic() + 30.0
            while not events and not protocol.closed and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # the first event came: the stream is admitted

    started = time.monotonic()
    await asyncio.gather(*(connect() for _ in range(count)))
    ready = sum(1 for _, events in streams if events)
    answer({"connected": len(streams), "ready": ready, "failures": failures[:5],
            "failed": len(failures), "connect_s": round(time.monotonic() - started, 2)})
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    command = json.loads(await reader.readline())  # the publication times, after the updates
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    published = [float(value) for value in command["published"]]
    delays = array("f")
    complete = distinct = 0
    for _, events in streams:
        totals = {total for _, total in events}
        complete += bool(events) and events[-1][1] >= len(published)
        distinct += all(k in totals for k in range(1, len(published) + 1))
        index = 0
        for k, published_at in enumerate(published, start=1):
            while index < len(events) and events[index][1] < k:
                index += 1
            if index == len(events):
                break
            delays.append((events[index][0] - published_at) * 1000)
    cpu_s = (usage_after.ru_utime + usage_after.ru_stime
             - usage_before.ru_utime - usage_before.ru_stime)
    answer({"complete": complete, "distinct": distinct, "streams": len(streams),
            "cpu_s_during_updates": round(cpu_s, 3),
            "delays_ms": base64.b64encode(delays.tobytes()).decode()})


def answer(document: dict) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


# --- driver ---------------------------------------------------------------------------------

def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class Publisher:
    """The ingest worker's publisher, fed one shard whose total rises by one per update."""

    def __init__(self, redis_url: str) -> None:
        import redis.asyncio

        from engine.results_publisher import ResultsPublisher, ShardTallies

        self.total = 0
        self.client = redis.asyncio.Redis.from_url(redis_url)
        config = SimpleNamespace(region="local", shards=1, results_publish_ms=100.0)
        self.publisher = ResultsPublisher(
            self.client, config,
            lambda: [ShardTallies(0, POLL, ["a", "b"], [self.total, 0], False)],
            lambda: {})

    async def publish(self) -> float:
        """Raise the total by one and merge it; the time the merge was sent."""
        self.total += 1
        sent_at = time.monotonic()
        await self.publisher.publish_once()
        return sent_at


async def reset_poll(redis_url: str) -> None:
    """The poll published afresh at total 0: it exists, nothing counted yet."""
    publisher = Publisher(redis_url)
    try:
        await publisher.client.delete(*(f"results:{{{POLL}}}:{name}"
                                        for name in ("merged", "definition", "version")))
        await publisher.publisher.publish_once()
    finally:
        await publisher.client.aclose()


class ClientProcess:
    def __init__(self, run_dir: Path, index: int, argv: list[str]) -> None:
        self.log = open(run_dir / f"client-{index}.log", "wb")  # noqa: SIM115 - as long as the process
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, start_new_session=True)

    def send(self, document: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(document) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded: the client's own waits are bounded
        if not line:
            raise BenchError(f"a fan-out client exited with {self.proc.wait(10)}")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


async def run_updates(redis_url: str, updates: int, rate_per_s: float) -> list[float]:
    publisher = Publisher(redis_url)
    try:
        published: list[float] = []
        start = time.monotonic()
        for k in range(updates):
            await asyncio.sleep(max(0.0, start + k / rate_per_s - time.monotonic()))
            published.append(await publisher.publish())
        return published
    finally:
        await publisher.client.aclose()


def run_step(run_dir: Path, redis: ServerProcess, redis_url: str, requested: int, held_max: int,
             args: argparse.Namespace) -> dict:
    subscribers = min(requested, held_max)
    asyncio.run(reset_poll(redis_url))
    results, results_url = start_results_role(run_dir, redis_url, subscribers_max=subscribers)
    clients: list[ClientProcess] = []
    try:
        host, port = results_url.removeprefix("http://").split(":")
        rss_before = tree_rss_bytes(results.pid)
        shares = [subscribers // args.clients + (index < subscribers % args.clients)
                  for index in range(args.clients)]
        clients = [ClientProcess(run_dir, index, args.client_argv) for index in range(args.clients)]
        for client, share in zip(clients, shares, strict=True):
            client.send({"host": host, "port": int(port), "count": share})
        connected = [client.receive() for client in clients]
        time.sleep(1.0)  # let the connect burst's garbage go before reading RSS
        rss_after = tree_rss_bytes(results.pid)
        client_pids = [client.proc.pid for client in clients]
        sampler = CpuSampler({"results": results.pid, "clients": client_pids,
                              "redis": redis.pid}).start()
        published = asyncio.run(run_updates(redis_url, args.updates, args.update_rate))
        time.sleep(DELIVERY_TAIL_S)
        usage = sampler.stop()  # CPU over the updates, not the idle settle after them
        time.sleep(SETTLE_WAIT_S)
        for client in clients:
            client.send({"published": published})
        outcomes = [client.receive() for client in clients]
    finally:
        for client in clients:
            client.stop()
        results.stop()
    delays = array("f")
    for outcome in outcomes:
        delays.frombytes(base64.b64decode(outcome["delays_ms"]))
    ordered = sorted(delays)
    ready = sum(c["ready"] for c in connected)
    complete = sum(o["complete"] for o in outcomes)
    p99 = percentile(ordered, 0.99)
    delivered_all = complete == subscribers and ready == subscribers
    return {
        "subscribers_requested": requested, "subscribers": subscribers,
        "capped_by_fd_limit": requested > held_max,
        "ready": ready, "failed": sum(c["failed"] for c in connected),
        "failures_sample": [f for c in connected for f in c["failures"]][:5],
        "connect_s": max(c["connect_s"] for c in connected),
        "complete_fraction": round(complete / subscribers, 4),
        "distinct_fraction": round(sum(o["distinct"] for o in outcomes) / subscribers, 4),
        "deliveries": len(ordered),
        "delay_p50_ms": round(percentile(ordered, 0.5) or 0, 1),
        "delay_p99_ms": round(p99 or 0, 1), "delay_max_ms": round(ordered[-1] if ordered else 0, 1),
        "rss_bytes_before": rss_before, "rss_bytes_after": rss_after,
        "rss_bytes_per_subscriber": round((rss_after - rss_before) / max(1, subscribers)),
        "cpu_percent": usage.cpu_percent, "machine_busy_percent": usage.machine_busy_percent,
        "client_limited": usage.cpu_percent.get("clients", 0) >= 90 * args.clients,
        "delivers": delivered_all and p99 is not None and p99 <= DELAY_TARGET_MS,
    }


def run(args: argparse.Namespace) -> dict:
    fd_hard = raise_fd_limit()
    held_max = fd_hard - FDS_RESERVED
    per_client_max = fd_hard - FDS_RESERVED
    steps = [int(n) for n in args.subscribers.split(",")]
    if max(steps) > per_client_max * args.clients:
        raise BenchError(f"{max(steps)} subscribers need more than {args.clients} clients "
                         f"of {per_client_max} streams each: raise --clients")
    run_dir = Path(tempfile.mkdtemp(prefix="votes-fanout-", dir=args.data_root))
    rows = []
    try:
        redis, redis_url = start_redis(run_dir)
        try:
            for requested in steps:
                row = run_step(run_dir, redis, redis_url, requested, held_max, args)
                rows.append(row)
                print(f"  {row['subscribers']} subscribers: p99 {row['delay_p99_ms']} ms, "
                      f"complete {row['complete_fraction']}, cpu {row['cpu_percent']}", flush=True)
        finally:
            redis.stop()
    finally:
        if not args.keep_run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
    held = [row["subscribers"] for row in rows if row["delivers"]]
    best = max(held, default=0)
    return {"steps": rows, "fd_limit_hard": fd_hard, "subscribers_held_max": best,
            "rss_bytes_per_subscriber": next((row["rss_bytes_per_subscriber"] for row in
                                              reversed(rows) if row["subscribers"] == best), None),
            "target": {"subscribers": SUBSCRIBERS_TARGET, "delay_p99_ms": DELAY_TARGET_MS},
            "verdict": "PASS" if best >= SUBSCRIBERS_TARGET else "FAIL",
            "parameters": {"updates": args.updates, "update_rate_per_s": args.update_rate,
                           "clients": args.clients, "client_kind": args.client_kind}}


def report(measured: dict) -> None:
    rows = [[row["subscribers"], row["ready"], row["complete_fraction"], row["distinct_fraction"],
             row["delay_p50_ms"], row["delay_p99_ms"], row["delay_max_ms"],
             row["rss_bytes_per_subscriber"], row["cpu_percent"].get("results"),
             row["cpu_percent"].get("clients"), "yes" if row["delivers"] else "no"]
            for row in measured["steps"]]
    print(f"\n== fan-out: one `votes results`, {measured['parameters']['updates']} updates at "
          f"{measured['parameters']['update_rate_per_s']}/s (delay ms from the merge)")
    print_table(["subs", "ready", "complete", "distinct", "p50", "p99", "max", "B/sub",
                 "results %", "clients %", "delivers"], rows)
    for row in measured["steps"]:
        if row["capped_by_fd_limit"]:
            print(f"  {row['subscribers_requested']} asked, {row['subscribers']} run: the hard "
                  f"fd limit is {measured['fd_limit_hard']} (RLIMIT_NOFILE, not raisable here)")
        if row["client_limited"]:
            print(f"  at {row['subscribers']} the clients used a full core each: they limited it")
    print(f"{measured['verdict']}: subscribers held with p99 <= {DELAY_TARGET_MS:.0f} ms and "
          f"every update delivered: {measured['subscribers_held_max']} (target >= "
          f"{SUBSCRIBERS_TARGET}); memory per subscriber {measured['rss_bytes_per_subscriber']} B")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", default="1000,2500,5000,10000,20000")
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--update-rate", type=float, default=10.0, help="updates per second")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--client-kind", choices=("go", "python"), default="go",
                        help="the subscriber client: Go (perf/sse_client, default) or Python")
    parser.add_argument("--data-root", default="/var/tmp")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "fanout.json")
    parser.add_argument("--keep-run-dir", action="store_true", help="keep the logs")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (1 <= args.updates <= 600 and 0.1 <= args.update_rate <= 100 and 1 <= args.clients <= 8):
        parser.error("bounds: --updates 1..600, --update-rate 0.1..100, --clients 1..8")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        import uvloop

        raise_fd_limit()
        uvloop.run(client_main())
        return 0
    conditions = describe_machine(("votes-engine", "granian", "uvloop", "redis"))
    if args.client_kind == "go":
        args.client_argv = [str(ensure_sse_client())]
        conditions["subscriber_client"] = f"perf/sse_client (Go), {go_version()}"
    else:
        args.client_argv = [sys.executable, "-m", "perf.bench_results_fanout", "--client"]
        conditions["subscriber_client"] = "perf.bench_results_fanout --client (Python, uvloop)"
    print_conditions(conditions, {k: v for k, v in vars(args).items() if k != "client_argv"}
                     | {"output": str(args.output)})
    measured = run(args)
    report(measured)
    write_json(args.output, {"benchmark": "results_fanout", "conditions": conditions, **measured})
    print(f"  wrote {args.output}")
    return 0  # a FAIL is a verdict, printed and in the JSON; a run that broke raises


if __name__ == "__main__":
    sys.exit(main())
