"""An independent reader of the WAL record format, for verify, export, prove and inspect.

It shares no code with the engine's reader (shards/segment_log.py) or decoder
(shards/records.py), so a bug there shows up as a difference instead of being repeated.

Embedded log: one per fencing group, segments `<group dir>/wal/<20-digit base offset>.log`,
each a run of frames `[u32 payload length][u32 crc32 of payload][payload]` (little-endian).
A record's offset is its frame's position in the group's whole log (the segment's base + the position in the
file), the next offset is the position after its frame. Reading follows recovery's rule:
after the last valid frame of the LAST segment, a short header, a frame running to or past
the end of the file, or only zeros is a torn write, reported and ignored; anything else
there, any bad frame in an earlier segment, or a gap between segments, is `DataDamaged`
naming the file and offset. Reading never takes the lock and never writes.

Payloads decode with plain `msgspec.msgpack.decode` into lists; a tagged array-like struct
encodes as `[tag, field, ...]`:
- "h" LogHeader:   [format, shards, groups, group]; the first record of every group's log
- "p" PollCreated: [poll, options, opens_at_ms, closes_at_ms, embargo, created_ms,
                    breakdown]; breakdown (a list of names, "country") is absent in
                    records of the release before
- "c" PollClosed:  [poll, closed_ms]
- "v" VoteBatch:   [group, batch_seq, time_ms, groups, batch_position, batch_nodes,
                    signature, key_id]: a run of one fencing group's votes in a commit
                    cycle (log format 3: any of the group's shards, one batch per run
                    between control records), batch_seq counting the group's batches;
                    each vote group
                    is [shard, poll, voters, options, country_codes, countries], every vote
                    of it of that shard, with voters packed little-endian uint32 voter
                    indexes (voter_id div shards), options packed uint16, and (a poll with
                    the country breakdown) countries packed uint16 indexes into the list
                    country_codes; the last two are empty without the breakdown, and
                    may be absent (the engine's decoder then takes them as empty).
The shapes are checked here by hand; a payload that passes its checksum but not these
checks is `DataDamaged`. Whether a vote group's shard is in the log's group is the readers'
check (replay/recount.py), which knows the layout.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import msgspec

from replay.errors import BadInput, DataDamaged

HEADER = struct.Struct("<II")
HEADER_BYTES = HEADER.size
# The engine refuses records above 16 MiB; the same bound keeps a damaged length from
# making this reader allocate without limit.
PAYLOAD_BYTES_MAX = 16 * 1024 * 1024
SEGMENT_SUFFIX = ".log"
SEGMENT_STEM_DIGITS = 20


class Header(NamedTuple):
    format: int
    shards: int
    groups: int
    group: int


class Created(NamedTuple):
    poll: str
    options: list[str]
    opens_at_ms: int | None
    closes_at_ms: int | None
    embargo: bool
    created_ms: int
    breakdown: tuple[str, ...] = ()


class Closed(NamedTuple):
    poll: str
    closed_ms: int


class Group(NamedTuple):
    shard: int  # every vote of the group is of this shard
    poll: str
    voters: bytes  # packed little-endian uint32
    options: bytes  # packed little-endian uint16
    country_codes: tuple[str, ...] = ()
    countries: bytes = b""  # packed little-endian uint16 indexes into country_codes

    @property
    def size(self) -> int:
        return len(self.voters) // 4


class Batch(NamedTuple):
    group: int  # the fencing group whose log holds it; batch_seq counts its batches
    batch_seq: int
    time_ms: int
    groups: list[Group]
    batch_position: int
    batch_nodes: list[bytes]
    signature: bytes
    key_id: str

    @property
    def vote_count(self) -> int:
        return sum(group.size for group in self.groups)

    @property
    def shards(self) -> list[int]:
        """The shards with votes in the batch, in order of first appearance."""
        return list(dict.fromkeys(group.shard for group in self.groups))


RawRecord = Header | Created | Closed | Batch


# Decoding --------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_int(value) -> bool:
    return value is None or _is_int(value)


def _check(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise DataDamaged(f"{where}: {what}")


def decode_raw(payload: bytes | memoryview, where: str) -> RawRecord:
    """One record's payload as Header / Created / Closed / Batch; `where` names it in errors."""
    try:
        fields = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec: bad UTF-8 in a string
        raise DataDamaged(f"{where}: payload is not msgpack ({exc})") from None
    _check(isinstance(fields, list) and bool(fields) and isinstance(fields[0], str), where,
           "payload is not a tagged array")
    tag = fields[0]
    if tag == "h":
        _check(len(fields) == 5 and all(_is_int(value) for value in fields[1:]), where,
               f"log header is not 4 integers: {fields[1:]!r}")
        return Header(*fields[1:])
    if tag == "p":
        _check(len(fields) in (7, 8), where,
               f"poll-created record has {len(fields) - 1} fields, not 6 or 7")
        _, poll, options, opens_at_ms, closes_at_ms, embargo, created_ms, *rest = fields
        breakdown = rest[0] if rest else []
        _check(isinstance(poll, str) and isinstance(options, list)
               and all(isinstance(option, str) for option in options)
               and _optional_int(opens_at_ms) and _optional_int(closes_at_ms)
               and isinstance(embargo, bool) and _is_int(created_ms)
               and isinstance(breakdown, list) and all(isinstance(name, str) for name in breakdown),
               where, "poll-created record has a field of the wrong type")
        return Created(poll, options, opens_at_ms, closes_at_ms, embargo, created_ms,
                       tuple(breakdown))
    if tag == "c":
        _check(len(fields) == 3, where, f"poll-closed record has {len(fields) - 1} fields, not 2")
        _, poll, closed_ms = fields
        _check(isinstance(poll, str) and _is_int(closed_ms), where,
               "poll-closed record has a field of the wrong type")
        return Closed(poll, closed_ms)
    if tag == "v":
        _check(len(fields) == 9, where, f"vote batch has {len(fields) - 1} fields, not 8")
        _, group, batch_seq, time_ms, groups, position, nodes, signature, key_id = fields
        _check(_is_int(group) and _is_int(batch_seq) and _is_int(time_ms)
               and isinstance(groups, list) and _is_int(position) and isinstance(nodes, list)
               and all(isinstance(node, bytes) for node in nodes)
               and isinstance(signature, bytes) and isinstance(key_id, str), where,
               "vote batch has a field of the wrong type")
        return Batch(group, batch_seq, time_ms, [_group(fields, where) for fields in groups],
                     position, nodes, signature, key_id)
    raise DataDamaged(f"{where}: unknown record tag {tag!r}")


def _group(fields, where: str) -> Group:
    _check(isinstance(fields, list) and len(fields) in (4, 6), where,
           "a vote group is not [shard, poll, voters, options] or [..., country_codes, "
           "countries]")
    shard, poll, voters, options, *country_fields = fields
    codes, countries = country_fields or ([], b"")
    _check(_is_int(shard) and shard >= 0 and isinstance(poll, str)
           and isinstance(voters, bytes) and isinstance(options, bytes)
           and isinstance(codes, list) and all(isinstance(code, str) for code in codes)
           and isinstance(countries, bytes), where, "a vote group has a field of the wrong type")
    _check(len(voters) % 4 == 0 and len(options) * 2 == len(voters), where,
           f"vote group of poll {poll!r} holds {len(voters)} voter bytes and {len(options)} "
           "option bytes (need 4 and 2 per vote)")
    _check(not countries or len(countries) * 2 == len(voters), where,
           f"vote group of poll {poll!r} holds {len(countries)} country bytes for "
           f"{len(voters) // 4} votes (need 2 per vote)")
    return Group(shard, poll, voters, options, tuple(codes), countries)


# Embedded segments -----------------------------------------------------------------------


class Frame(NamedTuple):
    offset: int
    next_offset: int
    payload: bytes


def segment_bases(wal_directory: Path) -> list[int]:
    bases = []
    for path in wal_directory.glob("*" + SEGMENT_SUFFIX):
        stem = path.name[: -len(SEGMENT_SUFFIX)]
        if len(stem) == SEGMENT_STEM_DIGITS and stem.isdigit():
            bases.append(int(stem))
    return sorted(bases)


def segment_path(wal_directory: Path, base: int) -> Path:
    return wal_directory / f"{base:0{SEGMENT_STEM_DIGITS}d}{SEGMENT_SUFFIX}"


def _frames(data, start: int) -> Iterator[tuple[int, int, bytes]]:
    """(position, next position, payload) of each valid frame from `start`; stops at the
    first frame that is short, out of bounds or fails its checksum."""
    position = start
    end = len(data)
    while position + HEADER_BYTES <= end:
        length, checksum = HEADER.unpack_from(data, position)
        payload_end = position + HEADER_BYTES + length
        if not 0 < length <= PAYLOAD_BYTES_MAX or payload_end > end:
            return
        payload = data[position + HEADER_BYTES:payload_end]
        if zlib.crc32(payload) != checksum:
            return
        yield position, payload_end, payload
        position = payload_end


def _torn(rest) -> bool:
    """Bytes after the last valid frame of the last segment that a crash mid-write explains."""
    if len(rest) < HEADER_BYTES:
        return True
    length, _ = HEADER.unpack_from(rest, 0)
    if 0 < length <= PAYLOAD_BYTES_MAX and HEADER_BYTES + length >= len(rest):
        return True
    return rest.count(0) == len(rest)


class SegmentReader:
    """Read-only view of one group's embedded log (see the module docstring).

    After `frames()` has run to the end, `end_offset` is the end of the last valid frame and
    `torn_tail` describes an ignored torn write (None when there was none)."""

    def __init__(self, wal_directory: Path) -> None:
        self.directory = Path(wal_directory)
        if not self.directory.is_dir():
            raise BadInput(f"no write-ahead log at {self.directory}")
        self.end_offset = 0
        self.torn_tail: str | None = None

    def frames(self, from_offset: int = 0, until_offset: int | None = None) -> Iterator[Frame]:
        """Every frame from `from_offset` (a record boundary) up to the end of the log, or
        up to the first frame at or beyond `until_offset`."""
        bases = segment_bases(self.directory)
        expected_base = bases[0] if bases else 0
        if bases and bases[0] != 0:
            raise DataDamaged(f"{self.directory}: the first segment starts at {bases[0]}, not 0")
        self.end_offset = expected_base
        for number, base in enumerate(bases):
            path = segment_path(self.directory, base)
            if base != expected_base:
                raise DataDamaged(f"{path}: segment starts at offset {base}, but the previous "
                                  f"one ends at {expected_base}")
            last = number == len(bases) - 1
            segment_end = yield from self._segment(path, base, last, from_offset, until_offset)
            if segment_end is None:  # reached until_offset
                return
            expected_base = segment_end
            self.end_offset = segment_end
        if from_offset > self.end_offset:
            raise BadInput(f"offset {from_offset} is beyond the end of the log ({self.end_offset})")

    def _segment(self, path: Path, base: int, last: bool, from_offset: int,
                 until_offset: int | None):
        """Yield the segment's frames from `from_offset`; return the segment's valid end, or
        None when a frame at or beyond `until_offset` was reached."""
        with open(path, "rb") as handle:
            size = _file_size(handle)
            if size == 0:
                return base
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                start = min(max(from_offset - base, 0), size)
                position = start
                for frame_position, next_position, payload in _frames(data, start):
                    if until_offset is not None and base + frame_position >= until_offset:
                        self.end_offset = base + frame_position
                        return None
                    yield Frame(base + frame_position, base + next_position, payload)
                    position = next_position
                if 0 < start == position < size and not (last and _torn(data[position:])):
                    raise BadInput(f"{path}: no valid record starts at offset {base + start}")
                return base + self._settle_tail(data, path, base, last, position)

    def _settle_tail(self, data, path: Path, base: int, last: bool, position: int) -> int:
        """Check what follows the last valid frame; return the segment's valid length."""
        if position == len(data):
            return position
        rest = data[position:]
        if last and _torn(rest):
            self.torn_tail = (f"{path}: torn last write of {len(rest)} bytes at offset "
                              f"{base + position} ignored (recovery cuts it)")
            return position
        raise DataDamaged(f"{path}: bad record at offset {base + position}"
                          + (" with more data after it" if last else " (not the last segment)"))

    def read_at(self, offset: int) -> bytes:
        """The payload of the record whose frame starts at `offset`."""
        bases = [base for base in segment_bases(self.directory) if base <= offset]
        if not bases:
            raise BadInput(f"no record at offset {offset} in {self.directory}")
        path = segment_path(self.directory, bases[-1])
        with open(path, "rb") as handle:
            handle.seek(offset - bases[-1])
            header = handle.read(HEADER_BYTES)
            if len(header) != HEADER_BYTES:
                raise BadInput(f"no record at offset {offset} in {self.directory}")
            length, checksum = HEADER.unpack(header)
            if not 0 < length <= PAYLOAD_BYTES_MAX:
                raise BadInput(f"{path}: no record starts at offset {offset}")
            payload = handle.read(length)
        if len(payload) != length or zlib.crc32(payload) != checksum:
            raise BadInput(f"{path}: no valid record starts at offset {offset}")
        return payload


def _file_size(handle) -> int:
    handle.seek(0, 2)
    size = handle.tell()
    handle.seek(0)
    return size
