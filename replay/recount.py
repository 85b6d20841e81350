"""An independent recount of shards from their groups' logs: the audit side of replay.

It reads each fencing group's raw log with replay/rawlog.py (or replay/kafka_source.py) ONCE
for all the shards asked for in that group, decodes records into plain lists, and counts with
its own simple logic, never through the engine's decoder, ShardState or apply_group. A vote
batch is its group's (log format 3: one batch holds the votes of any of the group's shards);
each of its vote groups belongs to the shard it names, which must be in the group, and a
shard's recount takes only its own vote groups (a batch without any is, for that shard, a
record it has no part in). Poll created / closed records hold for every shard of the group.
The rule (replay/chain.py states it for third
parties): a vote counts iff its poll was created earlier in its group's log and not closed
yet there,
its option index is valid, and its voter has not voted in that poll before. Votes that do
not count are tallied per poll by reason: `duplicate`, `poll-not-open` (the poll was not
created yet, or already closed, at that point of the log) and `option-invalid`.

Counting: per poll a pyroaring BitMap of the voter indexes that counted (voter_id div
shards). A group whose voters are unique, disjoint from that bitmap and whose options are
all valid counts whole, with bulk operations; any other group takes a per-vote loop in log
order. Optionally (`chain`) the export hash chain is computed per poll, and (`keep_voters`)
each counted voter's option is kept.

`Recounter` is the pure part (one shard: the group's records in, counts out) and can be fed
incrementally; `GroupRecounter` feeds one group's records to its shards' recounters;
`recount_group` / `recount_shard` / `recount` read the logs. Every read is bounded (see
replay/sources.py).
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import sys
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from pyroaring import BitMap

from engine.config import Config
from engine.errors import InvariantViolation
from replay import chain as export_chain
from replay.context import by_group
from replay.errors import DataDamaged
from replay.rawlog import Batch, Closed, Created, Frame, Group, RawRecord, decode_raw
from replay.sources import read_frames

DUPLICATE = "duplicate"
POLL_NOT_OPEN = "poll-not-open"
OPTION_INVALID = "option-invalid"
REJECTION_REASONS = (DUPLICATE, POLL_NOT_OPEN, OPTION_INVALID)
# Group logs recounted at once by `recount` (each is one thread or one Kafka consumer).
RECOUNT_CONCURRENCY = 4
_NATIVE_LITTLE_ENDIAN = sys.byteorder == "little"


@dataclass
class PollRecount:
    poll: str
    options: list[str]
    counts: dict[str, int]  # counted votes per option
    rejected: dict[str, int]  # by reason, as seen in the log
    closed: bool
    voters: BitMap  # counted voter indexes (voter_id div shards_total)
    voter_options: dict[int, str] | None  # voter_id -> option; only with keep_voters=True
    chain_digest: bytes  # replay/chain.py; b"" when the chain was not computed
    chained_votes: int
    closed_ms: int | None = None
    # A poll with the country breakdown: per country claim, counted votes per option.
    countries: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class VoteOutcome:
    """What the recount decided for one watched vote (`watch=(offset, index)`)."""

    offset: int
    index: int
    poll: str
    voter_id: int
    option_index: int
    counted: bool
    reason: str | None  # one of REJECTION_REASONS when not counted
    chain_position: int | None  # 1-based position in the poll's chain when counted


@dataclass
class Capture:
    """The recount's polls as they stood at a log offset (before the record there)."""

    offset: int
    polls: dict[str, PollRecount] | None
    problem: str | None = None  # why there is no state at this offset


@dataclass
class ShardRecount:
    shard: int
    end_offset: int
    records: int
    votes_seen: int
    polls: dict[str, PollRecount]
    shards_total: int = 0
    torn_tail: str | None = None
    # Votes for polls never created in this shard's group's log (counted nowhere), by poll.
    unknown_polls: dict[str, int] = field(default_factory=dict)
    captures: dict[int, Capture] = field(default_factory=dict)
    watched: VoteOutcome | None = None


class _PollTally:
    __slots__ = ("chain", "chained", "closed_ms", "counts", "countries", "options", "poll",
                 "rejected", "tails", "voter_options", "voters")

    def __init__(self, created: Created, shard: int, keep_voters: bool, chained: bool) -> None:
        self.poll = created.poll
        self.options = list(created.options)
        self.tails = [export_chain.option_tail(option) for option in self.options]
        self.counts = [0] * len(self.options)
        self.rejected = dict.fromkeys(REJECTION_REASONS, 0)
        self.closed_ms: int | None = None
        self.voters = BitMap()
        self.voter_options: dict[int, str] | None = {} if keep_voters else None
        self.chain = export_chain.chain_start(created.poll, shard) if chained else None
        self.chained = 0
        # country claim -> counted votes per option index; None: no country breakdown.
        self.countries: dict[str, list[int]] | None = (
            {} if "country" in created.breakdown else None)

    def count_country(self, country: str, option: int, votes: int = 1) -> None:
        if self.countries is not None:
            counts = self.countries.setdefault(country, [0] * len(self.options))
            counts[option] += votes

    def recount(self, copy: bool) -> PollRecount:
        return PollRecount(
            poll=self.poll, options=list(self.options),
            counts=dict(zip(self.options, self.counts, strict=True)), rejected=dict(self.rejected),
            closed=self.closed_ms is not None,
            voters=self.voters.copy() if copy else self.voters,
            voter_options=None if copy or self.voter_options is None else self.voter_options,
            chain_digest=self.chain or b"", chained_votes=self.chained, closed_ms=self.closed_ms,
            countries={country: dict(zip(self.options, counts, strict=True))
                       for country, counts in (self.countries or {}).items()})


def _unpacked(group: Group) -> tuple[array.array, array.array]:
    voters = array.array("I", group.voters)
    options = array.array("H", group.options)
    if not _NATIVE_LITTLE_ENDIAN:
        voters.byteswap()
        options.byteswap()
    return voters, options


def _country_claims(group: Group, tally: _PollTally, where: str) -> list[str] | None:
    """Per vote of the group its country claim (a poll with the country breakdown), else None."""
    if tally.countries is None:
        return None
    indexes = array.array("H", group.countries)
    if not _NATIVE_LITTLE_ENDIAN:
        indexes.byteswap()
    if len(indexes) != group.size or any(index >= len(group.country_codes) for index in indexes):
        raise DataDamaged(f"{where}: a vote group of poll {group.poll!r}, which has the country "
                          f"breakdown, has {len(indexes)} country indexes for {group.size} votes "
                          f"and {len(group.country_codes)} country codes")
    return [group.country_codes[index] for index in indexes]


def _option_counts(options_bytes: bytes, option_count: int) -> list[int] | None:
    """Votes per option index when every index is valid, else None. The high bytes of the
    little-endian uint16s must all be zero (fewer than 256 options), then the low bytes are
    counted with bytes.count, a C loop."""
    votes = len(options_bytes) // 2
    if option_count > 256 or options_bytes[1::2].count(0) != votes:
        return None
    low = options_bytes[0::2]
    counts = [low.count(index) for index in range(option_count)]
    return counts if sum(counts) == votes else None


class Recounter:
    """Feed records in log order (`feed` / `apply`), read the counts with `result`."""

    def __init__(self, shard: int, shards_total: int, *, keep_voters: bool = False,
                 chain: bool | Collection[str] = True, capture_at: Iterable[int] = (),
                 watch: tuple[int, int] | None = None, start_offset: int = 0) -> None:
        self.shard = shard
        self.shards_total = shards_total
        self.keep_voters = keep_voters
        self.chain = chain
        self.polls: dict[str, _PollTally] = {}
        self.unknown_polls: Counter = Counter()
        self.records = 0
        self.votes_seen = 0
        self.last_offset: int | None = None
        self.next_offset = start_offset
        self.captures: dict[int, Capture] = {}
        self._captures_pending = sorted(set(capture_at))
        self.watch = watch
        self.watched: VoteOutcome | None = None

    # Records -----------------------------------------------------------------------------

    def feed(self, frame: Frame) -> None:
        where = f"shard {self.shard} record at offset {frame.offset}"
        self.apply(frame.offset, frame.next_offset, decode_raw(frame.payload, where))

    def apply(self, offset: int, next_offset: int, record: RawRecord,
              own_groups: list[tuple[int, Group]] | None = None) -> None:
        """Apply one record of the group's log: a vote batch without votes of this shard and
        the header only move the offsets (captures are at offsets of the group's log).
        `own_groups`: this shard's part of a vote batch (votes_by_shard), when the caller
        has cut the batch once for all its shards."""
        while self._captures_pending and self._captures_pending[0] <= offset:
            self._capture(self._captures_pending.pop(0))
        if isinstance(record, Batch):
            if own_groups is None:
                own_groups = votes_by_shard(record).get(self.shard, [])
            if own_groups:
                self.records += 1
                for first_index, group in own_groups:
                    self._group(offset, first_index, group)
        elif isinstance(record, Created):
            self.records += 1
            if record.poll not in self.polls:
                tally = _PollTally(record, self.shard, self.keep_voters, self._chained(record.poll))
                tally.rejected[POLL_NOT_OPEN] += self.unknown_polls.pop(record.poll, 0)
                self.polls[record.poll] = tally
        elif isinstance(record, Closed):
            self.records += 1
            closing = self.polls.get(record.poll)
            if closing is not None and closing.closed_ms is None:
                closing.closed_ms = record.closed_ms
        self.last_offset = offset
        self.next_offset = next_offset

    def _chained(self, poll: str) -> bool:
        if isinstance(self.chain, bool):
            return self.chain
        return poll in self.chain

    def _group(self, offset: int, first_index: int, group: Group) -> None:
        votes = group.size
        if votes == 0:
            return
        self.votes_seen += votes
        tally = self.polls.get(group.poll)
        watched = (self.watch is not None and self.watch[0] == offset
                   and first_index <= self.watch[1] < first_index + votes)
        if tally is None or tally.closed_ms is not None:
            if tally is None:
                self.unknown_polls[group.poll] += votes
            else:
                tally.rejected[POLL_NOT_OPEN] += votes
            if watched:
                self._watch_outcome(offset, group, first_index, False, POLL_NOT_OPEN, None)
            return
        voters, options = _unpacked(group)
        countries = _country_claims(group, tally, f"shard {self.shard} record at offset {offset}")
        option_counts = _option_counts(group.options, len(tally.options))
        if option_counts is not None and not watched:
            group_bitmap = BitMap(voters)
            if len(group_bitmap) == votes and group_bitmap.isdisjoint(tally.voters):
                self._count_whole(tally, offset, first_index, voters, options, group_bitmap,
                                  option_counts)
                if countries is not None:
                    for (country, option), count in Counter(zip(countries, options)).items():
                        tally.count_country(country, option, count)
                return
        self._count_each(tally, offset, first_index, voters, options, group if watched else None,
                         countries)

    def _count_whole(self, tally: _PollTally, offset: int, first_index: int, voters, options,
                     group_bitmap: BitMap, option_counts: list[int]) -> None:
        """The bulk path: every vote of the group counts."""
        tally.voters |= group_bitmap
        for index, count in enumerate(option_counts):
            tally.counts[index] += count
        shards_total, shard = self.shards_total, self.shard
        if tally.voter_options is not None:
            names = tally.options
            tally.voter_options.update(
                (voter * shards_total + shard, names[option])
                for voter, option in zip(voters, options, strict=True))
        if tally.chain is not None:
            digest, tails = tally.chain, tally.tails
            offset_bytes = export_chain.offset_field(offset)
            pack, sha256 = export_chain.index_voter_field, hashlib.sha256
            for position, (voter, option) in enumerate(zip(voters, options, strict=True)):
                digest = sha256(digest + offset_bytes + pack(first_index + position,
                                voter * shards_total + shard) + tails[option]).digest()
            tally.chain = digest
            tally.chained += len(voters)

    def _count_each(self, tally: _PollTally, offset: int, first_index: int, voters, options,
                    watched_group: Group | None, countries: list[str] | None) -> None:
        """The per-vote path, in log order: earlier votes of the group win."""
        option_count = len(tally.options)
        seen = tally.voters
        shards_total, shard = self.shards_total, self.shard
        offset_bytes = export_chain.offset_field(offset)
        for position, (voter, option) in enumerate(zip(voters, options, strict=True)):
            index = first_index + position
            reason = None
            if option >= option_count:
                reason = OPTION_INVALID
            elif voter in seen:
                reason = DUPLICATE
            if reason is not None:
                tally.rejected[reason] += 1
            else:
                seen.add(voter)
                tally.counts[option] += 1
                if countries is not None:
                    tally.count_country(countries[position], option)
                voter_id = voter * shards_total + shard
                if tally.voter_options is not None:
                    tally.voter_options[voter_id] = tally.options[option]
                if tally.chain is not None:
                    tally.chain = hashlib.sha256(
                        tally.chain + offset_bytes
                        + export_chain.index_voter_field(index, voter_id) + tally.tails[option]
                    ).digest()
                    tally.chained += 1
            if watched_group is not None and self.watch is not None and index == self.watch[1]:
                self._watch_outcome(offset, watched_group, first_index, reason is None, reason,
                                    tally.chained if reason is None and tally.chain is not None
                                    else None)

    def _watch_outcome(self, offset: int, group: Group, first_index: int, counted: bool,
                       reason: str | None, chain_position: int | None) -> None:
        if self.watch is None:
            raise InvariantViolation("a vote's outcome was reported while no vote is watched")
        watched_index = self.watch[1]
        voters, options = _unpacked(group)
        position = watched_index - first_index
        self.watched = VoteOutcome(
            offset=offset, index=watched_index, poll=group.poll,
            voter_id=voters[position] * self.shards_total + self.shard,
            option_index=options[position], counted=counted, reason=reason,
            chain_position=chain_position)

    # Captures and results ----------------------------------------------------------------

    def _capture(self, offset: int) -> None:
        if self.last_offset is not None and offset < self.next_offset:
            self.captures[offset] = Capture(offset, None, (
                f"offset {offset} is inside the record at offset {self.last_offset} "
                f"(which ends at {self.next_offset}), not at a record boundary"))
            return
        self.captures[offset] = Capture(
            offset, {name: tally.recount(copy=True) for name, tally in self.polls.items()})

    def result(self, end_offset: int, torn_tail: str | None = None) -> ShardRecount:
        """The counts so far. They share state with the recounter: feed nothing more while
        they are in use. Captures asked for at or before `end_offset` are taken now."""
        while self._captures_pending and self._captures_pending[0] <= end_offset:
            self._capture(self._captures_pending.pop(0))
        for offset in self._captures_pending:
            self.captures[offset] = Capture(offset, None, (
                f"offset {offset} is beyond the end of the log ({end_offset})"))
        self._captures_pending = []
        return ShardRecount(
            shard=self.shard, end_offset=end_offset, records=self.records,
            votes_seen=self.votes_seen,
            polls={name: tally.recount(copy=False) for name, tally in self.polls.items()},
            shards_total=self.shards_total, torn_tail=torn_tail,
            unknown_polls=dict(self.unknown_polls), captures=dict(self.captures),
            watched=self.watched)


def votes_by_shard(batch: Batch) -> dict[int, list[tuple[int, Group]]]:
    """Per shard with votes in the batch, its vote groups in record order, each with the
    index of its first vote in the batch. The index counts every vote of the batch, of any
    shard: it is the vote's leaf index in the signed batch tree, the `index` of its receipt
    and of its export chain step (replay/chain.py)."""
    parts: dict[int, list[tuple[int, Group]]] = {}
    index = 0
    for group in batch.groups:
        parts.setdefault(group.shard, []).append((index, group))
        index += group.size
    return parts


class GroupRecounter:
    """One group's log, decoded once, each vote batch cut by shard once, fed to the
    recounter of each shard asked for."""

    def __init__(self, config: Config, group: int, recounters: dict[int, Recounter]) -> None:
        self.group = group
        self.groups_total = config.groups
        self.shards_total = config.shards
        self.recounters = recounters

    def decode(self, frame: Frame) -> RawRecord:
        """The frame's record. A vote batch that names another group, or holds votes of a
        shard outside this group, is DataDamaged: the engine's recovery refuses such a log
        (shards/recovery.apply_record), so counting it here would report results no engine
        serves."""
        record = decode_raw(frame.payload, f"group {self.group} record at offset {frame.offset}")
        if not isinstance(record, Batch):
            return record
        if record.group != self.group:
            raise DataDamaged(f"group {self.group} record at offset {frame.offset}: a vote batch "
                              f"of group {record.group} in the log of group {self.group}")
        for shard in record.shards:
            if not (shard < self.shards_total and shard % self.groups_total == self.group):
                raise DataDamaged(f"group {self.group} record at offset {frame.offset}: a vote "
                                  f"batch holding votes of shard {shard}, which is not in group "
                                  f"{self.group}")
        return record

    def apply(self, offset: int, next_offset: int, record: RawRecord) -> None:
        if isinstance(record, Batch):
            parts = votes_by_shard(record)
            for shard, recounter in self.recounters.items():
                recounter.apply(offset, next_offset, record, parts.get(shard, []))
            return
        for recounter in self.recounters.values():
            recounter.apply(offset, next_offset, record)

    def feed(self, frame: Frame) -> None:
        self.apply(frame.offset, frame.next_offset, self.decode(frame))


# Reading the logs ----------------------------------------------------------------------------


async def recount_group(config: Config, group: int, shards: Iterable[int] | None = None, *,
                        keep_voters: bool = False, chain: bool | Collection[str] = True,
                        capture_at: Iterable[int] = (), watch: tuple[int, int] | None = None,
                        until_offset: int | None = None) -> dict[int, ShardRecount]:
    """Recount the shards of a group (all by default) from ONE read of the group's log, from
    its start to its end (or to `until_offset`).

    chain: compute the export chain for every poll (True), none (False) or the polls named.
    capture_at: offsets of the group's log at which to keep a copy of each shard's polls.
    watch: (record offset, vote index) of one vote whose outcome to report."""
    chosen = list(config.shards_of_group(group)) if shards is None else sorted(set(shards))
    captures = list(capture_at)
    recounters = {shard: Recounter(shard, config.shards, keep_voters=keep_voters, chain=chain,
                                   capture_at=captures, watch=watch) for shard in chosen}
    feeder = GroupRecounter(config, group, recounters)
    end = await read_frames(config, group, feeder.feed, until_offset=until_offset)
    return {shard: recounter.result(end.end_offset, end.torn_tail)
            for shard, recounter in recounters.items()}


async def recount_shard(config: Config, shard: int, **options) -> ShardRecount:
    """Recount one shard from its group's log; `options` are recount_group's."""
    recounts = await recount_group(config, config.group_of(shard), [shard], **options)
    return recounts[shard]


async def recount(config: Config, shards: Iterable[int] | None = None, *,
                  keep_voters: bool = False, **options) -> dict[int, ShardRecount]:
    """Recount the shards (all by default), each group's log read once for its shards, a few
    groups at a time; `options` are recount_group's keyword arguments."""
    chosen = list(range(config.shards)) if shards is None else list(shards)
    slots = asyncio.Semaphore(RECOUNT_CONCURRENCY)

    async def one(group: int, group_shards: list[int]) -> dict[int, ShardRecount]:
        async with slots:
            return await recount_group(config, group, group_shards, keep_voters=keep_voters,
                                       **options)

    merged: dict[int, ShardRecount] = {}
    for part in await gather_all(one(group, group_shards)
                                 for group, group_shards in by_group(config, chosen).items()):
        merged.update(part)
    return {shard: merged[shard] for shard in chosen}


async def gather_all(coroutines) -> list:
    """Run the coroutines at once and wait for ALL of them (each is bounded), then raise the
    first failure: no read is left running, or holding a connection, after an error."""
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def merged_counts(recounts: dict[int, ShardRecount]) -> dict[str, dict[str, int]]:
    """poll -> option -> counted votes, summed over the shards."""
    merged: dict[str, dict[str, int]] = {}
    for shard_recount in recounts.values():
        for name, poll in shard_recount.polls.items():
            counts = merged.setdefault(name, {})
            for option, count in poll.counts.items():
                counts[option] = counts.get(option, 0) + count
    return merged


def merged_voter_options(recounts: dict[int, ShardRecount]) -> dict[str, dict[int, str]]:
    """poll -> voter_id -> option of the counted vote (needs keep_voters=True)."""
    merged: dict[str, dict[int, str]] = {}
    for shard_recount in recounts.values():
        for name, poll in shard_recount.polls.items():
            if poll.voter_options is None:
                raise ValueError("merged_voter_options needs a recount with keep_voters=True")
            merged.setdefault(name, {}).update(poll.voter_options)
    return merged
