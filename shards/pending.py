"""What a group owner holds between a vote's arrival and its answer, and the checks on it.

- `PendingVote` / `PendingControl`: an item queued at the owner with the future its caller
  awaits; `PlannedRecord`: one record of a commit cycle (a control record, or a vote batch
  to be signed); `AppendInFlight`: an append begun and not yet settled.
- `answer` / `fail`: resolve a waiter at most once (a stalled append's voters were answered
  outcome-unknown already).
- `check_positions`: the log's answer to an append must hold one (offset, next offset) per
  record, each offset at or after the end of what the group has applied and each record
  after the one before (docs/design.md "Invariants"). A log that breaks this would leave
  votes unanswered or apply records out of order, so it is an InvariantViolation, checked
  in production too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from engine import signing
from engine.errors import InvariantViolation
from shards.records import Record, VoteBatch, VoteGroup


def check_positions(positions: Sequence[tuple[int, int]], records: int,
                    wal_offset_next: int) -> None:
    """Raise InvariantViolation unless `positions` is one growing (offset, next offset) per
    record, starting at or after `wal_offset_next` (the end of what the group applied)."""
    if len(positions) != records:
        raise InvariantViolation(f"the log gave {len(positions)} positions for {records} records")
    floor = wal_offset_next
    for offset, next_offset in positions:
        if offset < floor or next_offset <= offset:
            raise InvariantViolation(
                f"the log gave record offsets {offset}..{next_offset}, not after {floor}")
        floor = next_offset


class PendingVote:
    __slots__ = ("poll", "voter_id", "shard", "voter_index", "option", "option_index", "future",
                 "country")

    def __init__(self, poll: str, voter_id: int, shard: int, voter_index: int, option: str,
                 option_index: int, future: asyncio.Future[bytes], country: str = "") -> None:
        self.poll = poll
        self.voter_id = voter_id
        self.shard = shard
        self.voter_index = voter_index
        self.option = option
        self.option_index = option_index
        self.future = future
        self.country = country  # the token's claim; recorded only for a country breakdown


class PlannedRecord:
    """One record of a commit cycle: a control record, or a vote batch to be signed."""

    __slots__ = ("record", "items", "group", "groups", "runs", "batch_seq", "signed")

    def __init__(self, record: Record | None, items: list[Any]) -> None:
        self.record = record
        self.items = items
        self.group = -1  # a vote batch's fencing group
        self.groups: list[VoteGroup] | None = None
        self.runs: list[signing.VoteRun] | None = None  # the groups as signing takes them
        self.batch_seq = 0
        self.signed: signing.SignedBatch | None = None

    @property
    def votes(self) -> list[PendingVote] | None:
        return self.items if self.record is None else None

    def finished_record(self) -> Record:
        if self.record is not None:
            return self.record
        signed, groups = self.signed, self.groups
        if signed is None or groups is None:
            raise InvariantViolation("a vote batch was appended before the cycle signed it")
        return VoteBatch(group=self.group, batch_seq=self.batch_seq, time_ms=signed.time_ms,
                         groups=groups, batch_position=signed.batch_position,
                         batch_nodes=signed.batch_nodes, signature=signed.signature,
                         key_id=signed.key_id)


class AppendInFlight:
    """One append begun and not yet settled (GroupOwner.begin_append)."""

    __slots__ = ("items", "plan", "records", "append", "ended", "timer", "decision", "started_s")

    def __init__(self, items: list[Any], plan: list[PlannedRecord], records: list[Record],
                 append: asyncio.Future[Any], ended: asyncio.Future[None]) -> None:
        self.items = items
        self.plan = plan
        self.records = records
        self.append = append
        self.ended = ended
        self.timer: asyncio.TimerHandle | None = None
        # Set when the append outlived append_timeout_s: its voters are held until it ends.
        self.decision: asyncio.Future[None] | None = None
        self.started_s = time.perf_counter()


class PendingControl:
    __slots__ = ("record", "future")

    def __init__(self, record: Record, future: asyncio.Future[Any]) -> None:
        self.record = record
        self.future = future


def answer(future: asyncio.Future[Any], result: object = None,
           exception: BaseException | None = None) -> None:
    """Resolve a waiter unless it was already answered (outcome-unknown after a stall)."""
    if future.done():
        return
    if exception is not None:
        fail(future, exception)
    else:
        future.set_result(result)


def fail(future: asyncio.Future[Any], exception: BaseException) -> None:
    """Set the exception and mark it retrieved at once: an answer nobody waits for any more
    (the handler timed out) must not log a warning, and a waiter still gets it raised. (Not
    a done-callback per future: that was one more loop callback per vote.)"""
    future.set_exception(exception)
    future.exception()
