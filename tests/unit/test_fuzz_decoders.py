"""Fuzzing of the decoders that read what a client or a disk hands the engine.

- The vote and poll bodies (engine/app.py `_decode`, `poll_record`): any bytes, and JSON of
  any shape, raise only BadRequest (answered 400), with a detail that is fixed text.
- WAL records (shards/records.py decode_record): any bytes, and records with fields of any
  msgpack type, raise only msgspec.DecodeError (ValidationError is one): what replay and
  recovery catch as a damaged record.
- WAL frames (shards/segment_log.py): scan_frames never raises on any bytes and yields only
  frames whose checksum holds; SegmentLog.recover over a segment of any bytes either cuts a
  torn tail or raises LogCorrupt, nothing else.
- Snapshots (shards/snapshots.py thaw): any bytes, and encoded ShardSnapshots with fields of
  any value, raise only msgspec.DecodeError or ValueError: what load_newest catches before
  it tries an older snapshot.
- Locator run files (shards/run_files.py): a run file of any bytes, or a valid one mutated,
  is skipped by load_runs (None from its header check) or read by read_all, which raises
  only LogCorrupt.
"""

from __future__ import annotations

import tempfile
import zlib
from pathlib import Path

import msgspec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.app import (
    POLL_BODY_EXPECTED,
    VOTE_BODY_EXPECTED,
    _decode,
    _poll_decoder,
    _vote_decoder,
    poll_record,
)
from engine.errors import BadRequest, LogCorrupt
from shards import run_files
from shards.records import FRAME_HEADER, decode_record, frame, frame_record
from shards.segment_log import SegmentLog, scan_frames, segment_name
from shards.snapshots import thaw

EXAMPLES = 300
SEGMENT_BYTES_MAX = 1 << 20

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30)),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)
msgpack_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
              st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=24)),
    lambda children: st.lists(children, max_size=5), max_leaves=16)


# --- the vote and poll bodies -------------------------------------------------------------

poll_bodies = st.fixed_dictionaries({}, optional={
    "id": st.one_of(st.text(max_size=70), json_values),
    "options": st.one_of(st.lists(st.text(max_size=70), max_size=70), json_values),
    "opens_at": st.one_of(st.datetimes().map(str), st.text(max_size=30), json_values),
    "closes_at": st.one_of(st.datetimes().map(lambda moment: moment.isoformat() + "Z"),
                           json_values),
    "embargo": json_values,
    "extra": json_values,
})


@settings(max_examples=EXAMPLES, deadline=None)
@given(body=st.one_of(st.binary(max_size=300),
                      json_values.map(lambda value: msgspec.json.encode(value)),
                      st.fixed_dictionaries({"option": json_values}).map(msgspec.json.encode)))
def test_vote_bodies_raise_only_bad_request(body: bytes) -> None:
    try:
        vote = _decode(_vote_decoder, body, VOTE_BODY_EXPECTED)
    except BadRequest as exc:
        assert exc.detail == VOTE_BODY_EXPECTED
        return
    assert isinstance(vote.option, str)


@settings(max_examples=EXAMPLES, deadline=None)
@given(body=st.one_of(st.binary(max_size=300), poll_bodies.map(msgspec.json.encode)))
def test_poll_bodies_raise_only_bad_request(body: bytes) -> None:
    try:
        record = poll_record(_decode(_poll_decoder, body, POLL_BODY_EXPECTED))
    except BadRequest:
        return
    assert 1 <= len(record.options) <= 64


# --- WAL records and frames -----------------------------------------------------------------

record_like = st.one_of(
    st.binary(max_size=300),
    st.lists(msgpack_values, max_size=9).map(msgspec.msgpack.encode),
    st.tuples(st.sampled_from(["h", "p", "c", "v", "x"]), st.lists(msgpack_values, max_size=9))
    .map(lambda tagged: msgspec.msgpack.encode([tagged[0], *tagged[1]])),
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(payload=record_like)
@example(payload=b"\x91\xa2\x00\x80")  # a string of invalid UTF-8: msgspec raised UnicodeDecodeError
def test_records_raise_only_decode_errors(payload: bytes) -> None:
    try:
        decode_record(payload)
    except msgspec.DecodeError:
        pass


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.one_of(st.binary(max_size=600),
                      st.lists(record_like, max_size=4).map(
                          lambda payloads: b"".join(frame(payload) for payload in payloads if payload))
                      .flatmap(lambda framed: st.tuples(st.just(framed), st.binary(max_size=40))
                               .map(lambda parts: parts[0] + parts[1]))))
def test_scan_frames_never_raises_and_yields_only_checked_frames(data: bytes) -> None:
    position = 0
    for start, next_position, payload in scan_frames(data):
        assert start == position and next_position > start
        length, checksum = FRAME_HEADER.unpack_from(data, start)
        assert length == len(payload) and zlib.crc32(payload) == checksum
        position = next_position


@settings(max_examples=100, deadline=None)
@given(good=st.lists(st.binary(min_size=1, max_size=60), max_size=3), tail=st.binary(max_size=80))
def test_recovery_of_any_segment_cuts_a_torn_tail_or_raises_log_corrupt(good, tail) -> None:
    prefix = b"".join(frame_record_bytes(payload) for payload in good)
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / segment_name(0)).write_bytes(prefix + tail)
        log = SegmentLog(Path(directory), SEGMENT_BYTES_MAX)
        try:
            end = log.recover()
        except LogCorrupt:
            return
        finally:
            log.close()
        assert len(prefix) <= end <= len(prefix) + len(tail)
        assert (Path(directory) / segment_name(0)).stat().st_size == end


def frame_record_bytes(payload: bytes) -> bytes:
    return frame(payload)


# --- snapshots --------------------------------------------------------------------------------

definitions = st.tuples(st.text(max_size=10), st.lists(st.text(max_size=5), max_size=4),
                        msgpack_values, msgpack_values, msgpack_values, msgpack_values)
poll_snapshots = st.tuples(
    st.one_of(definitions.map(lambda fields: ["p", *fields]), msgpack_values),
    st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), msgpack_values),
    st.binary(max_size=40),
    st.lists(st.integers(-(2**63), 2**64 - 1), max_size=5),
    st.integers(-(2**63), 2**64 - 1),
    st.binary(max_size=36), st.binary(max_size=72),
    st.lists(st.tuples(st.integers(-5, 2**64 - 1), st.integers(-5, 2**64 - 1),
                       st.integers(-5, 2**64 - 1), st.binary(max_size=12),
                       st.binary(max_size=24)), max_size=2),
).map(list)
shard_snapshots = st.tuples(
    st.integers(-(2**63), 2**64 - 1), st.integers(-(2**63), 2**64 - 1),
    st.integers(-(2**63), 2**64 - 1), st.integers(-(2**63), 2**64 - 1),
    st.integers(-(2**63), 2**64 - 1), st.lists(poll_snapshots, max_size=2),
    st.integers(-(2**63), 2**64 - 1),
).map(list)


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.one_of(st.binary(max_size=300), shard_snapshots.map(msgspec.msgpack.encode),
                      st.lists(msgpack_values, max_size=8).map(msgspec.msgpack.encode)))
def test_snapshots_raise_only_decode_or_value_errors(data: bytes) -> None:
    try:
        thaw(data)
    except (msgspec.DecodeError, ValueError):
        pass


# --- locator run files --------------------------------------------------------------------------

def valid_run_bytes(directory: Path, entries: int) -> bytes:
    voters = b"".join(voter.to_bytes(4, "little") for voter in range(entries))
    values = b"".join((voter * 7).to_bytes(8, "little") for voter in range(entries))
    path, _fences = run_files.write_run(directory, 1, 0, 100, voters, values)
    data = path.read_bytes()
    path.unlink()
    return data


@settings(max_examples=150, deadline=None)
@given(data=st.data(), entries=st.integers(0, 3))
def test_run_files_of_any_bytes_are_skipped_or_raise_log_corrupt(data, entries) -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        valid = valid_run_bytes(directory, entries)
        position = data.draw(st.integers(0, max(len(valid) - 1, 0)))
        content = data.draw(st.one_of(
            st.binary(max_size=200),
            st.builds(lambda value: valid[:position] + bytes([value]) + valid[position + 1:],
                      st.integers(0, 255)),
            st.just(valid[:position]),
            # a header claiming any entry count, its checksum right, so the count is believed
            st.integers(0, 2**64 - 1).map(lambda count: forged_header(count)),
        ))
        (directory / "run-00000001-00000000000000000000-00000000000000000100.bin") \
            .write_bytes(content)
        for run in run_files.load_runs(directory):
            blocks = len(run.fences)
            try:
                run_files.read_all(run.path, run.entries, blocks)
            except LogCorrupt:
                pass


def forged_header(entries: int) -> bytes:
    head = run_files._HEADER.pack(run_files._MAGIC, 0, 100, entries, run_files.RUN_BLOCK_ENTRIES)
    return head + run_files._CRC.pack(zlib.crc32(head))


def test_a_valid_record_and_frame_still_decode() -> None:
    """The fuzzed decoders still take what the engine writes (the tests above would pass
    with a decoder that refused everything)."""
    from shards.records import PollClosed

    record = PollClosed(poll="p", closed_ms=5)
    [(_start, _next, payload)] = list(scan_frames(frame_record(record)))
    assert decode_record(payload) == record
