"""Rate limits of the vote path: GCRA per client address, per network prefix and per voter.

Each worker answers every check from its own memory (`Gcra.check`, well under a microsecond:
perf/bench_micro.py's "rate limit" line); the global view lives in a Redis Cluster and is
synchronised in batches by `GlobalSync`, so Redis calls per vote stay far below one.

GCRA keeps one number per key, its theoretical arrival time (TAT): a request at `now` is
admitted when `max(TAT, now) + interval - now <= interval * burst`, and then moves the TAT on
by one interval. So a fresh key takes `burst` requests at once, then one per interval; a
rejected request answers how long until it would be admitted (Retry-After).

Invariants: a limiter holds at most `keys_max` keys (when full, the expired ones are dropped
first: an entry whose TAT has passed carries no state, so its loss changes nothing; then the
oldest-inserted) and at most `keys_max` pending sync counts. A check never waits on Redis: when Redis does not answer, the
local limits keep working, and what could not be synchronised is counted as fail-open.

The client address is the peer's; X-Forwarded-For is read only when the peer is in
`trusted_proxies`. Granian does not parse the PROXY protocol, so it is not honoured.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import logging
import math
import socket
import time
import zlib
from typing import Any, NamedTuple

from redis.crc import key_slot

from engine.config import Config
from engine.errors import VotesError
from engine.metrics import RATELIMIT_FAIL_OPEN, RATELIMIT_STORE_CALLS

log = logging.getLogger("votes.ratelimit")

IPV6_PREFIX_BITS = 56  # IPv4 prefixes are /24: the first three octets
RETRY_AFTER_S_MIN = 1
# Keys per Lua call: bounds one call's size and time in Redis.
SYNC_KEYS_PER_CALL_MAX = 512
# While the store fails, one log line per this many seconds, not one per sync or request.
FAIL_OPEN_LOG_INTERVAL_S = 10.0
FORWARDED_FOR_HEADER = "x-forwarded-for"
SLOTS = 16384  # Redis Cluster's hash slots

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientKeys(NamedTuple):
    """Who a request comes from, as the limits (and the ban lists) key it."""

    peer: str
    address: str
    prefix: str
    exempt: bool


class RateLimited(VotesError):
    """A limit was reached: 429 with Retry-After (engine/problems.py)."""


class Gcra:
    """Keyed GCRA limiter in one worker; times are monotonic seconds given by the caller."""

    __slots__ = ("interval_s", "tolerance_s", "keys_max", "arrivals", "pending", "syncing",
                 "evicted_live")

    def __init__(self, rate_per_s: float, burst: int, keys_max: int, syncing: bool = False):
        self.interval_s = 1.0 / rate_per_s
        self.tolerance_s = self.interval_s * burst
        self.keys_max = keys_max
        self.arrivals: dict[str, float] = {}  # key -> TAT, in insertion order
        self.pending: dict[str, int] = {}  # key -> admitted since the last sync
        self.syncing = syncing
        self.evicted_live = 0  # evicted keys whose TAT had not passed (state lost)

    def check(self, key: str, now: float) -> float:
        """0.0 when admitted (and counted), else the seconds until it would be."""
        arrivals = self.arrivals
        tat = arrivals.get(key, now)
        if tat < now:
            tat = now
        tat += self.interval_s
        over_s = tat - now - self.tolerance_s
        if over_s > 0.0:
            return over_s
        if len(arrivals) >= self.keys_max and key not in arrivals:
            arrivals = self._shrink(now)
        arrivals[key] = tat
        if self.syncing:
            pending = self.pending
            count = pending.get(key)
            if count is not None:
                pending[key] = count + 1
            elif len(pending) < self.keys_max:
                pending[key] = 1
        return 0.0

    def over_s(self, key: str, now: float) -> float:
        """Read-only `check`: the seconds until `key` would be admitted (0.0: now). Adds no
        key and counts nothing."""
        tat = self.arrivals.get(key)
        if tat is None:
            return 0.0
        over_s = max(tat, now) + self.interval_s - now - self.tolerance_s
        return over_s if over_s > 0.0 else 0.0

    def _shrink(self, now: float) -> dict[str, float]:
        """Make room: drop the expired entries (no state), and when that frees less than a
        quarter, the oldest-inserted live ones too (counted: their state is lost). Amortised
        O(1) per new key, and the dict is rebuilt, so deleted slots never pile up."""
        live = {key: tat for key, tat in self.arrivals.items() if tat > now}
        room_min = self.keys_max // 4
        excess = len(live) - (self.keys_max - room_min)
        if excess > 0:
            self.evicted_live += excess
            live = dict(itertools.islice(live.items(), excess, None))
        self.arrivals = live
        return live

    def take_pending(self) -> dict[str, int]:
        pending, self.pending = self.pending, {}
        return pending

    def apply_global(self, key: str, debt_s: float, now: float) -> None:
        """Adopt the global TAT (`now + debt_s`) when it is later than the local one: it
        counts every worker's admissions, this one's included."""
        arrivals = self.arrivals
        global_tat = now + debt_s
        tat = arrivals.get(key)
        if tat is None:
            if len(arrivals) >= self.keys_max:
                arrivals = self._shrink(now)
            arrivals[key] = global_tat
        elif global_tat > tat:
            arrivals[key] = global_tat


def parse_networks(text: str) -> tuple[Network, ...]:
    """"10.0.0.0/8, ::1/128" -> networks; empty text -> ()."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False)
                 for part in text.split(",") if part.strip())


def peer_address(scope_client: str) -> str:
    """The address of Granian's `scope.client`: "1.2.3.4:5678" or "[::1]:5678" (Rust's form)."""
    address = scope_client.rpartition(":")[0]
    return address[1:-1] if address[:1] == "[" else address


class AddressRange(NamedTuple):
    """A network as numbers: an address is in it when of this version and within bounds."""

    version: int
    first: int
    last: int


def address_ranges(networks: tuple[Network, ...]) -> tuple[AddressRange, ...]:
    return tuple(AddressRange(network.version, int(network.network_address),
                              int(network.broadcast_address)) for network in networks)


def address_number(address: str) -> tuple[int, int] | None:
    """(IP version, the address as an integer), None when the text is not an address.

    The socket module's inet_pton (strict: four decimal octets without leading zeros, or
    RFC 4291 text), not ipaddress.ip_address, which cost about 6 us a call: a flood from
    fresh addresses behind a trusted proxy paid it three times per rejected request."""
    try:
        if ":" in address:
            return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None


def in_ranges(address: str, ranges: tuple[AddressRange, ...]) -> bool:
    number = address_number(address)
    if number is None:
        return False
    version, value = number
    return any(version == network.version and network.first <= value <= network.last
               for network in ranges)


def forwarded_hop(forwarded_for: str, trusted_proxies: tuple[AddressRange, ...]) -> str | None:
    """The right-most hop of X-Forwarded-For that is not a trusted proxy (the first hop if
    all are; None if there is none), for a request whose peer is a trusted proxy."""
    if "," not in forwarded_for:  # one hop, as the edge sends it: no list to build
        hop = forwarded_for.strip()
        return hop or None
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not in_ranges(hop, trusted_proxies):
            return hop
    return hops[0] if hops else None


def prefix_of(address: str) -> str:
    """The network prefix key of an address: /24 for IPv4, /56 for IPv6."""
    if ":" not in address:
        head, _, _ = address.rpartition(".")
        return head or address
    try:
        network = ipaddress.ip_network(f"{address}/{IPV6_PREFIX_BITS}", strict=False)
    except ValueError:
        return address
    return str(network)


class RateLimiter:
    """The three limits of one worker and the address facts it caches (bounded)."""

    def __init__(self, config: Config, clock=time.monotonic) -> None:
        self.enabled = config.ratelimit_enabled
        self.clock = clock
        syncing = bool(config.ratelimit_redis_url)
        keys_max = config.ratelimit_keys_max
        self.address = Gcra(config.ratelimit_address_per_s, config.ratelimit_address_burst,
                            keys_max, syncing)
        self.prefix = Gcra(config.ratelimit_prefix_per_s, config.ratelimit_prefix_burst,
                           keys_max, syncing)
        self.voter = Gcra(config.ratelimit_voter_per_s, config.ratelimit_voter_burst,
                          keys_max, syncing)
        self.trusted_proxies = address_ranges(parse_networks(config.trusted_proxies))
        self.exempt_networks = address_ranges(parse_networks(config.ratelimit_exempt_networks))
        # address -> its keys (as if it were the peer); cleared when full.
        self._address_keys: dict[str, ClientKeys] = {}
        self._peer_trusted: dict[str, bool] = {}  # peer address -> in trusted_proxies
        self._address_keys_max = keys_max

    def limiters(self) -> dict[str, Gcra]:
        return {"a": self.address, "p": self.prefix, "v": self.voter}

    def client_keys(self, scope_client: str, forwarded_for: str | None) -> ClientKeys:
        """The request's peer, client address and prefix key, and whether the address is
        exempt; the facts of each address are cached (bounded)."""
        return self.keys_of(*self.client_address(scope_client, forwarded_for))

    def client_address(self, scope_client: str, forwarded_for: str | None) -> tuple[str, str]:
        """(peer, client address): the peer's, or the trusted proxies' X-Forwarded-For hop."""
        peer = peer_address(scope_client)
        address = peer
        if self.trusted_proxies and forwarded_for:
            # The peers are the few proxies (and whoever connects directly): their
            # trust is cached, not parsed again per request.
            trusted = self._peer_trusted.get(peer)
            if trusted is None:
                if len(self._peer_trusted) >= self._address_keys_max:
                    self._peer_trusted.clear()
                trusted = self._peer_trusted[peer] = in_ranges(peer, self.trusted_proxies)
            if trusted:
                address = forwarded_hop(forwarded_for, self.trusted_proxies) or peer
        return peer, address

    def keys_of(self, peer: str, address: str) -> ClientKeys:
        """client_keys for what client_address found."""
        keys = self._address_keys
        known = keys.get(address)
        if known is None:
            exempt = bool(self.exempt_networks) and in_ranges(address, self.exempt_networks)
            if len(keys) >= self._address_keys_max:
                keys.clear()
            known = keys[address] = ClientKeys(address, address, prefix_of(address), exempt)
        # The cached keys name the address as their peer: the common case (no proxy) reuses
        # them as they are, as building a tuple per vote was measurable (bench_challenge).
        if peer == address:
            return known
        return ClientKeys(peer, address, known.prefix, known.exempt)  # _replace: 4x the cost

    def check_client(self, scope_client: str, forwarded_for: str | None,
                     node_forwarded: bool = False) -> bool:
        """Raise RateLimited when the request's client address or its prefix is over its
        limit. Cheap: runs after the token's MAC, before the shard. Answers whether the
        voter limit is
        still to be checked: not for a vote that another node forwarded (marked so, from an
        exempt peer: the cluster's own network), as that node checked it already."""
        if not self.enabled:
            return False
        return self.check_client_keys(self.client_keys(scope_client, forwarded_for),
                                      node_forwarded)

    def check_client_keys(self, client: ClientKeys, node_forwarded: bool = False) -> bool:
        """check_client for the keys `client_keys` gave."""
        if not self.enabled:
            return False
        if client.exempt:
            return not (node_forwarded and client.address == client.peer)
        now = self.clock()
        wait_s = (self.address.check(client.address, now)
                  or self.prefix.check(client.prefix, now))
        if wait_s:
            raise rate_limited(wait_s, "this address")
        return True

    def address_over_s(self, address: str) -> float:
        """Read-only: the seconds until this client address would be admitted (0.0: now), as
        check_client_keys would find; nothing is parsed, added or counted. An exempt address
        is never counted, so it is never over."""
        if not self.enabled:
            return 0.0
        return self.address.over_s(address, self.clock())

    def check_voter(self, voter: int) -> None:
        if not self.enabled:
            return
        wait_s = self.voter.check(str(voter), self.clock())
        if wait_s:
            raise rate_limited(wait_s, "this voter")


def rate_limited(wait_s: float, whose: str) -> RateLimited:
    retry_after_s = max(RETRY_AFTER_S_MIN, math.ceil(wait_s))
    return RateLimited(_limited_detail(whose, retry_after_s), retry_after=retry_after_s)


@functools.lru_cache(maxsize=256)
def _limited_detail(whose: str, retry_after_s: int) -> str:
    # A flood past its limit gets the same few answers: formatted once each.
    return f"too many requests from {whose}; retry in {retry_after_s} s"


# One bucket of the global view is one Redis hash (its own slot, by its hash tag) of
# field "kind:key" -> TAT in microseconds of Redis's clock. ARGV[1] packs the entries,
# "field count interval_us" per line; the answer packs each field's debt (how far its TAT is
# ahead of now, microseconds) in the same order. Packing keeps a call one argument in and
# one string out whatever the number of keys (per-key arguments cost the worker ~7 us each).
# Each call also scans a bounded slice of the hash for passed TATs and deletes them, from a
# cursor kept in KEYS[2], so the hash holds live keys and a bounded backlog of dead ones.
SYNC_SCRIPT = """
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local debts = {}
local entries = 0
for field, count, interval_us in string.gmatch(ARGV[1], '(%S+) (%S+) (%S+)') do
  local tat = tonumber(redis.call('HGET', KEYS[1], field) or now_us)
  if tat < now_us then tat = now_us end
  tat = tat + tonumber(count) * tonumber(interval_us)
  redis.call('HSET', KEYS[1], field, string.format('%.0f', tat))
  entries = entries + 1
  debts[entries] = string.format('%.0f', tat - now_us)
end
local cursor = redis.call('GET', KEYS[2]) or '0'
local scanned = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 2 * entries + 16)
local fields = scanned[2]
for i = 1, #fields, 2 do
  if tonumber(fields[i + 1]) < now_us then redis.call('HDEL', KEYS[1], fields[i]) end
end
redis.call('SET', KEYS[2], scanned[1])
return table.concat(debts, ' ')
"""


def bucket_of(field: str, buckets: int) -> int:
    """The bucket of a limited key: the same in every worker (crc32, not the salted hash())."""
    return zlib.crc32(field.encode()) % buckets


def bucket_tags(buckets: int) -> list[str]:
    """A hash tag per bucket whose slot starts its share of the slot space, so B buckets
    spread over the masters of a cluster whose slots are split evenly (as `redis-cli
    --cluster create` does): with as many buckets as masters, one call per master per sync."""
    tags = []
    for bucket in range(buckets):
        low, high = bucket * SLOTS // buckets, (bucket + 1) * SLOTS // buckets
        tag = next(tag for tag in (f"rl:{bucket}:{n}" for n in itertools.count())
                   if low <= key_slot(tag.encode()) < high)
        tags.append(tag)
    return tags


def bucket_keys(tag: str) -> list[str]:
    """A bucket's hash and its prune cursor: one hash tag, so one slot and one call."""
    return [f"{{{tag}}}:tat", f"{{{tag}}}:prune"]


def cluster_client(url: str, timeout_s: float) -> Any:
    """The Redis Cluster client of a batched sync: one retry, at once (a sync that misses
    its interval is dropped, not queued)."""
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return RedisCluster.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                 retry=Retry(NoBackoff(), 1))


def bucket_batches(by_bucket: dict[int, list], per_call_max: int) -> list[tuple[int, list]]:
    """Each bucket's entries in calls of at most `per_call_max` (bounds a call in Redis)."""
    return [(bucket, entries[start:start + per_call_max])
            for bucket, entries in by_bucket.items()
            for start in range(0, len(entries), per_call_max)]


async def call_buckets(batches: list, call: Any) -> list:
    """`call(bucket, entries)` for every batch at once; answers or exceptions, in order.
    Each call is a store round trip (vote_ratelimit_store_calls_total)."""
    answers = await asyncio.gather(*(call(bucket, entries) for bucket, entries in batches),
                                   return_exceptions=True)
    RATELIMIT_STORE_CALLS.inc(len(batches))
    return answers


class FailOpenLog:
    """Counts what a failed sync let through, and logs it once, then at most every
    FAIL_OPEN_LOG_INTERVAL_S, and once more when the store answers again."""

    def __init__(self, what: str, unit: str) -> None:
        self.what, self.unit = what, unit  # "rate limit", "requests": for the log line
        self.failing_since: float | None = None
        self.logged_at = 0.0

    def report(self, failed: int, error: BaseException | None, now: float,
               consequence: str) -> None:
        if failed:
            RATELIMIT_FAIL_OPEN.inc(failed)
            if self.failing_since is None:
                self.failing_since = now
            elif now - self.logged_at < FAIL_OPEN_LOG_INTERVAL_S:
                return
            self.logged_at = now
            log.error("%s store did not answer (%s: %s); %s (%d %s this sync)", self.what,
                      type(error).__name__, error, consequence, failed, self.unit)
        elif self.failing_since is not None:
            log.warning("%s store answers again after %.1f s", self.what,
                        now - self.failing_since)
            self.failing_since = None


class GlobalSync:
    """Every `ratelimit_sync_ms`, one Lua call per bucket with pending counts: adds this
    worker's admissions to the global TATs and adopts the answers. Fails open, counted."""

    def __init__(self, config: Config, limiter: RateLimiter, client=None) -> None:
        self.limiter = limiter
        self.interval_s = config.ratelimit_sync_ms / 1000
        self.timeout_s = config.ratelimit_store_timeout_ms / 1000
        self.buckets = config.ratelimit_sync_buckets
        self.tags = bucket_tags(self.buckets)
        self.url = config.ratelimit_redis_url
        self.client = client
        self.script: Any = None  # redis-py's AsyncScript, made on the first sync
        self.fail_open = FailOpenLog("rate limit", "requests")

    def _connect(self):
        self.client = cluster_client(self.url, self.timeout_s)
        self.script = self.client.register_script(SYNC_SCRIPT)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.sync_once()

    def _batches(self) -> list[tuple[int, list[tuple[Gcra, str, int]]]]:
        by_bucket: dict[int, list[tuple[Gcra, str, int]]] = {}
        buckets = self.buckets
        for kind, gcra in self.limiter.limiters().items():
            for key, count in gcra.take_pending().items():
                bucket = bucket_of(f"{kind}:{key}", buckets)
                by_bucket.setdefault(bucket, []).append((gcra, key, count))
        return bucket_batches(by_bucket, SYNC_KEYS_PER_CALL_MAX)

    async def sync_once(self) -> None:
        batches = self._batches()
        if not batches:
            return
        if self.script is None:
            self._connect()
        answers = await call_buckets(batches, self._call)
        now = self.limiter.clock()
        failed, error = 0, None
        for (_, entries), answer in zip(batches, answers):
            if isinstance(answer, BaseException):
                failed += sum(count for _, _, count in entries)
                error = answer
                continue
            for (gcra, key, _), debt_us in zip(entries, answer.split()):
                gcra.apply_global(key, int(debt_us) / 1e6, now)
        self.fail_open.report(failed, error, now,
                              "failing open on the global limits, local limits still apply")

    async def _call(self, bucket: int, entries: list[tuple[Gcra, str, int]]) -> bytes:
        kinds = {id(gcra): kind for kind, gcra in self.limiter.limiters().items()}
        intervals = {id(gcra): f"{gcra.interval_s * 1e6:.3f}"
                     for gcra in self.limiter.limiters().values()}
        packed = "\n".join(f"{kinds[id(gcra)]}:{key} {count} {intervals[id(gcra)]}"
                           for gcra, key, count in entries)
        return await asyncio.wait_for(
            self.script(keys=bucket_keys(self.tags[bucket]), args=[packed]), self.timeout_s)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
