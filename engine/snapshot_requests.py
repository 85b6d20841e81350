"""Snapshot now: `votes snapshot now` asks every worker of a data dir to snapshot the fencing
groups it owns, and waits until each requested group's snapshot store holds a snapshot
newer than the request.

Workers are separate Granian processes and an HTTP request reaches only one of them, so the
request is a file every worker sees: `<data_dir>/run/snapshot-request.json`, replaced
atomically by the CLI. Each worker looks at it every `snapshot_request_check_s` (like the
token key files, engine/app.py `_watch_token_keys`) and, while the request has not expired,
snapshots each requested group it owns and has ready, once per request; a group that starts
or moves here while the request is live is snapshotted when it becomes ready. A request
names its own expiry (the CLI's wait), so a worker that starts later never acts on an old one.

The CLI does not trust acknowledgements: it reads the snapshot stores' manifests (the
directory or S3 store the config selects) and succeeds only when every shard of every
requested group has a manifest entry created at or after the request.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from engine.config import Config
from shards.backends import choose_backends

if TYPE_CHECKING:
    from engine.node import Node

log = logging.getLogger("votes.snapshot_requests")

REQUEST_FILE = "snapshot-request.json"
# How often the CLI reads the manifests while it waits (one small read per shard each time).
MANIFEST_CHECK_S = 0.25


class SnapshotRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    requested_ms: int
    expires_ms: int
    groups: list[int] | None = None  # None: every group the worker owns


_request_decoder = msgspec.json.Decoder(SnapshotRequest)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def request_path(data_dir: Path) -> Path:
    return Path(data_dir) / "run" / REQUEST_FILE


def write_request(data_dir: Path, groups: Iterable[int] | None, wait_s: float) -> SnapshotRequest:
    """Publish a request (temporary file, fsync, rename): a worker reads it whole or not at all."""
    requested_ms = now_ms()
    request = SnapshotRequest(id=uuid.uuid4().hex, requested_ms=requested_ms,
                              expires_ms=requested_ms + int(wait_s * 1000),
                              groups=None if groups is None else sorted(set(groups)))
    path = request_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{REQUEST_FILE}.{request.id}")
    with open(temporary, "wb") as handle:
        handle.write(msgspec.json.encode(request))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return request


class RequestWatch:
    """One worker's view of the request file: re-read only when the file changed."""

    def __init__(self, data_dir: Path) -> None:
        self.path = request_path(data_dir)
        self._signature: tuple[int, int, int] | None = None
        self.request: SnapshotRequest | None = None
        self.groups_done: set[int] = set()

    def live_request(self, at_ms: int) -> SnapshotRequest | None:
        """The request in force at `at_ms`, or None (no file, expired, or unreadable)."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return None
        signature = (status.st_ino, status.st_mtime_ns, status.st_size)
        if signature != self._signature:
            self._signature = signature
            try:
                request = _request_decoder.decode(self.path.read_bytes())
            except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("snapshot request %s not read: %s", self.path, exc)
                return None
            if self.request is None or request.id != self.request.id:
                self.request, self.groups_done = request, set()
        if self.request is None or at_ms >= self.request.expires_ms:
            return None
        return self.request


def groups_due(request: SnapshotRequest, ready_groups: Iterable[int], done: set[int]) -> list[int]:
    """The ready groups this request still wants a snapshot of (pure: unit-testable)."""
    wanted = None if request.groups is None else set(request.groups)
    return sorted(group for group in ready_groups
                  if group not in done and (wanted is None or group in wanted))


async def watch_snapshot_requests(node: Node) -> None:
    """A worker's task (engine/node.py `Node.start`): act on requests until cancelled."""
    watch = RequestWatch(node.data_dir)
    while True:
        await asyncio.sleep(node.config.snapshot_request_check_s)
        request = watch.live_request(now_ms())
        if request is None:
            continue
        owners = dict(node.owners)  # a cluster node's groups come and go while this runs
        due = groups_due(request, [group for group, owner in owners.items() if owner.ready],
                         watch.groups_done)
        for group in due:
            watch.groups_done.add(group)
            # Each shard's write waits for one already running; a failure is logged and
            # counted by the owner (vote_snapshot_failures_total), and the CLI times out.
            await asyncio.gather(*owners[group].snapshot_all(), return_exceptions=True)
            log.info("snapshot request %s: group %d snapshotted", request.id, group)


async def wait_for_snapshots(config: Config, groups: Iterable[int], request: SnapshotRequest,
                             wait_s: float) -> dict[int, list[int]]:
    """Wait, at most wait_s, until every shard of `groups` has a snapshot created at or after
    the request; returns {group: shards still without one} ({} on success)."""
    backends = choose_backends(config)
    stores = {shard: backends.snapshot_store(shard)
              for group in groups for shard in config.shards_of_group(group)}
    deadline = time.monotonic() + wait_s
    waiting = dict(stores)
    try:
        while True:
            for shard, store in list(waiting.items()):
                manifest = store.read_manifest()
                if inspect.isawaitable(manifest):
                    manifest = await manifest
                newest = manifest.snapshots[0] if manifest.snapshots else None
                if newest is not None and newest.created_ms >= request.requested_ms:
                    del waiting[shard]
            if not waiting or time.monotonic() >= deadline:
                break
            await asyncio.sleep(MANIFEST_CHECK_S)
    finally:
        for store in stores.values():
            await store.close()
    missing: dict[int, list[int]] = {}
    for shard in sorted(waiting):
        missing.setdefault(config.group_of(shard), []).append(shard)
    return missing
