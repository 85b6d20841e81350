"""Fencing-group ownership across hosts: Redis leases say who SHOULD own a group; Kafka fences.

Why leases in Redis, and not a Kafka consumer group:
- A move (`votes group move`) names one group and one target node. A consumer group
  assigns partitions with its own assignor on every rebalance, and a rebalance moves many
  partitions at once; per-group control would mean writing a custom assignor and living
  with stop-the-world rebalances.
- Takeover of a dead node's groups is bounded by `lease_ttl_s` (+ one `lease_renew_s`
  tick + fence and replay), independent of session timeouts and rebalance protocol rounds.
- Redis is already part of the stack, and it is not trusted with safety: a lease only
  decides liveness. Safety stays with Kafka: a new owner's `acquire()` bumps the epoch of
  the transactional id `wal-g<group>`, so an old owner that still believes it holds a lease
  (paused, partitioned from Redis) is fenced on its next append.

Keys (all under `votes:{wal_topic}:`):
- `lease:{group}` = "node_id advertise_url instance", SET NX PX lease_ttl_s; renewed by a
  compare-and-pexpire script, released by compare-and-delete. The instance id makes a
  restarted process with the same node id wait for its predecessor's lease to expire.
- `node:{node_id}` = advertise_url, PX lease_ttl_s: the node is alive.
- `move:{group}` = target node id, PX the move's timeout: a pending move.
- `pin:{group}` = node id, no expiry: a finished move overrides `group_map` for that group.

Rules of one tick (every `lease_renew_s`), for the groups of this worker (s mod workers == slot):
- Held leases are renewed first. A renewal that finds another value means the lease is
  lost: the group stops serving at once. A Redis error keeps serving (Kafka fences anyway;
  stopping would turn a Redis outage into a voting outage).
- A held group is handed over (stop serving, then release) when a move names another node,
  or when its preferred owner (pin, else group_map) is another live node and no move names
  this one.
- A free group is taken when a move names this node, or (with no move pending) when this
  node is its preferred owner, or when its preferred owner is not alive and this manager
  has run for at least lease_ttl_s (so a node starting next to its peers does not grab their
  groups before they register). SET NX picks one winner.
- A moved group's move key is deleted (and the pin set) only once its owner is ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from engine.config import Config, parse_group_map
from engine.errors import InvariantViolation

log = logging.getLogger("votes.ownership")

RENEW_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
DELETE_IF_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""
FORWARDED_HEADER = "x-votes-forwarded"


def key_prefix(config: Config) -> str:
    return f"votes:{config.wal_topic}:"


def lease_key(config: Config, group: int) -> str:
    return f"{key_prefix(config)}lease:{group}"


def move_key(config: Config, group: int) -> str:
    return f"{key_prefix(config)}move:{group}"


def pin_key(config: Config, group: int) -> str:
    return f"{key_prefix(config)}pin:{group}"


def node_key(config: Config, node_id: str) -> str:
    return f"{key_prefix(config)}node:{node_id}"


def parse_lease(value: str | bytes | None) -> tuple[str, str] | None:
    """(node id, advertise url) of a lease value, or None when the group is free."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    node_id, _, rest = value.partition(" ")
    return node_id, rest.split(" ")[0]


def _text(value: str | bytes | None) -> str | None:
    """A reply as text: the client decodes responses (redis_client); its type says str or bytes."""
    return value.decode() if isinstance(value, bytes) else value


def redis_client(config: Config) -> aioredis.Redis:
    # Every Redis call is bounded: a tick must not outlive the leases it renews.
    return aioredis.from_url(config.redis_url, socket_timeout=config.lease_renew_s,
                             socket_connect_timeout=config.lease_renew_s,
                             decode_responses=True)


async def lease_holders(config: Config, client: aioredis.Redis) -> dict[int, tuple[str, str]]:
    """group -> (node id, advertise url) for every held lease."""
    values = await client.mget([lease_key(config, group) for group in range(config.groups)])
    return {group: holder for group, value in enumerate(values)
            if (holder := parse_lease(value)) is not None}


class LeaseManager:
    """Acquires, renews, hands over and releases this worker's group leases.

    `start_group(group)` must begin serving (fence + replay) without blocking the tick;
    `stop_group(group)` must stop serving and return only when the group's WAL is closed.
    `group_ready(group)` says whether the group's owner finished starting.
    """

    def __init__(self, config: Config, client: aioredis.Redis, *, slot: int = 0,
                 start_group: Callable[[int], None] | None = None,
                 stop_group: Callable[[int], Awaitable[None]] | None = None,
                 group_ready: Callable[[int], bool] | None = None) -> None:
        self.config = config
        self.redis = client
        self.node_id = config.node_name
        self.value = f"{self.node_id} {config.advertised_url} {uuid.uuid4().hex[:12]}"
        self.group_map = parse_group_map(config.group_map, config.groups)
        self.candidates = [group for group in range(config.groups)
                           if group % config.workers == slot]
        self.start_group = start_group or (lambda group: None)
        self.stop_group = stop_group
        self.group_ready = group_ready or (lambda group: True)
        self.held: set[int] = set()
        self.handing_over: dict[int, asyncio.Task] = {}
        self.ticks = 0
        self._started_s = time.monotonic()
        self._renew = client.register_script(RENEW_SCRIPT)
        self._delete_if = client.register_script(DELETE_IF_SCRIPT)
        self._preferred_cache: dict[int, str | None] = {}

    # The loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.config.lease_renew_s * 2):
                    await self.tick()
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("lease tick failed (still serving what this node holds): %r", exc)
            await asyncio.sleep(max(0.0, self.config.lease_renew_s - (time.monotonic() - started)))

    async def tick(self) -> None:
        config = self.config
        ttl_ms = int(config.lease_ttl_s * 1000)
        await self.redis.set(node_key(config, self.node_id), config.advertised_url, px=ttl_ms)
        await self._renew_held(ttl_ms)
        groups = self.candidates
        leases = await self.redis.mget([lease_key(config, group) for group in groups])
        moves = [_text(move) for move in
                 await self.redis.mget([move_key(config, group) for group in groups])]
        pins = [_text(pin) for pin in
                await self.redis.mget([pin_key(config, group) for group in groups])]
        preferred = {group: pin or self.group_map.get(group)
                     for group, pin in zip(groups, pins, strict=True)}
        self._preferred_cache = preferred
        others = sorted({node for node in preferred.values() if node and node != self.node_id})
        alive_values = await self.redis.mget([node_key(config, node) for node in others]) if others else []
        alive = {node for node, value in zip(others, alive_values, strict=True)
                 if value is not None}
        alive.add(self.node_id)
        takeover_allowed = time.monotonic() - self._started_s >= config.lease_ttl_s
        for group, lease, move in zip(groups, leases, moves, strict=True):
            if group in self.handing_over:
                continue
            if group in self.held:
                await self._tick_held(group, move, preferred[group], alive)
            elif lease is None:
                owner = preferred[group]
                wanted = (move == self.node_id if move else
                          owner in (None, self.node_id) or (owner not in alive and takeover_allowed))
                if wanted:
                    await self._acquire(group, ttl_ms)
        self.ticks += 1

    async def _renew_held(self, ttl_ms: int) -> None:
        for group in sorted(self.held):
            renewed = await self._renew(keys=[lease_key(self.config, group)], args=[self.value, ttl_ms])
            if not renewed:
                log.warning("group %d: lease lost (expired or taken); stopping at once", group)
                self.held.discard(group)
                if group not in self.handing_over:  # a hand-over already stops it
                    self._track(group, self._stop(group))

    async def _tick_held(self, group: int, move: str | None, owner: str | None, alive: set[str]) -> None:
        if move and move != self.node_id:
            log.info("group %d: moving to %s", group, move)
            self._hand_over(group)
        elif move == self.node_id:
            if self.group_ready(group):
                await self.redis.set(pin_key(self.config, group), self.node_id)
                await self._delete_if(keys=[move_key(self.config, group)], args=[self.node_id])
                log.info("group %d: move to this node finished", group)
        elif owner and owner != self.node_id and owner in alive:
            log.info("group %d: handing back to its preferred owner %s", group, owner)
            self._hand_over(group)

    async def _acquire(self, group: int, ttl_ms: int) -> None:
        if await self.redis.set(lease_key(self.config, group), self.value, nx=True, px=ttl_ms):
            log.info("group %d: lease taken", group)
            self.held.add(group)
            self.start_group(group)

    def _hand_over(self, group: int) -> None:
        """Stop serving (the lease is still renewed meanwhile), then release the lease."""
        async def hand_over() -> None:
            await self._stop(group)
            self.held.discard(group)
            try:
                await self._delete_if(keys=[lease_key(self.config, group)], args=[self.value])
            except (RedisError, OSError) as exc:
                log.warning("group %d: releasing the lease failed (it expires): %r", group, exc)
            log.info("group %d: stopped and released", group)

        self._track(group, hand_over())

    def _stop(self, group: int) -> Awaitable[None]:
        if self.stop_group is None:
            raise InvariantViolation(f"group {group} must stop, and no stop_group was given")
        return self.stop_group(group)

    def _track(self, group: int, stopping: Awaitable[None]) -> None:
        # Stopping drains the group (up to append_timeout_s): never inside a tick, whose
        # renewals of the other leases must not wait for it.
        def done(task: asyncio.Task) -> None:
            self.handing_over.pop(group, None)
            if not task.cancelled() and task.exception() is not None:
                log.error("group %d: stopping failed: %r", group, task.exception())

        task = asyncio.ensure_future(stopping)
        task.add_done_callback(done)
        self.handing_over[group] = task

    # Views --------------------------------------------------------------------------------------

    def settled(self) -> bool:
        """A tick ran, nothing is being handed over, and this worker holds every group it
        prefers (when its preferred owner is this node)."""
        if self.ticks == 0 or self.handing_over:
            return False
        return all(group in self.held for group, owner in self._preferred_cache.items()
                   if owner == self.node_id)

    async def release_all(self) -> None:
        for group in sorted(self.held):
            try:
                await self._delete_if(keys=[lease_key(self.config, group)], args=[self.value])
            except (RedisError, OSError):
                pass
        self.held.clear()


class ForwardedRequest:
    """What a node needs to pass a request on to another node: the caller's credentials
    and body, and whether it was itself forwarded (a forwarded request is never forwarded
    again, so a stale view of the leases cannot make requests loop)."""

    __slots__ = ("authorization", "body", "forwarded")

    def __init__(self, authorization: str | None, body: bytes, forwarded: bool) -> None:
        self.authorization = authorization
        self.body = body
        self.forwarded = forwarded

    def headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", FORWARDED_HEADER: "1"}
        if self.authorization:
            headers["authorization"] = self.authorization
        return headers


class Relayed(Exception):
    """Another node's answer, to be sent to the client as it is (status, type, body)."""

    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        super().__init__(f"relayed {status}")
        self.status = status
        self.content_type = content_type
        self.body = body
