"""Small filesystems for fault tests: fill one to the last byte, unmount it robustly."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

UNMOUNT_WAIT_S = 10.0
UNMOUNT_RETRY_S = 0.1
FILL_CHUNKS = (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1)


def holders_of(mount_point: Path) -> list[str]:
    """Processes with a file, mapping or working directory under `mount_point` (diagnostics)."""
    prefix = str(mount_point)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [entry / "cwd", *(entry / "fd").iterdir()]
            targets = [os.readlink(link) for link in links]
            targets += [line.split(maxsplit=5)[-1] for line in
                        (entry / "maps").read_text().splitlines() if prefix in line]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
        if any(target.startswith(prefix) for target in targets):
            found.append(f"pid {entry.name}: {command}")
    return found


def unmount(mount_point: Path) -> None:
    """Unmount, retrying while the kernel still finishes closing a killed server's files (a
    SIGKILLed process's last file references may be dropped a moment after it is reaped on a
    busy machine); fail, naming the holders, if it stays busy."""
    deadline = time.monotonic() + UNMOUNT_WAIT_S
    while True:
        unmounted = subprocess.run(["umount", str(mount_point)], capture_output=True, text=True,
                                   check=False)
        if unmounted.returncode == 0:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(UNMOUNT_RETRY_S)
    holders = holders_of(mount_point)
    subprocess.run(["umount", "-l", str(mount_point)], check=False)
    pytest.fail(f"umount {mount_point} failed for {UNMOUNT_WAIT_S} s: "
                f"{unmounted.stderr.strip()}; holders: {holders or 'none found'}")


def fill_filesystem(path: Path) -> int:
    """Write `path` until the filesystem has no byte left; return the bytes written."""
    written = 0
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk_size in FILL_CHUNKS:
            chunk = b"\0" * chunk_size
            while True:
                try:
                    written += os.write(descriptor, chunk)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(descriptor)
    return written
