"""Proves that replay's own reader of the embedded log (replay/rawlog.py) finds the same
records at the same offsets as the engine's reader across several segments; that it treats
what recovery treats as a torn last write (a header cut short, a record running past the end
of the last segment, a tail of zeros) as ignorable and says so, and everything else (a bad
record with data after it, a bad record in an earlier segment, a gap between segments, a
payload that passes its checksum but is not a record, such as a vote group whose shard is not
an integer or one of log format 2 without its shard) as damage naming the file and offset;
that a format-3 vote batch decodes into its group and its vote groups' shards; and that
reading changes no byte on disk and leaves the log's lock free.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from pathlib import Path

import msgspec
import pytest

from engine.config import Config
from replay.errors import BadInput, DataDamaged
from replay.rawlog import SegmentReader, decode_raw, segment_bases, segment_path
from replay.recount import recount_shard
from shards.backends import group_directory
from shards.records import PollClosed, frame
from shards.segment_log import SegmentLog
from tests.support.records import group_batch, log_header, poll_created, vote_batch

SEGMENT_BYTES_MAX = 65536
SHARD = 0  # one shard in one fencing group: group 0's log is the shard's


def wal_dir(data_dir: Path) -> Path:
    return group_directory(data_dir, 0) / "wal"


def write_records(data_dir: Path, count: int) -> list[tuple[int, int]]:
    """The group's header, a poll and `count` vote batches of 500 voters (about 3 KB each),
    one append each; every record's (offset, next offset), the header's first."""
    from shards.records import frame_record

    log = SegmentLog(wal_dir(data_dir), SEGMENT_BYTES_MAX)
    assert log.try_lock()
    log.recover()
    positions = []
    try:
        records = [log_header(1, 1, 0), poll_created("a", ["x", "y"])] + [
            vote_batch(SHARD, seq, {"a": [(seq * 500 + voter, voter % 2) for voter in range(500)]},
                       group=0)
            for seq in range(count)]
        for record in records:
            framed = frame_record(record)
            offset = log.append(framed)
            positions.append((offset, offset + len(framed)))
    finally:
        log.close()
    return positions


def snapshot_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def read_all(directory: Path, from_offset: int = 0) -> tuple[list[tuple[int, int]], SegmentReader]:
    reader = SegmentReader(directory)
    return [(item.offset, item.next_offset) for item in reader.frames(from_offset)], reader


def test_same_records_as_the_engine_across_segments_and_nothing_written(tmp_path):
    positions = write_records(tmp_path, 60)
    directory = wal_dir(tmp_path)
    assert len(segment_bases(directory)) >= 3
    before = snapshot_bytes(directory)
    found, reader = read_all(directory)
    engine_log = SegmentLog(directory, SEGMENT_BYTES_MAX)
    engine_log.end_offset = positions[-1][1]
    assert found == positions == [(offset, next_offset) for offset, next_offset, _
                                  in engine_log.read_from(0)]
    assert reader.end_offset == positions[-1][1] and reader.torn_tail is None
    middle = positions[30][0]
    assert read_all(directory, middle)[0] == positions[30:]
    assert snapshot_bytes(directory) == before
    probe = SegmentLog(directory, SEGMENT_BYTES_MAX)
    assert probe.try_lock(), "reading must not hold the log's lock"
    probe.close()


@pytest.mark.parametrize("tail", [
    b"\x07\x00",  # a header cut short
    struct.pack("<II", 5000, 123) + b"partial payload",  # a record running past the end
    bytes(40),  # zeros
], ids=["short-header", "runs-past-end", "zeros"])
def test_torn_last_write_is_reported_and_ignored(tmp_path, tail):
    positions = write_records(tmp_path, 30)
    directory = wal_dir(tmp_path)
    last = segment_path(directory, segment_bases(directory)[-1])
    with open(last, "ab") as handle:
        handle.write(tail)
    found, reader = read_all(directory)
    assert found == positions
    assert reader.end_offset == positions[-1][1]
    assert f"at offset {positions[-1][1]}" in reader.torn_tail and str(last) in reader.torn_tail
    result = asyncio.run(recount_shard(Config(data_dir=str(tmp_path), shards=1).validate(), SHARD))
    assert result.polls["a"].counts == {"x": 7500, "y": 7500}
    assert result.torn_tail == reader.torn_tail


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def test_bad_record_with_data_after_it_is_damage_naming_file_and_offset(tmp_path):
    positions = write_records(tmp_path, 30)
    directory = wal_dir(tmp_path)
    base = segment_bases(directory)[-1]
    last = segment_path(directory, base)
    victim = next(offset for offset, _ in positions if offset > base)
    flip_byte(last, victim - base + 20)
    with pytest.raises(DataDamaged, match=f"{last}.*offset {victim} with more data after it"):
        read_all(directory)


def test_bad_record_in_an_earlier_segment_is_damage(tmp_path):
    positions = write_records(tmp_path, 30)
    directory = wal_dir(tmp_path)
    first = segment_path(directory, 0)
    victim = positions[3][0]
    flip_byte(first, victim + 20)
    with pytest.raises(DataDamaged, match=f"{first}.*offset {victim}.*not the last segment"):
        read_all(directory)


def test_gap_between_segments_is_damage(tmp_path):
    write_records(tmp_path, 30)
    directory = wal_dir(tmp_path)
    bases = segment_bases(directory)
    moved = segment_path(directory, bases[-1] + 8)
    segment_path(directory, bases[-1]).rename(moved)
    with pytest.raises(DataDamaged, match="starts at offset"):
        read_all(directory)


@pytest.mark.parametrize("garbage", [
    ["v", 0, "not an int", 0, [], 0, [], b"", ""],
    # A vote group whose shard is not an int (a vote group is [shard, poll, voters, options]).
    ["v", 0, 0, 0, [["0", "a", b"\x01\x00\x00\x00", b"\x00\x00"]], 0, [], b"", ""],
    ["v", 0, 0, 0, [[None, "a", b"\x01\x00\x00\x00", b"\x00\x00"]], 0, [], b"", ""],
    ["v", 0, 0, 0, [[True, "a", b"\x01\x00\x00\x00", b"\x00\x00"]], 0, [], b"", ""],
], ids=["batch-field", "shard-text", "shard-none", "shard-bool"])
def test_valid_frame_that_is_not_a_record_is_damage(tmp_path, garbage):
    positions = write_records(tmp_path, 2)
    directory = wal_dir(tmp_path)
    with open(segment_path(directory, 0), "ab") as handle:
        handle.write(frame(msgspec.msgpack.encode(garbage)))
    with pytest.raises(DataDamaged, match=f"offset {positions[-1][1]}.*wrong type"):
        asyncio.run(recount_shard(Config(data_dir=str(tmp_path), shards=1).validate(), SHARD))


@pytest.mark.parametrize("old_group", [
    ["a", b"\x01\x00\x00\x00", b"\x00\x00"],
    ["a", b"\x01\x00\x00\x00", b"\x00\x00", ["FR"], b"\x00\x00"],
], ids=["plain", "with-countries"])
def test_a_format_2_vote_group_without_its_shard_is_damage(old_group):
    """A vote group of the release before (no shard first) is refused, never misread."""
    payload = msgspec.msgpack.encode(["v", 0, 0, 0, [old_group], 0, [], b"", ""])
    with pytest.raises(DataDamaged, match="not \\[shard, poll, voters, options\\]"):
        decode_raw(payload, "here")


def test_decoding_into_lists_follows_the_struct_field_order():
    from shards.records import encode_record

    created = decode_raw(encode_record(poll_created("a", ["x"])), "here")
    assert (created.poll, created.options, created.embargo) == ("a", ["x"], False)
    closed = decode_raw(encode_record(PollClosed(poll="a", closed_ms=7)), "here")
    assert (closed.poll, closed.closed_ms) == ("a", 7)
    batch = decode_raw(encode_record(group_batch(1, 9, {5: {"a": [(5, 1)]}, 9: {"b": [(6, 0)]}},
                                                 key_id="k")), "here")
    assert (batch.group, batch.batch_seq, batch.key_id, batch.vote_count) == (1, 9, "k", 2)
    assert [(group.shard, group.poll) for group in batch.groups] == [(5, "a"), (9, "b")]
    assert batch.shards == [5, 9]
    assert batch.groups[0].voters == struct.pack("<I", 5)
    header = decode_raw(encode_record(log_header(32, 4, 3)), "here")
    assert tuple(header) == (3, 32, 4, 3)


def test_read_at_needs_a_record_boundary(tmp_path):
    positions = write_records(tmp_path, 3)
    reader = SegmentReader(wal_dir(tmp_path))
    offset, next_offset = positions[2]
    payload = reader.read_at(offset)
    assert len(payload) == next_offset - offset - 8
    assert zlib.crc32(payload) == struct.unpack_from("<I", segment_path(
        wal_dir(tmp_path), 0).read_bytes(), offset + 4)[0]
    with pytest.raises(BadInput):
        reader.read_at(offset + 1)
    with pytest.raises(BadInput, match="no valid record starts"):
        list(reader.frames(offset + 1))
