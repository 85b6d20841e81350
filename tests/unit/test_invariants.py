"""Proves that the invariants the data depends on are checked in production code, not
assumed: a log that answers an append with too few positions, or with an offset that does
not grow past what the group applied, stops the group and answers its voters (outcome
unknown) instead of leaving them waiting forever or applying records out of order; an
unknown record type is LogCorrupt; commit cycles in flight never exceed their bound.

Each check is shown to fire by feeding it the broken input (a WAL fake whose positions are
wrong, a record of an unknown type, a committer asked for one cycle too many). Without the
check the owner tests would time out waiting for an answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from engine import signing
from engine.config import Config
from engine.errors import InvariantViolation, LogCorrupt, OutcomeUnknown
from engine.keys import KeyRing
from shards.commit import COMMIT_CYCLES_IN_FLIGHT_MAX, GroupCommitter
from shards.group_owner import GroupOwner
from shards.pending import check_positions
from shards.snapshots import DirectorySnapshotStore
from shards.state import ShardState
from tests.support.records import poll_created

SHARD = 1
SHARDS_TOTAL = 4
GROUPS = 2
GROUP = SHARD % GROUPS  # shards 1 and 3
RECORD_BYTES = 10
ANSWER_WAIT_S = 5.0

Positions = list[tuple[int, int]]


def honest(offset_next: int, records: int) -> Positions:
    return [(offset_next + RECORD_BYTES * i, offset_next + RECORD_BYTES * (i + 1))
            for i in range(records)]


class FakeWal:
    """An in-memory log whose answer to an append is whatever `positions_for` says."""

    appends_in_flight_max = 1

    def __init__(self) -> None:
        self.offset_next = 0
        self.positions_for: Callable[[int, int], Positions] = honest

    async def acquire(self) -> None:
        return None

    async def replay(self, from_offset: int, apply: object) -> int:
        return 0

    def append(self, payloads: list[bytes]) -> asyncio.Future[Positions]:
        positions = self.positions_for(self.offset_next, len(payloads))
        self.offset_next += RECORD_BYTES * len(payloads)
        future: asyncio.Future[Positions] = asyncio.get_running_loop().create_future()
        future.set_result(positions)
        return future

    async def read_at(self, offset: int) -> bytes:
        raise AssertionError("no record is read back in these tests")

    def location(self) -> str:
        return "fake log"

    async def close(self) -> None:
        return None


async def _started_owner(tmp_path: Path, keyring: KeyRing, wal: FakeWal) -> GroupOwner:
    config = Config(data_dir=str(tmp_path), shards=SHARDS_TOTAL, groups=GROUPS,
                    group_commit_ms=1.0).validate()
    stores = {shard: DirectorySnapshotStore(tmp_path / f"snapshots-{shard}", shard, 2)
              for shard in config.shards_of_group(GROUP)}
    owner = GroupOwner(GROUP, config, wal, stores, keyring,
                       signing.VoterHasher(keyring.voter_hash_secret))
    await owner.start()
    assert await owner.create_poll(poll_created("p", ["a", "b"]))
    return owner


def _broken_append_stops_the_group(tmp_path: Path, keyring: KeyRing,
                                   positions_for: Callable[[int, int], Positions]) -> None:
    async def scenario() -> None:
        wal = FakeWal()
        owner = await _started_owner(tmp_path, keyring, wal)
        try:
            wal.positions_for = positions_for
            votes = [owner.submit_vote("p", voter * SHARDS_TOTAL + SHARD, "a") for voter in (1, 2)]
            answers = await asyncio.wait_for(
                asyncio.gather(*votes, return_exceptions=True), ANSWER_WAIT_S)
            assert all(isinstance(answer, OutcomeUnknown) for answer in answers), answers
            assert not owner.ready
            assert owner.failure is not None and "log" in owner.failure
            assert sum(state.votes_applied for state in owner.states.values()) == 0
        finally:
            await owner.stop()

    asyncio.run(scenario())


def test_an_append_answered_with_too_few_positions_stops_the_group(
        tmp_path: Path, keyring: KeyRing) -> None:
    _broken_append_stops_the_group(
        tmp_path, keyring, lambda offset_next, records: honest(offset_next, records)[:-1])


def test_an_append_answered_with_an_offset_already_applied_stops_the_group(
        tmp_path: Path, keyring: KeyRing) -> None:
    # The log's header took 0..10 and the poll's creation 10..20: an answer starting at 0
    # again goes backwards.
    _broken_append_stops_the_group(tmp_path, keyring,
                                   lambda offset_next, records: honest(0, records))


def test_honest_positions_pass_and_broken_ones_are_named() -> None:
    check_positions([(10, 20), (20, 35)], 2, 10)
    with pytest.raises(InvariantViolation, match="1 positions for 2 records"):
        check_positions([(10, 20)], 2, 10)
    with pytest.raises(InvariantViolation, match="not after 10"):
        check_positions([(5, 20)], 1, 10)
    with pytest.raises(InvariantViolation, match="not after 20"):
        check_positions([(10, 20), (15, 30)], 2, 10)
    with pytest.raises(InvariantViolation):
        check_positions([(10, 10)], 1, 10)


class UnknownRecord(msgspec.Struct):
    poll: str


def test_an_unknown_record_type_is_log_corrupt() -> None:
    state = ShardState(SHARD, SHARDS_TOTAL)
    state.apply(0, 10, poll_created("p", ["a"]))
    with pytest.raises(LogCorrupt, match="unknown type UnknownRecord"):
        state.apply(10, 20, UnknownRecord(poll="p"))  # type: ignore[arg-type]
    assert state.wal_offset_next == 10


class NeverEndingGroup:
    """A group whose appends never end, so every cycle started stays in flight."""

    group = GROUP
    queued_votes = 0
    appends_in_flight = 0
    appends_in_flight_max = 8

    def has_queued(self) -> bool:
        return False

    def take_items(self) -> list[object]:
        return []

    def plan_records(self, items: list[object]) -> list[object]:
        return []

    def begin_append(self, items: list[object], plan: list[object]) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()

    def fail_unwritten(self, items: list[object], exc: Exception) -> None:
        raise AssertionError(f"nothing should fail here: {exc}")


def test_a_commit_cycle_beyond_the_bound_is_refused(keyring: KeyRing) -> None:
    async def scenario() -> None:
        committer = GroupCommitter(Config(shards=SHARDS_TOTAL).validate(), keyring,
                                   signing.VoterHasher(keyring.voter_hash_secret))
        shard = NeverEndingGroup()
        for _ in range(COMMIT_CYCLES_IN_FLIGHT_MAX):
            committer._start_commit([(shard, [], [])])
        assert committer.cycles_in_flight == COMMIT_CYCLES_IN_FLIGHT_MAX
        with pytest.raises(InvariantViolation, match="in flight"):
            committer._start_commit([(shard, [], [])])

    asyncio.run(scenario())
