"""The WAL record format, shared by the embedded log, Kafka, snapshots' offsets and replay.

A record is msgspec msgpack of one of four tagged structs. On the embedded log each record
is framed as `[u32 payload length][u32 crc32 of payload][payload]` (little-endian); on Kafka
the payload is the record value (Kafka checksums it). Votes travel in batches: one record
holds one fencing group's votes of one commit cycle, grouped by (shard, poll), as packed
little-endian arrays (uint32 voter index = voter_id div shards, uint16 option index), so
applying them is a tight loop per shard.

Each fencing group has one log; its first record is a `LogHeader` naming the layout (format,
shards, groups, group), so a log written by another layout or for another group is refused,
never misread. Vote batches name their shard (shard s is in group s mod groups); poll
created / closed records hold for every shard of the group.

A poll created with `breakdown: ["country"]` has its votes' country claims in its vote
groups (`VoteGroup.country_codes` / `countries`); both fields and `PollCreated.breakdown`
are trailing with defaults, so the records of older logs (without them) decode unchanged.

Invariants: records are applied in log order; a vote counts only if its poll was created
earlier in its group's log and not yet closed there; applying a record twice changes
nothing (test-and-set).
"""

from __future__ import annotations

import struct
import zlib

import msgspec

FRAME_HEADER = struct.Struct("<II")
FRAME_HEADER_BYTES = FRAME_HEADER.size
# A group commit of 65536 votes is ~400 KiB; anything near this bound is corruption.
RECORD_BYTES_MAX = 16 * 1024 * 1024


# 1 (no header): one log per shard, before fencing groups; 2: one log per group, but one vote
# batch per shard per cycle (each batch record naming its shard); 3: one vote batch per
# group per cycle, its vote groups naming their shards.
LOG_FORMAT = 3


class LogHeader(msgspec.Struct, tag="h", array_like=True, frozen=True):
    """The first record of a group's log: what layout wrote it."""

    format: int
    shards: int
    groups: int
    group: int


BREAKDOWN_COUNTRY = "country"
BREAKDOWNS = (BREAKDOWN_COUNTRY,)


class PollCreated(msgspec.Struct, tag="p", array_like=True, frozen=True):
    poll: str
    options: list[str]
    opens_at_ms: int | None
    closes_at_ms: int | None
    embargo: bool
    created_ms: int
    # The breakdowns the poll asks for (BREAKDOWNS). Added last with a default, so a record
    # of the release before (one field shorter) decodes as a poll without one.
    breakdown: list[str] = []

    @property
    def by_country(self) -> bool:
        return BREAKDOWN_COUNTRY in self.breakdown


class PollClosed(msgspec.Struct, tag="c", array_like=True, frozen=True):
    poll: str
    closed_ms: int


class VoteGroup(msgspec.Struct, array_like=True, frozen=True, gc=False):
    shard: int  # every vote of the group is of this shard, which is in the batch's group
    poll: str
    voters: bytes  # packed little-endian uint32 voter indexes within the shard
    options: bytes  # packed little-endian uint16 option indexes, same count
    # Only for a poll with the country breakdown (empty otherwise: 3 bytes more per group):
    # the distinct country claims of the group's voters, and per vote a packed
    # little-endian uint16 index into them, so a recount of the log reproduces the breakdown.
    country_codes: list[str] = []
    countries: bytes = b""


class VoteBatch(msgspec.Struct, tag="v", array_like=True, frozen=True):
    """One fencing group's part of a commit cycle. Its votes' receipt leaves (vote group
    order, then vote order) form a Merkle tree whose root, bound to (group, batch_seq, leaf
    count), is this batch's node; `batch_nodes` lists the nodes of every group batch signed
    in the same commit cycle (this one at `batch_position`), and `signature` is Ed25519 by
    `key_id` over (time_ms, batch count, root of those nodes). See engine/receipts.py.
    `batch_seq` counts the group's batches."""

    group: int
    batch_seq: int
    time_ms: int
    groups: list[VoteGroup]
    batch_position: int
    batch_nodes: list[bytes]
    signature: bytes
    key_id: str


Record = LogHeader | PollCreated | PollClosed | VoteBatch

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)


def encode_record(record: Record) -> bytes:
    return _encoder.encode(record)


def decode_record(payload: bytes | memoryview) -> Record:
    try:
        record: Record = _decoder.decode(payload)
    except UnicodeDecodeError as exc:
        # msgspec lets a string of invalid UTF-8 through as UnicodeDecodeError; recovery and
        # replay treat every undecodable record alike, as a DecodeError.
        raise msgspec.DecodeError("record holds a string that is not UTF-8") from exc
    return record


def frame(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def frame_record(record: Record) -> bytes:
    return frame(encode_record(record))


def vote_count(batch: VoteBatch) -> int:
    return sum(len(group.voters) // 4 for group in batch.groups)


def batch_shards(batch: VoteBatch) -> list[int]:
    """The shards with votes in the batch, in order of first appearance."""
    return list(dict.fromkeys(group.shard for group in batch.groups))
