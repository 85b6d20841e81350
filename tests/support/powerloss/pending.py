"""The writes (and truncates) of one file that were not fsynced yet: what a power cut loses.

A `PendingFile` is the page cache of one file as far as durability goes: its operations in
the order they were made, applied to the backing file only by `apply` (the file's fsync),
dropped by a power cut, or applied up to a prefix of the last write by `apply_torn` (a cut
that tore the last write). `read` serves the file as the writer sees it: the backing bytes
with the pending operations laid over them in order, so a process always reads its own
writes. Pure bookkeeping on byte strings: no FUSE here, so it is tested on its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable

WRITE = "write"
TRUNCATE = "truncate"


class PendingFile:
    def __init__(self, backing_size: int) -> None:
        self.operations: list[tuple[str, int, bytes]] = []
        self.size = backing_size  # the size the writer sees
        self.pending_bytes = 0

    def write(self, offset: int, data: bytes) -> None:
        self.operations.append((WRITE, offset, bytes(data)))
        self.size = max(self.size, offset + len(data))
        self.pending_bytes += len(data)

    def truncate(self, size: int) -> None:
        self.operations.append((TRUNCATE, size, b""))
        self.size = size

    def last_write_bytes(self) -> int:
        for kind, _, data in reversed(self.operations):
            if kind == WRITE:
                return len(data)
        return 0

    def read(self, read_backing: Callable[[int, int], bytes], offset: int, length: int) -> bytes:
        """`length` bytes from `offset` as the writer sees them (short at the end of file)."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        buffer = bytearray(read_backing(offset, length).ljust(length, b"\0"))
        end = offset + length
        for kind, position, data in self.operations:
            if kind == TRUNCATE:
                # Bytes past a truncation read as zeros if the file grows again later.
                if position < end:
                    cut_from = max(position, offset) - offset
                    buffer[cut_from:] = bytes(length - cut_from)
                continue
            start, stop = max(position, offset), min(position + len(data), end)
            if start < stop:
                buffer[start - offset:stop - offset] = data[start - position:stop - position]
        return bytes(buffer)

    def apply(self, descriptor: int) -> None:
        """Make every pending operation durable on the backing file (the file's fsync)."""
        self._apply_operations(descriptor, self.operations)
        os.fsync(descriptor)

    def apply_torn(self, descriptor: int, kept_bytes: int) -> None:
        """A cut that tore the last write: the earlier operations reached the disk, and of
        the last write only its first `kept_bytes` (operations after it are lost)."""
        for index in range(len(self.operations) - 1, -1, -1):
            kind, position, data = self.operations[index]
            if kind == WRITE:
                torn = (WRITE, position, data[:max(0, min(kept_bytes, len(data)))])
                self._apply_operations(descriptor, [*self.operations[:index], torn])
                break
        os.fsync(descriptor)

    @staticmethod
    def _apply_operations(descriptor: int, operations: list[tuple[str, int, bytes]]) -> None:
        for kind, position, data in operations:
            if kind == TRUNCATE:
                os.ftruncate(descriptor, position)
                continue
            view = memoryview(data)
            while view:
                written = os.pwrite(descriptor, view, position)
                view, position = view[written:], position + written
