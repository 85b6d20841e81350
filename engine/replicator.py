"""The `replicator` role: ships one region's tally state into another region's Redis.

`votes replicator --region A --from-redis URL_A --to-redis URL_B` runs as its own process.
Every `--interval-ms` it lists the polls in A's Redis (the `results:{poll}:merged` hashes
engine/results_publisher.py writes), and for each poll whose version moved since it last
shipped it, reads the merged fields, keeps those of region A only (a region ships what it
owns: B's own fields in A's Redis came from B, and sending them back would only be a no-op),
and merges them into B's Redis with the publisher's own Lua max-merge
(`merge_poll_fields`), which raises B's version and publishes B's change notification, so
B's results role and SSE viewers see A's counts.

Why duplicates, reorders and delays are harmless: every shipment is A's whole current
state of a poll, and the merge keeps per field the larger value (engine/crdt.py), so a late
or repeated shipment can never lower a counter, and the target converges to the newest one.
The replicator keeps nothing but what it shipped (in memory): killed and restarted, its first
cycle ships everything again. A full shipment every FULL_SHIP_S (and after any error) refills
a target Redis that restarted empty.

Lag (`vote_replication_lag_seconds`, engine/metrics.py): now minus the time the source state
of the last complete cycle was read. Everything A's Redis held at that read is in B's Redis,
so it bounds how stale B's copy of A is (plus A's own publish interval); it grows while the
replicator cannot read A or write B (the gauge is computed at each scrape); before the
first complete cycle it is the time since the replicator started. Logged every
LAG_LOG_INTERVAL_S and served on `--metrics-port` when given.
Bounds: POLLS_PER_CYCLE_MAX polls per cycle, FIELDS_PER_CALL_MAX fields per script call,
each Redis call REDIS_TIMEOUT_S, each cycle CYCLE_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from engine import crdt
from engine.metrics import REPLICATION_LAG
from engine.results_publisher import (
    ERROR_LOG_INTERVAL_S,
    KEY_PREFIX,
    MERGE_SCRIPT,
    REDIS_TIMEOUT_S,
    definition_key,
    merge_poll_fields,
    merged_key,
    version_key,
)

log = logging.getLogger("votes.replicator")

POLLS_PER_CYCLE_MAX = 4096
SCAN_COUNT = 1000
FULL_SHIP_S = 5.0
CYCLE_TIMEOUT_S = 10.0
LAG_LOG_INTERVAL_S = 10.0
MERGED_PATTERN = f"{KEY_PREFIX}{{*}}:merged"  # Redis globs take braces literally
_MERGED_HEAD, _MERGED_TAIL = f"{KEY_PREFIX}{{", "}:merged"


def poll_of_merged_key(key: str) -> str:
    return key[len(_MERGED_HEAD):-len(_MERGED_TAIL)]


def region_fields(poll: str, fields: dict[str, Any], region: str) -> list[tuple[str, int]]:
    """The fields of `region` among a poll's merged fields, in a stable order. Parsed and
    written back through engine/crdt.py, so a field it did not write is refused
    (CounterInvalid), never copied."""
    state = crdt.counters_from_fields(poll, ((name, int(value)) for name, value in fields.items()))
    own = crdt.Counters(
        {key: value for key, value in state.tallies.items() if key[0] == region},
        {key: value for key, value in state.rejected.items() if key[0] == region},
        {key for key in state.closed if key[0] == region})
    return sorted(crdt.poll_fields(own, poll).items())


class Replicator:
    """Ships `region`'s fields from `source` to `target` (redis.asyncio clients that decode
    responses); `run` loops until cancelled."""

    def __init__(self, source: Any, target: Any, region: str, interval_s: float) -> None:
        self.source = source
        self.target = target
        self.region = region
        self.interval_s = interval_s
        self.script = target.register_script(MERGE_SCRIPT)
        self.shipped_versions: dict[str, str | None] = {}  # poll -> source version shipped
        self.full_ship_at = 0.0
        # time.time() of the last complete cycle's read; before the first, of the start
        # (what the target held then is unknown, so the lag is at least the time since).
        self.started_at = time.time()
        self.shipped_read_at: float | None = None
        self.errors = 0

    async def polls(self) -> list[str]:
        found: list[str] = []
        async for key in self.source.scan_iter(match=MERGED_PATTERN, count=SCAN_COUNT):
            found.append(poll_of_merged_key(key))
            if len(found) >= POLLS_PER_CYCLE_MAX:
                log.warning("more than %d polls: the rest wait for the next cycles",
                            POLLS_PER_CYCLE_MAX)
                break
        return found

    async def ship_once(self) -> int:
        """One cycle; the number of fields sent."""
        read_at = time.time()
        full = time.monotonic() >= self.full_ship_at
        if full:
            self.shipped_versions.clear()
            self.full_ship_at = time.monotonic() + FULL_SHIP_S
        sent = 0
        for poll in await self.polls():
            # The version is read before the fields: a merge after this read raises it
            # again, so the next cycle ships that merge too.
            version = await self.source.get(version_key(poll))
            if poll in self.shipped_versions and self.shipped_versions[poll] == version:
                continue
            definition = await self.source.get(definition_key(poll))
            if definition is None:  # the hash without its definition: not ours to guess
                continue
            fields = region_fields(poll, await self.source.hgetall(merged_key(poll)), self.region)
            sent += await merge_poll_fields(self.script, poll, definition, fields)
            self.shipped_versions[poll] = version
        self.shipped_read_at = read_at
        return sent

    def lag_s(self) -> float:
        return time.time() - (self.shipped_read_at or self.started_at)

    async def run(self) -> None:
        # Read at each scrape, so the gauge also grows while a cycle hangs or fails.
        REPLICATION_LAG.set_function(self.lag_s)
        lag_logged_at = error_logged_at = 0.0
        while True:
            started = time.monotonic()
            try:
                await asyncio.wait_for(self.ship_once(), CYCLE_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a Redis down or slow: retry, lag grows
                self.errors += 1
                self.full_ship_at = 0.0  # what the target holds is unknown: ship everything
                if started - error_logged_at >= ERROR_LOG_INTERVAL_S:  # not 5 lines a second
                    error_logged_at = started
                    log.warning("replication of region %s failed (%d so far): %r",
                                self.region, self.errors, exc)
            if started - lag_logged_at >= LAG_LOG_INTERVAL_S:
                lag_logged_at = started
                log.info("region %s replication lag %.3f s", self.region, self.lag_s())
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))


def serve_metrics(port: int) -> None:
    """/metrics with the lag gauge alone, on a thread (prometheus_client's own server)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(REPLICATION_LAG)
    start_http_server(port, addr="127.0.0.1", registry=registry)


def run_replicator(region: str, from_redis: str, to_redis: str, interval_s: float,
                   metrics_port: int | None = None) -> None:
    import redis.asyncio

    def client(url: str) -> Any:
        return redis.asyncio.Redis.from_url(url, decode_responses=True,
                                            socket_timeout=REDIS_TIMEOUT_S,
                                            socket_connect_timeout=REDIS_TIMEOUT_S)

    if metrics_port is not None:
        serve_metrics(metrics_port)
    log.info("replicating region %s from %s to %s every %.0f ms", region, from_redis, to_redis,
             interval_s * 1000)
    asyncio.run(Replicator(client(from_redis), client(to_redis), region, interval_s).run())
