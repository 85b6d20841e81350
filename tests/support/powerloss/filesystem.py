"""A power-loss filesystem for tests: a FUSE pass-through that keeps unsynced writes in memory.

Like LazyFS (the one Jepsen uses), it passes everything through to a backing directory but
keeps every write and truncate of a file that was not fsynced yet in memory (`PendingFile`):
- reads see the backing file with the pending operations laid over it (a process reads its
  own writes); `getattr` reports the size the writer sees;
- `fsync`/`fdatasync` of a file applies that file's pending operations to the backing file
  and fsyncs it; nothing else ever does (close, flush and other files' fsyncs do not);
- a power cut (`cut`) drops every pending operation; with `tear`, the file written last keeps
  its earlier pending operations and only a prefix of its last write (a write torn by the cut).
  `sync` applies everything (the kernel's writeback having caught up, e.g. after a while).
  A cut with `power_off` also leaves the power off until `power_on`: every change (write,
  fsync, truncate, create, rename, unlink...) fails with EIO meanwhile, so a process killed
  right after the cut cannot make anything durable any more (an fsync in flight at the cut
  fails instead of landing: the kernel makes a killed process wait for it).

Metadata is NOT modelled: create, mkdir, rename, link, unlink and rmdir go to the backing
directory at once and survive any cut, with or without a directory fsync (`fsyncdir` is
counted and does nothing). So this filesystem catches a missing file fsync, not a missing
directory fsync; a file created and never fsynced survives a cut empty (or with what was
fsynced of it).

Faults, armed through the control socket: every fsync takes a set delay first (so a cut
finds writes pending that a fast disk would have made durable already); the next N fsyncs
fail with EIO (their pending data stays pending: a failed fsync promises nothing), the next
N writes fail with EIO or ENOSPC, the next N truncates fail with EIO; each only for files
whose path contains a given string, if one is given (e.g. "/wal/": the log's segments, not
the snapshots). Pending bytes per mount are bounded: a write past `pending_bytes_max` fails
with ENOSPC and is logged. The kernel's copies cannot outlive a
cut: writes go through to this process at once (no writeback cache), attributes are never
cached, every open drops the file's cached pages (no keep_cache) and a cut invalidates every
file it touched. (Pages stay cacheable, so read-only mmap works: replay's reader uses it.)
O_APPEND writes go to the end of the file as this filesystem sees it.

Single-threaded (pyfuse3 on trio): requests are served one at a time, which is plenty for
tests and keeps the bookkeeping free of locks.
"""

from __future__ import annotations

import errno
import logging
import os
import random
from dataclasses import dataclass

import pyfuse3
import trio

from tests.support.powerloss.pending import PendingFile

log = logging.getLogger("powerloss")

PENDING_BYTES_MAX_DEFAULT = 256 * 1024 * 1024
FAULT_COUNT_MAX = 1_000_000
FSYNC_DELAY_S_MAX = 1.0
ERRNOS = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC}


@dataclass
class Handle:
    inode: int
    descriptor: int
    append: bool


class PowerLossOperations(pyfuse3.Operations):
    # Write-through: every write reaches this process before write(2) returns.
    enable_writeback_cache = False

    def __init__(self, backing: str, pending_bytes_max: int = PENDING_BYTES_MAX_DEFAULT) -> None:
        super().__init__()
        self.backing = os.path.abspath(backing)
        self.pending_bytes_max = pending_bytes_max
        self._root_backing_inode = os.lstat(self.backing).st_ino
        self._paths: dict[int, set[str]] = {pyfuse3.ROOT_INODE: {self.backing}}
        self._pending: dict[int, PendingFile] = {}
        self._handles: dict[int, Handle] = {}
        self._handle_next = 1
        self._write_sequence: dict[int, int] = {}  # inode -> sequence of its last write
        self._sequence = 0
        self.pending_bytes = 0
        self.counters = {"fsyncs": 0, "fsyncs_failed": 0, "writes_failed": 0,
                         "truncates_failed": 0, "writes_refused_full": 0, "cuts": 0}
        # kind -> [calls left to fail, errno, only files whose path contains this]
        self.faults = {"fsync": [0, errno.EIO, ""], "write": [0, errno.EIO, ""],
                       "truncate": [0, errno.EIO, ""]}
        self.fsync_delay_s = 0.0
        self.powered = True

    # Inodes and paths ----------------------------------------------------------------------

    def _inode_of(self, stat: os.stat_result) -> int:
        return pyfuse3.ROOT_INODE if stat.st_ino == self._root_backing_inode else stat.st_ino

    def _path(self, inode: int) -> str:
        paths = self._paths.get(inode)
        if not paths:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return next(iter(paths))

    def _child(self, parent_inode: int, name: bytes) -> str:
        return os.path.join(self._path(parent_inode), os.fsdecode(name))

    def _attributes(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            stat = os.lstat(path)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        inode = self._inode_of(stat)
        self._paths.setdefault(inode, set()).add(path)
        attributes = pyfuse3.EntryAttributes()
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(attributes, name, getattr(stat, name))
        attributes.st_ino = inode
        attributes.st_blksize = 4096
        attributes.st_blocks = (stat.st_size + 511) // 512
        pending = self._pending.get(inode)
        if pending is not None:
            attributes.st_size = pending.size
        # Never cached: after a cut the kernel must ask again.
        attributes.attr_timeout = 0
        attributes.entry_timeout = 0
        return attributes

    def _forget_path(self, inode: int, path: str) -> None:
        paths = self._paths.get(inode)
        if paths is not None:
            paths.discard(path)
            if not paths and inode != pyfuse3.ROOT_INODE:
                del self._paths[inode]
                if not any(handle.inode == inode for handle in self._handles.values()):
                    self._drop_pending(inode)

    def _drop_pending(self, inode: int) -> None:
        pending = self._pending.pop(inode, None)
        if pending is not None:
            self.pending_bytes -= pending.pending_bytes
        self._write_sequence.pop(inode, None)

    # Faults --------------------------------------------------------------------------------

    def _maybe_fail(self, kind: str, inode: int) -> None:
        fault = self.faults[kind]
        if fault[0] > 0 and any(fault[2] in path for path in self._paths.get(inode, ())):
            fault[0] -= 1
            self.counters[f"{kind}s_failed"] += 1
            log.warning("injected %s failure: %s", kind, errno.errorcode[fault[1]])
            raise pyfuse3.FUSEError(fault[1])

    def _require_power(self) -> None:
        if not self.powered:
            raise pyfuse3.FUSEError(errno.EIO)

    # Lookups and directories -----------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        return self._attributes(self._child(parent_inode, name))

    async def getattr(self, inode, ctx=None):
        return self._attributes(self._path(inode))

    async def opendir(self, inode, ctx):
        self._path(inode)
        return inode

    async def readdir(self, fh, start_id, token):
        directory = self._path(fh)
        names = sorted(os.listdir(directory))
        for index in range(start_id, len(names)):
            try:
                attributes = self._attributes(os.path.join(directory, names[index]))
            except pyfuse3.FUSEError:
                continue  # removed meanwhile
            if not pyfuse3.readdir_reply(token, os.fsencode(names[index]), attributes, index + 1):
                return

    async def releasedir(self, fh):
        return None

    async def fsyncdir(self, fh, datasync):
        # Metadata reaches the backing directory at once (see the module docstring).
        self.counters["fsyncs"] += 1

    async def mkdir(self, parent_inode, name, mode, ctx):
        self._require_power()
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        return self._attributes(path)

    async def rmdir(self, parent_inode, name, ctx):
        self._require_power()
        path = self._child(parent_inode, name)
        try:
            inode = self._inode_of(os.lstat(path))
            os.rmdir(path)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        self._forget_path(inode, path)

    async def unlink(self, parent_inode, name, ctx):
        self._require_power()
        path = self._child(parent_inode, name)
        try:
            inode = self._inode_of(os.lstat(path))
            os.unlink(path)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        self._forget_path(inode, path)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._require_power()
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        try:
            moved = self._inode_of(os.lstat(old))
            replaced = self._inode_of(os.lstat(new)) if os.path.lexists(new) else None
            os.rename(old, new)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        if replaced is not None and replaced != moved:
            self._forget_path(replaced, new)
        # Everything below a moved directory moves with it.
        for paths in self._paths.values():
            for path in list(paths):
                if path == old or path.startswith(old + os.sep):
                    paths.discard(path)
                    paths.add(new + path[len(old):])

    async def link(self, inode, new_parent_inode, new_name, ctx):
        self._require_power()
        path = self._child(new_parent_inode, new_name)
        try:
            os.link(self._path(inode), path)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        return self._attributes(path)

    async def statfs(self, ctx):
        stat = os.statvfs(self.backing)
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(data, name, getattr(stat, name))
        return data

    # Files -----------------------------------------------------------------------------------

    def _open_handle(self, inode: int, path: str, flags: int,
                     mode: int = 0o600) -> pyfuse3.FileInfo:
        # The backing file is always opened read-write and without O_APPEND: this process
        # places every write itself (pending, then applied at fsync).
        backing_flags = (flags & (os.O_CREAT | os.O_EXCL)) | os.O_RDWR | os.O_CLOEXEC
        try:
            descriptor = os.open(path, backing_flags, mode)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        handle_id = self._handle_next
        self._handle_next += 1
        self._handles[handle_id] = Handle(inode, descriptor, bool(flags & os.O_APPEND))
        return pyfuse3.FileInfo(fh=handle_id, direct_io=False, keep_cache=False)

    async def open(self, inode, flags, ctx):
        if flags & os.O_TRUNC:
            await self._truncate(inode, 0)
        return self._open_handle(inode, self._path(inode), flags)

    async def create(self, parent_inode, name, mode, flags, ctx):
        self._require_power()
        path = self._child(parent_inode, name)
        info = self._open_handle(0, path, flags | os.O_CREAT, mode)
        attributes = self._attributes(path)
        self._handles[info.fh].inode = attributes.st_ino
        return info, attributes

    def _pending_of(self, inode: int, descriptor: int) -> PendingFile:
        pending = self._pending.get(inode)
        if pending is None:
            pending = self._pending[inode] = PendingFile(os.fstat(descriptor).st_size)
        return pending

    async def read(self, fh, off, size):
        handle = self._handles[fh]
        pending = self._pending.get(handle.inode)
        if pending is None:
            return os.pread(handle.descriptor, size, off)
        return pending.read(lambda offset, length: os.pread(handle.descriptor, length, offset),
                            off, size)

    async def write(self, fh, off, buf):
        handle = self._handles[fh]
        self._require_power()
        self._maybe_fail("write", handle.inode)
        if self.pending_bytes + len(buf) > self.pending_bytes_max:
            self.counters["writes_refused_full"] += 1
            log.error("write of %d bytes refused (ENOSPC): %d pending bytes, at most %d",
                      len(buf), self.pending_bytes, self.pending_bytes_max)
            raise pyfuse3.FUSEError(errno.ENOSPC)
        pending = self._pending_of(handle.inode, handle.descriptor)
        pending.write(pending.size if handle.append else off, buf)
        self.pending_bytes += len(buf)
        self._sequence += 1
        self._write_sequence[handle.inode] = self._sequence
        return len(buf)

    async def _truncate(self, inode: int, size: int, descriptor: int | None = None) -> None:
        self._require_power()
        self._maybe_fail("truncate", inode)
        if descriptor is None:
            handle = next((h for h in self._handles.values() if h.inode == inode), None)
            if handle is None:  # truncate(2) of a file nobody has open: pending all the same
                opened = os.open(self._path(inode), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    self._pending_of(inode, opened).truncate(size)
                finally:
                    os.close(opened)
                return
            descriptor = handle.descriptor
        self._pending_of(inode, descriptor).truncate(size)

    async def setattr(self, inode, attr, fields, fh, ctx):
        self._require_power()
        path = self._path(inode)
        try:
            if fields.update_size:
                descriptor = self._handles[fh].descriptor if fh in self._handles else None
                await self._truncate(inode, attr.st_size, descriptor)
            if fields.update_mode:
                os.chmod(path, attr.st_mode & 0o7777)
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                stat = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else stat.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else stat.st_mtime_ns))
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        return self._attributes(path)

    async def flush(self, fh):
        return None  # close(2) makes nothing durable

    async def fsync(self, fh, datasync):
        handle = self._handles[fh]
        self.counters["fsyncs"] += 1
        if self.fsync_delay_s:
            # Other requests are served meanwhile; a cut during the delay drops this data.
            await trio.sleep(self.fsync_delay_s)
        self._require_power()
        self._maybe_fail("fsync", handle.inode)
        if fh in self._handles:
            self._apply(handle.inode, handle.descriptor)

    def _apply(self, inode: int, descriptor: int) -> None:
        pending = self._pending.pop(inode, None)
        if pending is None:
            os.fsync(descriptor)
            return
        self.pending_bytes -= pending.pending_bytes
        self._write_sequence.pop(inode, None)
        pending.apply(descriptor)

    async def release(self, fh):
        handle = self._handles.pop(fh)
        os.close(handle.descriptor)
        if handle.inode not in self._paths and not any(
                other.inode == handle.inode for other in self._handles.values()):
            self._drop_pending(handle.inode)

    # Control commands (tests/support/powerloss/control.py) -----------------------------------

    def stats(self) -> dict:
        return {"pending_bytes": self.pending_bytes, "pending_files": len(self._pending),
                **self.counters}

    def arm(self, kind: str, count: int, error_name: str = "EIO", path_contains: str = "") -> None:
        if kind not in self.faults or error_name not in ERRNOS or not 0 <= count <= FAULT_COUNT_MAX:
            raise ValueError(f"cannot arm {kind!r} x{count} with {error_name!r}")
        if kind != "write" and error_name != "EIO":
            raise ValueError(f"{kind} faults are EIO only")
        self.faults[kind] = [count, ERRNOS[error_name], path_contains]

    def delay_fsync(self, seconds: float) -> None:
        if not 0 <= seconds <= FSYNC_DELAY_S_MAX:
            raise ValueError(f"fsync delay {seconds} s is not in 0..{FSYNC_DELAY_S_MAX}")
        self.fsync_delay_s = seconds

    def heal(self) -> None:
        for fault in self.faults.values():
            fault[0] = 0
        self.fsync_delay_s = 0.0

    def sync(self) -> list[int]:
        """Apply every pending operation (writeback caught up); returns the inodes touched."""
        inodes = list(self._pending)
        for inode in inodes:
            self._with_backing(inode, lambda descriptor, inode=inode:
                               self._apply(inode, descriptor))
        return inodes

    def cut(self, tear: bool, seed: int | None,
            power_off: bool = False) -> tuple[dict, list[int]]:
        """Power cut: drop every pending operation; with `tear`, the file written last keeps
        its earlier operations and a random prefix (1..n-1 bytes) of its last write; with
        `power_off`, nothing changes any more until `power_on`."""
        self.counters["cuts"] += 1
        self.powered = not power_off
        torn = None
        inodes = list(self._pending)
        if tear and self._write_sequence:
            inode = max(self._write_sequence, key=self._write_sequence.__getitem__)
            pending = self._pending[inode]
            last_bytes = pending.last_write_bytes()
            kept = random.Random(seed).randint(1, last_bytes - 1) if last_bytes > 1 else 0
            self._with_backing(inode, lambda descriptor: pending.apply_torn(descriptor, kept))
            torn = {"path": self._paths.get(inode, {"<unlinked>"}).copy().pop(),
                    "kept_bytes": kept, "of_bytes": last_bytes}
        dropped = self.pending_bytes
        self._pending.clear()
        self._write_sequence.clear()
        self.pending_bytes = 0
        log.warning("power cut: dropped %d pending bytes of %d files; torn: %s", dropped,
                    len(inodes), torn)
        return {"dropped_bytes": dropped, "dropped_files": len(inodes), "torn": torn}, inodes

    def power_on(self) -> None:
        self.powered = True

    def _with_backing(self, inode: int, function) -> None:
        handle = next((h for h in self._handles.values() if h.inode == inode), None)
        if handle is not None:
            function(handle.descriptor)
            return
        paths = self._paths.get(inode)
        if not paths:  # unlinked and closed: nothing of it can survive
            self._drop_pending(inode)
            return
        descriptor = os.open(next(iter(paths)), os.O_RDWR | os.O_CLOEXEC)
        try:
            function(descriptor)
        finally:
            os.close(descriptor)
