"""A shard's state: per poll a roaring bitmap of who voted, the tallies and a receipt locator.

The state changes only by applying WAL records in log order (`ShardState.apply`), on the live
path after the log reports them durable and on replay alike; votes go through the same
test-and-set (engine.fastpath.apply_group), so re-applying a record changes nothing. A
record of a type this code does not know is LogCorrupt, never skipped.

Voter ids map to shards as `shard = voter_id mod shards` and to bitmap positions as
`voter_index = voter_id div shards`, which keeps each shard's bitmap dense.

The receipt locator (shards/locator_runs.py: per voter_index, the log offset of the record
that counted the vote + 1) lets a repeat vote get its original receipt back by reading one
record. It keeps a bounded open run in RAM and the rest in sorted run files under the
shard's locator directory (`attach_locator`); without one (replay tools, tests) every run
stays in RAM.
"""

from __future__ import annotations

import array
from collections import Counter
from itertools import compress
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from pyroaring import BitMap

from engine.errors import LogCorrupt
from engine.fastpath import apply_group
from shards.locator_runs import RUN_ENTRIES_DEFAULT, PollLocator, RunWrite, poll_directory
from shards.records import LogHeader, PollClosed, PollCreated, Record, VoteBatch, VoteGroup

# Outcome of one vote when its record is applied.
COUNTED = 1
DUPLICATE = 0
NOT_OPEN = 2  # the poll was unknown or already closed at this point in the log


class ShardSummary(NamedTuple):
    """One shard's counts of one poll: what results and the publisher read."""

    shard: int
    definition: PollCreated
    tallies: list[int]  # per option index
    closed: bool
    country_tallies: dict[str, list[int]]  # per country, per option index; {} without breakdown


class PollState:
    __slots__ = ("definition", "option_index", "voters", "tallies", "locator", "closed_ms",
                 "country_tallies")

    def __init__(self, definition: PollCreated, locator: PollLocator | None = None) -> None:
        self.definition = definition
        self.option_index = {option: index for index, option in enumerate(definition.options)}
        self.voters = BitMap()
        self.tallies = array.array("Q", bytes(8 * len(definition.options)))
        self.locator = locator if locator is not None else PollLocator()
        self.closed_ms: int | None = None
        # Only for a poll with the country breakdown: per country claim, per option index.
        self.country_tallies: dict[str, array.array[int]] = {}

    @property
    def closed(self) -> bool:
        return self.closed_ms is not None

    def counts(self) -> dict[str, int]:
        return dict(zip(self.definition.options, self.tallies.tolist(), strict=True))

    def summary(self, shard: int) -> ShardSummary:
        return ShardSummary(shard, self.definition, self.tallies.tolist(), self.closed,
                            self.country_counts())

    def country_counts(self) -> dict[str, list[int]]:
        """Per country, the votes per option index (empty for a poll without the breakdown)."""
        return {country: tallies.tolist() for country, tallies in self.country_tallies.items()}

    def count_countries(self, group: VoteGroup, flags: bytearray, where: str) -> None:
        """Add the counted votes of `group` (flags from apply_group) to the country tallies.
        A group of such a poll without one country index per vote, or with an index outside
        its codes, is LogCorrupt: our writer never produces one, and guessing would make the
        breakdown disagree with the totals."""
        codes, indexes = group.country_codes, array.array("H", group.countries)
        if len(indexes) != len(flags) or (indexes and max(indexes) >= len(codes)):
            raise LogCorrupt(f"{where}: the vote group of poll {group.poll!r} has "
                             f"{len(indexes)} country indexes for {len(flags)} votes and "
                             f"{len(codes)} country codes")
        options = array.array("H", group.options)
        option_count = len(self.definition.options)
        for (country, option), count in Counter(
                compress(zip(indexes, options), flags)).items():
            tallies = self.country_tallies.get(codes[country])
            if tallies is None:
                tallies = self.country_tallies[codes[country]] = array.array(
                    "Q", bytes(8 * option_count))
            tallies[option] += count


class ShardState:
    def __init__(self, shard: int, shards_total: int,
                 locator_run_entries: int = RUN_ENTRIES_DEFAULT, groups: int = 0) -> None:
        self.shard = shard
        self.shards_total = shards_total
        # The layout's fencing groups (config.groups), recorded in snapshots: their offsets
        # are in this group's log. 0: unknown (a state built without a config).
        self.groups = groups
        self.locator_run_entries = locator_run_entries
        self.locator_directory: Path | None = None
        self.polls: dict[str, PollState] = {}
        self.wal_offset_next = 0  # the log offset just after the last applied record
        self.batch_seq_next = 0
        self.votes_applied = 0

    def voter_index(self, voter_id: int) -> int:
        return voter_id // self.shards_total

    def voter_id(self, voter_index: int) -> int:
        return voter_index * self.shards_total + self.shard

    def apply(self, offset: int, next_offset: int, record: Record) -> list[bytearray | None]:
        """Apply one record that sits at `offset`. For a vote batch, returns one entry per
        vote group: a flags bytearray (1 = counted) for a group of this shard whose poll was
        open, else None (a group of another shard of the fencing group is not applied here;
        see `apply_votes` for only this shard's groups)."""
        if next_offset <= self.wal_offset_next:
            # Already applied (a replay overlapping what the state holds): changes nothing,
            # even for a vote whose poll was created later in the log.
            return [None] * len(record.groups) if isinstance(record, VoteBatch) else []
        outcomes: list[bytearray | None] = []
        if isinstance(record, VoteBatch):
            outcomes = self._apply_votes(offset, next_offset, record)
        elif isinstance(record, PollCreated):
            if record.poll not in self.polls:
                locator = PollLocator(self.locator_run_entries)
                if self.locator_directory is not None:
                    # A poll the state did not hold: no snapshot relies on runs left for it.
                    locator.attach_fresh(poll_directory(self.locator_directory, record.poll))
                self.polls[record.poll] = PollState(record, locator)
        elif isinstance(record, PollClosed):
            poll = self.polls.get(record.poll)
            if poll is not None and poll.closed_ms is None:
                poll.closed_ms = record.closed_ms
        elif isinstance(record, LogHeader):
            pass  # checked by whoever opens the log (shards/recovery.py)
        else:
            # decode_record only gives the types above: anything else means the log or the
            # decoder disagrees with this code, and guessing would lose or invent votes.
            raise LogCorrupt(f"shard {self.shard}: record at offset {offset} has unknown type "
                             f"{type(record).__name__}")
        self.wal_offset_next = max(self.wal_offset_next, next_offset)
        return outcomes

    def advance_to(self, wal_offset_next: int) -> None:
        """Records up to `wal_offset_next` of the group's log are applied: the ones this
        shard had no part in change nothing here, and a snapshot of it covers them."""
        self.wal_offset_next = max(self.wal_offset_next, wal_offset_next)

    def attach_locator(self, directory: Path, run_entries: int) -> bool:
        """Keep the polls' locator runs in `directory`: True if the runs there cover what
        this state (a thawed snapshot) relies on or the snapshot carried them, else False
        (the caller rebuilds the shard from the log). Blocking file I/O: off the loop."""
        for poll_id, poll in self.polls.items():
            poll.locator.run_entries = run_entries
            if not poll.locator.attach(poll_directory(directory, poll_id)):
                return False
        self.locator_directory = directory
        self.locator_run_entries = run_entries
        return True

    def attach_locator_fresh(self, directory: Path, run_entries: int) -> None:
        """Keep locator runs in `directory`, a state with no poll yet (rebuilt from the log)."""
        if self.polls:
            raise ValueError("a fresh locator directory is for a state with no poll")
        self.locator_directory = directory
        self.locator_run_entries = run_entries

    def locator_covered_next(self) -> int:
        """The furthest log offset a receipt locator run of this shard covers."""
        return max((poll.locator.covered_next for poll in self.polls.values()), default=0)

    def locator_writes_pending(self) -> list[RunWrite]:
        """Run files a snapshot frozen now relies on and that are still being written."""
        return [future for poll in self.polls.values() for future in poll.locator.writes_pending()]

    def apply_votes(self, offset: int, next_offset: int, batch: VoteBatch,
                    positions: Sequence[int]) -> list[bytearray | None]:
        """Apply the vote groups of `batch` at `positions`, all of this shard (the group's
        owner cuts a batch by shard once, shards/recovery.py); one outcome per position, as
        `apply` gives them. A record already applied changes nothing."""
        if next_offset <= self.wal_offset_next:
            return [None] * len(positions)
        outcomes = self._apply_votes(offset, next_offset, batch, positions)
        self.wal_offset_next = next_offset
        return outcomes

    def _apply_votes(self, offset: int, next_offset: int, batch: VoteBatch,
                     positions: Sequence[int] | None = None) -> list[bytearray | None]:
        """Outcomes of the groups at `positions` (None: of every group, those of other
        shards None)."""
        self.batch_seq_next = max(self.batch_seq_next, batch.batch_seq + 1)
        outcomes: list[bytearray | None] = []
        groups = batch.groups
        for group in (groups if positions is None else [groups[i] for i in positions]):
            poll = self.polls.get(group.poll)
            if poll is None or poll.closed_ms is not None or group.shard != self.shard:
                outcomes.append(None)
                continue
            counted, flags = apply_group(
                poll.voters, poll.tallies, poll.locator.open_run, group.voters, group.options,
                offset + 1
            )
            poll.locator.after_apply(next_offset)
            if poll.definition.by_country:
                poll.count_countries(group, flags, f"shard {self.shard} record at offset {offset}")
            self.votes_applied += counted
            outcomes.append(flags)
        return outcomes

    def record_of_voter(self, poll: PollState, voter_index: int) -> int | None:
        """The log offset of the record holding this voter's counted vote, or None."""
        value = poll.locator.get(voter_index)
        return value - 1 if value else None
