"""Locator run files (shards/locator_runs.py): immutable, sorted by voter, checksummed per block.

Layout: a header (magic, offset_first, offset_next, entries, block_entries), one uint32
fence (the block's first voter) per block and the CRC-32 of header and fences; then the
blocks, each RUN_BLOCK_ENTRIES voters (uint32), their values (uint64) and their CRC-32.
A file is written to a temporary name, fsynced and renamed, so a file that exists under its
name is whole; a block that fails its checksum raises LogCorrupt naming the file.
"""

from __future__ import annotations

import array
import ctypes
import logging
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from engine.errors import LogCorrupt
from shards.segment_log import fsync_directory

log = logging.getLogger("votes.locator")

RUN_BLOCK_ENTRIES = 1024  # entries per block: one pread of 12 KiB per lookup in a run

_MAGIC = b"VLRUN001"
# magic, offset_first, offset_next, entries, block_entries: then one uint32 fence per block
# and the CRC-32 of header and fences; then the blocks, each its voters (uint32), values
# (uint64) and their CRC-32.
_HEADER = struct.Struct("<8sQQQI")
_CRC = struct.Struct("<I")


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to release this way


_malloc_trim = _load_malloc_trim()


def release_free_heap() -> None:
    """Give the process's free heap pages back to the system (glibc's malloc_trim).

    Sealing and merging runs leaves free chunks all over the heap, between long-lived
    allocations (bitmap containers, open runs) that pin them: measured with
    perf/bench_memory.py, RSS grew by 20+ bits per eligible voter of which under 4 were live
    data. Called after each merge and run write, on their threads (~1 ms), not on the loop."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _run_name(seq: int, offset_first: int, offset_next: int) -> str:
    return f"run-{seq:08d}-{offset_first:020d}-{offset_next:020d}.bin"


def _block_count(entries: int) -> int:
    return (entries + RUN_BLOCK_ENTRIES - 1) // RUN_BLOCK_ENTRIES


def _data_start(blocks: int) -> int:
    return _HEADER.size + 4 * blocks + _CRC.size


def write_run(directory: Path, seq: int, offset_first: int, offset_next: int,
               voters_bytes: bytes | memoryview, values_bytes: bytes | memoryview) -> tuple[Path, array.array[int]]:
    """Write a sorted run durably (temporary file, fsync, rename, fsync the directory), block
    by block: a merge's output is not copied whole once more on its way out."""
    voters = memoryview(voters_bytes).cast("I")
    values = memoryview(values_bytes).cast("Q")
    entries = len(voters)
    fences = array.array("I", voters[::RUN_BLOCK_ENTRIES])
    head = _HEADER.pack(_MAGIC, offset_first, offset_next, entries, RUN_BLOCK_ENTRIES) + fences.tobytes()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _run_name(seq, offset_first, offset_next)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(head)
        handle.write(_CRC.pack(zlib.crc32(head)))
        for start in range(0, entries, RUN_BLOCK_ENTRIES):
            block_voters = voters[start:start + RUN_BLOCK_ENTRIES].cast("B")
            block_values = values[start:start + RUN_BLOCK_ENTRIES].cast("B")
            handle.write(block_voters)
            handle.write(block_values)
            handle.write(_CRC.pack(zlib.crc32(block_values, zlib.crc32(block_voters))))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_directory(directory)
    release_free_heap()
    return path, fences


def read_block(path: Path, entries: int, blocks: int, block: int) -> tuple[array.array[int], array.array[int]]:
    count = min(RUN_BLOCK_ENTRIES, entries - block * RUN_BLOCK_ENTRIES)
    position = _data_start(blocks) + block * (12 * RUN_BLOCK_ENTRIES + _CRC.size)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, 12 * count + _CRC.size, position)
        finally:
            os.close(fd)
    except OSError as exc:
        raise LogCorrupt(f"locator run {path} unreadable: {exc}") from exc
    body = data[:12 * count]
    if len(data) != 12 * count + _CRC.size or _CRC.unpack_from(data, 12 * count)[0] != zlib.crc32(body):
        raise LogCorrupt(f"locator run {path}: block {block} fails its checksum")
    return array.array("I", body[:4 * count]), array.array("Q", body[4 * count:])


def read_all(path: Path, entries: int, blocks: int) -> tuple[bytes, bytes]:
    """Every entry of a run file, each block's checksum checked (merges read runs whole)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise LogCorrupt(f"locator run {path} unreadable: {exc}") from exc
    try:
        return read_all_fd(fd, path, entries, blocks)
    finally:
        os.close(fd)


def read_all_fd(fd: int, path: Path | None, entries: int, blocks: int) -> tuple[bytes, bytes]:
    size = _data_start(blocks) + 12 * entries + _CRC.size * blocks
    try:
        data = memoryview(os.pread(fd, size, 0))
    except OSError as exc:
        raise LogCorrupt(f"locator run {path} unreadable: {exc}") from exc
    voters, values = [], []
    position = _data_start(blocks)
    for block in range(blocks):
        count = min(RUN_BLOCK_ENTRIES, entries - block * RUN_BLOCK_ENTRIES)
        body = data[position:position + 12 * count]
        crc = data[position + 12 * count:position + 12 * count + _CRC.size]
        if len(body) != 12 * count or len(crc) != _CRC.size or _CRC.unpack(crc)[0] != zlib.crc32(body):
            raise LogCorrupt(f"locator run {path}: block {block} fails its checksum")
        voters.append(body[:4 * count])
        values.append(body[4 * count:])
        position += 12 * count + _CRC.size
    return b"".join(voters), b"".join(values)


class RunFile(NamedTuple):
    """A whole, valid run file's header and fences."""

    seq: int
    offset_first: int
    offset_next: int
    entries: int
    path: Path
    fences: array.array[int]


def _load_header(path: Path) -> RunFile | None:
    """A run file's header and fences, or None if it is not a whole, valid run file."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEADER.size)
            if len(head) != _HEADER.size:
                return None
            magic, offset_first, offset_next, entries, block_entries = _HEADER.unpack(head)
            if magic != _MAGIC or block_entries != RUN_BLOCK_ENTRIES:
                return None
            blocks = _block_count(entries)
            # The size is checked before the fences are read: a torn or forged header could
            # claim any entry count, and reading what it claims could exhaust memory.
            if os.fstat(handle.fileno()).st_size != (
                    _data_start(blocks) + 12 * entries + _CRC.size * blocks):
                return None
            fences_bytes = handle.read(4 * blocks)
            crc = handle.read(_CRC.size)
    except OSError:
        return None
    if len(crc) != _CRC.size or _CRC.unpack(crc)[0] != zlib.crc32(head + fences_bytes):
        return None
    seq = int(path.name.split("-")[1])
    return RunFile(seq, offset_first, offset_next, entries, path, array.array("I", fences_bytes))


def load_runs(directory: Path) -> list[RunFile]:
    runs = []
    for path in sorted(directory.glob("run-*.bin")) if directory.is_dir() else []:
        run = _load_header(path)
        if run is None:
            log.warning("locator run %s is not a whole run file; removed (rebuilt from the log)", path)
            path.unlink(missing_ok=True)
            continue
        runs.append(run)
    for path in directory.glob("run-*.tmp") if directory.is_dir() else []:
        path.unlink(missing_ok=True)
    return runs


def remove_runs(directory: Path) -> None:
    if directory.is_dir():
        for path in directory.glob("run-*"):
            path.unlink(missing_ok=True)
