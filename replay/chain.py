"""The export hash chain (v1): one digest per (poll, shard) over the votes that counted.

Anyone holding the log of a shard's fencing group can recount the shard and recompute the digest, and so check an
export (or the engine's results) without trusting the tool that made it.

Definition. H is SHA-256, `||` is concatenation, every integer is unsigned big-endian, and
strings are UTF-8 without a terminator:

    h_0 = H("votes/export-chain/v1" || 0x00 || u16 len(poll) || poll || u32 shard)
    h_k = H(h_{k-1} || u64 offset || u32 index || u64 voter_id || u16 len(option) || option)

for k = 1..n, one step per COUNTED vote of `poll` in the shard's vote groups of its group's
log (one log holds every shard of the group; a vote batch holds votes of any of them, each
vote group naming its shard), in log order (record order, then vote group order within the
record, then vote order within the group). The digest is h_n (h_0 when no vote counted),
and the export states n beside it.

- offset: the log position of the vote's record. Embedded log: the byte position of the
  record's frame in the group's whole log (segment base offset + position in the segment
  file). Kafka: the record's offset in partition `group` (shard mod groups) of the WAL topic.
- index: the vote's position among ALL votes of its batch record, of every shard, counted
  or not, from 0: vote groups in record order, votes in group order. It is the `index` a
  receipt carries (the vote's leaf in the batch's signed tree).
- voter_id: voter index (the uint32 stored in the vote group) x shard count + shard.
- option: the option id, `options[option index]` of the poll's creation record.

Which votes count (the engine's rule, docs/design.md "Outcomes the client can see"): a vote
counts iff the poll's creation record comes earlier in the shard's group's log (a later creation record of
the same poll id changes nothing), no close record of the poll comes earlier in that log,
its option index is below the number of options, and its voter has no counted vote in the
poll earlier in the log (an earlier vote of the same group included).

Known answer (checked by tests/unit/test_replay_chain.py): for poll "p" and shard 1,
    h_0 = ad0335a983591e77d97c012772322a3b4e29941e5f62ff33043aa44ffca07bc6
and after one counted vote at offset 0, index 0, voter_id 9, option "a",
    h_1 = 620a133f4844b87448001b1c087a15be53710f01775876155cacf068f7a078c2
"""

from __future__ import annotations

import hashlib
import struct

CHAIN_DOMAIN = b"votes/export-chain/v1\x00"
CHAIN_ALGORITHM = "votes/export-chain/v1"

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OFFSET = struct.Struct(">Q")
_INDEX_VOTER = struct.Struct(">IQ")


def _prefixed(text: str) -> bytes:
    data = text.encode()
    if len(data) > 0xFFFF:
        raise ValueError("a poll or option id is longer than 65535 bytes")
    return _U16.pack(len(data)) + data


def chain_start(poll: str, shard: int) -> bytes:
    return hashlib.sha256(CHAIN_DOMAIN + _prefixed(poll) + _U32.pack(shard)).digest()


def option_tail(option: str) -> bytes:
    """The last field of a step, `u16 len(option) || option`; callers precompute it per option."""
    return _prefixed(option)


def offset_field(offset: int) -> bytes:
    return _OFFSET.pack(offset)


def index_voter_field(index: int, voter_id: int) -> bytes:
    return _INDEX_VOTER.pack(index, voter_id)


def chain_step(digest: bytes, offset: int, index: int, voter_id: int, option: str) -> bytes:
    """One step of the chain, spelled out; the recount inlines the same bytes."""
    return hashlib.sha256(digest + offset_field(offset) + index_voter_field(index, voter_id)
                          + option_tail(option)).digest()


def chain_digest(poll: str, shard: int, votes) -> bytes:
    """The digest over `votes`, (offset, index, voter_id, option) tuples of counted votes in
    log order: the reference a third party's implementation is checked against."""
    digest = chain_start(poll, shard)
    for offset, index, voter_id, option in votes:
        digest = chain_step(digest, offset, index, voter_id, option)
    return digest
