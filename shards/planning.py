"""Cutting a fencing group's queued items into the records of one commit cycle.

A group owner queues votes (of any of its shards) and control records (poll created /
closed, which hold for every shard of the group) in one queue, in arrival order. A cycle
takes up to `batch_votes_max` votes with the control records among them, and cuts them
into records in that order: each run of votes between two control records becomes one
vote batch of the group (its votes grouped by shard and poll, each vote group naming its
shard; the group's batches carry its own sequence numbers), each control record stays one
record. All of it goes to the group's log in one append: one durable write, one batch and
one Merkle tree per group per cycle, whatever the number of shards in the group.
"""

from __future__ import annotations

import array
from collections import deque
from collections.abc import Mapping

from engine import signing
from shards.pending import PendingControl, PendingVote, PlannedRecord
from shards.records import PollCreated, VoteGroup
from shards.state import ShardState

QueuedItem = PendingVote | PendingControl


def take_items(queue: deque[QueuedItem], votes_max: int) -> tuple[list[QueuedItem], int]:
    """Up to `votes_max` votes from the queue's front, control records kept in place; and
    how many of the items are votes."""
    items: list[QueuedItem] = []
    votes = 0
    while queue and votes < votes_max:
        item = queue.popleft()
        if isinstance(item, PendingVote):
            votes += 1
        items.append(item)
    return items, votes


class BatchSequence:
    """A group's next vote batch sequence number: advanced for every batch planned, so a
    sequence number is never reused, even if the append fails."""

    __slots__ = ("next",)

    def __init__(self, next_: int = 0) -> None:
        self.next = next_

    def take(self) -> int:
        taken = self.next
        self.next += 1
        return taken


def plan_records(items: list[QueuedItem], group: int, states: Mapping[int, ShardState],
                 sequence: BatchSequence) -> list[PlannedRecord]:
    """The records of one append of `group`, in arrival order (see the module's
    docstring)."""
    plan: list[PlannedRecord] = []
    run: list[PendingVote] = []
    for item in items:
        if isinstance(item, PendingVote):
            run.append(item)
            continue
        if run:
            plan.append(_plan_vote_batch(group, run, states, sequence))
            run = []
        plan.append(PlannedRecord(item.record, [item]))
    if run:
        plan.append(_plan_vote_batch(group, run, states, sequence))
    return plan


def _plan_vote_batch(group: int, votes: list[PendingVote], states: Mapping[int, ShardState],
                     sequence: BatchSequence) -> PlannedRecord:
    by_shard_poll: dict[tuple[int, str], list[PendingVote]] = {}
    for vote in votes:
        key = (vote.shard, vote.poll)
        shard_poll = by_shard_poll.get(key)
        if shard_poll is None:
            by_shard_poll[key] = [vote]
        else:
            shard_poll.append(vote)
    planned = PlannedRecord(None, [vote for run in by_shard_poll.values() for vote in run])
    groups: list[VoteGroup] = []
    runs: list[signing.VoteRun] = []
    planned.group, planned.groups, planned.runs = group, groups, runs
    definitions: dict[str, PollCreated] = {}
    for (shard, poll), run in by_shard_poll.items():
        options = array.array("H", [vote.option_index for vote in run]).tobytes()
        voters = array.array("I", [vote.voter_index for vote in run]).tobytes()
        definition = definitions.get(poll)
        if definition is None:  # a poll's definition is alike in every shard of the group
            definition = definitions[poll] = states[shard].polls[poll].definition
        if definition.by_country:
            codes, countries = country_columns(run)
            groups.append(VoteGroup(shard, poll, voters, options, codes, countries))
        else:
            groups.append(VoteGroup(shard, poll, voters, options))
        runs.append(signing.VoteRun(
            shard, poll, definition.options,
            array.array("Q", [vote.voter_id for vote in run]).tobytes(), options))
    planned.batch_seq = sequence.take()
    return planned


def country_columns(votes: list[PendingVote]) -> tuple[list[str], bytes]:
    """The votes' distinct country claims (in order of first appearance) and, per vote, its
    claim's index among them as packed uint16 (a group holds at most batch_votes_max votes,
    at most 65,536, so an index always fits)."""
    index_of: dict[str, int] = {}
    indexes = array.array("H", [index_of.setdefault(vote.country, len(index_of))
                                for vote in votes])
    return list(index_of), indexes.tobytes()
