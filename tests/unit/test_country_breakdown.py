"""Proves the per-country breakdown (a poll created with `breakdown: ["country"]`) is counted
from the log alike by the engine's apply (shards/state.py), the replay tool's independent
recount (replay/recount.py) and a plain model, across duplicates, invalid options and a
close record; that a snapshot carries it; that a poll without the breakdown records and
counts no countries; and that records and snapshots of the release before (no breakdown
field, vote groups of three fields) still decode, with the engine's decoder and the replay
tool's.

Failures reproduce with the seed printed in the session header (`--hypothesis-seed=N`).
"""

from __future__ import annotations

import array
import asyncio
import tempfile
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import Config
from engine.errors import LogCorrupt
from replay.rawlog import decode_raw
from replay.recount import recount_shard
from shards import snapshots
from shards.pending import PendingVote
from shards.planning import country_columns
from shards.records import (
    PollClosed,
    PollCreated,
    VoteBatch,
    VoteGroup,
    decode_record,
    encode_record,
    frame_record,
)
from shards.recovery import apply_record
from shards.state import ShardState
from tests.support.records import CREATED_MS, write_group_log

SHARDS_TOTAL = 2
SHARD = 1
GROUP = 0  # one fencing group
OPTIONS = ["a", "b", "c"]
COUNTRIES = ["DE", "FR", "ZZ"]


def created(poll: str, breakdown: list[str]) -> PollCreated:
    return PollCreated(poll, OPTIONS, None, None, False, CREATED_MS, breakdown)


def group_of(poll: str, votes: list[tuple[int, int, str]], with_countries: bool) -> VoteGroup:
    """(voter index, option index, country) votes as the planner packs them."""
    voters = array.array("I", [voter for voter, _, _ in votes]).tobytes()
    options = array.array("H", [option for _, option, _ in votes]).tobytes()
    if not with_countries:
        return VoteGroup(SHARD, poll, voters, options)
    pending = [PendingVote(poll, 0, SHARD, 0, "", 0, None, country)  # type: ignore[arg-type]
               for _, _, country in votes]
    codes, countries = country_columns(pending)
    return VoteGroup(SHARD, poll, voters, options, codes, countries)


def batch_of(batch_seq: int, groups: list[VoteGroup]) -> VoteBatch:
    return VoteBatch(GROUP, batch_seq, CREATED_MS + batch_seq, groups, 0, [], b"", "")


def model(batches: list[list[tuple[int, int, str]]], closed_after: int) -> dict:
    """Per country, per option: the first vote of each voter with a valid option, in the
    batches before the close."""
    seen: set[int] = set()
    counts: Counter = Counter()
    for batch in batches[:closed_after]:
        for voter, option, country in batch:
            if option < len(OPTIONS) and voter not in seen:
                seen.add(voter)
                counts[(country, OPTIONS[option])] += 1
    countries: dict[str, dict[str, int]] = {}
    for (country, option), count in counts.items():
        countries.setdefault(country, dict.fromkeys(OPTIONS, 0))[option] = count
    return countries


def engine_state(records: list, positions: list[tuple[int, int]]) -> ShardState:
    states = {number: ShardState(number, SHARDS_TOTAL) for number in range(SHARDS_TOTAL)}
    for record, (offset, next_offset) in zip(records, positions, strict=True):
        apply_record(states, 0, offset, next_offset, decode_record(frame_record(record)[8:]))
    return states[SHARD]


def named(state_counts: dict[str, list[int]]) -> dict[str, dict[str, int]]:
    return {country: dict(zip(OPTIONS, counts, strict=True))
            for country, counts in state_counts.items()}


votes = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 3), st.sampled_from(COUNTRIES)),
                 min_size=1, max_size=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(votes, min_size=1, max_size=5), st.integers(0, 5))
def test_engine_recount_and_model_agree_per_country(batches, closed_after) -> None:
    records: list = [created("by-country", ["country"]), created("plain", [])]
    for batch_seq, batch in enumerate(batches):
        if batch_seq == closed_after:
            records.append(PollClosed("by-country", CREATED_MS + 100))
        records.append(batch_of(batch_seq, [group_of("by-country", batch, True),
                                            group_of("plain", batch, False)]))
    expected = model(batches, closed_after)
    with tempfile.TemporaryDirectory() as directory:
        config = Config(data_dir=directory, shards=SHARDS_TOTAL, groups=1).validate()
        positions = write_group_log(Path(directory), SHARDS_TOTAL, 1, 0, records)
        recount = asyncio.run(recount_shard(config, SHARD))
    state = engine_state(records, positions)
    poll = state.polls["by-country"]
    assert named(poll.country_counts()) == expected
    assert recount.polls["by-country"].countries == expected
    # The breakdown sums to the poll's counts.
    assert {option: sum(counts[option] for counts in expected.values())
            for option in OPTIONS} == poll.counts()
    assert state.polls["plain"].country_counts() == {}
    assert recount.polls["plain"].countries == {}
    thawed = snapshots.thaw(snapshots.freeze(state))
    assert named(thawed.polls["by-country"].country_counts()) == expected


def test_a_group_of_a_breakdown_poll_without_its_countries_is_log_corruption() -> None:
    state = ShardState(SHARD, SHARDS_TOTAL)
    state.apply(0, 10, created("by-country", ["country"]))
    with pytest.raises(LogCorrupt):
        state.apply(10, 20, batch_of(0, [group_of("by-country", [(1, 0, "DE")], False)]))


def test_country_columns_pack_one_index_per_vote_into_the_distinct_codes() -> None:
    claims = ["DE", "FR", "DE", "ZZ", "FR"]
    pending = [PendingVote("p", 0, 0, 0, "", 0, None, claim)  # type: ignore[arg-type]
               for claim in claims]
    codes, countries = country_columns(pending)
    assert codes == ["DE", "FR", "ZZ"]
    assert [codes[index] for index in array.array("H", countries)] == claims


def test_records_of_the_release_before_decode() -> None:
    # As the release before wrote them: PollCreated of six fields; and vote groups without
    # the trailing country fields (shard, poll, voters, options), as a poll without the
    # breakdown may be written.
    old_created = msgspec.msgpack.encode(["p", "poll", ["a", "b"], None, None, False, CREATED_MS])
    old_batch = msgspec.msgpack.encode(
        ["v", GROUP, 0, CREATED_MS, [[SHARD, "poll", b"\x01\x00\x00\x00", b"\x01\x00"]], 0, [],
         b"", ""])
    record = decode_record(old_created)
    assert isinstance(record, PollCreated)
    assert (record.breakdown, record.by_country) == ([], False)
    batch = decode_record(old_batch)
    assert isinstance(batch, VoteBatch)
    assert (batch.groups[0].country_codes, batch.groups[0].countries) == ([], b"")
    raw_created, raw_batch = decode_raw(old_created, "old"), decode_raw(old_batch, "old")
    assert raw_created.breakdown == ()  # type: ignore[union-attr]
    assert raw_batch.groups[0].countries == b""  # type: ignore[union-attr]
    # And the new form round-trips through both decoders.
    new = encode_record(created("poll", ["country"]))
    assert decode_record(new).by_country  # type: ignore[union-attr]
    assert decode_raw(new, "new").breakdown == ("country",)  # type: ignore[union-attr]


def test_a_snapshot_of_the_release_before_decodes_without_country_tallies() -> None:
    state = ShardState(SHARD, SHARDS_TOTAL)
    state.apply(0, 10, created("poll", []))
    state.apply(10, 20, batch_of(0, [group_of("poll", [(1, 0, "DE")], False)]))
    snapshot = msgspec.msgpack.decode(snapshots.freeze(state))
    poll_fields = snapshot[5][0]
    assert poll_fields[-1] == {}  # country_tallies, last
    snapshot[5][0] = poll_fields[:-1]  # what the release before wrote
    snapshot[5][0][0] = poll_fields[0][:-1]  # and its PollCreated without breakdown
    thawed = snapshots.thaw(msgspec.msgpack.encode(snapshot))
    assert thawed.polls["poll"].counts() == {"a": 1, "b": 0, "c": 0}
    assert thawed.polls["poll"].country_counts() == {}
