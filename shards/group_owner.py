"""The live owner of one fencing group: fence, recover, then group-commit votes and answer them.

A fencing group (docs/design.md "Fencing groups") is the unit of ownership, fencing and
durable writes; its shards are the units of state (shard s is in group s mod groups). The
owner holds the group's one log (`Wal`: its flock, or its Kafka transactional producer) and
every shard's `ShardState`:
- `submit_vote` checks the poll and the shard's bitmap; a repeat gets AlreadyVoted with the
  original receipt; a vote of a voter already in flight waits for that one's outcome and
  never becomes a second vote; the group's queue is bounded (Overloaded beyond it).
- Each commit cycle (shards/commit.py, one per worker) takes up to `batch_votes_max` queued
  items and cuts them into records (shards/planning.py: one vote batch of the group per run
  of votes, its vote groups naming their shards, control records in arrival order); the cycle signs all batches at once, then each group begins
  ONE append of all its records (`begin_append`) and, once the log has made them durable,
  applies them to their shards and answers. A group may have several appends in flight
  (the embedded log pipelines them); they are applied in the order they began.
- A failed append is settled by the WAL before it raises (WalUnavailable: nothing counted);
  OutcomeUnknown keeps the voter's in-flight entry until the log decides.

Until the fence is held and the log replayed to its end, every call raises NotReady.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence

from engine import signing
from engine.config import Config
from engine.errors import (
    AlreadyVoted,
    InvariantViolation,
    LogCorrupt,
    NotReady,
    OutcomeUnknown,
    Overloaded,
    PollClosed,
    PollExists,
    PollNotFound,
    PollNotOpen,
    UnknownOption,
    VotesError,
    WalUnavailable,
)
from engine.keys import KeyRing
from shards.commit import CommitMetrics, GroupCommitter
from shards.locator_runs import wait_idle
from shards.pending import (
    AppendInFlight,
    PendingControl,
    PendingVote,
    PlannedRecord,
    answer,
    check_positions,
    fail,
)
from shards.planning import BatchSequence, QueuedItem, plan_records, take_items
from shards.records import PollCreated, Record, VoteBatch, decode_record, encode_record
from shards.records import PollClosed as PollClosedRecord
from shards.recovery import apply_record, recover_group
from shards.repeat_receipts import RepeatReceipts, rebuild_signed_batch
from shards.snapshot_policy import snapshot_due
from shards.snapshots import FrozenShard, SnapshotStore, freeze_deferred
from shards.state import COUNTED, PollState, ShardState, ShardSummary
from shards.wal import Positions, Wal

log = logging.getLogger("votes.owner")

SIGNED_BATCHES_CACHED = 64
AUTO_CLOSE_CHECK_S = 0.5
# How long stopping a group waits for a snapshot being written (the S3 store closes after).
SNAPSHOT_FINISH_WAIT_S = 10.0


# What a voter's vote in flight is held by: its own future (the 201 body), or the future of
# a stalled or failed append's decision.
_VoterWaiter = asyncio.Future[bytes] | asyncio.Future[None]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class GroupOwner:
    def __init__(self, group: int, config: Config, wal: Wal,
                 snapshot_stores: Mapping[int, SnapshotStore], keyring: KeyRing,
                 hasher: signing.VoterHasher, metrics: CommitMetrics | None = None,
                 committer: GroupCommitter | None = None) -> None:
        self.group = group
        self.config = config
        self.shards = list(config.shards_of_group(group))
        if sorted(snapshot_stores) != self.shards:
            raise InvariantViolation(f"group {group} needs one snapshot store per shard "
                                     f"{self.shards}, got {sorted(snapshot_stores)}")
        self.wal = wal
        self.snapshot_stores = dict(snapshot_stores)
        self.keyring = keyring
        self.hasher = hasher
        self.metrics = metrics
        self.committer = committer
        self.states: dict[int, ShardState] = {}
        self.ready = False
        self.failure: str | None = None
        self._queue: deque[QueuedItem] = deque()
        self._queued_votes = 0
        self._inflight: dict[tuple[str, int], _VoterWaiter] = {}
        self._closing: set[str] = set()
        self._stalled = False
        self._appends: deque[AppendInFlight] = deque()
        self._wal_offset_next = 0
        self._batch_sequence = BatchSequence()
        self._signed_batches: OrderedDict[int, signing.SignedBatch] = OrderedDict()
        self._repeat_receipts = RepeatReceipts()
        self._snapshot_tasks: dict[int, asyncio.Task[None]] = {}
        self._snapshot_votes_applied: dict[int, int] = {}
        self._snapshot_time_s: dict[int, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # asyncio.get_running_loop() costs a getpid() system call each time (its fork check):
        # on the vote path that was a tenth of the event loop's time, so the loop is kept.
        self._loop: asyncio.AbstractEventLoop | None = None

    # Start-up: fence, recover, replay ------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self.wal.acquire()
            self.states = await self._recover()
        except VotesError as exc:
            self.failure = f"group {self.group}: {exc}"
            log.error("group %d cannot start: %s", self.group, exc)
            raise
        except Exception as exc:
            # A defect, not an expected failure: keep the traceback, and still say on /readyz
            # why the group is not serving instead of leaving it silently not ready.
            self.failure = f"group {self.group}: unexpected {type(exc).__name__}: {exc}"
            log.exception("group %d cannot start", self.group)
            raise
        started_s = time.monotonic()
        # Every shard that applied a batch of the group knows its sequence number.
        self._batch_sequence = BatchSequence(max(
            (state.batch_seq_next for state in self.states.values()), default=0))
        for shard, state in self.states.items():
            self._snapshot_votes_applied[shard] = state.votes_applied
            self._snapshot_time_s[shard] = started_s
        if self.committer is None:  # a lone owner (tests, tools) commits for itself
            self.committer = GroupCommitter(self.config, self.keyring, self.hasher, self.metrics)
            self._tasks.append(asyncio.create_task(self.committer.run(), name=f"commit-g{self.group}"))
        self.committer.add(self)
        self._tasks.append(asyncio.create_task(self._auto_close_loop(), name=f"close-g{self.group}"))
        self.ready = True

    async def _recover(self) -> dict[int, ShardState]:
        states, self._wal_offset_next = await recover_group(
            self.group, self.config, self.wal, self.snapshot_stores)
        return states

    def _apply_record(self, states: Mapping[int, ShardState], offset: int, next_offset: int,
                      record: Record) -> list[bytearray | None]:
        return apply_record(states, self.group, offset, next_offset, record)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.ready = False
        await self.wal.close()
        writing = [task for task in self._snapshot_tasks.values() if not task.done()]
        if writing:
            # Let snapshots being written finish before their stores close (bounded: if one
            # does not, its manifest is not replaced and the previous snapshot stays in use).
            await asyncio.wait(writing, timeout=SNAPSHOT_FINISH_WAIT_S)
        # Run writes and merges end before another owner may attach the same runs (bounded).
        await wait_idle([poll.locator for state in self.states.values()
                         for poll in state.polls.values()], SNAPSHOT_FINISH_WAIT_S)
        # An S3 store holds a client session; a group handed over must not leak it.
        for store in self.snapshot_stores.values():
            await store.close()

    def _ready_state(self, shard: int) -> ShardState:
        if not self.ready:
            raise NotReady(self.failure or f"group {self.group} is fencing or catching up")
        return self.states[shard]

    def _any_ready_state(self) -> ShardState:
        """A shard of the group as polls see it: control records hold for every shard."""
        return self._ready_state(self.shards[0])

    def _started_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise InvariantViolation(f"group {self.group} has no event loop before start()")
        return self._loop

    def _started_committer(self) -> GroupCommitter:
        if self.committer is None:
            raise InvariantViolation(f"group {self.group} has no committer before start()")
        return self.committer

    # The vote path ---------------------------------------------------------------------------

    async def submit_vote(self, poll_id: str, voter_id: int, option: str, country: str = "") -> bytes:
        """The vote's 201 body once its record is durable; raises the VotesError to answer."""
        shards_total = self.config.shards
        shard = voter_id % shards_total
        state = self._ready_state(shard)
        poll = state.polls.get(poll_id)
        if poll is None:
            raise PollNotFound("no poll with this id")
        option_index = poll.option_index.get(option)
        if option_index is None:
            raise UnknownOption("the poll has no such option")
        self._check_open(poll)
        voter_index = voter_id // shards_total
        key = (poll_id, voter_id)
        while (earlier := self._inflight.get(key)) is not None:
            await self._outcome_of_earlier(earlier)
        if voter_index in poll.voters:
            raise AlreadyVoted("this voter's vote is already in the log",
                               receipt=await self._receipt_for(state, poll, voter_index))
        if self._stalled:
            raise WalUnavailable(f"group {self.group}'s log has not answered its last append")
        if self._queued_votes >= self.config.group_queue_votes_max:
            raise Overloaded(f"group {self.group} has {self._queued_votes} votes waiting")
        future: asyncio.Future[bytes] = self._started_loop().create_future()
        self._inflight[key] = future
        self._queue.append(PendingVote(poll_id, voter_id, shard, voter_index, option,
                                       option_index, future, country))
        self._queued_votes += 1
        self._started_committer().notify()
        # No per-vote timer: the commit resolves every future, and an append that outlives
        # append_timeout_s is answered outcome-unknown there (see _append_timed_out).
        try:
            return await future
        except AlreadyVoted as exc:
            raise AlreadyVoted(exc.detail, receipt=await self._receipt_for(state, poll, voter_index))

    def _check_open(self, poll: PollState) -> None:
        definition = poll.definition
        if poll.closed or definition.poll in self._closing:
            raise PollClosed("the poll is closed")
        if definition.closes_at_ms is None and definition.opens_at_ms is None:
            return  # no schedule: the clock is not read on the vote path
        current_ms = now_ms()
        if definition.closes_at_ms is not None and current_ms >= definition.closes_at_ms:
            raise PollClosed("the poll is closed")
        if definition.opens_at_ms is not None and current_ms < definition.opens_at_ms:
            raise PollNotOpen("the poll opens later")

    async def _outcome_of_earlier(self, earlier: _VoterWaiter) -> None:
        """Wait for the same voter's vote in flight; raise what its outcome means for this one."""
        try:
            await asyncio.wait_for(asyncio.shield(earlier), self.config.append_timeout_s)
        except TimeoutError:
            raise OutcomeUnknown("an earlier vote of this voter is still undecided")
        except (AlreadyVoted, PollClosed):
            return  # fall through to the bitmap check, which decides
        except VotesError as exc:
            raise type(exc)(exc.detail)

    async def _receipt_for(self, state: ShardState, poll: PollState,
                           voter_index: int) -> signing.ReceiptDocument | None:
        poll_id, voter_id = poll.definition.poll, state.voter_id(voter_index)
        cached = self._repeat_receipts.get(poll_id, voter_id)
        if cached is not None:
            return cached
        offset = state.record_of_voter(poll, voter_index)  # LogCorrupt if its runs are damaged
        if offset is None:
            log.error("shard %d: voter index %d of %s has no locator entry; 409 without "
                      "its receipt", state.shard, voter_index, poll_id)
            return None
        signed = self._signed_batches.get(offset)
        if signed is None:
            batch = decode_record(await self.wal.read_at(offset))
            if not isinstance(batch, VoteBatch) or batch.group != self.group:
                raise VotesError(f"record at offset {offset} is not a vote batch of group {self.group}")
            signed = rebuild_signed_batch(self.hasher, state, batch)
        index = signed.index_of(state.shard, poll_id, self.hasher(poll_id, voter_id))
        if index is None:
            return None
        receipt = signing.receipt_document(signed.receipt(index, offset))
        self._repeat_receipts.put(poll_id, voter_id, receipt)
        return receipt

    # Control records: polls created and closed, one record for the whole group --------------

    async def create_poll(self, record: PollCreated) -> bool:
        """Append the poll's creation to this group's log; False if it already exists alike."""
        state = self._any_ready_state()
        existing = state.polls.get(record.poll)
        if existing is not None:
            if _same_definition(existing.definition, record):
                return False
            raise PollExists("a poll with this id exists with another definition")
        if len(state.polls) >= self.config.polls_max:
            raise Overloaded(f"group {self.group} already holds {len(state.polls)} polls")
        await self._submit_control(record)
        return True

    async def close_poll(self, poll_id: str) -> None:
        poll = self._any_ready_state().polls.get(poll_id)
        if poll is None:
            raise PollNotFound("no poll with this id")
        if poll.closed:
            return
        self._closing.add(poll_id)
        try:
            await self._submit_control(PollClosedRecord(poll=poll_id, closed_ms=now_ms()))
        finally:
            self._closing.discard(poll_id)

    def knows_poll(self, poll_id: str) -> bool:
        return bool(self.states) and poll_id in self.states[self.shards[0]].polls

    async def _submit_control(self, record: Record) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(PendingControl(record, future))
        self._started_committer().notify()
        try:
            await asyncio.wait_for(asyncio.shield(future), self.config.append_timeout_s)
        except TimeoutError:
            raise OutcomeUnknown("the log did not confirm the record in time")

    async def _auto_close_loop(self) -> None:
        while True:
            await asyncio.sleep(AUTO_CLOSE_CHECK_S)
            current_ms = now_ms()
            for poll_id, poll in list(self.states[self.shards[0]].polls.items()):
                closes_at_ms = poll.definition.closes_at_ms
                if closes_at_ms is not None and current_ms >= closes_at_ms and not poll.closed \
                        and poll_id not in self._closing:
                    try:
                        await self.close_poll(poll_id)
                    except VotesError as exc:
                        log.warning("auto-close of %s on group %d failed: %s", poll_id, self.group, exc)

    # Group commit (cycles are driven by the worker's GroupCommitter) -------------------------

    @property
    def queued_votes(self) -> int:
        return self._queued_votes

    def has_queued(self) -> bool:
        return bool(self._queue)

    def take_items(self) -> list[QueuedItem]:
        """Up to batch_votes_max queued votes, with control records in arrival order."""
        items, votes = take_items(self._queue, self.config.batch_votes_max)
        self._queued_votes -= votes
        return items

    def plan_records(self, items: list[QueuedItem]) -> list[PlannedRecord]:
        """The records of one append (shards/planning.py); the committer signs every vote
        batch of the cycle at once before the append begins."""
        return plan_records(items, self.group, self.states, self._batch_sequence)

    @property
    def appends_in_flight(self) -> int:
        return len(self._appends)

    @property
    def wal_offset_next(self) -> int:
        """The log offset just after the last record applied (0 before recovery)."""
        return self._wal_offset_next

    @property
    def appends_in_flight_max(self) -> int:
        return self.wal.appends_in_flight_max

    def has_votes_in_flight(self) -> bool:
        """Whether a vote taken here still waits for its answer (or its log's decision)."""
        return bool(self._inflight)

    def begin_append(self, items: list[QueuedItem],
                     plan: list[PlannedRecord]) -> asyncio.Future[None]:
        """Start making the planned records durable in ONE append; never raises. When the log
        answers, the records are applied and their items answered, appends in the order they
        began.

        Returns a future that ends when this append is settled, or when it was answered
        outcome-unknown after append_timeout_s (its voters then stay held, and the group
        takes no new votes, until the log answers it)."""
        loop = self._started_loop()
        records = [planned.finished_record() for planned in plan]
        append = asyncio.ensure_future(self.wal.append([encode_record(record) for record in records]))
        entry = AppendInFlight(items, plan, records, append, loop.create_future())
        entry.timer = loop.call_later(self.config.append_timeout_s, self._append_timed_out, entry)
        self._appends.append(entry)
        append.add_done_callback(self._append_done)
        return entry.ended

    def _append_done(self, _: asyncio.Future[Positions]) -> None:
        # Settle from the oldest append on, so records apply in log order whatever order the
        # callbacks run in; an append that ended behind an unanswered one waits for it.
        appends = self._appends
        while appends and appends[0].append.done():
            entry = appends.popleft()
            if entry.timer is not None:  # set as the append began
                entry.timer.cancel()
            if entry.decision is not None:
                self._decided(entry, entry.decision)
            else:
                self._settle(entry.append, entry.items, entry.plan, entry.records)
            if not entry.ended.done():
                entry.ended.set_result(None)
            if self.committer is not None:
                self.committer.append_ended(self, entry.started_s, len(entry.items))

    def _stop_serving(self, reason: str) -> None:
        self.ready = False
        self.failure = f"group {self.group}: {reason}"

    def _settle(self, append: asyncio.Future[Positions], items: Sequence[QueuedItem],
                plan: list[PlannedRecord], records: list[Record]) -> None:
        try:
            positions = append.result()
        except VotesError as exc:
            if isinstance(exc, NotReady):  # the log fenced this owner out: stop serving
                self._stop_serving(str(exc))
                if self.metrics is not None:
                    self.metrics.fencing_lost(self.group)
            elif self.metrics is not None and isinstance(exc, (WalUnavailable, OutcomeUnknown)):
                self.metrics.wal_append_error("wal-unavailable" if isinstance(exc, WalUnavailable)
                                              else "outcome-unknown")
            self._fail_items(items, exc)
            return
        except Exception as exc:  # a bug or an unexpected client error: outcome unknown
            log.error("append on group %d failed unexpectedly: %r", self.group, exc)
            self._fail_items(items, OutcomeUnknown(f"append failed unexpectedly: {exc}"))
            return
        try:
            check_positions(positions, len(records), self._wal_offset_next)
        except InvariantViolation as exc:
            # The log broke its contract: the records may be in it, so their voters stay
            # held (outcome unknown) and the group stops serving until it is recovered.
            log.error("group %d stops: %s", self.group, exc)
            self._stop_serving(str(exc))
            self._fail_items(items, OutcomeUnknown(f"the log broke its contract: {exc}"))
            return
        states = self.states
        for planned, record, (offset, next_offset) in zip(plan, records, positions, strict=True):
            outcomes = self._apply_record(states, offset, next_offset, record)
            if planned.signed is None:
                answer(planned.items[0].future)
                continue
            self._remember_signed(offset, planned.signed)
            self._answer_votes(record, planned.items, planned.signed, outcomes, offset)
        if positions:
            self._wal_offset_next = positions[-1][1]
        self._maybe_snapshot(vote_group.shard for record in records if isinstance(record, VoteBatch)
                             for vote_group in record.groups)

    def _append_timed_out(self, entry: AppendInFlight) -> None:
        if entry.append.done():
            return
        log.warning("group %d: append unanswered after %.1f s; holding its voters",
                    self.group, self.config.append_timeout_s)
        if self.metrics is not None:
            self.metrics.wal_append_error("outcome-unknown")
        self._stalled = True
        for item in entry.items:
            answer(item.future, exception=OutcomeUnknown("the log did not confirm in time; "
                                                          "this counts at most once"))
        # The held voters stay in _inflight until the append ends: a repeat of a held voter
        # waits there and then meets the bitmap, which by then says what the log decided.
        entry.decision = asyncio.get_running_loop().create_future()
        for item in entry.items:
            if isinstance(item, PendingVote):
                self._inflight[(item.poll, item.voter_id)] = entry.decision
        entry.ended.set_result(None)

    def _decided(self, entry: AppendInFlight, decision: asyncio.Future[None]) -> None:
        """A stalled append ended: apply what the log decided (its waiters were answered
        already, so _answer leaves them alone) and let its voters go."""
        self._settle(entry.append, entry.items, entry.plan, entry.records)
        for item in entry.items:
            if isinstance(item, PendingVote) and self._inflight.get(
                    (item.poll, item.voter_id)) is decision:
                del self._inflight[(item.poll, item.voter_id)]
        decision.set_result(None)
        if not any(other.decision is not None for other in self._appends):
            self._stalled = False
        log.warning("group %d: the stalled append ended; group resumes", self.group)

    def _answer_votes(self, record: Record, votes: list[PendingVote],
                      signed: signing.SignedBatch, outcomes: list[bytearray | None],
                      offset: int) -> None:
        if not isinstance(record, VoteBatch):
            raise InvariantViolation(f"the signed record at offset {offset} is no vote batch")
        bodies = signed.receipt_bodies(offset)  # every 201 body in one compiled pass
        inflight = self._inflight
        leaf = 0
        for group, flags in zip(record.groups, outcomes, strict=True):
            group_size = len(group.voters) // 4
            for position in range(group_size):
                vote = votes[leaf]
                inflight.pop((vote.poll, vote.voter_id), None)
                if flags is None:
                    answer(vote.future, exception=PollClosed("the poll closed before this vote"))
                elif flags[position] == COUNTED:
                    answer(vote.future, bodies[leaf])
                else:
                    answer(vote.future, exception=AlreadyVoted("this voter's vote is already in the log"))
                leaf += 1

    def fail_unwritten(self, items: Sequence[QueuedItem], exc: VotesError) -> None:
        self._fail_items(items, exc)

    def _fail_items(self, items: Sequence[QueuedItem], exc: VotesError) -> None:
        keep_inflight = isinstance(exc, OutcomeUnknown)
        for item in items:
            if isinstance(item, PendingVote) and not keep_inflight:
                self._inflight.pop((item.poll, item.voter_id), None)
            answer(item.future, exception=type(exc)(exc.detail))
        if keep_inflight:
            # The log decides on its next successful read: until the group is recovered
            # (restart or handover), these voters stay held and answer outcome-unknown.
            held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fail(held, OutcomeUnknown("an earlier vote of this voter is undecided"))
            for item in items:
                if isinstance(item, PendingVote):
                    self._inflight[(item.poll, item.voter_id)] = held

    def _remember_signed(self, offset: int, signed: signing.SignedBatch) -> None:
        """Keep recent batches' trees by record offset: repeats come soon after the vote."""
        self._signed_batches[offset] = signed
        while len(self._signed_batches) > SIGNED_BATCHES_CACHED:
            self._signed_batches.popitem(last=False)

    # Snapshots, per shard ---------------------------------------------------------------------

    def _maybe_snapshot(self, shards: Iterable[int]) -> None:
        elapsed_s = time.monotonic()
        for shard in set(shards):
            task = self._snapshot_tasks.get(shard)
            if task is not None and not task.done():
                continue
            if snapshot_due(self.config, self._snapshot_votes_applied[shard],
                            self.states[shard].votes_applied,
                            elapsed_s - self._snapshot_time_s[shard]):
                self.snapshot_now(shard)

    def snapshot_now(self, shard: int) -> asyncio.Task[None]:
        """Freeze the shard now (a batch boundary: no record is half applied) and write it off
        the loop. It covers the group's log up to what the group applied."""
        state = self.states[shard]
        state.advance_to(self._wal_offset_next)
        frozen = freeze_deferred(state)  # with the locator run writes it waits for
        self._snapshot_votes_applied[shard] = state.votes_applied
        self._snapshot_time_s[shard] = time.monotonic()
        # One write per shard at a time: `votes snapshot now` may ask while one is running,
        # and two writers of one manifest could each prune the other's object.
        earlier = self._snapshot_tasks.get(shard)
        task = asyncio.get_running_loop().create_task(
            self._write_snapshot(shard, frozen, state.wal_offset_next, earlier))
        self._snapshot_tasks[shard] = task
        return task

    def snapshot_all(self) -> list[asyncio.Task[None]]:
        return [self.snapshot_now(shard) for shard in self.shards]

    async def _write_snapshot(self, shard: int, frozen: FrozenShard, wal_offset_next: int,
                              earlier: asyncio.Task[None] | None = None) -> None:
        if earlier is not None:
            await asyncio.wait([earlier])  # its outcome is its own: it logged a failure
        try:
            # Encoded off the loop; OSError if a run write it relies on failed: not published.
            await frozen.save_to(self.snapshot_stores[shard], wal_offset_next)
        except (OSError, LogCorrupt) as exc:  # LogCorrupt: a damaged run file it would carry
            log.warning("snapshot of shard %d failed: %s (the previous one stays in use)", shard, exc)
            if self.metrics is not None:
                self.metrics.snapshot_failed(shard)
            return
        if self.metrics is not None:
            self.metrics.snapshot_written(shard, time.time())

    # Results ----------------------------------------------------------------------------------

    def poll_summaries(self, poll_id: str) -> list[ShardSummary]:
        """Per shard of the group its ShardSummary of the poll; [] for an unknown poll."""
        return [poll.summary(shard) for shard in self.shards
                if (poll := self._ready_state(shard).polls.get(poll_id)) is not None]


def _same_definition(left: PollCreated, right: PollCreated) -> bool:
    return (left.options, left.opens_at_ms, left.closes_at_ms, left.embargo, left.breakdown) == (
        right.options, right.opens_at_ms, right.closes_at_ms, right.embargo, right.breakdown)
