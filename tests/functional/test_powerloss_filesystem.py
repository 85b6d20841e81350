"""The power-loss filesystem itself (tests/support/powerloss): what a cut keeps and drops.

Written-but-unsynced data is gone after a cut, fsynced data stays, a torn write keeps a
prefix of itself, a process reads its own unsynced writes, faults fail exactly the calls they
were armed for, and the pending-bytes bound refuses writes with ENOSPC.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.powerloss import PowerLossFilesystem, mounted
from tests.support.powerloss.pending import PendingFile


@pytest.fixture
def power_loss(tmp_path: Path) -> Iterator[PowerLossFilesystem]:
    with mounted(tmp_path / "powerloss") as disk:
        yield disk


def append_file(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def test_unsynced_writes_are_gone_after_a_cut_and_fsynced_ones_stay(power_loss) -> None:
    path = power_loss.mount_point / "log"
    descriptor = append_file(path)
    try:
        os.write(descriptor, b"durable;")
        os.fsync(descriptor)
        os.write(descriptor, b"lost")
        assert path.read_bytes() == b"durable;lost"  # the writer sees its own writes
        assert os.stat(path).st_size == 12
        assert (power_loss.backing / "log").read_bytes() == b"durable;"
        assert power_loss.stats()["pending_bytes"] == 4
        cut = power_loss.cut()
        assert (cut["dropped_bytes"], cut["torn"]) == (4, None)
        assert path.read_bytes() == b"durable;"
        assert os.stat(path).st_size == 8
        with open(path, "rb") as reader, \
                mmap.mmap(reader.fileno(), 0, access=mmap.ACCESS_READ) as data:
            assert bytes(data) == b"durable;"  # no page of the lost bytes is left in the cache
        # Appends go on from the durable end, not from where the lost bytes ended.
        os.write(descriptor, b"next")
        os.fdatasync(descriptor)
    finally:
        os.close(descriptor)
    assert path.read_bytes() == b"durable;next"
    assert power_loss.stats()["pending_bytes"] == 0


def test_a_torn_cut_keeps_a_prefix_of_the_last_write_only(power_loss) -> None:
    other = power_loss.mount_point / "other"
    other.write_bytes(b"never synced")
    path = power_loss.mount_point / "log"
    descriptor = append_file(path)
    try:
        os.write(descriptor, b"A" * 10)
        os.fsync(descriptor)
        os.write(descriptor, b"B" * 5)
        os.write(descriptor, b"C" * 100)
        cut = power_loss.cut(tear=True, seed=7)
    finally:
        os.close(descriptor)
    kept = cut["torn"]["kept_bytes"]
    assert cut["torn"]["of_bytes"] == 100 and 1 <= kept <= 99
    # The earlier unsynced write of the torn file may reach the disk; the torn one only in part.
    assert path.read_bytes() == b"A" * 10 + b"B" * 5 + b"C" * kept
    assert other.read_bytes() == b""  # created (metadata is kept), its data dropped


def test_truncates_are_pending_too_and_reads_see_them(power_loss) -> None:
    path = power_loss.mount_point / "file"
    with open(path, "wb") as handle:
        handle.write(b"0123456789")
        handle.flush()
        os.fsync(handle.fileno())
        handle.truncate(4)
        handle.seek(6)
        handle.write(b"xy")
        handle.flush()
        assert path.read_bytes() == b"0123\0\0xy"
        power_loss.cut()
    assert path.read_bytes() == b"0123456789"


def test_faults_fail_the_armed_calls_only(power_loss) -> None:
    path = power_loss.mount_point / "file"
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, b"data")
        power_loss.fail_fsync(1, path_contains="/elsewhere/")
        os.fsync(descriptor)  # armed for other files only
        power_loss.heal()
        power_loss.fail_fsync(2, path_contains="/file")
        for _ in range(2):
            with pytest.raises(OSError) as failed:
                os.fsync(descriptor)
            assert failed.value.errno == errno.EIO
        os.fsync(descriptor)  # the data stayed pending and is durable now
        assert (power_loss.backing / "file").read_bytes() == b"data"
        power_loss.fail_write(1, "ENOSPC")
        with pytest.raises(OSError) as failed:
            os.write(descriptor, b"more")
        assert failed.value.errno == errno.ENOSPC
        power_loss.fail_write(1, "EIO")
        with pytest.raises(OSError) as failed:
            os.write(descriptor, b"more")
        assert failed.value.errno == errno.EIO
        power_loss.fail_truncate(1)
        with pytest.raises(OSError) as failed:
            os.ftruncate(descriptor, 1)
        assert failed.value.errno == errno.EIO
        os.ftruncate(descriptor, 2)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    assert path.read_bytes() == b"da"
    stats = power_loss.stats()
    assert (stats["fsyncs_failed"], stats["writes_failed"], stats["truncates_failed"]) == (2, 2, 1)


def test_pending_bytes_are_bounded(tmp_path: Path) -> None:
    with mounted(tmp_path, pending_bytes_max=1000) as disk:
        descriptor = os.open(disk.mount_point / "file", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, b"x" * 800)
            with pytest.raises(OSError) as failed:
                os.write(descriptor, b"y" * 300)
            assert failed.value.errno == errno.ENOSPC
            os.fsync(descriptor)  # the bound is on what is pending, not on the file
            os.write(descriptor, b"y" * 300)
        finally:
            os.close(descriptor)
        assert disk.stats()["writes_refused_full"] == 1
        assert "refused (ENOSPC)" in disk.log_tail()


def test_pending_file_reads_overlay_writes_and_truncates_in_order() -> None:
    backing = b"abcdefgh"
    pending = PendingFile(len(backing))
    pending.write(6, b"XYZ")
    pending.truncate(3)
    pending.write(5, b"Q")

    def read(offset: int, length: int) -> bytes:
        return backing[offset:offset + length]

    assert pending.size == 6
    assert pending.read(read, 0, 100) == b"abc\0\0Q"
    assert pending.read(read, 2, 2) == b"c\0"


def test_with_the_power_off_nothing_changes_until_power_on(power_loss) -> None:
    path = power_loss.mount_point / "log"
    descriptor = append_file(path)
    try:
        os.write(descriptor, b"lost")
        power_loss.cut(power_off=True)
        for change in (lambda: os.write(descriptor, b"late"), lambda: os.fsync(descriptor),
                       lambda: os.ftruncate(descriptor, 0),
                       lambda: (power_loss.mount_point / "new").write_bytes(b"")):
            with pytest.raises(OSError) as failed:
                change()
            assert failed.value.errno == errno.EIO
        assert path.read_bytes() == b""  # reads still work
        power_loss.power_on()
        os.write(descriptor, b"back")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    assert (power_loss.backing / "log").read_bytes() == b"back"
