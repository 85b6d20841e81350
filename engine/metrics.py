"""Prometheus metrics with conventional names: `vote_` prefix, base units, `_total` counters.

Workers run in prometheus-client's multiprocess mode: `votes serve` points
PROMETHEUS_MULTIPROC_DIR at a fresh directory before any worker starts, and /metrics
aggregates every worker's files.
"""

from __future__ import annotations

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
REQUEST_SECONDS = Histogram(
    "vote_request_duration_seconds", "Time to answer an HTTP request", ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
COMMIT_SECONDS = Histogram(
    "vote_wal_commit_duration_seconds", "Time to make one group commit durable",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
COMMIT_ITEMS = Histogram(
    "vote_wal_commit_items", "Records and votes per group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
)
SHARDS_READY = Gauge(
    "vote_shards_ready", "Shards this process owns and serves", multiprocess_mode="livesum"
)


class OwnerMetrics:
    """What a shard owner reports; kept apart so shards/ works without prometheus set up."""

    def observe_commit(self, seconds: float, items: int) -> None:
        COMMIT_SECONDS.observe(seconds)
        COMMIT_ITEMS.observe(items)


def exposition() -> tuple[bytes, str]:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
