"""Results as grow-only counters (a G-Counter CRDT): merge is element-wise max, the result a sum.

Kernel code: no I/O, no imports of the project. Every publisher of tally state (a shard's
owner, a region's replicator) sends its whole current counters; receivers merge them by
taking, per key, the larger value. Max is commutative, associative and idempotent, so
replicas that saw the same updates in any order, duplicated or delayed, hold the same state,
and no merge can make a counter go down.

Keys:
- tallies: (region, shard, poll, option) -> votes counted. A shard's tallies only grow (its
  state is rebuilt from its log, which holds every acknowledged vote), so one key per shard
  is a correct G-Counter entry even across owner restarts and moves.
- rejections: (region, replica, poll, reason) -> requests rejected. Rejections are counted
  in memory by each worker process and start again from 0 when it restarts, so each process
  publishes under its own `replica` id (fresh per start): a restart adds entries and never
  lowers one, which keeps max-merge correct.
- closed: (region, shard, poll) present once that shard applied the poll's close record
  (a grow-only set; merge is union).
- countries: (region, shard, poll, country, option) -> votes counted from voters of that
  country claim, for a poll with the country breakdown; a shard's counters, so they grow
  like its tallies, and per (region, shard, poll, option) they sum to the tally.

Invariant (checked): counters are non-negative integers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

TallyKey = tuple[str, int, str, str]  # region, shard, poll, option
RejectionKey = tuple[str, str, str, str]  # region, replica, poll, reason
ClosedKey = tuple[str, int, str]  # region, shard, poll
CountryKey = tuple[str, int, str, str, str]  # region, shard, poll, country, option

# Field names inside one poll's merged hash (the poll is in the hash's key). The separator
# cannot occur in region, replica, country, option or reason ids (A-Z a-z 0-9 _ - : .).
FIELD_SEPARATOR = "|"
TALLY_FIELD = "t"
REJECTION_FIELD = "r"
CLOSED_FIELD = "c"
COUNTRY_FIELD = "k"


class CounterInvalid(ValueError):
    """A counter update that is not a non-negative integer, or a field that is not ours."""


@dataclass
class Counters:
    tallies: dict[TallyKey, int] = field(default_factory=dict)
    rejected: dict[RejectionKey, int] = field(default_factory=dict)
    closed: set[ClosedKey] = field(default_factory=set)
    countries: dict[CountryKey, int] = field(default_factory=dict)

    def copy(self) -> Counters:
        return Counters(dict(self.tallies), dict(self.rejected), set(self.closed),
                        dict(self.countries))


def _merge_counts(target: dict, update: Mapping) -> bool:
    changed = False
    for key, value in update.items():
        if not isinstance(value, int) or value < 0:
            raise CounterInvalid(f"counter {key!r} = {value!r} is not a non-negative integer")
        if value > target.get(key, -1):
            target[key] = value
            changed = True
    return changed


def merge_into(target: Counters, update: Counters) -> bool:
    """Merge `update` into `target` (element-wise max, union); True if `target` changed."""
    changed = _merge_counts(target.tallies, update.tallies)
    changed = _merge_counts(target.rejected, update.rejected) or changed
    changed = _merge_counts(target.countries, update.countries) or changed
    new_closed = update.closed - target.closed
    target.closed |= new_closed
    return changed or bool(new_closed)


def merge(left: Counters, right: Counters) -> Counters:
    """A new state: the merge of two states (neither argument changes)."""
    merged = left.copy()
    merge_into(merged, right)
    return merged


def totals(state: Counters, poll: str) -> dict[str, int]:
    """The global result of a poll: per option, the sum over regions and shards."""
    counts: dict[str, int] = {}
    for (_, _, key_poll, option), value in state.tallies.items():
        if key_poll == poll:
            counts[option] = counts.get(option, 0) + value
    return counts


def region_totals(state: Counters, poll: str) -> dict[str, dict[str, int]]:
    """Per region, per option: the sum over that region's shards."""
    regions: dict[str, dict[str, int]] = {}
    for (region, _, key_poll, option), value in state.tallies.items():
        if key_poll == poll:
            counts = regions.setdefault(region, {})
            counts[option] = counts.get(option, 0) + value
    return regions


def country_totals(state: Counters, poll: str) -> dict[str, dict[str, int]]:
    """Per country, per option: the sum over regions and shards."""
    countries: dict[str, dict[str, int]] = {}
    for (_, _, key_poll, country, option), value in state.countries.items():
        if key_poll == poll:
            counts = countries.setdefault(country, {})
            counts[option] = counts.get(option, 0) + value
    return countries


def rejected_totals(state: Counters, poll: str) -> dict[str, int]:
    """Per reason: the sum over regions and replicas."""
    reasons: dict[str, int] = {}
    for (_, _, key_poll, reason), value in state.rejected.items():
        if key_poll == poll:
            reasons[reason] = reasons.get(reason, 0) + value
    return reasons


def closed_shards(state: Counters, poll: str) -> dict[str, set[int]]:
    """Per region, the shards that applied the poll's close record."""
    regions: dict[str, set[int]] = {}
    for region, shard, key_poll in state.closed:
        if key_poll == poll:
            regions.setdefault(region, set()).add(shard)
    return regions


# One poll's state as flat hash fields (what the Redis publisher merges) ------------------------

def poll_fields(state: Counters, poll: str) -> dict[str, int]:
    """The poll's counters as {field: value}: `t|region|shard|option`,
    `r|region|replica|reason`, `c|region|shard` (value 1), `k|region|shard|country|option`."""
    join = FIELD_SEPARATOR.join
    fields: dict[str, int] = {}
    for (region, shard, key_poll, option), value in state.tallies.items():
        if key_poll == poll:
            fields[join((TALLY_FIELD, region, str(shard), option))] = value
    for (region, replica, key_poll, reason), value in state.rejected.items():
        if key_poll == poll:
            fields[join((REJECTION_FIELD, region, replica, reason))] = value
    for region, shard, key_poll in state.closed:
        if key_poll == poll:
            fields[join((CLOSED_FIELD, region, str(shard)))] = 1
    for (region, shard, key_poll, country, option), value in state.countries.items():
        if key_poll == poll:
            fields[join((COUNTRY_FIELD, region, str(shard), country, option))] = value
    return fields


def counters_from_fields(poll: str, fields: Iterable[tuple[str, int]]) -> Counters:
    """Inverse of poll_fields; raises CounterInvalid on a field this module did not write."""
    state = Counters()
    for name, value in fields:
        parts = name.split(FIELD_SEPARATOR)
        try:
            if parts[0] == TALLY_FIELD and len(parts) == 4:
                _merge_counts(state.tallies, {(parts[1], int(parts[2]), poll, parts[3]): value})
            elif parts[0] == REJECTION_FIELD and len(parts) == 4:
                _merge_counts(state.rejected, {(parts[1], parts[2], poll, parts[3]): value})
            elif parts[0] == COUNTRY_FIELD and len(parts) == 5:
                _merge_counts(state.countries,
                              {(parts[1], int(parts[2]), poll, parts[3], parts[4]): value})
            elif parts[0] == CLOSED_FIELD and len(parts) == 3:
                if value:
                    state.closed.add((parts[1], int(parts[2]), poll))
            else:
                raise CounterInvalid(f"unknown results field {name!r}")
        except ValueError as exc:  # int() of a shard that is not a number
            raise CounterInvalid(f"results field {name!r}: {exc}") from None
    return state


# The CRDT against a recount of the log --------------------------------------------------------

class ShardCounts(NamedTuple):
    """One shard's counts of one poll from its log (a recount, or its owner's state)."""

    counts: Mapping[str, int]  # per option
    countries: Mapping[str, Mapping[str, int]]  # per country claim, per option ({}: none)
    closed: bool  # the shard applied the poll's close record


class Disagreement(NamedTuple):
    shard: int
    option: str
    country: str | None  # None: the shard's tally of the option
    crdt: int
    log: int

    def __str__(self) -> str:
        where = f"option {self.option!r}" + (
            "" if self.country is None else f", country {self.country!r}")
        return f"shard {self.shard}, {where}: the CRDT says {self.crdt}, the log {self.log}"


def recount_disagreements(state: Counters, region: str, poll: str,
                          shards: Mapping[int, ShardCounts]) -> list[Disagreement]:
    """Where the CRDT entries of `region`'s shards in `shards` differ from their counts from
    the log. A shard that applied the close record must agree exactly (final results are
    the log's counts up to the close); an open shard's entries may lag its log, since they
    are published about every 100 ms, but never exceed it. Per option and per (country,
    option); the region and global totals are sums of these entries, so they agree when
    these do."""
    crdt_counts: dict[tuple[int, str | None, str], int] = {}
    for (key_region, shard, key_poll, option), value in state.tallies.items():
        if key_region == region and key_poll == poll and shard in shards:
            crdt_counts[(shard, None, option)] = value
    for (key_region, shard, key_poll, country, option), value in state.countries.items():
        if key_region == region and key_poll == poll and shard in shards:
            crdt_counts[(shard, country, option)] = value
    log_counts: dict[tuple[int, str | None, str], int] = {}
    for shard, part in shards.items():
        log_counts.update(((shard, None, option), count) for option, count in part.counts.items())
        log_counts.update(((shard, country, option), count)
                          for country, counts in part.countries.items()
                          for option, count in counts.items())
    found = []
    for key in sorted(set(crdt_counts) | set(log_counts),
                      key=lambda key: (key[0], key[1] or "", key[2])):
        crdt_value, log_value = crdt_counts.get(key, 0), log_counts.get(key, 0)
        if crdt_value > log_value or (shards[key[0]].closed and crdt_value != log_value):
            found.append(Disagreement(key[0], key[2], key[1], crdt_value, log_value))
    return found
