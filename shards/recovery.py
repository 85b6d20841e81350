"""Recovering a fencing group: each shard's snapshot, then one replay of the group's log.

Each shard has its own snapshots, each covering the group's log up to an offset; the group's
log is replayed once from the oldest of them, every record through the live apply
(`apply_record`), and a shard skips what its snapshot already holds (ShardState.apply). The
log's first record is its `LogHeader`: a log that starts with anything else, or with the
header of another layout or group, is refused (LogCorrupt naming the file or partition),
never misread; a new, empty log gets its header before the group serves. A snapshot of
another layout (its shard count, or its group count: its offsets are then in another
group's log) is refused the same way; one that does not record its groups (an older
release) is not used, and the shard is rebuilt from the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from engine.config import Config
from engine.errors import LogCorrupt
from shards.backends import shard_directory
from shards.pending import check_positions
from shards.records import LOG_FORMAT, LogHeader, Record, VoteBatch, decode_record, encode_record
from shards.snapshots import SnapshotStore, snapshot_name
from shards.state import ShardState
from shards.wal import Wal

log = logging.getLogger("votes.recovery")


def log_header(config: Config, group: int) -> LogHeader:
    return LogHeader(format=LOG_FORMAT, shards=config.shards, groups=config.groups, group=group)


def apply_record(states: Mapping[int, ShardState], group: int, offset: int, next_offset: int,
                 record: Record) -> list[bytearray | None]:
    """Apply one record of a group's log: each vote group of a vote batch to its shard,
    anything else to every shard of the group. The vote batch's outcomes, one per vote group
    (ShardState.apply); [] for the others."""
    if isinstance(record, VoteBatch):
        if record.group != group:
            raise LogCorrupt(f"record at offset {offset} is a vote batch of group {record.group} "
                             f"in the log of group {group}")
        positions_of: dict[int, list[int]] = {}
        for position, vote_group in enumerate(record.groups):
            positions_of.setdefault(vote_group.shard, []).append(position)
        outcomes: list[bytearray | None] = [None] * len(record.groups)
        for shard, positions in positions_of.items():
            state = states.get(shard)
            if state is None:
                raise LogCorrupt(f"record at offset {offset} holds votes of shard {shard}, "
                                 f"which is not in group {group}")
            for position, outcome in zip(positions, state.apply_votes(
                    offset, next_offset, record, positions), strict=True):
                outcomes[position] = outcome
        return outcomes
    for state in states.values():
        state.apply(offset, next_offset, record)
    return []


def check_header(record: Record, expected: LogHeader, offset: int, location: str) -> None:
    if record == expected:
        return
    if isinstance(record, LogHeader) and record.format != expected.format:
        found = (f"the header {record!r}, of log format {record.format} (this release reads "
                 f"format {expected.format} only: format 2 wrote one vote batch per shard per "
                 f"commit cycle)")
    elif isinstance(record, LogHeader):
        found = f"the header {record!r}"
    else:
        found = (f"a {type(record).__name__} record (a log of layout 1, one log per shard, has "
                 f"no header)")
    raise LogCorrupt(
        f"the log {location} starts at offset {offset} with {found}, not {expected!r}: it was "
        f"written by another layout or for another group. Export its results with the release "
        f"that wrote it; do not point this group at it.")


def attach_locator(config: Config, shard: int, state: ShardState | None) -> ShardState:
    """The shard's state with its receipt locator's runs attached: the run files on this
    host, or on a new host the runs the snapshot carried, written out. A snapshot that
    carried none and whose runs are not all here (a snapshot of an older release) is not
    used: the shard is rebuilt from the log, which rebuilds its locator too
    (shards/locator_runs.py: runs are derived data). Blocking file I/O: off the loop."""
    directory = shard_directory(config.data_path, shard) / "locator"
    if state is not None:
        if state.attach_locator(directory, config.locator_run_entries):
            state.groups = config.resolved().groups
            return state
        log.warning("shard %d: the receipt locator runs in %s do not cover its snapshot at "
                    "offset %d and the snapshot does not carry them; rebuilding the shard "
                    "from the log", shard, directory, state.wal_offset_next)
    fresh = ShardState(shard, config.shards, config.locator_run_entries,
                       groups=config.resolved().groups)
    fresh.attach_locator_fresh(directory, config.locator_run_entries)
    return fresh


def check_layout(config: Config, shard: int, state: ShardState | None,
                 location: str) -> ShardState | None:
    """The loaded snapshot if it is of this layout; None (rebuild from the log) if it does
    not say which groups it was written for; LogCorrupt if it is of another layout."""
    if state is None:
        return None
    if (state.shard, state.shards_total) != (shard, config.shards):
        # Voter ids map to bitmap positions through the shard count: another layout's
        # snapshot would count every voter under someone else's id.
        raise LogCorrupt(
            f"the newest snapshot in {location} is of shard {state.shard} of "
            f"{state.shards_total}, not shard {shard} of {config.shards}: it was written by "
            f"another layout. Point s3_prefix (or the data dir) at this layout's snapshots, "
            f"or start with the layout that wrote them.")
    groups = config.resolved().groups
    if state.groups == 0:
        # Written before snapshots recorded their groups: its offsets may be in another
        # group's log, and the log alone is safe (slower).
        log.warning("shard %d: the newest snapshot in %s does not record its fencing groups; "
                    "rebuilding the shard from the log", shard, location)
        return None
    if state.groups != groups:
        # A shard's group is shard mod groups: with another group count its offsets are
        # positions in another group's log, and replaying this one from them would skip
        # or misapply records.
        raise LogCorrupt(
            f"the newest snapshot in {location} was written by a layout of "
            f"{state.groups} fencing groups, not {groups}: its offsets are in another "
            f"group's log. Start with groups = {state.groups}, or point s3_prefix (or the "
            f"data dir) at this layout's snapshots (an empty one rebuilds from the log).")
    return state


async def recover_group(group: int, config: Config, wal: Wal,
                        snapshot_stores: Mapping[int, SnapshotStore],
                        ) -> tuple[dict[int, ShardState], int]:
    """Every shard's state of the group and the log offset after the last record applied."""
    shards = sorted(snapshot_stores)
    loaded = await asyncio.gather(*(snapshot_stores[shard].load() for shard in shards))
    checked = [check_layout(config, shard, state, snapshot_stores[shard].location())
               for shard, state in zip(shards, loaded, strict=True)]
    # Writing out the runs a snapshot carried is file I/O: off the loop, which may be
    # serving the worker's other groups (a takeover).
    states = await asyncio.to_thread(lambda: {
        shard: attach_locator(config, shard, state)
        for shard, state in zip(shards, checked, strict=True)})
    replay_from = min(state.wal_offset_next for state in states.values())
    header = log_header(config, group)
    records_seen = 0

    def apply(offset: int, next_offset: int, payload: bytes | memoryview) -> None:
        nonlocal records_seen
        record = decode_record(payload)
        if records_seen == 0 and replay_from == 0:
            check_header(record, header, offset, wal.location())
        records_seen += 1
        apply_record(states, group, offset, next_offset, record)

    end_offset = await wal.replay(replay_from, apply)
    for shard, state in states.items():
        if state.wal_offset_next > end_offset:
            # The snapshot holds votes the log no longer has: serving it would answer for
            # records nobody can replay or audit. Stop, naming both sides for the operator.
            raise LogCorrupt(
                f"snapshot {snapshot_name(state.wal_offset_next)} of shard {shard} in "
                f"{snapshot_stores[shard].location()} covers the log up to "
                f"{state.wal_offset_next} but the log ends at {end_offset} "
                f"({wal.location()}): the log lost acknowledged records")
        if state.locator_covered_next() > end_offset:
            # Runs point at records the log no longer has: their receipts would be wrong.
            raise LogCorrupt(
                f"the receipt locator runs of shard {shard} cover the log up to "
                f"{state.locator_covered_next()} but the log ends at {end_offset} "
                f"({wal.location()}): the log lost acknowledged records")
    # No record at all: a new log. Its end need not be 0 (Kafka's owner markers, which
    # replay skips, come first), so "empty" is judged by the records, not the offset.
    if records_seen == 0 and replay_from == 0:
        positions = await wal.append([encode_record(header)])
        check_positions(positions, 1, end_offset)
        end_offset = positions[0][1]
    for state in states.values():
        state.advance_to(end_offset)
    return states, end_offset
