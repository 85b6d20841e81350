"""WAL records built by hand for shard tests, a log that applies them, a group's embedded log
written with them (its LogHeader first, as a group owner writes it), and a state fingerprint.

Vote batches are encoded as a group owner encodes them (shards/planning.py): one vote group
per shard and poll, packed uint32 voter indexes and uint16 option indexes. Their signature fields stay empty unless given: applying
a record does not check them.
"""

from __future__ import annotations

import array
import typing
from pathlib import Path

import msgspec

from shards.backends import group_directory
from shards.records import LOG_FORMAT, LogHeader, PollCreated, VoteBatch, VoteGroup, frame_record
from shards.segment_log import SegmentLog
from shards.state import ShardState

CREATED_MS = 1_700_000_000_000


def poll_created(poll: str, options: list[str]) -> PollCreated:
    return PollCreated(poll=poll, options=options, opens_at_ms=None, closes_at_ms=None,
                       embargo=False, created_ms=CREATED_MS)


# A batch's group when the test leaves it to write_group_log (the log it goes into).
GROUP_OF_LOG = -1


def vote_batch(shard: int, batch_seq: int, groups: dict[str, list[tuple[int, int]]],
               group: int = GROUP_OF_LOG, **fields: object) -> VoteBatch:
    """A batch of one shard's (voter index, option index) votes per poll; `fields` set other
    VoteBatch fields (e.g. the signature's), every field not given is its type's empty
    value. `group` left out: the group of the log write_group_log puts it in."""
    return group_batch(group, batch_seq, {shard: groups}, **fields)


def group_batch(group: int, batch_seq: int,
                shards: dict[int, dict[str, list[tuple[int, int]]]],
                **fields: object) -> VoteBatch:
    """A batch of a fencing group holding several shards' votes: per shard, per poll,
    (voter index, option index) pairs, one vote group each, in the order given."""
    values: dict[str, object] = {
        "group": group, "batch_seq": batch_seq, "time_ms": CREATED_MS + batch_seq,
        "groups": [
            VoteGroup(shard=shard, poll=poll,
                      voters=array.array("I", [voter for voter, _ in votes]).tobytes(),
                      options=array.array("H", [option for _, option in votes]).tobytes())
            for shard, polls in shards.items() for poll, votes in polls.items()
        ],
        **fields,
    }
    for field in msgspec.structs.fields(VoteBatch):
        if field.name not in values:
            values[field.name] = (typing.get_origin(field.type) or field.type)()
    return VoteBatch(**values)


# Records framed into one append (one fsync) by write_group_log.
APPEND_BYTES_MAX = 16384


def log_header(shards: int, groups: int, group: int) -> LogHeader:
    return LogHeader(format=LOG_FORMAT, shards=shards, groups=groups, group=group)


def write_group_log(data_dir: Path, shards: int, groups: int, group: int, records: list,
                    segment_bytes_max: int = 1 << 16, header: LogHeader | None = None
                    ) -> list[tuple[int, int]]:
    """Append the records, one frame each, to the group's embedded log in appends of up to
    APPEND_BYTES_MAX; a new log gets its header first (`header`, else this layout's), as the
    group's owner writes it. Each record's (offset, next offset), the header's not included."""
    log = SegmentLog(group_directory(data_dir, group) / "wal", segment_bytes_max)
    assert log.try_lock()
    positions = []
    pending: list[bytes] = []
    try:
        if log.recover() == 0:
            first = header if header is not None else log_header(shards, groups, group)
            log.append(frame_record(first))
        for record in records + [None]:
            if isinstance(record, VoteBatch) and record.group == GROUP_OF_LOG:
                record = msgspec.structs.replace(record, group=group)
            framed = b"" if record is None else frame_record(record)
            if pending and (record is None or sum(map(len, pending)) + len(framed) > APPEND_BYTES_MAX):
                offset = log.append(b"".join(pending))
                for item in pending:
                    positions.append((offset, offset + len(item)))
                    offset += len(item)
                pending = []
            if record is not None:
                pending.append(framed)
    finally:
        log.close()
    return positions


class Log:
    """Applies records to a state at made-up, increasing offsets (100 apart), as the owner
    would; `votes` adds a vote batch with the next batch_seq (`batch_fields` go into each)."""

    def __init__(self, state: ShardState, **batch_fields: object) -> None:
        self.state = state
        self.offset = state.wal_offset_next
        self.batch_seq = state.batch_seq_next
        self.batch_fields = batch_fields

    def apply(self, record) -> None:
        next_offset = self.offset + 100
        self.state.apply(self.offset, next_offset, record)
        self.offset = next_offset

    def votes(self, groups: dict[str, list[tuple[int, int]]]) -> None:
        self.apply(vote_batch(self.state.shard, self.batch_seq, groups, **self.batch_fields))
        self.batch_seq += 1


def fingerprint(state: ShardState) -> dict:
    """Everything a snapshot must carry, in comparable form."""
    return {
        "shard": (state.shard, state.shards_total),
        "offsets": (state.wal_offset_next, state.batch_seq_next, state.votes_applied),
        # The locator by meaning: which pages exist is an allocation detail, not state.
        "polls": {
            name: (poll.definition, poll.closed_ms, list(poll.voters), poll.tallies.tolist(),
                   [(voter, poll.locator.get(voter)) for voter in poll.voters], poll.option_index)
            for name, poll in state.polls.items()
        },
    }


def check_answers(state: ShardState, counted: dict[int, int], absent: list[int],
                  poll_id: str = "song") -> None:
    """Every counted voter's receipt lookup names the record that counted it (`counted`:
    voter -> that record's offset), and no absent voter is found."""
    poll = state.polls[poll_id]
    for voter, offset in counted.items():
        assert state.record_of_voter(poll, voter) == offset, voter
    for voter in absent:
        assert state.record_of_voter(poll, voter) is None, voter
