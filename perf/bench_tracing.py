"""What tracing adds to one request on the vote path, off vs the default sample ratio, in
one run, side by side: `python -m perf.bench_tracing [--requests N]`.

Times the exact calls engine/app.py makes per request (tracing.start_request, and for a
sampled request the two child spans and finish_request) with spans exported synchronously
to memory (SimpleSpanProcessor: the export runs inline, so this over-counts a production
BatchSpanProcessor, whose export runs on its own thread). The result is µs per request;
divide by a vote's CPU cost (docs/performance.md, µs per 201) for the share of throughput.
Not a wrk closed-loop run: on this shared 2-core machine the difference (well under 1 %)
is below the run-to-run noise of a closed loop.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine import tracing
from engine.config import Config

REQUESTS_DEFAULT = 200_000
ROUNDS = 5


def one_request() -> None:
    span = tracing.start_request("POST")
    if span is not None:
        with tracing.child(span, "verify-voter-token"):
            pass
        with tracing.child(span, "node.vote"):
            pass
        tracing.finish_request(span, "vote", 201, "poll")


def per_request_us(requests: int) -> float:
    started = time.perf_counter()
    for _ in range(requests):
        one_request()
    return (time.perf_counter() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=REQUESTS_DEFAULT)
    args = parser.parse_args()
    ratio = Config().trace_sample_ratio
    exporter = InMemorySpanExporter()
    print(f"python {platform.python_version()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.2f}, {args.requests} requests x {ROUNDS} rounds, "
          f"default sample ratio {ratio}")
    off, on = [], []
    for _ in range(ROUNDS):  # interleaved, so machine noise hits both alike
        tracing.configure(0.0)
        off.append(per_request_us(args.requests))
        tracing.configure(ratio, exporter=exporter)
        on.append(per_request_us(args.requests))
        exporter.clear()
    tracing.configure(0.0)
    best_off, best_on = min(off), min(on)
    print(f"tracing off:        {best_off:.3f} us per request (best of {ROUNDS})")
    print(f"tracing at {ratio:.0%}:     {best_on:.3f} us per request (best of {ROUNDS})")
    print(f"added by tracing:   {best_on - best_off:.3f} us per request")


if __name__ == "__main__":
    main()
