"""Proves that a fencing group's durable state (records -> the group's real segment log -> one
ShardState per shard of the group, per-shard snapshots, recovery) always equals a simple model,
for every shard of a group of several: per poll a set of voters, the tallies and a closed
flag, built only from records the log reported durable. Hypothesis interleaves poll creation,
vote batches (repeat voters, duplicates inside a batch, a ghost poll that never exists, option
indexes past the options), closes, close-then-vote in one write, snapshots, damaged snapshots,
restarts with and without a power cut, crashes that tear a write, moves of the group to a
new owner that waits on the fence while the old one holds it, and replays of an overlap.
Vote batches are the group's (one per write, as the owner writes one per commit cycle) and
hold votes of either shard of the group or of both; poll records hold for both. After every step
each shard's bitmaps, tallies, closed flags, vote totals, receipt locators and log offsets
match the model.

Every recovery is the real one: a `GroupOwner` on the embedded log (EmbeddedWal over
SegmentLog) starts on the data dir: it takes the group's fence, loads each shard's newest
valid snapshot, cuts a torn tail and replays the group's log once after the oldest of them. Records are appended through that owner's
WAL (the log writer thread: write, fsync, answer), and the model takes a record only once the
append answered, so durable means fsynced: the data dir is on the power-loss filesystem
(tests/support/powerloss), and a power cut drops whatever was not fsynced. A crash writes a
multi-record write straight to the last segment (or a new one), never fsynced, and cuts the
power, tearing that write: frames that reached the disk whole survive, and recovery must keep
them (their writer never got an answer: outcome unknown, counted at most once); a torn frame
must never count.

Then, with a real GroupOwner on asyncio and uvloop: concurrent repeats of one voter resolve to
one vote and every repeat gets that vote's receipt, also after a restart; a vote submitted
after a close was queued in the same commit window is refused and not counted, while one
queued before the close counts.

Failures reproduce with the seed printed in the session header (`--hypothesis-seed=N`) or
the blob hypothesis prints.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import uvloop
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine import signing
from engine.config import Config
from engine.errors import AlreadyVoted, PollClosed
from engine.keys import KeyRing, ensure_keys, load_keys
from shards.group_owner import GroupOwner
from shards.recovery import apply_record
from shards.records import PollClosed as PollClosedRecord
from shards.records import (
    PollCreated,
    Record,
    VoteBatch,
    decode_record,
    encode_record,
    frame_record,
)
from shards.segment_log import SegmentLog, segment_name
from shards.snapshots import DirectorySnapshotStore
from shards.state import COUNTED, ShardState
from shards.wal import EmbeddedWal
from tests.support.powerloss import PowerLossFilesystem, mounted
from tests.support.records import group_batch, poll_created, vote_batch

SHARD = 1
SHARDS_TOTAL = 4
GROUPS = 2
GROUP = SHARD % GROUPS
GROUP_SHARDS = list(range(GROUP, SHARDS_TOTAL, GROUPS))  # [1, 3]: several shards per group
# Small segments, so the machine crosses segment boundaries every few records.
SEGMENT_BYTES_MAX = 1024
SNAPSHOTS_KEPT = 2
POLLS = ["song", "quiz", "dance"]
GHOST_POLL = "ghost"  # never created: its votes must never count
# The machine's data dirs live on one power-loss filesystem per module (mounting one per
# example would cost more than the example); it is set by the fixture below.
DISK: PowerLossFilesystem | None = None
MACHINE_KEYS: KeyRing | None = None


@pytest.fixture(scope="module", autouse=True)
def power_loss_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PowerLossFilesystem]:
    global DISK, MACHINE_KEYS
    keys_dir = tmp_path_factory.mktemp("shard-machine-keys")
    ensure_keys(keys_dir)
    MACHINE_KEYS = load_keys(keys_dir)
    with mounted(tmp_path_factory.mktemp("shard-machine-disk")) as disk:
        DISK = disk
        try:
            yield disk
        finally:
            DISK = None


def numbered_poll(poll: str, option_count: int) -> PollCreated:
    """A poll with options option-0..option-<option_count - 1>."""
    return poll_created(poll, [f"option-{i}" for i in range(option_count)])


class ModelPoll:
    def __init__(self, option_count: int) -> None:
        self.option_count = option_count
        self.voters: dict[int, int] = {}  # voter index -> batch_seq of the counted vote
        self.tallies = [0] * option_count
        self.closed = False


class Model:
    """What the shard must hold: the effect of every record the log kept, in log order."""

    def __init__(self) -> None:
        self.polls: dict[str, ModelPoll] = {}
        self.batch_seqs: set[int] = set()

    def apply(self, offset: int, record: Record) -> list[list[bool] | None]:
        """Apply one record (a vote batch: the vote groups of this model's shard, as the
        group model hands them); for a vote batch, return per group the votes that count."""
        if isinstance(record, PollCreated):
            self.polls.setdefault(record.poll, ModelPoll(len(record.options)))
            return []
        if isinstance(record, PollClosedRecord):
            if record.poll in self.polls:
                self.polls[record.poll].closed = True
            return []
        self.batch_seqs.add(record.batch_seq)
        outcomes: list[list[bool] | None] = []
        for group in record.groups:
            poll = self.polls.get(group.poll)
            if poll is None or poll.closed:
                outcomes.append(None)
                continue
            counted = []
            votes = zip(array.array("I", group.voters), array.array("H", group.options))
            for voter, option in votes:
                counts = option < poll.option_count and voter not in poll.voters
                if counts:
                    poll.voters[voter] = offset
                    poll.tallies[option] += 1
                counted.append(counts)
            outcomes.append(counted)
        return outcomes


class GroupModel:
    """One Model per shard of the group: each vote group of a batch goes to its shard, the
    rest to all."""

    def __init__(self) -> None:
        self.shards = {shard: Model() for shard in GROUP_SHARDS}

    @property
    def polls(self) -> dict[str, ModelPoll]:
        return self.shards[GROUP_SHARDS[0]].polls  # poll records hold for every shard

    def apply(self, offset: int, record: Record) -> list[list[bool] | None]:
        if isinstance(record, VoteBatch):
            outcomes: list[list[bool] | None] = [None] * len(record.groups)
            for shard in dict.fromkeys(group.shard for group in record.groups):
                positions = [i for i, group in enumerate(record.groups) if group.shard == shard]
                part = msgspec.structs.replace(record, groups=[record.groups[i] for i in positions])
                for position, outcome in zip(positions, self.shards[shard].apply(offset, part)):
                    outcomes[position] = outcome
            return outcomes
        for model in self.shards.values():
            model.apply(offset, record)
        return []


def fingerprints(states: dict[int, ShardState]) -> dict[int, tuple]:
    return {shard: fingerprint(state) for shard, state in states.items()}


def fingerprint(state: ShardState) -> tuple:
    """Everything a replay could change, in comparable form."""
    return (
        state.wal_offset_next, state.batch_seq_next, state.votes_applied,
        # The locator by meaning: the entry of every counted voter and how many are set at
        # all (which pages exist is an allocation detail, not state).
        sorted((name, poll.closed_ms, poll.tallies.tolist(), poll.locator.count_set(),
                [(voter, poll.locator.get(voter)) for voter in poll.voters])
               for name, poll in state.polls.items()),
    )


# Strategies ------------------------------------------------------------------------------------

# Mostly a small range, so voters repeat across batches and inside one; sometimes far out, so
# the receipt locator takes pages far apart.
voter_indexes = st.one_of(st.integers(0, 40), st.integers(0, 40), st.integers(0, 50_000))
# The owner only writes options that exist; records also admit others, which never count.
option_indexes = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, 65535))


@st.composite
def vote_lists(draw: st.DrawFn) -> list[tuple[int, int]]:
    pool = draw(st.lists(voter_indexes, min_size=1, max_size=12))
    voters = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=30))
    options = draw(st.lists(option_indexes, min_size=len(voters), max_size=len(voters)))
    return list(zip(voters, options))


class GroupMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        if DISK is None:
            raise RuntimeError("the power-loss filesystem fixture is not set up")
        self.directory = Path(tempfile.mkdtemp(prefix="shard-", dir=DISK.mount_point))
        self.wal_directory = self.directory / "wal"
        self.config = Config(data_dir=str(self.directory), shards=SHARDS_TOTAL,
                             groups=GROUPS).validate()
        self.model = GroupModel()
        self.record_offsets: list[int] = []
        self.runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)
        self.owner: GroupOwner | None = None
        self.states: dict[int, ShardState]
        try:
            self.start_owner()
        except BaseException:
            self.teardown()  # hypothesis only tears down a machine whose __init__ returned
            raise

    def teardown(self) -> None:
        try:
            self.stop_owner()
        finally:
            self.runner.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def log(self) -> SegmentLog:
        return self.owner.wal.log

    def store(self, shard: int) -> DirectorySnapshotStore:
        store = self.owner.snapshot_stores[shard]
        assert isinstance(store, DirectorySnapshotStore)
        return store

    def new_owner(self) -> GroupOwner:
        wal = EmbeddedWal(SegmentLog(self.wal_directory, SEGMENT_BYTES_MAX))
        stores = {shard: DirectorySnapshotStore(self.directory / f"snapshots-{shard}", shard,
                                                SNAPSHOTS_KEPT) for shard in GROUP_SHARDS}
        return GroupOwner(GROUP, self.config, wal, stores, MACHINE_KEYS,
                          signing.VoterHasher(MACHINE_KEYS.voter_hash_secret))

    def start_owner(self) -> None:
        """GroupOwner.start on the data dir: fence, each shard's newest valid snapshot, cut
        of a torn tail, one replay of the group's log after the oldest snapshot."""
        owner = self.new_owner()
        self.runner.run(owner.start())
        self.owner = owner
        self.states = owner.states

    def stop_owner(self) -> None:
        """The owner goes away: tasks cancelled, the log's files and fence closed. Stopping
        writes nothing (the log keeps no buffer), so this is a process crash on the disk."""
        if self.owner is not None:
            owner, self.owner = self.owner, None
            self.runner.run(owner.stop())

    def existing_polls(self) -> list[str]:
        return sorted(self.model.polls)

    def append(self, records: list[Record]) -> list[list[bytearray | None]]:
        """One append through the owner's WAL, then apply: the live path. The model takes the
        records only once the log answered (written and fsynced)."""
        positions = self.runner.run(self._append([encode_record(record) for record in records]))
        outcomes = []
        for record, (offset, next_offset) in zip(records, positions):
            state_outcome = apply_record(self.states, GROUP, offset, next_offset, record)
            model_outcome = self.model.apply(offset, record)
            self.record_offsets.append(offset)
            if isinstance(record, VoteBatch):
                assert [None if flags is None else [flag == COUNTED for flag in flags]
                        for flags in state_outcome] == model_outcome
            outcomes.append(state_outcome)
        for state in self.states.values():  # as the owner does after every append
            state.advance_to(positions[-1][1])
        return outcomes

    async def _append(self, payloads: list[bytes]) -> list[tuple[int, int]]:
        return await self.owner.wal.append(payloads)

    def batch_seq_next(self) -> int:
        """The group's next batch sequence number, as its owner takes it on start."""
        return max(state.batch_seq_next for state in self.states.values())

    def vote_batch(self, shard: int, groups: dict[str, list[tuple[int, int]]]) -> VoteBatch:
        return vote_batch(shard, self.batch_seq_next(), groups, group=GROUP)

    # Rules ---------------------------------------------------------------------------------

    @rule(poll=st.sampled_from(POLLS), option_count=st.integers(1, 4))
    def create_poll(self, poll: str, option_count: int) -> None:
        self.append([numbered_poll(poll, option_count)])

    @rule(data=st.data())
    def cast_votes(self, data: st.DataObject) -> None:
        polls = data.draw(st.lists(st.sampled_from([*self.existing_polls(), GHOST_POLL]),
                                   min_size=1, max_size=3, unique=True))
        shards = data.draw(st.lists(st.sampled_from(GROUP_SHARDS), min_size=1, max_size=2,
                                    unique=True), label="shards")
        batch = group_batch(GROUP, self.batch_seq_next(), {
            shard: {poll: data.draw(vote_lists()) for poll in polls} for shard in shards})
        event(f"a batch of {len(shards)} shards")
        self.append([batch])

    @precondition(lambda self: self.model.polls)
    @rule(data=st.data())
    def close_poll(self, data: st.DataObject) -> None:
        poll = data.draw(st.sampled_from(self.existing_polls()))
        self.append([PollClosedRecord(poll=poll, closed_ms=1_700_000_001_000)])

    @precondition(lambda self: self.model.polls)
    @rule(data=st.data())
    def close_then_vote_in_one_write(self, data: st.DataObject) -> None:
        poll = data.draw(st.sampled_from(self.existing_polls()))
        votes = data.draw(vote_lists())
        shard = data.draw(st.sampled_from(GROUP_SHARDS), label="shard")
        tallies_before = list(self.model.shards[shard].polls[poll].tallies)
        close = PollClosedRecord(poll=poll, closed_ms=1_700_000_001_000)
        _, vote_outcomes = self.append([close, self.vote_batch(shard, {poll: votes})])
        assert vote_outcomes == [None]
        assert self.states[shard].polls[poll].tallies.tolist() == tallies_before

    @rule(shard=st.sampled_from(GROUP_SHARDS))
    def take_snapshot(self, shard: int) -> None:
        # The owner's own snapshot of one shard: frozen at a batch boundary, written and
        # fsynced by its store; the shards' snapshots cover different points of the log.
        self.runner.run(self._snapshot(shard))

    async def _snapshot(self, shard: int) -> None:
        await self.owner.snapshot_now(shard)

    @rule(data=st.data())
    def damage_newest_snapshot(self, data: st.DataObject) -> None:
        shard = data.draw(st.sampled_from(GROUP_SHARDS), label="shard")
        snapshots = self.store(shard).read_manifest().snapshots
        if not snapshots:
            return
        path = self.store(shard).directory / snapshots[0].name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        with open(path, "r+b") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # the damage is on the disk, not only in the cache

    @rule(cut_power=st.booleans())
    def restart(self, cut_power: bool) -> None:
        before = fingerprints(self.states)
        self.stop_owner()
        if cut_power:
            # Everything acknowledged was fsynced: a cut must not lose any of it.
            DISK.cut()
        self.start_owner()
        assert fingerprints(self.states) == before

    @rule()
    def move_the_group(self) -> None:
        """A new owner starts while the old one still holds the group's fence: it waits on
        the fence (not ready, nothing replayed) until the old one lets go, then recovers
        the same state for every shard of the group."""
        before = fingerprints(self.states)
        self.runner.run(self._move())
        assert fingerprints(self.states) == before

    async def _move(self) -> None:
        successor = self.new_owner()
        starting = asyncio.create_task(successor.start())
        await asyncio.sleep(0.05)
        assert not starting.done() and not successor.ready and not successor.states
        old, self.owner = self.owner, None
        await old.stop()
        await asyncio.wait_for(starting, 10)
        self.owner, self.states = successor, successor.states

    @rule(data=st.data(), new_segment=st.booleans())
    def crash_during_a_write(self, data: st.DataObject, new_segment: bool) -> None:
        records = self.planned_records(data)
        frames = [frame_record(record) for record in records]
        written = b"".join(frames)
        durable_end = self.log.end_offset
        last_base = self.log.segment_bases()[-1]
        base = durable_end if new_segment else last_base
        self.stop_owner()
        # The write reached the file (the page cache), never fsynced; then the power goes and
        # tears it: the disk keeps a prefix of it (1 .. n-1 bytes, the seed picks how many).
        with open(self.wal_directory / segment_name(base), "ab") as handle:
            handle.write(written)
        cut = DISK.cut(tear=True, seed=data.draw(st.integers(0, 2**32 - 1), label="tear seed"))
        torn = cut["torn"]
        kept = torn["kept_bytes"] if torn is not None and len(written) > 1 else 0
        assert torn is not None and torn["of_bytes"] == len(written), cut

        self.start_owner()

        # Frames that reached the disk whole are in the log now; the torn one is not.
        offset = durable_end
        kept_records = 0
        for record, framed_record in zip(records, frames):
            if offset + len(framed_record) > durable_end + kept:
                break
            self.model.apply(offset, record)
            self.record_offsets.append(offset)
            offset += len(framed_record)
            kept_records += 1
        event(f"crash kept {kept_records} of {len(records)} records"
              f"{' in a new segment' if new_segment else ''}")
        assert self.log.end_offset == offset
        segment_bytes = sum((self.wal_directory / segment_name(b)).stat().st_size
                            for b in self.log.segment_bases())
        assert segment_bytes == offset

    def planned_records(self, data: st.DataObject) -> list[Record]:
        """One to three records of one write, valid in order as the owner would plan them."""
        records: list[Record] = []
        existing = set(self.model.polls)
        batch_seq = self.batch_seq_next()
        for _ in range(data.draw(st.integers(1, 3))):
            kind = data.draw(st.sampled_from(["create", "close", "votes"]))
            if kind == "create":
                poll = data.draw(st.sampled_from(POLLS))
                records.append(numbered_poll(poll, data.draw(st.integers(1, 4))))
                existing.add(poll)
            elif kind == "close" and existing:
                poll = data.draw(st.sampled_from(sorted(existing)))
                records.append(PollClosedRecord(poll=poll, closed_ms=1_700_000_001_000))
            else:
                poll = data.draw(st.sampled_from([*sorted(existing), GHOST_POLL]))
                shards = data.draw(st.lists(st.sampled_from(GROUP_SHARDS), min_size=1,
                                            max_size=2, unique=True), label="shards")
                records.append(group_batch(GROUP, batch_seq, {
                    shard: {poll: data.draw(vote_lists())} for shard in shards}))
                batch_seq += 1
        return records

    @precondition(lambda self: self.record_offsets)
    @rule(data=st.data())
    def replay_an_overlap(self, data: st.DataObject) -> None:
        start = data.draw(st.sampled_from(self.record_offsets), label="replay from")
        before = fingerprints(self.states)
        states = self.states

        def apply(offset: int, next_offset: int, payload) -> None:
            apply_record(states, GROUP, offset, next_offset, decode_record(payload))

        # Through the owner's own WAL, as its recovery replays after a snapshot.
        end_offset = self.runner.run(self.owner.wal.replay(start, apply))
        assert end_offset == self.log.end_offset
        assert fingerprints(self.states) == before

    # Invariants ----------------------------------------------------------------------------

    @invariant()
    def state_matches_the_model(self) -> None:
        for shard in GROUP_SHARDS:
            self.shard_matches_the_model(self.states[shard], self.model.shards[shard])

    def shard_matches_the_model(self, state: ShardState, model: Model) -> None:
        assert sorted(state.polls) == sorted(model.polls)
        for name, expected in model.polls.items():
            poll = state.polls[name]
            assert set(poll.voters) == set(expected.voters), name
            assert poll.tallies.tolist() == expected.tallies, name
            assert poll.closed == expected.closed, name
            assert sum(expected.tallies) == len(expected.voters) == len(poll.voters), name
            for voter, offset in expected.voters.items():
                assert state.record_of_voter(poll, voter) == offset, (name, voter)
        assert state.votes_applied == sum(len(poll.voters) for poll in model.polls.values())
        assert GHOST_POLL not in state.polls

    @invariant()
    def every_acknowledged_byte_is_applied(self) -> None:
        for shard, state in self.states.items():
            assert state.wal_offset_next == self.log.end_offset, shard
            expected_next = max(self.model.shards[shard].batch_seqs, default=-1) + 1
            assert state.batch_seq_next == expected_next, shard


TestGroupMachine = GroupMachine.TestCase
TestGroupMachine.settings = settings(TestGroupMachine.settings, deadline=None)
# Shrinking a failure replays thousands of runs, and hypothesis stops shrinking after 300 s on
# its own: give it room to report the shrunk example before the suite-wide 300 s timeout hits.
TestGroupMachine.pytestmark = [pytest.mark.timeout(600)]


# The replay overlap the machine does not generate ------------------------------------------------
# The owner never writes a vote for a poll its shard has not created, so the machine votes only
# for existing polls and a ghost that never exists. Records admit the other order, though, and
# replaying an overlap must still change nothing.


def test_replaying_an_old_vote_for_a_poll_created_later_changes_nothing() -> None:
    state = ShardState(SHARD, SHARDS_TOTAL)
    records = [vote_batch(SHARD, 0, {"late": [(5, 0)]}), numbered_poll("late", 2)]
    offset = 0
    for record in records:
        state.apply(offset, offset + 100, record)
        offset += 100
    assert state.polls["late"].tallies.tolist() == [0, 0]
    before = fingerprint(state)
    state.apply(0, 100, records[0])  # an overlap: replay from an offset already applied
    assert fingerprint(state) == before


# The live owner ----------------------------------------------------------------------------------

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
POLL = numbered_poll("final", 2)
VOTER_ID = SHARDS_TOTAL * 1234 + SHARD  # voter_id mod shards == SHARD


def run(loop_name: str, coroutine) -> object:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        return runner.run(coroutine)


def summary(owner: GroupOwner, poll: str) -> tuple[list[int], bool]:
    """The poll's tallies summed over the group's shards, and whether every shard closed it."""
    parts = owner.poll_summaries(poll)
    tallies = [sum(counts) for counts in zip(*(part[2] for part in parts))]
    return tallies, all(part[3] for part in parts)


class OwnerHarness:
    """A GroupOwner on real files under `directory`, started and stopped like a worker does."""

    def __init__(self, directory: Path, keyring) -> None:
        self.directory = directory
        self.keyring = keyring
        self.config = Config(data_dir=str(directory), shards=SHARDS_TOTAL, groups=GROUPS,
                             group_commit_ms=2.0).validate()

    async def __aenter__(self) -> GroupOwner:
        self.wal = EmbeddedWal(SegmentLog(self.directory / "wal", self.config.segment_bytes_max))
        stores = {shard: DirectorySnapshotStore(self.directory / f"snapshots-{shard}", shard,
                                                SNAPSHOTS_KEPT) for shard in GROUP_SHARDS}
        self.owner = GroupOwner(GROUP, self.config, self.wal, stores, self.keyring,
                                signing.VoterHasher(self.keyring.voter_hash_secret))
        await self.owner.start()
        return self.owner

    async def __aexit__(self, *exc_info) -> None:
        await self.owner.stop()  # also closes the log and releases its lock


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_concurrent_repeats_of_one_voter_count_once(
    tmp_path: Path, keyring, loop_name: str
) -> None:
    async def scenario() -> None:
        async with OwnerHarness(tmp_path, keyring) as owner:
            assert await owner.create_poll(POLL)
            options = [POLL.options[attempt % 2] for attempt in range(20)]
            outcomes = await asyncio.gather(
                *(owner.submit_vote(POLL.poll, VOTER_ID, option) for option in options),
                return_exceptions=True)
            # The 201 body is JSON bytes; a 409 carries the same receipt as a document.
            receipts_given = [json.loads(outcome) for outcome in outcomes
                              if isinstance(outcome, bytes)]
            assert len(receipts_given) == 1, outcomes
            receipt = receipts_given[0]
            repeats = [outcome for outcome in outcomes if not isinstance(outcome, bytes)]
            assert all(isinstance(outcome, AlreadyVoted) for outcome in repeats), repeats
            assert [outcome.extra["receipt"] for outcome in repeats] == [receipt] * 19
            assert summary(owner, POLL.poll)[0] == [1, 0]  # the first submitted counted

        # After a restart the vote is still counted once, and a repeat gets the same receipt,
        # rebuilt from the log.
        async with OwnerHarness(tmp_path, keyring) as owner:
            assert summary(owner, POLL.poll)[0] == [1, 0]
            with pytest.raises(AlreadyVoted) as caught:
                await owner.submit_vote(POLL.poll, VOTER_ID, POLL.options[1])
            assert caught.value.extra["receipt"] == receipt
            assert summary(owner, POLL.poll)[0] == [1, 0]

    run(loop_name, scenario())


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_a_vote_after_a_close_in_the_same_commit_does_not_count(
    tmp_path: Path, keyring, loop_name: str
) -> None:
    # Two shards of the group: the close record holds for both.
    early_voter, late_voter = VOTER_ID, VOTER_ID + GROUPS

    async def scenario() -> None:
        async with OwnerHarness(tmp_path, keyring) as owner:
            assert await owner.create_poll(POLL)
            early = asyncio.create_task(owner.submit_vote(POLL.poll, early_voter, POLL.options[0]))
            close = asyncio.create_task(owner.close_poll(POLL.poll))
            await asyncio.sleep(0)  # both are queued now; the commit is still lingering
            with pytest.raises(PollClosed):
                await owner.submit_vote(POLL.poll, late_voter, POLL.options[1])
            assert json.loads(await early)["poll"] == POLL.poll
            await close
            assert summary(owner, POLL.poll) == ([1, 0], True)
            with pytest.raises(PollClosed):
                await owner.submit_vote(POLL.poll, late_voter, POLL.options[1])

        async with OwnerHarness(tmp_path, keyring) as owner:
            assert summary(owner, POLL.poll) == ([1, 0], True)

    run(loop_name, scenario())
