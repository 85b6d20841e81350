"""Ban lists (voter, address, network prefix) kept in Redis with TTLs, and each worker's
local copy of them.

In Redis (a Redis Cluster node, `bans_redis_url`), all under one hash tag so one Lua call
reads them: a sorted set per kind, `{bans}:<kind>`, member = the banned value, score = its
expiry in epoch milliseconds; and `{bans}:version`, incremented by every change. `votes ban
add|remove|list` (engine/ban_cli.py) and the workers' auto-bans (engine/defences.py) write
them.

The vote path never calls Redis: `BanList` is a dict per kind, value -> expiry, looked up
only when non-empty. `BanRefresher` reloads it every `bans_refresh_ms` (one call that
answers the version alone when nothing changed), so a ban or a removal applies in every
worker within bans_refresh_ms + bans_store_timeout_ms. Expired entries stop applying at
their expiry on their own (each lookup compares it with the clock), whether or not the
refresh ran. At most `bans_max` entries per kind are loaded (the ones expiring last).
When Redis does not answer, the last copy keeps applying; the failure is counted
(`vote_bans_refresh_failures_total`) and logged at most once per interval.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Any

from engine.config import Config
from engine.errors import VotesError

log = logging.getLogger("votes.bans")

KINDS = ("voter", "address", "prefix")
KEY_TAG = "{bans}"
VERSION_KEY = f"{KEY_TAG}:version"
BAN_TTL_S_MAX = 30 * 86400
VOTER_ID_END = 2**32
FAILURE_LOG_INTERVAL_S = 10.0
AUTOBANS_PENDING_MAX = 1024


class Banned(VotesError):
    """Requests from this voter or network are refused for now."""


class BanValueInvalid(VotesError):
    """The ban's kind or value is not valid."""


def set_key(kind: str) -> str:
    return f"{KEY_TAG}:{kind}"


def normalized(kind: str, value: str) -> str:
    """The canonical form of a ban value, or BanValueInvalid: a voter id in [0, 2**32), an
    IP address, or a /24 IPv4 or /56 IPv6 network (the rate limiter's prefixes)."""
    # Imported here, as the metrics below: engine.ratelimit loads engine.metrics, and
    # `votes ban` (engine/cli.py) loads this module before `votes serve` may set the
    # metrics' multiprocess directory.
    from engine.ratelimit import IPV6_PREFIX_BITS

    text = value.strip()
    if kind == "voter":
        if not text.isdigit() or int(text) >= VOTER_ID_END:
            raise BanValueInvalid("a voter is a number in 0..4294967295")
        return str(int(text))
    try:
        if kind == "address":
            return str(ipaddress.ip_address(text))
        if kind == "prefix":
            network = ipaddress.ip_network(text, strict=False)
            bits = 24 if network.version == 4 else IPV6_PREFIX_BITS
            if network.prefixlen != bits:
                raise BanValueInvalid("a prefix is a /24 IPv4 or /56 IPv6 network")
            return str(network)
    except ValueError:
        raise BanValueInvalid(f"not a valid {kind}") from None
    raise BanValueInvalid(f"the kind is one of {', '.join(KINDS)}")


def prefix_key(network_text: str) -> str:
    """The rate limiter's key of a /24 or /56 network (engine/ratelimit.py prefix_of)."""
    from engine.ratelimit import prefix_of

    network = ipaddress.ip_network(network_text, strict=False)
    return prefix_of(str(network.network_address))


class BanList:
    """One worker's copy: per kind, value -> expiry in epoch milliseconds."""

    __slots__ = ("voters", "addresses", "prefixes", "version")

    def __init__(self) -> None:
        self.voters: dict[int, int] = {}
        self.addresses: dict[str, int] = {}
        self.prefixes: dict[str, int] = {}  # keyed as prefix_of() names a prefix
        self.version: int | None = None

    def replace(self, version: int, entries: dict[str, list[tuple[str, int]]]) -> None:
        self.voters = {int(value): expiry for value, expiry in entries.get("voter", [])}
        self.addresses = dict(entries.get("address", []))
        self.prefixes = {prefix_key(value): expiry for value, expiry in entries.get("prefix", [])}
        self.version = version

    def client_banned(self, address: str, prefix: str, now_ms: int) -> bool:
        addresses, prefixes = self.addresses, self.prefixes
        return bool((addresses and addresses.get(address, 0) > now_ms)
                    or (prefixes and prefixes.get(prefix, 0) > now_ms))

    def voter_banned(self, voter: int, now_ms: int) -> bool:
        return bool(self.voters) and self.voters.get(voter, 0) > now_ms


# Answers {version} when the caller's version is current, else {version, voters, addresses,
# prefixes}, each a flat member/score list of the unexpired entries expiring last (at most
# ARGV[3] per kind). KEYS: version, then the three sets; ARGV: now_ms, known version, max.
REFRESH_SCRIPT = """
local version = redis.call('GET', KEYS[1]) or '0'
if version == ARGV[2] then return {version} end
local answer = {version}
for i = 2, 4 do
  answer[i] = redis.call('ZRANGE', KEYS[i], '+inf', '(' .. ARGV[1], 'BYSCORE', 'REV',
                         'LIMIT', 0, tonumber(ARGV[3]), 'WITHSCORES')
end
return answer
"""


def _pairs(flat: list[Any]) -> list[tuple[str, int]]:
    return [(_text(flat[index]), int(float(flat[index + 1])))
            for index in range(0, len(flat), 2)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class BanStore:
    """The ban sets in Redis, for the CLI (sync) and the workers (async) alike."""

    @staticmethod
    def add_commands(kind: str, value: str, expires_ms: int) -> list[tuple[Any, ...]]:
        return [("ZADD", set_key(kind), expires_ms, value), ("INCR", VERSION_KEY)]

    @staticmethod
    def remove_commands(kind: str, value: str) -> list[tuple[Any, ...]]:
        return [("ZREM", set_key(kind), value), ("INCR", VERSION_KEY)]


class BanRefresher:
    """Reloads a BanList from Redis every bans_refresh_ms and writes the auto-bans queued
    by the velocity rules (at most AUTOBANS_PENDING_MAX waiting; beyond, they stay local)."""

    def __init__(self, config: Config, bans: BanList, client=None) -> None:
        self.bans = bans
        self.url = config.bans_redis_url
        self.interval_s = config.bans_refresh_ms / 1000
        self.timeout_s = config.bans_store_timeout_ms / 1000
        self.bans_max = config.bans_max
        self.client = client
        self.script: Any = None
        self.autobans: list[tuple[str, str, int]] = []
        self.failing_since: float | None = None
        self.logged_at = 0.0

    def queue_autoban(self, kind: str, value: str, expires_ms: int) -> bool:
        if len(self.autobans) >= AUTOBANS_PENDING_MAX:
            return False
        self.autobans.append((kind, value, expires_ms))
        return True

    def _connect(self) -> None:
        from redis.asyncio.cluster import RedisCluster

        self.client = RedisCluster.from_url(
            self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
            cluster_error_retry_attempts=1)
        self.script = self.client.register_script(REFRESH_SCRIPT)

    async def run(self) -> None:
        while True:
            await self.refresh_once()
            await asyncio.sleep(self.interval_s)

    async def refresh_once(self) -> None:
        if self.script is None:
            self._connect()
        try:
            await asyncio.wait_for(self._refresh(), self.timeout_s)
        except Exception as exc:  # any store failure: keep the last copy, count, log
            # Imported here: see normalized().
            from engine.metrics import BANS_REFRESH_FAILURES

            BANS_REFRESH_FAILURES.inc()
            self._log_failing(exc)
            return
        if self.failing_since is not None:
            log.warning("ban store answers again after %.1f s",
                        time.monotonic() - self.failing_since)
            self.failing_since = None

    async def _refresh(self) -> None:
        while self.autobans:  # each leaves the queue once written: a failure keeps the rest
            kind, value, expires_ms = self.autobans[0]
            for command in BanStore.add_commands(kind, value, expires_ms):
                await self.client.execute_command(*command)
            self.autobans.pop(0)
        known = "" if self.bans.version is None else str(self.bans.version)
        answer = await self.script(keys=[VERSION_KEY, *map(set_key, KINDS)],
                                   args=[int(time.time() * 1000), known, self.bans_max])
        version = int(_text(answer[0]))
        if len(answer) == 1:
            return
        self.bans.replace(version, {kind: _pairs(flat) for kind, flat in zip(KINDS, answer[1:])})

    def _log_failing(self, error: BaseException) -> None:
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        elif now - self.logged_at < FAILURE_LOG_INTERVAL_S:
            return
        self.logged_at = now
        log.error("ban store did not answer (%s); the last ban list keeps applying",
                  type(error).__name__)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
