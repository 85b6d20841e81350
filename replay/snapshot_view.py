"""Read shards' snapshot stores (directory or S3) the way recovery does, without writing.

`newest_snapshot` returns the manifest and the newest snapshot that checks out (the store's
own `load`, which skips a missing or damaged object and logs why), with a note when that is
not the manifest's newest entry; the store's log lines are kept for the note, per shard,
also when several shards are read at once (`newest_snapshots`).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from dataclasses import dataclass

from engine.config import Config
from replay.recount import gather_all
from shards.backends import make_snapshot_store
from shards.snapshots import Manifest
from shards.state import ShardState

STORE_LOGGERS = ("votes.snapshots", "votes.s3_snapshots")
# Snapshot stores read at once (each S3 store is one client).
STORES_CONCURRENCY = 8

_messages: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "replay_snapshot_messages", default=None)


@dataclass
class ShardSnapshot:
    shard: int
    manifest: Manifest
    state: ShardState | None
    note: str | None = None

    @property
    def offset(self) -> int | None:
        return None if self.state is None else self.state.wal_offset_next

    @property
    def name(self) -> str | None:
        if self.state is None:
            return None
        for entry in self.manifest.snapshots:
            if entry.wal_offset_next == self.state.wal_offset_next:
                return entry.name
        return None


class _Collect(logging.Handler):
    """Sends a store's warnings to the list of the shard being read (a context variable,
    which asyncio tasks and asyncio.to_thread carry)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        messages = _messages.get()
        if messages is not None:
            messages.append(record.getMessage())


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


async def newest_snapshot(config: Config, shard: int) -> ShardSnapshot:
    return (await newest_snapshots(config, [shard]))[0]


async def newest_snapshots(config: Config, shards: list[int]) -> list[ShardSnapshot]:
    collect = _Collect()
    loggers = [logging.getLogger(name) for name in STORE_LOGGERS]
    for logger in loggers:  # the warnings go into the notes instead of the log
        logger.addHandler(collect)
        logger.propagate = False
    slots = asyncio.Semaphore(STORES_CONCURRENCY)

    async def one(shard: int) -> ShardSnapshot:
        async with slots:
            return await _read_store(config, shard)

    try:
        return await gather_all(one(shard) for shard in shards)
    finally:
        for logger in loggers:
            logger.removeHandler(collect)
            logger.propagate = True


async def _read_store(config: Config, shard: int) -> ShardSnapshot:
    messages: list[str] = []
    _messages.set(messages)  # this task's own context
    store = make_snapshot_store(config, shard)
    try:
        manifest = await _maybe_await(store.read_manifest())
        state = await store.load()
    finally:
        close = getattr(store, "close", None)
        if close is not None:
            await close()
    note = None
    newest = manifest.snapshots[0] if manifest.snapshots else None
    if newest is not None and (state is None or state.wal_offset_next != newest.wal_offset_next):
        fallback = "none is usable" if state is None else \
            f"the snapshot at offset {state.wal_offset_next} is used"
        note = (f"shard {shard}: the newest snapshot {newest.name} is unusable ("
                + ("; ".join(messages) or "see the log") + f"); {fallback}")
    return ShardSnapshot(shard, manifest, state, note)
