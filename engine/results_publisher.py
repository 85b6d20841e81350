"""Publishing the tallies a worker owns to Redis, about every `results_publish_ms`.

Each worker reads its shards' state through a small callable (`TalliesSource`: one
`ShardTallies` per ready shard and poll) and its in-memory rejection counts, turns them
into CRDT counters (engine/crdt.py) and merges the fields that grew since its last publish
into one Redis hash per poll with a Lua max-merge. The script raises the poll's version and
publishes it on the poll's channel only when a field grew, so the results role
(engine/results_app.py) wakes once per change, however many workers publish.

Keys of one poll share the hash tag `{poll}`, so one script touches one cluster slot:
- `results:{poll}:merged`     hash of CRDT fields -> counter (engine.crdt.poll_fields)
- `results:{poll}:definition` JSON of options, embargo, shards total (set once)
- `results:{poll}:version`    integer, raised by every merge that changed something
- channel `results:{poll}:changed` carries the new version.

Redis never holds the truth: a lost or emptied Redis is refilled by the next full publish
(every FULL_PUBLISH_S, and after any error), and max-merge makes repeats harmless.
Bounds: at most FIELDS_PER_CALL_MAX fields per script call; one publish in flight per worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from engine import crdt
from engine.config import Config
from engine.results_close_check import CloseCheck

log = logging.getLogger("votes.results")

KEY_PREFIX = "results:"
FIELDS_PER_CALL_MAX = 2000
FULL_PUBLISH_S = 5.0
REDIS_TIMEOUT_S = 2.0
ERROR_LOG_INTERVAL_S = 30.0

# KEYS: merged hash, definition, version. ARGV: channel, definition JSON, then field/value
# pairs. A field is written only when its value is larger (max-merge); the version rises
# and is published once per call that changed something.
MERGE_SCRIPT = """
local changed = 0
if redis.call('SET', KEYS[2], ARGV[2], 'NX') then changed = 1 end
for i = 3, #ARGV, 2 do
  local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '-1')
  if tonumber(ARGV[i + 1]) > current then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    changed = changed + 1
  end
end
if changed > 0 then
  local version = redis.call('INCR', KEYS[3])
  redis.call('PUBLISH', ARGV[1], version)
end
return changed
"""


class ShardTallies(NamedTuple):
    """One shard's counters of one poll, as its owner holds them now."""

    shard: int
    poll: str
    options: list[str]
    tallies: list[int]
    closed: bool
    embargo: bool = False
    # Per country claim, votes per option index: a poll with the country breakdown only.
    countries: Mapping[str, list[int]] = {}
    breakdown: Sequence[str] = ()  # the poll's (records.PollCreated.breakdown)


TalliesSource = Callable[[], Iterable[ShardTallies]]
RejectionsSource = Callable[[], Mapping[str, Mapping[str, int]]]  # poll -> reason -> count


def merged_key(poll: str) -> str:
    return f"{KEY_PREFIX}{{{poll}}}:merged"


def definition_key(poll: str) -> str:
    return f"{KEY_PREFIX}{{{poll}}}:definition"


def version_key(poll: str) -> str:
    return f"{KEY_PREFIX}{{{poll}}}:version"


def channel(poll: str) -> str:
    return f"{KEY_PREFIX}{{{poll}}}:changed"


def node_tallies(node: Any) -> TalliesSource:
    """The adapter from `engine.node.Node`: every shard of every ready group owner, per poll
    (node.owners is keyed by fencing group; a group's shards share its polls)."""

    def read() -> Iterable[ShardTallies]:
        for owner in list(node.owners.values()):
            if not owner.ready or not owner.states:
                continue
            for poll in list(owner.states[owner.shards[0]].polls):
                for part in owner.poll_summaries(poll):
                    yield ShardTallies(part.shard, poll, list(part.definition.options),
                                       part.tallies, part.closed, part.definition.embargo,
                                       part.country_tallies, part.definition.breakdown)
    return read


def node_rejections(node: Any) -> RejectionsSource:
    return lambda: {poll: dict(counts) for poll, counts in node.rejected.items()}


class PollPublish(NamedTuple):
    fields: dict[str, int]
    definition: str


def poll_publishes(region: str, replica: str, shards_total: int,
                   shard_tallies: Iterable[ShardTallies],
                   rejections: Mapping[str, Mapping[str, int]]) -> dict[str, PollPublish]:
    """Per poll, every CRDT field this worker holds now and the poll's definition."""
    state = crdt.Counters()
    definitions: dict[str, str] = {}
    for part in shard_tallies:
        for option, count in zip(part.options, part.tallies, strict=True):
            state.tallies[(region, part.shard, part.poll, option)] = count
        for country, counts in part.countries.items():
            for option, count in zip(part.options, counts, strict=True):
                state.countries[(region, part.shard, part.poll, country, option)] = count
        if part.closed:
            state.closed.add((region, part.shard, part.poll))
        definition = {"options": part.options, "embargo": part.embargo, "shards": shards_total}
        if part.breakdown:
            definition["breakdown"] = list(part.breakdown)
        definitions.setdefault(part.poll, json.dumps(definition))
    for poll, reasons in rejections.items():
        if poll in definitions:  # rejections of polls this worker does not hold wait
            for reason, count in reasons.items():
                state.rejected[(region, replica, poll, reason)] = count
    return {poll: PollPublish(crdt.poll_fields(state, poll), definition)
            for poll, definition in definitions.items()}


async def merge_poll_fields(script: Any, poll: str, definition: str,
                            fields: list[tuple[str, int]]) -> int:
    """Max-merge `fields` into the poll's hash with MERGE_SCRIPT (registered on the target
    Redis), in calls of at most FIELDS_PER_CALL_MAX fields; one call even with no fields (it
    sets the definition). The number of fields sent. Shared with engine/replicator.py."""
    for start in range(0, max(len(fields), 1), FIELDS_PER_CALL_MAX):
        chunk = fields[start:start + FIELDS_PER_CALL_MAX]
        arguments: list[str | int] = [channel(poll), definition]
        for name, value in chunk:
            arguments += [name, value]
        await script(keys=[merged_key(poll), definition_key(poll), version_key(poll)],
                     args=arguments)
    return len(fields)


class ResultsPublisher:
    """Publishes this worker's counters; `run` loops until cancelled."""

    def __init__(self, redis: Any, config: Config, tallies: TalliesSource,
                 rejections: RejectionsSource) -> None:
        self.redis = redis
        self.region = config.region
        self.replica = uuid.uuid4().hex[:16]  # fresh per process: see engine/crdt.py
        self.shards_total = config.shards
        self.interval_s = config.results_publish_ms / 1000
        self.tallies = tallies
        self.rejections = rejections
        self.script = redis.register_script(MERGE_SCRIPT)
        self.published: dict[str, dict[str, int]] = {}  # what Redis acknowledged, per poll
        self.full_publish_at = 0.0
        self.errors = 0
        self._error_logged_at = 0.0
        self.close_check = CloseCheck(redis, self.region, FIELDS_PER_CALL_MAX)

    async def publish_once(self) -> int:
        """Merge what grew since the last publish (everything, when a full one is due);
        the number of fields sent."""
        full = time.monotonic() >= self.full_publish_at
        if full:
            self.published.clear()
            self.full_publish_at = time.monotonic() + FULL_PUBLISH_S
        sent = 0
        parts = list(self.tallies())
        current = poll_publishes(self.region, self.replica, self.shards_total, parts,
                                 self.rejections())
        for poll, publish in current.items():
            known = self.published.setdefault(poll, {})
            grown = [(name, value) for name, value in publish.fields.items()
                     if value > known.get(name, -1)]
            if not grown and not full:
                continue
            sent += await merge_poll_fields(self.script, poll, publish.definition, grown)
            known.update(grown)
        if full:  # Redis holds at least every counter of `parts` now: see the close check
            await self.close_check.check(parts, merged_key)
        return sent

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await asyncio.wait_for(self.publish_once(), REDIS_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis down or slow: results wait, votes go on
                self.errors += 1
                self.full_publish_at = 0.0  # what Redis holds is unknown: send everything
                if started - self._error_logged_at >= ERROR_LOG_INTERVAL_S:
                    self._error_logged_at = started
                    log.warning("results publish failed (%d so far): %r", self.errors, exc)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))


def start_publisher(loop: asyncio.AbstractEventLoop, config: Config,
                    node: Any) -> asyncio.Task[None] | None:
    """Start publishing this worker's tallies when a Redis URL is configured (else None)."""
    if not config.redis_url or node is None:
        return None
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(config.redis_url, socket_timeout=REDIS_TIMEOUT_S,
                                          socket_connect_timeout=REDIS_TIMEOUT_S)
    publisher = ResultsPublisher(client, config, node_tallies(node), node_rejections(node))
    return loop.create_task(publisher.run(), name="results-publisher")
