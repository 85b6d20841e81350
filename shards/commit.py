"""Group commit across the shards of one worker: one cycle, one signature, parallel appends.

Why per worker and not per shard: an Ed25519 signature costs ~50 us, and with many shards
per worker each shard's own batches would be tiny, so signing per shard batch would cost
more CPU than everything else on the vote path. A cycle lingers `group_commit_ms` (unless
`batch_votes_max` votes already wait), takes each ready shard's queued items, signs all
their vote batches at once (receipts.sign_commit: a Merkle tree per shard batch under one
tree per cycle), then appends every shard's records concurrently (each shard's log on its
own thread, so their fsyncs overlap) and lets each shard apply and answer its own.

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
                if owner.has_queued():
                    items = owner.take_items()
                    work.append((owner, items, owner.plan_records(items)))
            if work:
                await self._commit(work)
            if any(owner.has_queued() for owner in self.owners):
                self._wakeup.set()

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

    async def _commit(self, work) -> None:
        try:
            self._sign(work)
        except Exception as exc:  # a bug: nothing was written, so nothing was counted
            log.exception("signing a commit cycle failed")
            for owner, items, _ in work:
                owner.fail_unwritten(items, WalUnavailable(f"the commit could not be signed: {exc}"))
            return
        started = time.perf_counter()
        await asyncio.gather(*(owner.append_and_apply(items, plan) for owner, items, plan in work))
        if self.metrics is not None:
            self.metrics.observe_commit(time.perf_counter() - started,
                                        sum(len(items) for _, items, _ in work))
