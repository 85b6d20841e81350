"""Velocity rules across workers: each prefix's votes and distinct voters, counted in the
Redis Cluster of the rate limits (`ratelimit_redis_url`) with the window as TTL.

A worker's own window (engine/defences.py `Velocity`) sees only its share of a prefix's
traffic: a bot farm spread over 40 workers stays under `velocity_prefix_voters_max` in each.
So every `ratelimit_sync_ms` the worker sends what it saw since the last sync, per prefix
(votes, and at most voters_max + 1 new voter ids: beyond, the rule fires anyway), one Lua
call per bucket (the rate limits' buckets: one hash slot each, so one call per master),
and gets back each prefix's global votes and distinct voters. Per prefix the script keeps
a counter and a HyperLogLog (distinct voters within about 1 %, 12 KB at most), both
created with the window as TTL, so a window starts at the prefix's first vote anywhere and
ends by itself. A prefix over either limit globally is suspicious in this worker
(engine/defences.py `apply_global_velocity`), and auto-banned past the auto-ban limit.

The vote path never waits on this: the counts travel after the votes, so a rule broken
across workers is applied within one sync interval. Redis away: the local rules keep
working, the unsent counts are dropped and counted as fail-open (`vote_ratelimit_fail_open_
total`), and the worker logs at most every ratelimit.FAIL_OPEN_LOG_INTERVAL_S.
"""

from __future__ import annotations

import asyncio
from typing import Any

from engine.config import Config
from engine.ratelimit import (
    FailOpenLog,
    bucket_batches,
    bucket_of,
    bucket_tags,
    call_buckets,
    cluster_client,
)

PREFIXES_PER_CALL_MAX = 256  # two keys each: bounds one call's size and time in Redis

# KEYS: per prefix its counter and its HyperLogLog (the bucket's hash tag: one slot).
# ARGV[1]: the window in seconds; ARGV[i + 1]: prefix i's "votes voter voter ...".
# A counter that this call creates starts the prefix's window: the old HyperLogLog (if its
# TTL outlived the counter's by a moment) is dropped so the two windows stay one.
VELOCITY_SCRIPT = """
local window_s = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local count_key, voters_key = KEYS[2 * i - 3], KEYS[2 * i - 2]
  local votes, ids = string.match(ARGV[i], '^(%d+) ?(.*)$')
  local total = redis.call('INCRBY', count_key, votes)
  if total == tonumber(votes) then
    redis.call('EXPIRE', count_key, window_s)
    redis.call('DEL', voters_key)
  end
  local voters = {}
  for id in string.gmatch(ids, '%d+') do voters[#voters + 1] = id end
  if #voters > 0 then redis.call('PFADD', voters_key, unpack(voters)) end
  if redis.call('TTL', voters_key) < 0 then redis.call('EXPIRE', voters_key, window_s) end
  out[#out + 1] = total .. ' ' .. redis.call('PFCOUNT', voters_key)
end
return table.concat(out, ' ')
"""


def velocity_keys(tag: str, prefix: str) -> list[str]:
    return [f"{{{tag}}}:vel:n:{prefix}", f"{{{tag}}}:vel:h:{prefix}"]


class VelocitySync:
    """One worker's shipment of its velocity counts; `defences` takes the global ones."""

    def __init__(self, config: Config, defences: Any, client: Any = None) -> None:
        self.defences = defences
        self.interval_s = config.ratelimit_sync_ms / 1000
        self.timeout_s = config.ratelimit_store_timeout_ms / 1000
        self.window_s = max(1, round(config.velocity_window_s))
        self.buckets = config.ratelimit_sync_buckets
        self.tags = bucket_tags(self.buckets)
        self.url = config.ratelimit_redis_url
        self.client = client
        self.script: Any = None
        self.fail_open = FailOpenLog("velocity", "votes")

    def _connect(self) -> None:
        if self.client is None:
            self.client = cluster_client(self.url, self.timeout_s)
        self.script = self.client.register_script(VELOCITY_SCRIPT)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.sync_once()

    def _batches(self) -> list[tuple[int, list[tuple[str, int, set[int]]]]]:
        by_bucket: dict[int, list[tuple[str, int, set[int]]]] = {}
        for prefix, (votes, voters) in self.defences.velocity.take_pending().items():
            by_bucket.setdefault(bucket_of(f"vel:{prefix}", self.buckets), []).append(
                (prefix, votes, voters))
        return bucket_batches(by_bucket, PREFIXES_PER_CALL_MAX)

    async def sync_once(self) -> None:
        batches = self._batches()
        if not batches:
            return
        if self.script is None:
            self._connect()
        answers = await call_buckets(batches, self._call)
        failed, error = 0, None
        for (_, entries), answer in zip(batches, answers):
            if isinstance(answer, BaseException):
                failed += sum(votes for _, votes, _ in entries)
                error = answer
                continue
            numbers = [int(number) for number in answer.split()]
            for index, (prefix, _, _) in enumerate(entries):
                self.defences.apply_global_velocity(prefix, numbers[2 * index],
                                                    numbers[2 * index + 1])
        self.fail_open.report(failed, error, self.defences.clock(),
                              "the velocity rules count this worker's traffic only")

    async def _call(self, bucket: int, entries: list[tuple[str, int, set[int]]]) -> bytes:
        tag = self.tags[bucket]
        keys = [key for prefix, _, _ in entries for key in velocity_keys(tag, prefix)]
        args = [str(self.window_s)] + [
            " ".join([str(votes), *map(str, voters)]) for _, votes, voters in entries]
        return await asyncio.wait_for(self.script(keys=keys, args=args), self.timeout_s)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
