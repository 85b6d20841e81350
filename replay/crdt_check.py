"""`verify --crdt-redis-url`: the merged CRDT counters in Redis against the recount.

Reads each poll's merged hash (`results:{poll}:merged`, engine/results_publisher.py) whole,
with HSCAN (at most FIELDS_READ_MAX fields per poll, each call bounded by REDIS_TIMEOUT_S),
keeps the fields of this data dir's region (`config.region`) and compares them, per shard
recounted, with that shard's recount (engine.crdt.recount_disagreements): per option, and
per country and option for a poll with the country breakdown. A shard closed in its log must
agree exactly; an open one's counters may lag (they are published about every 100 ms) but
never exceed the log. Fields of shards not recounted and of other regions are not compared
(each region verifies its own log). A poll the hash does not hold is a note, not a finding:
nothing was published for it (no Redis configured, or an emptied Redis before the next full
publish refills it).
"""

from __future__ import annotations

from engine import crdt
from replay.errors import BadInput
from replay.recount import ShardRecount

FIELDS_READ_MAX = 10_000_000
HSCAN_COUNT = 5000
REDIS_TIMEOUT_S = 5.0


def merged_key(poll: str) -> str:
    """The publisher's key of a poll's merged hash (engine/results_publisher.py merged_key;
    the replay layer does not import the serving layer, so the format is repeated here and
    tests/unit/test_replay_crdt_check.py holds the two equal)."""
    return f"results:{{{poll}}}:merged"


async def read_merged(redis_url: str, polls: list[str]) -> dict[str, crdt.Counters | None]:
    """Per poll, its merged CRDT state from Redis, or None when the hash does not exist."""
    import redis.asyncio
    import redis.exceptions

    try:
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=REDIS_TIMEOUT_S,
                                              socket_connect_timeout=REDIS_TIMEOUT_S)
    except ValueError as exc:  # not a redis://, rediss:// or unix:// URL
        raise BadInput(f"--crdt-redis-url {redis_url!r}: {exc}") from None
    states: dict[str, crdt.Counters | None] = {}
    try:
        for poll in polls:
            fields: list[tuple[str, int]] = []
            async for name, value in client.hscan_iter(merged_key(poll), count=HSCAN_COUNT):
                fields.append((name.decode(), int(value)))
                if len(fields) > FIELDS_READ_MAX:
                    raise BadInput(f"the merged hash of poll {poll!r} holds more than "
                                   f"{FIELDS_READ_MAX:,} fields")
            try:
                states[poll] = crdt.counters_from_fields(poll, fields) if fields else None
            except crdt.CounterInvalid as exc:
                raise BadInput(f"the merged hash of poll {poll!r}: {exc}") from None
    except (redis.exceptions.RedisError, OSError) as exc:
        raise BadInput(f"cannot read the merged results from {redis_url}: {exc}") from None
    finally:
        await client.aclose()
    return states


def shard_counts(recount: ShardRecount, poll: str) -> crdt.ShardCounts | None:
    tally = recount.polls.get(poll)
    if tally is None:
        return None
    return crdt.ShardCounts(tally.counts, tally.countries, tally.closed)


def disagreements(state: crdt.Counters, region: str, poll: str,
                  recounts: dict[int, ShardRecount]) -> list[crdt.Disagreement]:
    shards = {shard: counts for shard, recount in recounts.items()
              if (counts := shard_counts(recount, poll)) is not None}
    return crdt.recount_disagreements(state, region, poll, shards)
