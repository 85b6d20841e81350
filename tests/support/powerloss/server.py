"""The power-loss filesystem as a process: mount, serve FUSE and the control socket, exit
when unmounted.

`python -m tests.support.powerloss MOUNT BACKING --control SOCKET [--pending-bytes-max N]`

Control protocol: one JSON object per line in each direction over the unix socket SOCKET.
Requests `{"command": NAME, ...}`; answers `{"ok": true, ...}` or `{"ok": false, "error": ...}`.
- `stats`: pending bytes and files, fsync / failure / cut counters;
- `cut` (`tear`: bool, `seed`: int or null, `power_off`: bool): a power cut (filesystem.py);
- `power-on`: changes are accepted again after a cut with `power_off`;
- `sync`: apply every pending write;
- `fail-fsync` / `fail-write` / `fail-truncate` (`count`, `errno`: "EIO" or, for writes,
  "ENOSPC"; `path_contains`: only files whose path contains it): the next `count` such
  calls fail;
- `delay-fsync` (`seconds`, at most 1): every fsync waits that long first;
- `heal`: disarm every fault and the delay.
A request line is at most CONTROL_LINE_BYTES_MAX; a longer one closes the connection.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket

import pyfuse3
import trio

from tests.support.powerloss.filesystem import PENDING_BYTES_MAX_DEFAULT, PowerLossOperations

log = logging.getLogger("powerloss")

CONTROL_LINE_BYTES_MAX = 64 * 1024
INVALIDATE_WAIT_S = 5.0
FAULT_COMMANDS = {"fail-fsync": "fsync", "fail-write": "write", "fail-truncate": "truncate"}


async def _invalidate(inodes: list[int]) -> None:
    """Drop what the kernel may still hold of these files (attributes): off the trio thread,
    since a kernel notification can wait for a request this thread would have to serve."""

    def run() -> None:
        for inode in inodes:
            try:
                pyfuse3.invalidate_inode(inode, attr_only=False)
            except OSError:
                pass  # the kernel does not know this inode (any more)

    with trio.move_on_after(INVALIDATE_WAIT_S):
        await trio.to_thread.run_sync(run, abandon_on_cancel=True)


async def answer(operations: PowerLossOperations, request: dict) -> dict:
    command = request.get("command")
    if command == "stats":
        return operations.stats()
    if command == "cut":
        result, inodes = operations.cut(bool(request.get("tear", False)), request.get("seed"),
                                        bool(request.get("power_off", False)))
        await _invalidate(inodes)
        return result
    if command == "power-on":
        operations.power_on()
        return {}
    if command == "sync":
        inodes = operations.sync()
        return {"synced_files": len(inodes)}
    if command in FAULT_COMMANDS:
        operations.arm(FAULT_COMMANDS[command], int(request.get("count", 1)),
                       str(request.get("errno", "EIO")), str(request.get("path_contains", "")))
        return {}
    if command == "delay-fsync":
        operations.delay_fsync(float(request.get("seconds", 0)))
        return {}
    if command == "heal":
        operations.heal()
        return {}
    raise ValueError(f"unknown command {command!r}")


async def serve_connection(operations: PowerLossOperations, stream: trio.SocketStream) -> None:
    buffer = b""
    async with stream:
        while True:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            buffer += chunk
            if len(buffer) > CONTROL_LINE_BYTES_MAX:
                log.error("control request longer than %d bytes; closing", CONTROL_LINE_BYTES_MAX)
                return
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    reply = {"ok": True, **await answer(operations, json.loads(line))}
                except (ValueError, TypeError, OSError) as error:
                    reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
                await stream.send_all(json.dumps(reply).encode() + b"\n")


async def serve_control(operations: PowerLossOperations, control_path: str) -> None:
    listening = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listening.bind(control_path)
    listening.listen(8)
    listener = trio.SocketListener(listening)

    async def handle(stream: trio.SocketStream) -> None:
        await serve_connection(operations, stream)

    await trio.serve_listeners(handle, [listener])


async def run(operations: PowerLossOperations, control_path: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_control, operations, control_path)
        await pyfuse3.main()  # returns once the filesystem is unmounted
        nursery.cancel_scope.cancel()


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.powerloss")
    parser.add_argument("mount")
    parser.add_argument("backing")
    parser.add_argument("--control", required=True, help="path of the control unix socket")
    parser.add_argument("--pending-bytes-max", type=int, default=PENDING_BYTES_MAX_DEFAULT)
    options = parser.parse_args(arguments)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s powerloss %(levelname)s %(message)s")
    operations = PowerLossOperations(options.backing, options.pending_bytes_max)
    if os.path.exists(options.control):
        os.unlink(options.control)
    mount_options = set(pyfuse3.default_options)
    mount_options.add("fsname=powerloss")
    mount_options.add("allow_other")  # tests run as root; other users may run the engine
    pyfuse3.init(operations, options.mount, mount_options)
    log.info("mounted %s over %s; control %s", options.mount, options.backing, options.control)
    try:
        trio.run(run, operations, options.control)
    finally:
        pyfuse3.close(unmount=False)
        log.info("unmounted %s", options.mount)
