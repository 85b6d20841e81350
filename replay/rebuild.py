"""Rebuild shards from snapshot + WAL through the engine's own path, and write a snapshot.

Each fencing group has one log holding all its shards' records; the rebuild reads it ONCE
for every chosen shard of the group (`--group G`: all of them). For each shard: start from a
checkpoint of an interrupted rebuild (unless `restart`), else from the newest valid snapshot
(unless `from_wal`), else from an empty state; the group's log is read from the lowest of
those offsets to its end with the engine's reader (shards/segment_log.py, or
KafkaWal.replay), each record decoded once with shards.records.decode_record and applied
with ShardState.apply (the compiled apply_group) to the shards it concerns (a vote batch,
the group's, to each shard with votes in it, which applies its own vote groups only; poll
created / closed to every shard; a shard skips what its state already holds); then each
state is frozen and saved in the shard's snapshot store (shards.backends.make_snapshot_store),
and its checkpoint removed.

Rules:
- The log's first record must be this layout's header for the group (replay/sources.py
  checks it before anything is applied); a log of another layout or group is refused, and
  so is a vote batch that names another group or holds votes of a shard outside the group
  (as the engine's recovery refuses them, shards/recovery.apply_record).
- Embedded log: the rebuild takes every chosen group's fence (the flock on the group's
  wal/LOCK) before it starts and holds it to the end, and refuses when an engine holds one:
  a rebuild never runs beside an engine that appends. Holding the fence, it recovers the log
  as an owner does at start-up (a torn last write is cut, as the next engine start would).
- Kafka: the tool never writes to the log, so it takes no fence; the snapshot it saves is
  correct at its offset, and stores order snapshots by offset, so it may run beside an
  engine.
- A checkpoint (one per shard) is written every `checkpoint_records` records of the group's
  log or `checkpoint_interval_s` seconds, and when `records_max` stops a run early
  (`RebuildPaused`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import msgspec

from engine.config import Config
from engine.errors import InvariantViolation, LogCorrupt
from replay.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    checkpoint_path,
    read_checkpoint,
    remove_checkpoint,
    write_checkpoint,
)
from replay.context import by_group
from replay.errors import BadInput, DataDamaged, Paused, Unavailable
from replay.sources import GroupLog, wal_directory
from shards.backends import make_snapshot_store
from shards.records import LogHeader, Record, VoteBatch, batch_shards, decode_record
from shards.segment_log import SegmentLog
from shards.snapshots import freeze, thaw
from shards.state import ShardState

SOURCE_SNAPSHOT = "snapshot"
SOURCE_WAL = "wal"


class RebuildPaused(Paused):
    """Rebuild paused: `records_max` records were applied; the checkpoint holds the work."""


@dataclass
class RebuildOptions:
    from_wal: bool = False
    restart: bool = False
    checkpoint_records: int = 200_000
    checkpoint_interval_s: float = 30.0
    records_max: int | None = None


@dataclass
class RebuildResult:
    shard: int
    group: int
    started_from: str  # how the state began: snapshot / empty / checkpoint
    start_offset: int
    end_offset: int
    records: int  # applied to this shard by this run (batches with its votes, the group's
    # control records)
    votes: int  # its votes in those records
    seconds: float  # the group's read, shared by its shards
    records_earlier: int  # applied by earlier, interrupted runs (from the checkpoint)
    votes_counted: int
    snapshot_name: str
    snapshot_bytes: int
    polls: dict[str, dict[str, int]]

    @property
    def votes_per_s(self) -> float:
        return self.votes / self.seconds if self.seconds > 0 else 0.0


# The log, as the rebuild reads it -------------------------------------------------------------


class EmbeddedRebuildLog:
    def __init__(self, config: Config, group: int) -> None:
        self.directory = wal_directory(config, group)
        self.group = group
        self.log = SegmentLog(self.directory, config.segment_bytes_max)
        self.identity = f"embedded:{self.directory.resolve()}"
        self.end_offset = 0

    def fence(self) -> None:
        if not self.directory.is_dir():
            raise BadInput(f"group {self.group} has no write-ahead log at {self.directory}")
        if not self.log.try_lock():
            raise Unavailable(f"group {self.group}: an engine holds the log's lock "
                              f"({self.directory / 'LOCK'}); stop it before rebuilding")
        # As an owner at start-up: find the durable end, cutting only a torn last write.
        self.end_offset = self.log.recover()

    async def replay(self, from_offset: int, apply) -> int:
        end_offset = self.end_offset
        if from_offset <= end_offset:
            for offset, next_offset, payload in self.log.read_from(from_offset):
                apply(offset, next_offset, payload)
        return end_offset

    async def read_at(self, offset: int) -> bytes:
        return self.log.read_at(offset)

    async def close(self) -> None:
        self.log.close()


class KafkaRebuildLog:
    def __init__(self, config: Config, group: int) -> None:
        from shards.kafka_wal import KafkaWal

        self.wal = KafkaWal(config, group)
        self.identity = f"kafka:{config.wal_topic}"

    def fence(self) -> None:
        """Nothing to take: the rebuild only reads Kafka (see the module docstring)."""

    async def replay(self, from_offset: int, apply) -> int:
        return await self.wal.replay(from_offset, apply)

    async def read_at(self, offset: int) -> bytes:
        return await self.wal.read_at(offset)

    async def close(self) -> None:
        await self.wal.close()


def open_rebuild_log(config: Config, group: int):
    return KafkaRebuildLog(config, group) if config.uses_kafka else EmbeddedRebuildLog(config, group)


# One shard --------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised out of the apply callback to end a run at `records_max`."""


class ShardRebuild:
    """The state of one shard's rebuild while records stream through `apply`."""

    def __init__(self, config: Config, shard: int, options: RebuildOptions, log,
                 progress: Callable[[int], None]) -> None:
        self.config = config
        self.shard = shard
        self.options = options
        self.log = log
        self.progress = progress
        self.path = checkpoint_path(config.data_path, shard)
        self.state: ShardState | None = None
        self.source = SOURCE_WAL if options.from_wal else SOURCE_SNAPSHOT
        self.started_offset = 0
        self.records = self.votes = 0
        self.records_before = self.votes_before = 0
        self.elapsed_before_s = 0.0
        self.run_started_s = time.monotonic()
        # The last record applied: its offset, and its payload (hashed only when a checkpoint
        # is written) or, right after a resume, the digest the checkpoint recorded.
        self.last_record_offset = 0
        self.last_record_sha256 = ""
        self._last_payload: bytes | memoryview | None = None

    @property
    def started_state(self) -> ShardState:
        """The state `begin` set: reading it before is a bug, not a damaged input."""
        if self.state is None:
            raise InvariantViolation(f"shard {self.shard}'s rebuild has no state before begin()")
        return self.state

    async def begin(self, store) -> str:
        """Set the starting state; return how it began."""
        checkpoint = None if self.options.restart else read_checkpoint(self.path)
        if checkpoint is not None:
            await self._resume(checkpoint)
            return f"checkpoint at offset {self.started_state.wal_offset_next}"
        if self.options.restart:
            remove_checkpoint(self.path)
        loaded = None if self.options.from_wal else await store.load()
        if loaded is not None:
            self._check_state(loaded, "the newest snapshot")
            self.state = loaded
            self.started_offset = loaded.wal_offset_next
            return f"snapshot at offset {loaded.wal_offset_next}"
        # Records the layout's groups: recovery refuses a snapshot of another one.
        self.state = ShardState(self.shard, self.config.shards, groups=self.config.resolved().groups)
        return "the start of the log" + ("" if self.options.from_wal else " (no snapshot)")

    async def _resume(self, checkpoint: Checkpoint) -> None:
        if checkpoint.source != self.source or checkpoint.wal != self.log.identity:
            raise BadInput(
                f"{self.path} is a checkpoint of a rebuild from the {checkpoint.source} of "
                f"{checkpoint.wal}; this run reads the {self.source} of {self.log.identity}: "
                "run with the same options, or with --restart")
        if checkpoint.last_record_sha256:
            try:
                payload = await self.log.read_at(checkpoint.last_record_offset)
            except LogCorrupt:  # no record there any more
                payload = b""
            if hashlib.sha256(payload).hexdigest() != checkpoint.last_record_sha256:
                raise DataDamaged(f"{self.path}: the log no longer holds the checkpoint's last "
                                  f"record at offset {checkpoint.last_record_offset}; run with "
                                  "--restart")
            self.last_record_offset = checkpoint.last_record_offset
            self.last_record_sha256 = checkpoint.last_record_sha256
        state = thaw(checkpoint.state)
        self._check_state(state, str(self.path))
        self.state = state
        self.started_offset = checkpoint.started_offset
        self.records_before, self.votes_before = checkpoint.records, checkpoint.votes
        self.elapsed_before_s = checkpoint.elapsed_s

    def _check_state(self, state: ShardState, what: str) -> None:
        if (state.shard, state.shards_total) != (self.shard, self.config.shards):
            raise DataDamaged(f"{what} is of shard {state.shard} of {state.shards_total}, "
                              f"not shard {self.shard} of {self.config.shards}")

    def take(self, offset: int, next_offset: int, record: Record, payload,
             shards_in_batch: Collection[int] = ()) -> int | None:
        """Apply one record of the group's log if it concerns this shard and the state does
        not hold it yet; the votes it held for this shard, None when it was not applied.
        `shards_in_batch`: for a vote batch, the shards with votes in it."""
        state = self.started_state
        if next_offset <= state.wal_offset_next:
            return None  # the snapshot or checkpoint already holds it
        if isinstance(record, VoteBatch) and self.shard not in shards_in_batch:
            state.advance_to(next_offset)
            return None
        try:
            state.apply(offset, next_offset, record)
        except ValueError as exc:
            raise DataDamaged(f"shard {self.shard}: the record at offset {offset} does not "
                              f"apply: {exc}") from None
        if isinstance(record, LogHeader):
            return None  # layout, not data: not counted as a record (as the recount does)
        # ShardState.apply applied this shard's vote groups only: count only those.
        votes = sum(len(group.voters) // 4 for group in record.groups
                    if group.shard == self.shard) if isinstance(record, VoteBatch) else 0
        self.records += 1
        self.votes += votes
        self.progress(votes)
        self.last_record_offset = offset
        self._last_payload = payload
        return votes

    def checkpoint(self) -> None:
        if self._last_payload is not None:
            self.last_record_sha256 = hashlib.sha256(self._last_payload).hexdigest()
            self._last_payload = None
        write_checkpoint(self.path, Checkpoint(
            format=CHECKPOINT_FORMAT, shard=self.shard, shards_total=self.config.shards,
            source=self.source, wal=self.log.identity, started_offset=self.started_offset,
            wal_offset_next=self.started_state.wal_offset_next,
            last_record_offset=self.last_record_offset,
            last_record_sha256=self.last_record_sha256,
            records=self.records_before + self.records, votes=self.votes_before + self.votes,
            elapsed_s=self.elapsed_before_s + time.monotonic() - self.run_started_s,
            state=freeze(self.started_state)))



class GroupRebuild:
    """One group's log streaming through `apply`, decoded once, to its chosen shards."""

    def __init__(self, config: Config, group: int, options: RebuildOptions,
                 shards: list[ShardRebuild]) -> None:
        self.config = config
        self.group = group
        self.options = options
        self.shards = shards
        self.records = 0
        self.records_since_checkpoint = 0
        self.checkpoint_time_s = time.monotonic()

    def apply(self, offset: int, next_offset: int, payload) -> None:
        try:
            record = decode_record(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DataDamaged(f"group {self.group}: the record at offset {offset} does not "
                              f"decode: {exc}") from None
        shards_in_batch: list[int] = []
        if isinstance(record, VoteBatch):
            shards_in_batch = self._batch_shards(offset, record)
        applied = [shard.take(offset, next_offset, record, payload, shards_in_batch)
                   for shard in self.shards]
        if all(votes is None for votes in applied):
            return
        self.records += 1
        self.records_since_checkpoint += 1
        if self.options.records_max is not None and self.records >= self.options.records_max:
            self.checkpoint()
            raise _Stop
        if (self.records_since_checkpoint >= self.options.checkpoint_records
                or time.monotonic() - self.checkpoint_time_s >= self.options.checkpoint_interval_s):
            self.checkpoint()

    def _batch_shards(self, offset: int, batch: VoteBatch) -> list[int]:
        """The shards with votes in the batch, each checked to be in the group."""
        if batch.group != self.group:
            raise DataDamaged(f"group {self.group}: the record at offset {offset} is a vote "
                              f"batch of group {batch.group}, not of this group's log")
        shards = batch_shards(batch)
        for shard in shards:
            if not 0 <= shard < self.config.shards or self.config.group_of(shard) != self.group:
                raise DataDamaged(f"group {self.group}: the record at offset {offset} is a vote "
                                  f"batch holding votes of shard {shard}, which is not in the "
                                  "group")
        return shards

    def checkpoint(self) -> None:
        for shard in self.shards:
            shard.checkpoint()
        self.records_since_checkpoint = 0
        self.checkpoint_time_s = time.monotonic()


async def rebuild_group(config: Config, group: int, shards: list[int], options: RebuildOptions,
                        log, progress_for: Callable[[int], Callable[[int], None]]
                        ) -> list[RebuildResult]:
    """Rebuild the chosen shards of one group whose log is fenced (`log.fence()` done) from
    one read of the log; see the module docstring."""
    stores = {shard: make_snapshot_store(config, shard) for shard in shards}
    try:
        rebuilds = [ShardRebuild(config, shard, options, log, progress_for(shard))
                    for shard in shards]
        started_from = {rebuild.shard: await rebuild.begin(stores[rebuild.shard])
                        for rebuild in rebuilds}
        start_offsets = {rebuild.shard: rebuild.started_state.wal_offset_next
                         for rebuild in rebuilds}
        counted_before = {rebuild.shard: rebuild.started_state.votes_applied
                          for rebuild in rebuilds}
        group_rebuild = GroupRebuild(config, group, options, rebuilds)
        started = time.perf_counter()
        for rebuild in rebuilds:
            rebuild.run_started_s = time.monotonic()
        try:
            end_offset = await log.replay(min(start_offsets.values()), group_rebuild.apply)
        except _Stop:
            raise RebuildPaused(
                f"group {group}: stopped after {group_rebuild.records} records (--records-max) "
                f"at offset {max(r.started_state.wal_offset_next for r in rebuilds)}; run again "
                f"to resume from the checkpoints in "
                f"{checkpoint_path(config.data_path, shards[0]).parent}") from None
        seconds = time.perf_counter() - started
        results = []
        for rebuild in rebuilds:
            shard, state = rebuild.shard, rebuild.started_state
            if start_offsets[shard] > end_offset:
                raise DataDamaged(f"shard {shard}: the starting state covers group {group}'s log "
                                  f"up to offset {start_offsets[shard]}, but the log ends at "
                                  f"{end_offset}: the log lost records")
            state.advance_to(end_offset)
            entry = await stores[shard].save(freeze(state), state.wal_offset_next)
            remove_checkpoint(rebuild.path)
            results.append(RebuildResult(
                shard=shard, group=group, started_from=started_from[shard],
                start_offset=start_offsets[shard], end_offset=end_offset,
                records=rebuild.records, votes=rebuild.votes, seconds=seconds,
                records_earlier=rebuild.records_before,
                votes_counted=state.votes_applied - counted_before[shard],
                snapshot_name=entry.name, snapshot_bytes=entry.size_bytes,
                polls={name: poll.counts() for name, poll in state.polls.items()}))
        return results
    finally:
        for store in stores.values():
            close = getattr(store, "close", None)
            if close is not None:
                await close()


async def rebuild(config: Config, shards: list[int], options: RebuildOptions,
                  progress_for: Callable[[int], Callable[[int], None]],
                  report: Callable[[RebuildResult], None]) -> list[RebuildResult]:
    """Fence every chosen shard's group first (refusing all when one is held) and check each
    log's header, then rebuild the groups one after the other, each from one read of its log;
    `progress_for(shard)` gives the per-record progress callback."""
    groups = by_group(config, shards)
    logs = {group: open_rebuild_log(config, group) for group in groups}
    fenced = []
    try:
        for log in logs.values():
            log.fence()
            fenced.append(log)
        for group in groups:
            reader = GroupLog(config, group)
            try:
                await reader.check_header()
            finally:
                await reader.close()
        results = []
        for group, group_shards in groups.items():
            for result in await rebuild_group(config, group, group_shards, options, logs[group],
                                              progress_for):
                report(result)
                results.append(result)
        return results
    finally:
        for log in fenced:
            await log.close()
