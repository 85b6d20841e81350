"""Proves that replay's independent recount (replay/recount.py, on its own frame reader and
untyped decoding) agrees with the engine's own replay (decode_record + ShardState.apply, the
compiled apply_group) on generated logs written to a real segment log: polls created, closed
and created twice, votes for polls never created or created later, votes after a close,
duplicate voters across and within groups, and invalid option indexes, each batch holding
the votes of two shards of the group in interleaved vote groups (log format 3), of which a
shard counts only its own, at their indexes among all the batch's votes. Beyond the engine's
state it checks the recount's rejections by reason and each counted voter's option against
a plain model (a Python set per poll), its hash chain against replay/chain.py's reference,
its captures at record boundaries against a recount cut at that offset, and the outcome it
reports for a watched vote. A large group with unique voters takes the bulk path and still
matches the per-vote model.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import Config
from replay import chain as export_chain
from replay.recount import (
    DUPLICATE,
    OPTION_INVALID,
    POLL_NOT_OPEN,
    REJECTION_REASONS,
    merged_counts,
    merged_voter_options,
    recount,
    recount_shard,
)
from shards.records import PollClosed, VoteBatch, decode_record, frame_record
from shards.recovery import apply_record
from shards.state import ShardState
from tests.support.records import (
    GROUP_OF_LOG,
    group_batch,
    log_header,
    poll_created,
    vote_batch,
    write_group_log,
)

SHARDS_TOTAL = 3
GROUPS = 1  # every shard in group 0: one log holds them all
SHARD = 1
OTHER_SHARD = 2
POLLS = ["a", "b", "c", "never"]
OPTION_NAMES = ["o0", "o1", "o2", "o3", "o4"]
HEADER_BYTES = len(frame_record(log_header(SHARDS_TOTAL, GROUPS, 0)))


def write_log(data_dir: Path, shard: int, records: list, segment_bytes_max: int = 1 << 16
              ) -> list[tuple[int, int]]:
    """Append the records to the log of the shard's group (GROUPS groups: with one, every
    shard's records share one log), header first when the log is new; each record's
    (offset, next offset)."""
    return write_group_log(data_dir, SHARDS_TOTAL, GROUPS, shard % GROUPS, records,
                           segment_bytes_max)


def config_for(data_dir: Path, shards: int = SHARDS_TOTAL) -> Config:
    return Config(data_dir=str(data_dir), shards=shards, groups=GROUPS).validate()


def as_logged(record, group: int = 0):
    """The record as write_group_log wrote it into the log of `group`: a vote batch left to
    it names that group."""
    if isinstance(record, VoteBatch) and record.group == GROUP_OF_LOG:
        return msgspec.structs.replace(record, group=group)
    return record


def engine_state(records: list, positions: list[tuple[int, int]], shard: int = SHARD) -> ShardState:
    """The shard's state after the engine's own group apply (shards/recovery.apply_record) of
    the records, every shard of the group in play."""
    states = {number: ShardState(number, SHARDS_TOTAL) for number in range(SHARDS_TOTAL)}
    for record, (offset, next_offset) in zip(records, positions):
        apply_record(states, 0, offset, next_offset,
                     decode_record(frame_record(as_logged(record))[8:]))
    return states[shard]


def model(records: list, positions: list[tuple[int, int]], shard: int = SHARD) -> dict:
    """The counting rule in its plainest form: a set per poll, one vote at a time."""
    polls: dict[str, dict] = {}
    pending: Counter = Counter()
    for record, (offset, _) in zip(records, positions):
        kind = type(record).__name__
        if kind == "PollCreated" and record.poll not in polls:
            polls[record.poll] = {"options": record.options, "seen": set(), "closed": False,
                                  "rejected": Counter({POLL_NOT_OPEN: pending.pop(record.poll, 0)}),
                                  "counts": Counter(), "voter_options": {}, "chain": []}
        elif kind == "PollClosed" and record.poll in polls:
            polls[record.poll]["closed"] = True
        elif kind == "VoteBatch":
            index = 0  # among every vote of the batch, of any shard
            for group in record.groups:
                voters = memoryview(group.voters).cast("I").tolist()
                options = memoryview(group.options).cast("H").tolist()
                if group.shard != shard:
                    index += len(voters)
                    continue
                poll = polls.get(group.poll)
                for voter, option in zip(voters, options):
                    if poll is None:
                        pending[group.poll] += 1
                    elif poll["closed"]:
                        poll["rejected"][POLL_NOT_OPEN] += 1
                    elif option >= len(poll["options"]):
                        poll["rejected"][OPTION_INVALID] += 1
                    elif voter in poll["seen"]:
                        poll["rejected"][DUPLICATE] += 1
                    else:
                        poll["seen"].add(voter)
                        name = poll["options"][option]
                        poll["counts"][name] += 1
                        voter_id = voter * SHARDS_TOTAL + shard
                        poll["voter_options"][voter_id] = name
                        poll["chain"].append((offset, index, voter_id, name))
                    index += 1
    return {"polls": polls, "unknown": dict(pending)}


# Generated logs -------------------------------------------------------------------------------

created = st.builds(lambda poll, count: poll_created(poll, OPTION_NAMES[:count]),
                    st.sampled_from(POLLS[:3]), st.integers(1, 4))
closed = st.builds(lambda poll: PollClosed(poll=poll, closed_ms=1), st.sampled_from(POLLS))
votes_any = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 5)), max_size=12)
votes_unique = st.sets(st.integers(0, 2**20), max_size=40).map(
    lambda voters: [(voter, voter % 3) for voter in sorted(voters, key=hash)])
group_votes = st.dictionaries(st.sampled_from(POLLS), st.one_of(votes_any, votes_unique),
                              max_size=3)
record = st.one_of(created, closed, group_votes)


def two_shard_batch(batch_seq: int, item: dict[str, list[tuple[int, int]]]) -> VoteBatch:
    """One batch of the group holding the same votes for SHARD and OTHER_SHARD, their vote
    groups interleaved per poll (as the group owner orders them, by first arrival of each
    shard and poll), OTHER_SHARD's first in every other batch, so SHARD's votes sit at
    indexes shifted by OTHER_SHARD's, which SHARD's recount must pass by."""
    batch = group_batch(GROUP_OF_LOG, batch_seq, {SHARD: item, OTHER_SHARD: item})
    mine, others = batch.groups[:len(item)], batch.groups[len(item):]
    pairs = zip(others, mine) if batch_seq % 2 else zip(mine, others)
    return msgspec.structs.replace(batch, groups=[group for pair in pairs for group in pair])


def materialize(items: list) -> list:
    """The records: each dict of votes becomes one two-shard batch (two_shard_batch), with
    the group's next batch_seq."""
    records = []
    batch_seq = 0
    for item in items:
        if isinstance(item, dict):
            records.append(two_shard_batch(batch_seq, item))
            batch_seq += 1
        else:
            records.append(item)
    return records


def holds_shard(record, shard: int = SHARD) -> bool:
    """Whether the record concerns the shard: a vote batch with a vote group of it, or any
    other record of the group's log."""
    return not isinstance(record, VoteBatch) or any(group.shard == shard
                                                    for group in record.groups)


def check_against_engine_and_model(records: list, data_dir: Path) -> None:
    positions = write_log(data_dir, SHARD, records)
    result = asyncio.run(recount_shard(config_for(data_dir), SHARD, keep_voters=True))
    state = engine_state(records, positions)
    expected = model(records, positions)
    assert result.end_offset == (positions[-1][1] if positions else HEADER_BYTES)
    assert result.records == sum(holds_shard(record) for record in records)
    assert result.votes_seen == sum(len(group.voters) // 4 for record in records
                                    if isinstance(record, VoteBatch)
                                    for group in record.groups if group.shard == SHARD)
    assert set(result.polls) == set(state.polls) == set(expected["polls"])
    assert result.unknown_polls == expected["unknown"]
    for name, poll in result.polls.items():
        engine_poll, model_poll = state.polls[name], expected["polls"][name]
        assert poll.counts == engine_poll.counts(), name
        assert poll.closed == engine_poll.closed
        assert poll.voters == engine_poll.voters
        assert poll.counts == {option: model_poll["counts"][option] for option in poll.options}
        assert poll.rejected == {reason: model_poll["rejected"][reason]
                                 for reason in REJECTION_REASONS}
        assert poll.voter_options == model_poll["voter_options"]
        assert poll.chained_votes == len(model_poll["chain"])
        assert poll.chain_digest == export_chain.chain_digest(name, SHARD, model_poll["chain"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(created, max_size=2), st.lists(record, max_size=25))
def test_recount_agrees_with_the_engine_and_the_model(first, items):
    # Most logs start with polls created, so most generated votes reach the counting paths.
    with tempfile.TemporaryDirectory() as directory:
        check_against_engine_and_model(materialize(first + items), Path(directory))


def test_big_unique_group_takes_the_bulk_path_and_matches(tmp_path):
    rng = random.Random(7)
    voters = rng.sample(range(10_000_000), 4096)
    first = [(voter, rng.randrange(3)) for voter in voters]
    # A second group repeating some of those voters and adding new ones: per-vote path.
    second = [(voter, 1) for voter in voters[:100]] + [(voter, 2) for voter in range(10, 60)]
    records = [poll_created("a", OPTION_NAMES[:3]), vote_batch(SHARD, 0, {"a": first}),
               vote_batch(SHARD, 1, {"a": second})]
    check_against_engine_and_model(records, tmp_path)


def test_captures_at_boundaries_equal_a_cut_recount_and_flag_the_rest(tmp_path):
    records = [poll_created("a", OPTION_NAMES[:2]),
               vote_batch(SHARD, 0, {"a": [(1, 0), (2, 1)]}),
               vote_batch(SHARD, 1, {"a": [(3, 1), (1, 1)]}),
               PollClosed(poll="a", closed_ms=5),
               vote_batch(SHARD, 2, {"a": [(9, 0)]})]
    positions = write_log(tmp_path, SHARD, records)
    config = config_for(tmp_path)
    inside = positions[1][0] + 3
    beyond = positions[-1][1] + 100
    captures = [offset for offset, _ in positions] + [positions[-1][1], inside, beyond]
    result = asyncio.run(recount_shard(config, SHARD, capture_at=captures))
    for offset, _ in positions + [(positions[-1][1], None)]:
        cut = asyncio.run(recount_shard(config, SHARD, until_offset=offset))
        assert cut.end_offset == offset
        captured = result.captures[offset].polls
        assert set(captured) == set(cut.polls)
        for name, poll in cut.polls.items():
            assert (captured[name].counts, captured[name].voters, captured[name].closed,
                    captured[name].chain_digest) == (poll.counts, poll.voters, poll.closed,
                                                     poll.chain_digest)
    assert result.captures[inside].polls is None
    assert "not at a record boundary" in result.captures[inside].problem
    assert "beyond the end" in result.captures[beyond].problem
    assert result.polls["a"].counts == {"o0": 1, "o1": 2}
    assert result.polls["a"].rejected == {DUPLICATE: 1, POLL_NOT_OPEN: 1, OPTION_INVALID: 0}


@pytest.mark.parametrize(("index", "counted", "reason", "position"), [
    (0, True, None, 3), (1, False, DUPLICATE, None), (2, False, OPTION_INVALID, None),
    (3, False, POLL_NOT_OPEN, None),
])
def test_watched_vote_outcome(tmp_path, index, counted, reason, position):
    records = [poll_created("a", OPTION_NAMES[:2]),
               vote_batch(SHARD, 0, {"a": [(1, 0), (2, 1)]}),
               vote_batch(SHARD, 1, {"a": [(7, 1), (1, 1), (8, 9)], "never": [(4, 0)]})]
    positions = write_log(tmp_path, SHARD, records)
    watch = (positions[2][0], index)
    result = asyncio.run(recount_shard(config_for(tmp_path), SHARD, watch=watch))
    outcome = result.watched
    assert (outcome.counted, outcome.reason, outcome.chain_position) == (counted, reason, position)
    expected_voter = [7, 1, 8, 4][index]
    assert outcome.voter_id == expected_voter * SHARDS_TOTAL + SHARD


def test_recount_of_all_shards_merges_counts_and_voters(tmp_path):
    for shard in range(SHARDS_TOTAL):
        write_log(tmp_path, shard, [poll_created("a", OPTION_NAMES[:2]),
                                    vote_batch(shard, 0, {"a": [(shard, 0), (10 + shard, 1)]})])
    results = asyncio.run(recount(config_for(tmp_path), keep_voters=True))
    assert sorted(results) == list(range(SHARDS_TOTAL))
    assert merged_counts(results) == {"a": {"o0": SHARDS_TOTAL, "o1": SHARDS_TOTAL}}
    voters = merged_voter_options(results)["a"]
    assert voters == {**{shard * SHARDS_TOTAL + shard: "o0" for shard in range(SHARDS_TOTAL)},
                      **{(10 + shard) * SHARDS_TOTAL + shard: "o1"
                         for shard in range(SHARDS_TOTAL)}}
    without = asyncio.run(recount(config_for(tmp_path), [0]))
    with pytest.raises(ValueError):
        merged_voter_options(without)
