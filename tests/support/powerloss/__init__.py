"""A power-loss filesystem for tests (filesystem.py says what it keeps and drops) and the
helper that runs it: `PowerLossFilesystem` starts `python -m tests.support.powerloss` as its
own process, waits (bounded) until the mount is up, sends control commands, and always
unmounts with `fusermount3 -u` (bounded, then lazily) and reaps the process.

    with mounted(tmp_path) as disk:
        ... write under disk.mount_point ...
        disk.cut(tear=True)

A test module wraps `mounted` in its own fixture (tests/functional/test_powerloss_filesystem.py).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
MOUNT_WAIT_S = 15.0
UNMOUNT_WAIT_S = 10.0
EXIT_WAIT_S = 10.0
COMMAND_TIMEOUT_S = 15.0
POLL_S = 0.02
LOG_TAIL_BYTES = 3000


def is_mounted(mount_point: Path) -> bool:
    """Whether the kernel lists a mount at `mount_point`, also one whose server died (then
    os.path.ismount says False: stat fails with ENOTCONN, yet it must be unmounted)."""
    target = str(Path(mount_point).resolve()).replace(" ", "\\040")
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts if line.strip())


class PowerLossError(RuntimeError):
    """The filesystem did not mount, answer or unmount as it should."""


class PowerLossFilesystem:
    def __init__(self, mount_point: Path, backing: Path, control: Path, log_path: Path,
                 pending_bytes_max: int | None = None) -> None:
        self.mount_point = Path(mount_point)
        self.backing = Path(backing)
        self.control = Path(control)
        self.log_path = Path(log_path)
        self.pending_bytes_max = pending_bytes_max
        self.process: subprocess.Popen[bytes] | None = None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")[-LOG_TAIL_BYTES:]
        except FileNotFoundError:
            return "<no log>"

    def start(self) -> None:
        self.mount_point.mkdir(parents=True, exist_ok=True)
        self.backing.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "tests.support.powerloss", str(self.mount_point),
                   str(self.backing), "--control", str(self.control)]
        if self.pending_bytes_max is not None:
            command += ["--pending-bytes-max", str(self.pending_bytes_max)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + MOUNT_WAIT_S
        while not (is_mounted(self.mount_point) and self.control.exists()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PowerLossError(f"power-loss filesystem did not mount at {self.mount_point} "
                                     f"within {MOUNT_WAIT_S} s; log:\n{self.log_tail()}")
            time.sleep(POLL_S)

    def command(self, name: str, **arguments) -> dict:
        request = json.dumps({"command": name, **arguments}).encode() + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(COMMAND_TIMEOUT_S)
            connection.connect(str(self.control))
            connection.sendall(request)
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = connection.recv(65536)
                if not chunk:
                    raise PowerLossError(f"control socket closed on {name}; "
                                         f"log:\n{self.log_tail()}")
                reply += chunk
        answer = json.loads(reply)
        if not answer.pop("ok"):
            raise PowerLossError(f"{name} failed: {answer['error']}")
        return answer

    # The commands --------------------------------------------------------------------------

    def stats(self) -> dict:
        return self.command("stats")

    def cut(self, tear: bool = False, seed: int | None = None, power_off: bool = False) -> dict:
        return self.command("cut", tear=tear, seed=seed, power_off=power_off)

    def power_on(self) -> None:
        self.command("power-on")

    def sync(self) -> dict:
        return self.command("sync")

    def fail_fsync(self, count: int = 1, path_contains: str = "") -> None:
        self.command("fail-fsync", count=count, path_contains=path_contains)

    def fail_write(self, count: int = 1, error: str = "EIO", path_contains: str = "") -> None:
        self.command("fail-write", count=count, errno=error, path_contains=path_contains)

    def fail_truncate(self, count: int = 1, path_contains: str = "") -> None:
        self.command("fail-truncate", count=count, path_contains=path_contains)

    def delay_fsync(self, seconds: float) -> None:
        self.command("delay-fsync", seconds=seconds)

    def heal(self) -> None:
        self.command("heal")

    # Teardown ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Unmount (bounded retries, then lazily) and reap the process; idempotent."""
        deadline = time.monotonic() + UNMOUNT_WAIT_S
        while is_mounted(self.mount_point):
            done = subprocess.run(["fusermount3", "-u", str(self.mount_point)],
                                  capture_output=True, check=False)
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                subprocess.run(["fusermount3", "-u", "-z", str(self.mount_point)],
                               capture_output=True, check=False)
                break
            time.sleep(0.1)
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.wait(EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(EXIT_WAIT_S)


@contextmanager
def mounted(directory: Path, pending_bytes_max: int | None = None) -> Iterator[PowerLossFilesystem]:
    """A power-loss filesystem at `directory`/mnt over `directory`/backing, always unmounted."""
    directory = Path(directory)
    disk = PowerLossFilesystem(directory / "mnt", directory / "backing",
                               directory / "powerloss.sock", directory / "powerloss.log",
                               pending_bytes_max)
    disk.start()
    try:
        yield disk
    finally:
        disk.stop()
