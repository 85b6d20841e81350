"""Cutting a fencing group's queued items into the records of one commit cycle.

A group owner queues votes (of any of its shards) and control records (poll created /
closed, which hold for every shard of the group) in one queue, in arrival order. A cycle
takes up to `batch_votes_max` votes with the control records among them, and cuts them
into records in that order: each run of votes between two control records becomes one
vote batch per shard that has votes in it (a receipt names its shard, and a shard's
batches keep their own sequence numbers), each control record stays one record. All of it
goes to the group's log in one append: one durable write per group per cycle, whatever the
number of shards in the group.
"""

from __future__ import annotations

import array
from collections import deque
from collections.abc import Mapping

from engine import signing
from shards.pending import PendingControl, PendingVote, PlannedRecord
from shards.records import VoteGroup
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


def plan_records(items: list[QueuedItem], states: Mapping[int, ShardState],
                 batch_seq_next: dict[int, int]) -> list[PlannedRecord]:
    """The records of one append, in arrival order (see the module's docstring).
    `batch_seq_next` (shard -> next sequence number) is advanced for every batch planned:
    a sequence number is never reused, even if the append fails."""
    plan: list[PlannedRecord] = []
    run: list[PendingVote] = []
    for item in items:
        if isinstance(item, PendingVote):
            run.append(item)
            continue
        if run:
            plan += _plan_run(run, states, batch_seq_next)
            run = []
        plan.append(PlannedRecord(item.record, [item]))
    if run:
        plan += _plan_run(run, states, batch_seq_next)
    return plan


def _plan_run(votes: list[PendingVote], states: Mapping[int, ShardState],
              batch_seq_next: dict[int, int]) -> list[PlannedRecord]:
    by_shard: dict[int, list[PendingVote]] = {}
    for vote in votes:
        by_shard.setdefault(vote.shard, []).append(vote)
    return [_plan_vote_batch(shard, shard_votes, states[shard], batch_seq_next)
            for shard, shard_votes in by_shard.items()]


def _plan_vote_batch(shard: int, votes: list[PendingVote], state: ShardState,
                     batch_seq_next: dict[int, int]) -> PlannedRecord:
    by_poll: dict[str, list[PendingVote]] = {}
    for vote in votes:
        by_poll.setdefault(vote.poll, []).append(vote)
    planned = PlannedRecord(None, [vote for group in by_poll.values() for vote in group])
    planned.shard = shard
    planned.groups = []
    planned.runs = []
    for poll, group in by_poll.items():
        options = array.array("H", [vote.option_index for vote in group]).tobytes()
        voters = array.array("I", [vote.voter_index for vote in group]).tobytes()
        definition = state.polls[poll].definition
        if definition.by_country:
            codes, countries = country_columns(group)
            planned.groups.append(VoteGroup(poll, voters, options, codes, countries))
        else:
            planned.groups.append(VoteGroup(poll, voters, options))
        planned.runs.append(signing.VoteRun(
            poll, definition.options,
            array.array("Q", [vote.voter_id for vote in group]).tobytes(), options))
    planned.batch_seq = batch_seq_next[shard]
    batch_seq_next[shard] += 1
    return planned


def country_columns(votes: list[PendingVote]) -> tuple[list[str], bytes]:
    """The votes' distinct country claims (in order of first appearance) and, per vote, its
    claim's index among them as packed uint16 (a group holds at most batch_votes_max votes,
    at most 65,536, so an index always fits)."""
    index_of: dict[str, int] = {}
    indexes = array.array("H", [index_of.setdefault(vote.country, len(index_of))
                                for vote in votes])
    return list(index_of), indexes.tobytes()
