"""The CRDT must agree with the log at close: each ingest worker checks its own shards.

Final results are each shard's log counted up to its close record, and a closed shard's
tallies never change again, so its owner's state is that count. Once every shard this worker
holds of a poll has applied the poll's close record, the worker checks the poll right after
its next successful full publish (engine/results_publisher.py: every counter of the
worker's, max-merged, so Redis holds at least these values): it reads back exactly its own
shards' fields (`t|region|shard|option` and `k|region|shard|country|option`, HMGET in calls of
at most FIELDS_PER_CALL_MAX fields) and compares them with the state the publish was made
from (engine.crdt.recount_disagreements). A difference (a counter raised by something
other than this shard's owner, a merge script that lost an update) counts
`vote_crdt_recount_disagreements_total` once per poll and is logged, at most
DISAGREEMENTS_LOGGED_MAX fields per poll (alert VoteCrdtRecountDisagreement).

Each poll is checked once per process (at most CHECKED_POLLS_MAX remembered; a forgotten one
is checked again, which is harmless). What this cannot see, because it reads only the fields
it wrote: a field of its shards for a country none of its voters claimed. `votes replay
verify --crdt-redis-url` reads the whole hash and finds those too (docs/replay.md).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from engine import crdt
from engine.metrics import CRDT_RECOUNT_DISAGREEMENTS

log = logging.getLogger("votes.results")

CHECKED_POLLS_MAX = 10_000
DISAGREEMENTS_LOGGED_MAX = 20


def closed_polls(parts: Iterable[Any]) -> dict[str, list[Any]]:
    """The polls every one of whose shards in `parts` (ShardTallies) is closed, with them."""
    by_poll: dict[str, list[Any]] = {}
    for part in parts:
        by_poll.setdefault(part.poll, []).append(part)
    return {poll: shard_parts for poll, shard_parts in by_poll.items()
            if all(part.closed for part in shard_parts)}


def shard_counts(part: Any) -> crdt.ShardCounts:
    options = part.options
    return crdt.ShardCounts(
        dict(zip(options, part.tallies, strict=True)),
        {country: dict(zip(options, counts, strict=True))
         for country, counts in part.countries.items()},
        part.closed)


class CloseCheck:
    """Compares, once per poll, this worker's closed shards with the merged hash."""

    def __init__(self, redis: Any, region: str, fields_per_call_max: int) -> None:
        self.redis = redis
        self.region = region
        self.fields_per_call_max = fields_per_call_max
        self.checked: OrderedDict[str, int] = OrderedDict()  # poll -> disagreements found
        self.disagreements_total = 0

    async def check(self, parts: Iterable[Any], merged_key: Any) -> int:
        """Check the polls of `parts` (what a full publish just sent) that are closed in all
        of them and not checked yet; the number of polls found disagreeing."""
        disagreeing = 0
        for poll, shard_parts in closed_polls(parts).items():
            if poll in self.checked:
                continue
            expected = {part.shard: shard_counts(part) for part in shard_parts}
            state = await self._read_back(merged_key(poll), poll, expected)
            found = crdt.recount_disagreements(state, self.region, poll, expected)
            self._remember(poll, len(found))
            if found:
                disagreeing += 1
                self.disagreements_total += 1
                CRDT_RECOUNT_DISAGREEMENTS.inc()
                log.error("poll %r: the merged CRDT disagrees with the log at close in %d "
                          "place(s): %s", poll, len(found),
                          "; ".join(str(item) for item in found[:DISAGREEMENTS_LOGGED_MAX]))
        return disagreeing

    async def _read_back(self, key: str, poll: str,
                         expected: dict[int, crdt.ShardCounts]) -> crdt.Counters:
        state = crdt.Counters()
        for shard, counts in expected.items():
            for option in counts.counts:
                state.tallies[(self.region, shard, poll, option)] = 0
            for country, per_option in counts.countries.items():
                for option in per_option:
                    state.countries[(self.region, shard, poll, country, option)] = 0
        fields = list(crdt.poll_fields(state, poll))
        values: list[Any] = []
        for start in range(0, len(fields), self.fields_per_call_max):
            values += await self.redis.hmget(key, fields[start:start + self.fields_per_call_max])
        present = [(name, int(value)) for name, value in zip(fields, values, strict=True)
                   if value is not None]
        return crdt.counters_from_fields(poll, present)

    def _remember(self, poll: str, found: int) -> None:
        self.checked[poll] = found
        while len(self.checked) > CHECKED_POLLS_MAX:
            self.checked.popitem(last=False)
