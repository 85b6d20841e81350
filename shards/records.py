"""The WAL record format, shared by the embedded log, Kafka, snapshots' offsets and replay.

A record is msgspec msgpack of one of three tagged structs. On the embedded log each record
is framed as `[u32 payload length][u32 crc32 of payload][payload]` (little-endian); on Kafka
the payload is the record value (Kafka checksums it). Votes travel in batches: one record
holds a group commit's votes, grouped by poll, as packed little-endian arrays (uint32 voter
index = voter_id div shards, uint16 option index), so applying them is a tight loop.

Invariants: records are applied in log order; a vote counts only if its poll was created
earlier in the same shard's log and not yet closed there; applying a record twice changes
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


class PollCreated(msgspec.Struct, tag="p", array_like=True, frozen=True):
    poll: str
    options: list[str]
    opens_at_ms: int | None
    closes_at_ms: int | None
    embargo: bool
    created_ms: int


class PollClosed(msgspec.Struct, tag="c", array_like=True, frozen=True):
    poll: str
    closed_ms: int


class VoteGroup(msgspec.Struct, array_like=True, frozen=True, gc=False):
    poll: str
    voters: bytes  # packed little-endian uint32 voter indexes within the shard
    options: bytes  # packed little-endian uint16 option indexes, same count


class VoteBatch(msgspec.Struct, tag="v", array_like=True, frozen=True):
    """One group commit. `root` is the Merkle root over the votes' receipt leaves, in group
    order then vote order, and `signature` is Ed25519 over (shard, batch_seq, time_ms,
    leaf count, root) with the receipt key `key_id`."""

    shard: int
    batch_seq: int
    time_ms: int
    groups: list[VoteGroup]
    root: bytes
    signature: bytes
    key_id: str


Record = PollCreated | PollClosed | VoteBatch

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)


def encode_record(record: Record) -> bytes:
    return _encoder.encode(record)


def decode_record(payload: bytes | memoryview) -> Record:
    return _decoder.decode(payload)


def frame(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def frame_record(record: Record) -> bytes:
    return frame(encode_record(record))


def vote_count(batch: VoteBatch) -> int:
    return sum(len(group.voters) // 4 for group in batch.groups)
