"""The embedded write-ahead log: append-only, checksummed segments per fencing group, fsync'd.

Layout: `<group dir>/wal/<20-digit base offset>.log`, plus `<group dir>/wal/LOCK` (the group
dir is `DATA/groups/group-<gggg>`, shards/backends.py). Offsets are byte positions in the
group's whole log, so a segment's name is the offset of its first
frame. Frames are `records.frame(...)`.

Rules a caller can rely on:
- Fencing: the owner holds an exclusive flock on LOCK for as long as it lives; a second
  process cannot open the log for writing (`try_lock` returns False).
- `append` returns only after the bytes are written and fsync'd. On any failure it truncates
  the segment back to the last durable offset and fsyncs before raising `WalUnavailable`
  (nothing of that append is in the log). If even that fails it raises `OutcomeUnknown`
  and refuses further appends until a later truncation succeeds.
- Recovery cuts a torn last record only: at the end of the last segment, a header cut
  short, a record whose declared length runs to or past the end of the file, or a tail of
  zeros. A bad record with more data after it is corruption: `LogCorrupt` names the file
  and offset, and the shard does not start.
- A new segment is created (and the directory fsync'd) when the active one would exceed
  `segment_bytes_max`.
"""

from __future__ import annotations

import fcntl
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from engine import failpoints
from engine.errors import InvariantViolation, LogCorrupt, OutcomeUnknown, WalUnavailable
from shards.records import FRAME_HEADER, FRAME_HEADER_BYTES, RECORD_BYTES_MAX

SEGMENT_SUFFIX = ".log"
# One group commit writes at most this much to one group's log.
WRITE_BYTES_MAX = 32 * 1024 * 1024
# The segments' fsync: os.fsync itself unless a test switched it off (engine/failpoints.py,
# `segment-log-skip-fsync`) to show that the power-loss test catches a missing fsync.
_fsync_segment = failpoints.skipped_if_on("segment-log-skip-fsync", os.fsync)


def segment_name(base_offset: int) -> str:
    return f"{base_offset:020d}{SEGMENT_SUFFIX}"


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def scan_frames(data: bytes | memoryview, start: int = 0) -> Iterator[tuple[int, int, memoryview]]:
    """Yield (position, next position, payload) for each valid frame from `start`; stop at the
    first frame that is incomplete or fails its checksum (the caller decides what that means)."""
    view = memoryview(data)
    position = start
    end = len(view)
    while position + FRAME_HEADER_BYTES <= end:
        length, checksum = FRAME_HEADER.unpack_from(view, position)
        payload_start = position + FRAME_HEADER_BYTES
        payload_end = payload_start + length
        # A zero length is never written (every record encodes to some bytes), and a header of
        # zeros would otherwise pass its checksum.
        if length == 0 or length > RECORD_BYTES_MAX or payload_end > end:
            return
        payload = view[payload_start:payload_end]
        if zlib.crc32(payload) != checksum:
            return
        yield position, payload_end, payload
        position = payload_end


def _is_torn_tail(rest: memoryview) -> bool:
    """True when the bytes after the last valid frame can only be the last write torn by a
    crash: too short for a header, a record running to or past the end, or zeros."""
    if len(rest) < FRAME_HEADER_BYTES:
        return True
    length, _ = FRAME_HEADER.unpack_from(rest, 0)
    if 0 < length <= RECORD_BYTES_MAX and FRAME_HEADER_BYTES + length >= len(rest):
        return True
    return not any(rest)


class SegmentLog:
    durability = "embedded-fsync"

    def __init__(self, directory: Path, segment_bytes_max: int) -> None:
        self.directory = Path(directory)
        self._directory_text = str(self.directory)
        self.segment_bytes_max = segment_bytes_max
        self.end_offset = 0  # durable end: the offset the next append starts at
        self._lock_descriptor: int | None = None
        self._active_base = 0
        self._active_descriptor: int | None = None
        self._needs_truncate = False

    # Ownership ---------------------------------------------------------------------------

    def try_lock(self) -> bool:
        """Take the fence without blocking; True when this process now owns the log."""
        self.directory.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return False
        self._lock_descriptor = descriptor
        return True

    def close(self) -> None:
        for name in ("_active_descriptor", "_lock_descriptor"):
            descriptor = getattr(self, name)
            if descriptor is not None:
                os.close(descriptor)
                setattr(self, name, None)

    # Recovery ----------------------------------------------------------------------------

    def segment_bases(self) -> list[int]:
        bases = []
        for path in self.directory.glob("*" + SEGMENT_SUFFIX):
            stem = path.name[: -len(SEGMENT_SUFFIX)]
            if stem.isdigit():
                bases.append(int(stem))
        return sorted(bases)

    def recover(self) -> int:
        """Find the durable end, cutting a torn tail of the last segment; open it for appends."""
        bases = self.segment_bases() or [0]
        last_base = bases[-1]
        path = self.directory / segment_name(last_base)
        data = path.read_bytes() if path.exists() else b""
        valid_end = 0
        for _, next_position, _ in scan_frames(data):
            valid_end = next_position
        if valid_end < len(data):
            if not _is_torn_tail(memoryview(data)[valid_end:]):
                raise LogCorrupt(
                    f"{path}: bad record at offset {last_base + valid_end} with more data after "
                    "it: only a torn last record may be cut"
                )
            with open(path, "r+b") as handle:
                handle.truncate(valid_end)
                handle.flush()
                _fsync_segment(handle.fileno())
        self._open_active(last_base)
        self.end_offset = last_base + valid_end
        return self.end_offset

    def _open_active(self, base: int) -> None:
        path = self.directory / segment_name(base)
        created = not path.exists()
        # Open the new segment before closing the old one, so a failure leaves a usable fd.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if self._active_descriptor is not None:
            os.close(self._active_descriptor)
        self._active_descriptor = descriptor
        self._active_base = base
        if created:
            _fsync_segment(self._active_descriptor)
            fsync_directory(self.directory)

    # Reading -----------------------------------------------------------------------------

    def read_from(self, offset: int) -> Iterator[tuple[int, int, memoryview]]:
        """Yield (offset, next offset, payload) for every record from `offset` to the durable
        end. A record that does not check out before the end is corruption."""
        bases = self.segment_bases()
        for position, base in enumerate(bases):
            segment_end = bases[position + 1] if position + 1 < len(bases) else self.end_offset
            if segment_end <= offset:
                continue
            path = self.directory / segment_name(base)
            data = path.read_bytes()[: segment_end - base]
            cursor = max(offset, base) - base
            for frame_position, next_position, payload in scan_frames(data, cursor):
                yield base + frame_position, base + next_position, payload
                cursor = next_position
            if base + cursor != segment_end:
                raise LogCorrupt(f"{path}: bad record at offset {base + cursor}")

    def read_at(self, offset: int) -> bytes:
        """The payload of the record at `offset` (receipts for repeat votes, `prove`).

        A record of the active segment (a repeat vote's, mostly: repeats follow their vote
        closely) is read without listing the directory: the glob was a third of a 409's
        cost. `_active_base` is read once: if an append rolls to a new segment meanwhile,
        the old one, which holds the record, stays where it is."""
        if offset >= self.end_offset:
            raise LogCorrupt(f"no record at offset {offset} in {self.directory}")
        base = self._active_base
        if offset < base or base == 0 and self._active_descriptor is None:
            bases = [base for base in self.segment_bases() if base <= offset]
            if not bases:
                raise LogCorrupt(f"no record at offset {offset} in {self.directory}")
            base = bases[-1]
        path = os.path.join(self._directory_text, segment_name(base))  # not pathlib: per 409
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise LogCorrupt(f"no record at offset {offset} in {self.directory}") from None
        try:
            header = os.pread(descriptor, FRAME_HEADER_BYTES, offset - base)
            if len(header) != FRAME_HEADER_BYTES:
                raise LogCorrupt(f"{path}: no record at offset {offset}")
            length, checksum = FRAME_HEADER.unpack(header)
            payload = os.pread(descriptor, min(length, RECORD_BYTES_MAX),
                               offset - base + FRAME_HEADER_BYTES)
        finally:
            os.close(descriptor)
        if len(payload) != length or zlib.crc32(payload) != checksum:
            raise LogCorrupt(f"{path}: bad record at offset {offset}")
        return payload

    # Appending ---------------------------------------------------------------------------

    def append(self, data: bytes) -> int:
        """Write framed records and fsync; return the offset of the first. Blocking: run it
        off the event loop. See the module docstring for the failure contract."""
        if len(data) > WRITE_BYTES_MAX:
            raise ValueError(f"append of {len(data)} bytes exceeds {WRITE_BYTES_MAX}")
        if self._needs_truncate:
            try:
                self._truncate_to_durable()
            except OSError as exc:
                raise WalUnavailable(f"log still not truncated after a failed append: {exc}") from exc
        start = self.end_offset
        try:
            segment_used = start - self._active_base
            if segment_used > 0 and segment_used + len(data) > self.segment_bytes_max:
                self._open_active(start)
            _fsync_segment(self._write_all(data))
        except OSError as exc:
            try:
                self._truncate_to_durable()
            except OSError as truncate_exc:
                self._needs_truncate = True
                raise OutcomeUnknown(f"append failed ({exc}) and truncation failed ({truncate_exc})") from exc
            raise WalUnavailable(f"append failed and was rolled back: {exc}") from exc
        self.end_offset = start + len(data)
        return start

    def _write_all(self, data: bytes) -> int:
        """Write all of `data` to the active segment; its descriptor, to fsync."""
        descriptor = self._active()
        view = memoryview(data)
        while view:
            written = os.write(descriptor, view)
            view = view[written:]
        return descriptor

    def _active(self) -> int:
        if self._active_descriptor is None:
            raise InvariantViolation(f"{self.directory}: no active segment is open")
        return self._active_descriptor

    def _truncate_to_durable(self) -> None:
        if self._active_descriptor is None or self._active_base > self.end_offset:
            # Failed while creating a segment past the durable end: reopen the old one.
            bases = [base for base in self.segment_bases() if base <= self.end_offset]
            self._open_active(bases[-1] if bases else 0)
        descriptor = self._active()
        os.ftruncate(descriptor, self.end_offset - self._active_base)
        _fsync_segment(descriptor)
        self._needs_truncate = False
