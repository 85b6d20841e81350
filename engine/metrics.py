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
    "vote_commit_cycle_duration_seconds",
    "Time from a commit cycle's start to its group's log append being durable",
    buckets=COMMIT_SECONDS_BUCKETS,
)
COMMIT_ITEMS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
COMMIT_ITEMS = Histogram(
    "vote_commit_cycle_items", "Records and votes in one group's commit cycle",
    buckets=COMMIT_ITEMS_BUCKETS,
)
FLUSH_INTERVAL_S = 1.0
SHARDS_READY = Gauge(
    "vote_shards_ready", "Shards this process owns and serves", multiprocess_mode="livesum"
)
# Not per request: written where they happen, unbuffered (a few per second at most).
GROUPS_OWNED = Gauge(
    "vote_groups_owned", "Fencing groups this process holds the fence of",
    multiprocess_mode="livesum",
)
GROUPS_READY = Gauge(
    "vote_groups_ready", "Fencing groups this process owns and serves votes for",
    multiprocess_mode="livesum",
)
WAL_APPEND_ERROR_KINDS = ("wal-unavailable", "outcome-unknown")
WAL_APPEND_ERRORS = Counter(
    "vote_wal_append_errors_total",
    "Log appends that failed, by kind: wal-unavailable (nothing was written) or "
    "outcome-unknown (the append may or may not be durable)", ["kind"],
)
FENCING_LOST = Counter(
    "vote_fencing_lost_total",
    "Times a group's log answered NotReady after the group had started: another owner took "
    "the fence", ["group"],
)
# "max" across processes: the newest snapshot any worker wrote; age = time() - this.
SNAPSHOT_LAST_SECONDS = Gauge(
    "vote_snapshot_last_success_timestamp_seconds",
    "Unix time of the newest snapshot written, per shard", ["shard"], multiprocess_mode="max",
)
SNAPSHOT_FAILURES = Counter(
    "vote_snapshot_failures_total", "Snapshots that could not be written, per shard", ["shard"]
)
WAL_PENDING_VOTES = Gauge(
    "vote_wal_pending_votes",
    "Votes left in a group's queue by the latest commit cycle, waiting for a later durable "
    "append (the WAL backlog in votes)",
    ["group"], multiprocess_mode="livesum",
)

# Written by the rate limiter's sync task (engine/ratelimit.py), a few times per second.
RATELIMIT_FAIL_OPEN = Counter(
    "vote_ratelimit_fail_open_total",
    "Requests let through because the rate limiter's store did not answer (their counts "
    "never reached the global view; local limits still applied)",
)
RATELIMIT_STORE_CALLS = Counter(
    "vote_ratelimit_store_calls_total",
    "Calls to the rate limiter's store (one Lua call per bucket per sync), answered or not",
)
# Written by the ban list's refresh task (engine/bans.py), once per bans_refresh_ms at most.
BANS_REFRESH_FAILURES = Counter(
    "vote_bans_refresh_failures_total",
    "Refreshes of a worker's ban list that the ban store did not answer (the last list "
    "kept applying)",
)
# Set by the replicator role only (engine/replicator.py), which serves it on its own
# /metrics; ingest workers export it at 0. "max": the most stale of the processes.
REPLICATION_LAG = Gauge(
    "vote_replication_lag_seconds",
    "Seconds since the source region's tally state that this replicator last shipped in "
    "full was read (an upper bound on how stale the other region's copy is)",
    multiprocess_mode="max",
)

# Written by the close check of each ingest worker (engine/results_close_check.py).
CRDT_RECOUNT_DISAGREEMENTS = Counter(
    "vote_crdt_recount_disagreements",
    "Polls whose merged CRDT counters disagreed, at close, with the log's counts of this "
    "worker's shards",
)

for _kind in WAL_APPEND_ERROR_KINDS:  # exported as 0 from the start, so rate() has a base
    WAL_APPEND_ERRORS.labels(_kind)

# Defined above, with a hook below, but the hook is not called yet.
AWAITING_HOOK: dict[str, str] = {}

# Metrics of parts not built yet (issues 12 and 13): their names live here so the alert
# rules, the SLO recording rules and the dashboard reference the names those parts must
# export. tests/unit/test_alert_rules.py accepts these and AWAITING_HOOK's names besides
# what a running engine exports, and prints them.
NOT_YET_EMITTED: dict[str, tuple[str, str]] = {
    "vote_ack_to_visible_seconds": (
        "histogram", "Time from a vote's 201 to its count appearing in results (issue 13)"),
}


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
        self._wal_pending_votes: dict[int, int] = {}  # group -> its latest backlog
        self._rejected: dict[str, BufferedCounter] = {}

    def request(self, route: str, status: int, seconds: float) -> None:
        pair = self._requests.get((route, status))
        if pair is None:
            pair = self._requests[(route, status)] = (
                BufferedCounter(REQUESTS.labels(route, str(status))),
                BufferedHistogram(REQUEST_SECONDS.labels(route), REQUEST_SECONDS_BUCKETS))
            self._all.extend(pair)
        pair[0].inc()
        pair[1].observe(seconds)

    def rejected(self, reason: str) -> None:
        """A vote rejected for `reason`: buffered like the requests, since a flood's
        rejections would otherwise each write a file-backed value."""
        counter = self._rejected.get(reason)
        if counter is None:
            counter = self._rejected[reason] = BufferedCounter(REJECTED.labels(reason))
            self._all.append(counter)
        counter.inc()

    # The owners' events (shards/commit.py CommitMetrics), rare: straight to prometheus.
    def wal_append_error(self, kind: str) -> None:
        wal_append_error(kind)

    def fencing_lost(self, group: int) -> None:
        fencing_lost(group)

    def snapshot_written(self, shard: int, unix_time_s: float) -> None:
        snapshot_written(shard, unix_time_s)

    def snapshot_failed(self, shard: int) -> None:
        snapshot_failed(shard)

    def observe_commit(self, seconds: float, items: int) -> None:
        """What a shard owner reports per append (shards/ calls it through the committer)."""
        self.commit_seconds.observe(seconds)
        self.commit_items.observe(items)

    def wal_pending_votes(self, group: int, votes: int) -> None:
        """Once per commit cycle and group: kept here, set on the gauge at the flush (a
        multiprocess gauge set writes a file-backed value; per cycle it would cost more)."""
        self._wal_pending_votes[group] = votes

    def flush(self) -> None:
        for metric in self._all:
            metric.flush()
        pending, self._wal_pending_votes = self._wal_pending_votes, {}
        for group, votes in pending.items():
            wal_pending_votes(group, votes)


BUFFERED = Buffered()


# Hooks for the owner, the committer and the node (shards/, engine/node.py): each is one
# call at the place the event happens, so those files need no prometheus import.
def group_owned(group: int, owned: bool) -> None:
    """A group's fence was taken (owned=True) or given up / lost (owned=False)."""
    if owned:
        FENCING_LOST.labels(str(group))  # exported as 0 once owned, so rate() has a base
        GROUPS_OWNED.inc()
    else:
        GROUPS_OWNED.dec()


def group_ready(group: int, ready: bool) -> None:
    """A group started serving votes (ready=True) or stopped (ready=False)."""
    if ready:
        GROUPS_READY.inc()
    else:
        GROUPS_READY.dec()


def wal_append_error(kind: str) -> None:
    if kind not in WAL_APPEND_ERROR_KINDS:  # a bounded label set: no free-form kinds
        raise ValueError(f"unknown WAL append error kind {kind!r}")
    WAL_APPEND_ERRORS.labels(kind).inc()


def fencing_lost(group: int) -> None:
    """The group's log answered NotReady after the group had started."""
    FENCING_LOST.labels(str(group)).inc()


def snapshot_written(shard: int, unix_time_s: float) -> None:
    SNAPSHOT_LAST_SECONDS.labels(str(shard)).set(unix_time_s)


def snapshot_failed(shard: int) -> None:
    SNAPSHOT_FAILURES.labels(str(shard)).inc()


def wal_pending_votes(group: int, votes: int) -> None:
    """Votes waiting for the group's next durable append; set once per commit cycle."""
    WAL_PENDING_VOTES.labels(str(group)).set(votes)


def exposition() -> tuple[bytes, str]:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
