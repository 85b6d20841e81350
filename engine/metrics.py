"""Prometheus metrics with conventional names: `vote_` prefix, base units, `_total` counters.

Workers run in prometheus-client's multiprocess mode: `votes serve` points
PROMETHEUS_MULTIPROC_DIR at a fresh directory before any worker starts, and /metrics
aggregates every worker's files.

The per-request and per-commit metrics are buffered (`Buffered`): in multiprocess mode every
inc() and observe() writes the worker's mmap file under a lock after a pid check, about 3 us
each, and at 20,000+ requests/s per worker that was a tenth of the event loop's time. The
buffers keep plain counts and add them to the prometheus values in bulk: every
FLUSH_INTERVAL_S (the worker's flush task) and before this worker answers /metrics. A
scrape can therefore miss up to FLUSH_INTERVAL_S of the other workers' requests.
"""

from __future__ import annotations

import bisect
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "vote_requests_total", "HTTP requests answered, by route and status", ["route", "status"]
)
REJECTED = Counter(
    "vote_rejected_total", "Votes rejected before the log, by reason", ["reason"]
)
REQUEST_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                           2.5, 5.0)
REQUEST_SECONDS = Histogram(
    "vote_request_duration_seconds", "Time to answer an HTTP request", ["route"],
    buckets=REQUEST_SECONDS_BUCKETS,
)
COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
COMMIT_SECONDS = Histogram(
    "vote_wal_commit_duration_seconds", "Time to make one shard's append durable",
    buckets=COMMIT_SECONDS_BUCKETS,
)
COMMIT_ITEMS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
COMMIT_ITEMS = Histogram(
    "vote_wal_commit_items", "Records and votes per shard append",
    buckets=COMMIT_ITEMS_BUCKETS,
)
FLUSH_INTERVAL_S = 1.0
SHARDS_READY = Gauge(
    "vote_shards_ready", "Shards this process owns and serves", multiprocess_mode="livesum"
)


class BufferedCounter:
    __slots__ = ("child", "pending")

    def __init__(self, child) -> None:
        self.child = child
        self.pending = 0

    def inc(self) -> None:
        self.pending += 1

    def flush(self) -> None:
        if self.pending:
            pending, self.pending = self.pending, 0
            self.child.inc(pending)


class BufferedHistogram:
    """Counts per bucket and a sum, added to a prometheus Histogram child in bulk.

    prometheus-client has no bulk observe, so the flush adds to the child's per-bucket values
    (`_buckets`, non-cumulative, and `_sum`), which is what its own observe() does one at a
    time; tests/unit/test_metrics.py checks the exposition against plain observe()."""

    __slots__ = ("child", "bounds", "counts", "total")

    def __init__(self, child, bounds: tuple) -> None:
        if len(child._buckets) != len(bounds) + 1:  # the last bucket is +Inf
            raise ValueError("bounds do not match the histogram's buckets")
        self.child = child
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound falls in that bound's bucket (le = "<=").
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        self.counts = [0] * len(counts)
        total, self.total = self.total, 0.0
        for index, count in enumerate(counts):
            if count:
                self.child._buckets[index].inc(count)
        self.child._sum.inc(total)


class Buffered:
    """This worker's buffered metrics; `flush()` from the flush task and before /metrics."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, int], tuple[BufferedCounter, BufferedHistogram]] = {}
        self.commit_seconds = BufferedHistogram(COMMIT_SECONDS, COMMIT_SECONDS_BUCKETS)
        self.commit_items = BufferedHistogram(COMMIT_ITEMS, COMMIT_ITEMS_BUCKETS)
        self._all: list = [self.commit_seconds, self.commit_items]

    def request(self, route: str, status: int, seconds: float) -> None:
        pair = self._requests.get((route, status))
        if pair is None:
            pair = self._requests[(route, status)] = (
                BufferedCounter(REQUESTS.labels(route, str(status))),
                BufferedHistogram(REQUEST_SECONDS.labels(route), REQUEST_SECONDS_BUCKETS))
            self._all.extend(pair)
        pair[0].inc()
        pair[1].observe(seconds)

    def observe_commit(self, seconds: float, items: int) -> None:
        """What a shard owner reports per append (shards/ calls it through the committer)."""
        self.commit_seconds.observe(seconds)
        self.commit_items.observe(items)

    def flush(self) -> None:
        for metric in self._all:
            metric.flush()


BUFFERED = Buffered()


def exposition() -> tuple[bytes, str]:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
