"""Proves, on real files, the embedded log's contract (shards/segment_log.py): appends read back
byte for byte across several segments and after reopening; recovery cuts exactly a torn last
write and keeps every complete record; a damaged record anywhere else stops reading or
recovery with LogCorrupt naming the file, without touching the bytes; the LOCK fence keeps a
second open of the log, in another process too, from writing; a full disk makes an append
fail with WalUnavailable and leaves the file at its durable end, and the log works again once
space is freed; read_at returns the payload stored at an offset, and LogCorrupt for an offset
where no record starts.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.errors import LogCorrupt, WalUnavailable
from shards import segment_log
from shards.records import frame
from shards.segment_log import SegmentLog, segment_name

REPO_ROOT = Path(__file__).resolve().parents[2]
SEGMENT_BYTES_MAX = 65536


def payload(number: int, size_bytes: int = 3000) -> bytes:
    """A distinct payload per number, so a record read from the wrong place cannot match."""
    stem = f"record-{number:06d}|".encode()
    return (stem * (size_bytes // len(stem) + 1))[:size_bytes]


def open_log(directory: Path, segment_bytes_max: int = SEGMENT_BYTES_MAX) -> SegmentLog:
    log = SegmentLog(directory, segment_bytes_max)
    assert log.try_lock()
    log.recover()
    return log


def append_records(log: SegmentLog, payloads: list[bytes], per_append: int = 1) -> list[int]:
    """Append `per_append` framed payloads per write; return every payload's offset."""
    offsets = []
    for start in range(0, len(payloads), per_append):
        chunk = [frame(item) for item in payloads[start:start + per_append]]
        offset = log.append(b"".join(chunk))
        for framed in chunk:
            offsets.append(offset)
            offset += len(framed)
    return offsets


def read_all(log: SegmentLog, offset: int = 0) -> list[tuple[int, bytes]]:
    return [(position, bytes(data)) for position, _, data in log.read_from(offset)]


def segment_path(log: SegmentLog, base: int) -> Path:
    return log.directory / segment_name(base)


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "wal"


def test_appends_read_back_across_segments_and_after_reopening(log_dir: Path) -> None:
    log = open_log(log_dir)
    payloads = [payload(number, 2000 + 97 * (number % 30)) for number in range(90)]
    offsets = append_records(log, payloads, per_append=3)
    bases = log.segment_bases()
    assert len(bases) >= 4
    # Each segment is named after its first frame and never exceeds the size bound.
    assert set(bases) <= set(offsets) | {0}
    for base in bases:
        assert segment_path(log, base).stat().st_size <= SEGMENT_BYTES_MAX
    end_offset = log.end_offset
    assert end_offset == sum(len(frame(item)) for item in payloads)
    assert read_all(log) == list(zip(offsets, payloads))
    log.close()

    reopened = open_log(log_dir)
    assert reopened.end_offset == end_offset
    assert reopened.segment_bases() == bases
    assert read_all(reopened) == list(zip(offsets, payloads))
    middle = len(payloads) // 2
    assert read_all(reopened, offsets[middle]) == list(zip(offsets, payloads))[middle:]
    more = [payload(1000 + number) for number in range(5)]
    more_offsets = append_records(reopened, more)
    assert more_offsets[0] == end_offset
    assert read_all(reopened, end_offset) == list(zip(more_offsets, more))
    reopened.close()


def test_read_at_returns_the_payload_stored_at_an_offset(log_dir: Path) -> None:
    log = open_log(log_dir)
    payloads = [payload(number, 1500 + number * 37) for number in range(80)]
    offsets = append_records(log, payloads, per_append=2)
    assert len(log.segment_bases()) >= 2
    for offset, expected in zip(offsets, payloads):
        assert log.read_at(offset) == expected
    with pytest.raises(LogCorrupt):
        log.read_at(log.end_offset)
    log.close()


@pytest.mark.parametrize(
    "distance",
    [1, 9, 1000, -3],
    ids=["in-header", "payload-start", "mid-payload", "near-segment-end"],
)
def test_read_at_an_offset_that_is_no_record_start_is_log_corrupt(
    log_dir: Path, distance: int
) -> None:
    # `votes prove` and receipts pass offsets that may be wrong; the answer must be LogCorrupt.
    log = open_log(log_dir)
    offsets = append_records(log, [payload(1), payload(2)])
    offset = offsets[0] + distance if distance > 0 else log.end_offset + distance
    with pytest.raises(LogCorrupt):
        log.read_at(offset)
    log.close()


@pytest.mark.parametrize("torn_bytes", [1, 7, 8, 9, 2500, -1], ids=lambda n: f"torn-{n}")
def test_recovery_cuts_exactly_a_torn_last_write(log_dir: Path, torn_bytes: int) -> None:
    log = open_log(log_dir)
    payloads = [payload(number) for number in range(40)]
    offsets = append_records(log, payloads)
    durable_end = log.end_offset
    last_base = log.segment_bases()[-1]
    log.close()

    torn_frame = frame(payload(999))
    prefix = torn_frame[:torn_bytes]  # -1: everything but the last byte of the payload
    with open(segment_path(log, last_base), "ab") as handle:
        handle.write(prefix)
    assert segment_path(log, last_base).stat().st_size == durable_end - last_base + len(prefix)

    recovered = open_log(log_dir)
    assert recovered.end_offset == durable_end
    assert segment_path(log, last_base).stat().st_size == durable_end - last_base
    assert read_all(recovered) == list(zip(offsets, payloads))
    # The next append starts exactly where the torn one did.
    assert append_records(recovered, [payload(1000)]) == [durable_end]
    assert read_all(recovered, durable_end) == [(durable_end, payload(1000))]
    recovered.close()


def test_recovery_cuts_a_complete_frame_whose_checksum_fails_at_the_end(log_dir: Path) -> None:
    log = open_log(log_dir)
    offsets = append_records(log, [payload(number) for number in range(3)])
    last_offset = offsets[-1]
    log.close()
    flip_byte(segment_path(log, 0), last_offset + 100)

    recovered = open_log(log_dir)
    assert recovered.end_offset == last_offset
    assert segment_path(log, 0).stat().st_size == last_offset
    assert read_all(recovered) == list(zip(offsets[:2], [payload(0), payload(1)]))
    recovered.close()


@pytest.mark.parametrize("position_in_record", [2, 6, 500], ids=["length", "checksum", "payload"])
def test_a_damaged_record_in_an_earlier_segment_stops_reading(
    log_dir: Path, position_in_record: int
) -> None:
    log = open_log(log_dir)
    payloads = [payload(number) for number in range(60)]
    offsets = append_records(log, payloads)
    bases = log.segment_bases()
    assert len(bases) >= 3
    # The third record of the first segment: records before it still read back.
    damaged = offsets[2]
    path = segment_path(log, bases[0])
    size_before = path.stat().st_size
    flip_byte(path, damaged + position_in_record)

    read = []
    with pytest.raises(LogCorrupt) as caught:
        for position, _, data in log.read_from(0):
            read.append((position, bytes(data)))
    assert read == list(zip(offsets[:2], payloads[:2]))
    assert str(path) in caught.value.detail
    assert str(damaged) in caught.value.detail
    log.close()

    # Recovery only looks at the last segment; reading from the start still refuses.
    reopened = open_log(log_dir)
    assert reopened.end_offset == log.end_offset
    with pytest.raises(LogCorrupt):
        read_all(reopened)
    # Reading from past the damage works: only the damaged segment is refused.
    assert read_all(reopened, bases[1]) == [
        (offset, data) for offset, data in zip(offsets, payloads) if offset >= bases[1]
    ]
    assert path.stat().st_size == size_before
    reopened.close()


def test_damage_followed_by_more_than_one_write_is_corruption_not_a_torn_tail(
    log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(log_dir)
    payloads = [payload(number) for number in range(10)]
    offsets = append_records(log, payloads)
    assert log.segment_bases() == [0]
    log.close()
    monkeypatch.setattr(segment_log, "WRITE_BYTES_MAX", 4096)
    path = segment_path(log, 0)
    flip_byte(path, offsets[4] + 100)
    damaged_bytes = path.read_bytes()

    with pytest.raises(LogCorrupt) as caught:
        open_log(log_dir)
    assert str(path) in caught.value.detail
    assert str(offsets[4]) in caught.value.detail
    assert path.read_bytes() == damaged_bytes  # nothing was cut


def test_a_second_log_in_the_same_process_cannot_take_the_lock(log_dir: Path) -> None:
    owner = open_log(log_dir)
    intruder = SegmentLog(log_dir, SEGMENT_BYTES_MAX)
    assert not intruder.try_lock()
    owner.close()
    assert intruder.try_lock()
    intruder.close()


LOCK_PROBE = (
    "import sys; from pathlib import Path; from shards.segment_log import SegmentLog; "
    "print(SegmentLog(Path(sys.argv[1]), 65536).try_lock())"
)


def lock_in_another_process(directory: Path) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", LOCK_PROBE, str(directory)], cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


def test_another_process_cannot_take_the_lock_while_the_owner_lives(log_dir: Path) -> None:
    owner = open_log(log_dir)
    append_records(owner, [payload(1)])
    assert lock_in_another_process(log_dir) == "False"
    owner.close()
    assert lock_in_another_process(log_dir) == "True"


# Disk full -----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real file system that runs out of space."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    completed = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )
    if completed.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs to fill (needs root): {completed.stderr.strip()}")
    try:
        yield mount_point
    finally:
        # A failed test may leave a descriptor open there; detach lazily rather than leak a mount.
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def fill_disk(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for chunk_bytes in (65536, 4096, 1):
            while True:
                try:
                    handle.write(bytes(chunk_bytes))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    return filler


def segment_bytes_on_disk(log: SegmentLog) -> int:
    return sum(segment_path(log, base).stat().st_size for base in log.segment_bases())


@pytest.mark.parametrize("rolls_over", [False, True], ids=["same-segment", "new-segment"])
def test_a_full_disk_fails_the_append_cleanly_and_the_log_recovers(
    small_disk: Path, rolls_over: bool
) -> None:
    directory = small_disk / "wal"
    log = open_log(directory)
    acknowledged = [payload(number, 20_000) for number in range(2)]
    if rolls_over:
        acknowledged.append(payload(2, SEGMENT_BYTES_MAX - 2 * len(frame(acknowledged[0])) - 100))
    offsets = append_records(log, acknowledged)
    durable_end = log.end_offset
    filler = fill_disk(small_disk)

    with pytest.raises(WalUnavailable):
        log.append(frame(payload(100, 20_000)))
    assert log.end_offset == durable_end
    assert segment_bytes_on_disk(log) == durable_end
    # Still full: a retry fails the same way and leaves the same bytes.
    with pytest.raises(WalUnavailable):
        log.append(frame(payload(101, 20_000)))
    assert segment_bytes_on_disk(log) == durable_end

    filler.unlink()
    later = [payload(200, 10_000), payload(201, 500)]
    later_offsets = append_records(log, later)
    assert later_offsets[0] == durable_end
    assert len(log.segment_bases()) == (2 if rolls_over else 1)
    log.close()

    reopened = open_log(directory)
    assert read_all(reopened) == list(zip(offsets + later_offsets, acknowledged + later))
    assert segment_bytes_on_disk(reopened) == reopened.end_offset
    reopened.close()
    shutil.rmtree(directory)


def test_the_torn_tail_bound_is_one_write(log_dir: Path) -> None:
    # The recovery bound and the append bound are the same number, so any write a crash can
    # tear is cut, and an append larger than it is refused up front.
    log = open_log(log_dir)
    with pytest.raises(ValueError):
        log.append(bytes(segment_log.WRITE_BYTES_MAX + 1))
    assert log.end_offset == 0
    assert os.path.getsize(segment_path(log, 0)) == 0
    log.close()
