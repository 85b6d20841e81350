"""Group commit across the shards of one worker: one cycle, one signature, parallel appends.

Why per worker and not per shard: an Ed25519 signature costs ~50 us, and with many shards
per worker each shard's own batches would be tiny, so signing per shard batch would cost
more CPU than everything else on the vote path. A cycle lingers `group_commit_ms` (unless
`batch_votes_max` votes already wait), takes the queued items of each shard that has no
append in flight, signs all their vote batches at once (receipts.sign_commit: a Merkle tree
per shard batch under one tree per cycle), then starts every shard's append concurrently
(each shard's log on its own thread, so fsyncs overlap; one Kafka transaction per shard)
and lets each shard apply and answer its own. The next cycle starts when they are all done,
or after `group_commit_wait_ms` at most, so one slow shard (a partition without a leader)
does not hold up the others; at most one append per shard is in flight, which keeps each
log in order.

A failure of one shard's append fails that shard's items only.
"""

from __future__ import annotations

import asyncio
import logging
import time

from engine import receipts
from engine.config import Config
from engine.errors import WalUnavailable
from engine.keys import KeyRing


log = logging.getLogger("votes.commit")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class GroupCommitter:
    def __init__(self, config: Config, keyring: KeyRing, hasher: receipts.VoterHasher,
                 metrics=None) -> None:
        self.config = config
        self.keyring = keyring
        self.hasher = hasher
        self.metrics = metrics
        self.owners: list = []
        self._wakeup = asyncio.Event()
        self._appending: set = set()  # owners with an append in flight
        self._append_tasks: set[asyncio.Task] = set()

    def add(self, owner) -> None:
        self.owners.append(owner)

    def notify(self) -> None:
        self._wakeup.set()

    def _queued_votes(self) -> int:
        return sum(owner.queued_votes for owner in self.owners)

    async def run(self) -> None:
        linger_s = self.config.group_commit_ms / 1000
        while True:
            await self._wakeup.wait()
            if linger_s and self._queued_votes() < self.config.batch_votes_max:
                await asyncio.sleep(linger_s)
            self._wakeup.clear()
            work = []
            for owner in self.owners:
                # One append in flight per shard keeps each log in order; a shard whose
                # append is still running is left for a later cycle, the others go on.
                if owner not in self._appending and owner.has_queued():
                    items = owner.take_items()
                    work.append((owner, items, owner.plan_records(items)))
            if work:
                started = self._start_commit(work)
                if started:
                    # Wait for this cycle's appends, so the next cycle carries what queued
                    # meanwhile (bigger batches: fewer signatures, fsyncs, transactions); but
                    # only so long, so one slow shard does not hold up the others.
                    await asyncio.wait(started, timeout=self.config.group_commit_wait_ms / 1000)

    def _sign(self, work) -> None:
        vote_batches = [(owner, planned) for owner, _, plan in work for planned in plan
                        if planned.votes is not None]
        if not vote_batches:
            return
        signed_batches = receipts.sign_commit(
            self.keyring, self.hasher, now_ms(),
            [(owner.shard, planned.batch_seq,
              [(vote.poll, vote.voter_id, vote.option) for vote in planned.votes])
             for owner, planned in vote_batches],
        )
        for (_, planned), signed in zip(vote_batches, signed_batches):
            planned.signed = signed

    def _start_commit(self, work) -> list[asyncio.Task]:
        try:
            self._sign(work)
        except Exception as exc:  # a bug: nothing was written, so nothing was counted
            log.exception("signing a commit cycle failed")
            for owner, items, _ in work:
                owner.fail_unwritten(items, WalUnavailable(f"the commit could not be signed: {exc}"))
            return []
        started = []
        for owner, items, plan in work:
            self._appending.add(owner)
            task = asyncio.create_task(self._append(owner, items, plan))
            self._append_tasks.add(task)
            task.add_done_callback(self._append_tasks.discard)
            started.append(task)
        return started

    async def _append(self, owner, items, plan) -> None:
        started = time.perf_counter()
        try:
            await owner.append_and_apply(items, plan)
        finally:
            self._appending.discard(owner)
            if self.metrics is not None:
                self.metrics.observe_commit(time.perf_counter() - started, len(items))
            if owner.has_queued():
                self._wakeup.set()
