"""Group commit across the fencing groups of one worker: one cycle, one signature, one
append per group, pipelined.

Why per worker and not per shard: an Ed25519 signature costs ~50 us, and with many shards
per worker each shard's own batches would be tiny, so signing per shard batch would cost
more CPU than everything else on the vote path. A cycle starts when votes wait, but at most
every `group_commit_ms` (sooner if `batch_votes_max` votes wait), takes the queued items of
each group that may start another append, signs all their vote batches at once
(signing.sign_commit: a Merkle tree per group batch under one tree per cycle), then begins
every group's ONE append (its batch, holding all its shards' votes, and control records); each group applies
and answers its own when its log answers, in the order its appends began. So a cycle costs
one signature, and one batch and one durable write per owned group, whatever the number
of shards.

How many appends a group may have begun and not seen end is its log's
`appends_in_flight_max`, and at most COMMIT_CYCLES_IN_FLIGHT_MAX cycles are in flight. The
embedded log pipelines (shards/log_writer.py): while one cycle's round fsyncs, the next
cycle is signed and queued behind it, so the event loop does not idle waiting for the disk.
A Kafka group has one transaction at a time: there the cycle waits for its appends, but at
most `group_commit_wait_ms`, so batches stay large while one slow group (a partition without
a leader) does not hold up the others.

A failure of one group's append fails that group's items only. More than
COMMIT_CYCLES_IN_FLIGHT_MAX cycles in flight is an InvariantViolation (checked on every
cycle, in production too). Groups are added and removed through `add` / `remove`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from engine import signing
from engine.config import Config
from engine.errors import InvariantViolation, WalUnavailable
from engine.keys import KeyRing

log = logging.getLogger("votes.commit")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# Commit cycles begun and not yet ended (every append settled, or answered outcome-unknown).
COMMIT_CYCLES_IN_FLIGHT_MAX = 2


class CommitMetrics(Protocol):
    """What the committer and the group owners report (engine/metrics.py `Buffered`)."""

    def observe_commit(self, seconds: float, items: int) -> None: ...

    def wal_append_error(self, kind: str) -> None: ...

    def fencing_lost(self, group: int) -> None: ...

    def snapshot_written(self, shard: int, unix_time_s: float) -> None: ...

    def snapshot_failed(self, shard: int) -> None: ...

    def wal_pending_votes(self, group: int, votes: int) -> None: ...


class CommitGroup(Protocol):
    """What the committer needs of a group's owner (shards/group_owner.py `GroupOwner`)."""

    group: int

    @property
    def queued_votes(self) -> int: ...

    @property
    def appends_in_flight(self) -> int: ...

    @property
    def appends_in_flight_max(self) -> int: ...

    def has_queued(self) -> bool: ...

    def take_items(self) -> list[Any]: ...

    def plan_records(self, items: list[Any]) -> list[Any]: ...

    def begin_append(self, items: list[Any], plan: list[Any]) -> asyncio.Future[None]: ...

    def fail_unwritten(self, items: list[Any], exc: WalUnavailable) -> None: ...


class _Cycle:
    __slots__ = ("committer", "appends_left")

    def __init__(self, committer: GroupCommitter, appends: int) -> None:
        self.committer = committer
        self.appends_left = appends

    def one_ended(self, _: asyncio.Future[None]) -> None:
        self.appends_left -= 1
        if self.appends_left == 0:
            self.committer._cycle_ended()


class GroupCommitter:
    def __init__(self, config: Config, keyring: KeyRing, hasher: signing.VoterHasher,
                 metrics: CommitMetrics | None = None) -> None:
        self.config = config
        self.keyring = keyring
        self.hasher = hasher
        self.metrics = metrics
        self._owners: list[CommitGroup] = []
        self._wakeup = asyncio.Event()
        self._cycles_in_flight = 0

    def add(self, owner: CommitGroup) -> None:
        self._owners.append(owner)

    def remove(self, owner: CommitGroup) -> None:
        """Stop committing for `owner` (its group moved away); a no-op if it was not added."""
        if owner in self._owners:
            self._owners.remove(owner)

    @property
    def cycles_in_flight(self) -> int:
        return self._cycles_in_flight

    def notify(self) -> None:
        self._wakeup.set()

    def _queued_votes(self) -> int:
        return sum(owner.queued_votes for owner in self._owners)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval_s = self.config.group_commit_ms / 1000
        cycle_started_s = float("-inf")
        while True:
            await self._wakeup.wait()
            if self._cycles_in_flight >= COMMIT_CYCLES_IN_FLIGHT_MAX:
                # One cycle at the disk and one queued behind it: a third would only join
                # the second's round, so let its votes join the next cycle instead (bigger
                # batches, less work per vote). A cycle ending sets the wakeup again.
                self._wakeup.clear()
                continue
            # Cycles start at most every group_commit_ms (unless batch_votes_max votes wait):
            # a vote after a quiet spell goes at once, and under load each cycle carries
            # what came in since the last one began.
            wait_s = cycle_started_s + interval_s - loop.time()
            if wait_s > 0 and self._queued_votes() < self.config.batch_votes_max:
                await asyncio.sleep(wait_s)
            self._wakeup.clear()
            cycle_started_s = loop.time()
            work = []
            for owner in self._owners:
                # A group at its log's limit of appends in flight is left for a later cycle
                # (append_ended wakes the committer); the others go on.
                if owner.has_queued() and owner.appends_in_flight < owner.appends_in_flight_max:
                    items = owner.take_items()
                    work.append((owner, items, owner.plan_records(items)))
            if self.metrics is not None:  # what this cycle left behind: the groups' backlog
                for owner in self._owners:
                    self.metrics.wal_pending_votes(owner.group, owner.queued_votes)
            if work:
                waits = self._start_commit(work)
                if waits:
                    # Logs with one append at a time: wait for this cycle's, so the next
                    # cycle carries what queued meanwhile (fewer signatures and
                    # transactions); but only so long, so one slow group does not hold up
                    # the others.
                    await asyncio.wait(waits, timeout=self.config.group_commit_wait_ms / 1000)

    def _sign(self, work: Sequence[tuple[CommitGroup, list[Any], list[Any]]]) -> None:
        vote_batches = [(owner, planned) for owner, _, plan in work for planned in plan
                        if planned.votes is not None]
        if not vote_batches:
            return
        signed_batches = signing.sign_commit(
            self.keyring, self.hasher, now_ms(),
            [(planned.group, planned.batch_seq, planned.runs) for _, planned in vote_batches],
        )
        for (_, planned), signed in zip(vote_batches, signed_batches, strict=True):
            planned.signed = signed

    def _start_commit(self, work: Sequence[tuple[CommitGroup, list[Any], list[Any]]],
                      ) -> list[asyncio.Future[None]]:
        """Sign the cycle and begin its appends; the futures of those to wait for."""
        if self._cycles_in_flight >= COMMIT_CYCLES_IN_FLIGHT_MAX:
            raise InvariantViolation(f"a commit cycle would start with {self._cycles_in_flight} "
                                     f"in flight (at most {COMMIT_CYCLES_IN_FLIGHT_MAX})")
        try:
            self._sign(work)
        except Exception as exc:  # a bug: nothing was written, so nothing was counted
            log.exception("signing a commit cycle failed")
            for owner, items, _ in work:
                owner.fail_unwritten(items, WalUnavailable(f"the commit could not be signed: {exc}"))
            return []
        waits: list[asyncio.Future[None]] = []
        cycle = _Cycle(self, len(work))
        self._cycles_in_flight += 1
        for owner, items, plan in work:
            ended = owner.begin_append(items, plan)
            ended.add_done_callback(cycle.one_ended)
            if owner.appends_in_flight_max == 1:
                waits.append(ended)
        return waits

    def _cycle_ended(self) -> None:
        if self._cycles_in_flight <= 0:
            raise InvariantViolation("a commit cycle ended that had not begun")
        self._cycles_in_flight -= 1
        if any(owner.has_queued() for owner in self._owners):
            self._wakeup.set()

    def append_ended(self, owner: CommitGroup, started_s: float, items: int) -> None:
        """Called by a group's owner when an append it began is settled."""
        if self.metrics is not None:
            self.metrics.observe_commit(time.perf_counter() - started_s, items)
        if owner.has_queued():
            self._wakeup.set()
