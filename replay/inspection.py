"""`inspect wal` and `inspect snapshots`: a group's or a shard's records, a shard's snapshots.

Records come from the independent reader (replay/rawlog.py), read-only, from the fencing
group's one log: for a group every record, for a shard the records that concern it (the
header, poll created / closed, and the vote batches holding votes of the shard); each is
described by its offset, next offset, kind and fields, a vote batch (the group's, holding
votes of any of its shards) by its group, batch_seq, time, key id, the shards with votes in
it and per vote group the shard, the poll and the vote count. A batch listed for a shard is
described whole, with the vote groups of its other shards too: it is one record. Snapshots:
the manifest entries, and a summary of the newest snapshot that checks out.
"""

from __future__ import annotations

import datetime

from engine.config import Config
from replay.rawlog import Batch, Closed, Created, Frame, Header, decode_raw
from replay.snapshot_view import newest_snapshot
from replay.sources import read_frames

RECORDS_LISTED_MAX = 1_000_000


class _Enough(Exception):
    """Raised out of the reader's callback once `limit` records are listed."""


def _time(epoch_ms: int | None) -> str | None:
    if epoch_ms is None:
        return None
    moment = datetime.datetime.fromtimestamp(epoch_ms / 1000, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe(frame: Frame, group: int, shard: int | None = None) -> dict | None:
    """The record as a dict; None when `shard` is given and the record is a vote batch
    without votes of it."""
    record = decode_raw(frame.payload, f"group {group} record at offset {frame.offset}")
    if shard is not None and isinstance(record, Batch) and shard not in record.shards:
        return None
    entry: dict = {"offset": frame.offset, "next_offset": frame.next_offset,
                   "bytes": len(frame.payload)}
    if isinstance(record, Header):
        entry.update(kind="log-header", format=record.format, shards=record.shards,
                     groups=record.groups, group=record.group)
    elif isinstance(record, Created):
        entry.update(kind="poll-created", poll=record.poll, options=record.options,
                     opens_at=_time(record.opens_at_ms), closes_at=_time(record.closes_at_ms),
                     embargo=record.embargo, created=_time(record.created_ms))
    elif isinstance(record, Closed):
        entry.update(kind="poll-closed", poll=record.poll, closed_ms=record.closed_ms,
                     closed=_time(record.closed_ms))
    elif isinstance(record, Batch):
        entry.update(kind="vote-batch", group=record.group, batch_seq=record.batch_seq,
                     time=_time(record.time_ms), votes=record.vote_count, shards=record.shards,
                     groups=[{"shard": vote_group.shard, "poll": vote_group.poll,
                              "votes": vote_group.size} for vote_group in record.groups],
                     batch_position=record.batch_position, batch_count=len(record.batch_nodes),
                     key_id=record.key_id)
    return entry


def render_record(entry: dict) -> str:
    head = f"{entry['offset']:>14} -> {entry['next_offset']:<14} {entry['kind']:<13}"
    if entry["kind"] == "poll-created":
        return (f"{head} poll={entry['poll']} options={','.join(entry['options'])} "
                f"opens_at={entry['opens_at']} closes_at={entry['closes_at']} "
                f"embargo={entry['embargo']} created={entry['created']}")
    if entry["kind"] == "log-header":
        return (f"{head} format={entry['format']} shards={entry['shards']} "
                f"groups={entry['groups']} group={entry['group']}")
    if entry["kind"] == "poll-closed":
        return f"{head} poll={entry['poll']} closed_ms={entry['closed_ms']} ({entry['closed']})"
    # Per vote group: shard/poll:votes (a poll id may hold ':' but the last one ends it).
    groups = " ".join(f"{group['shard']}/{group['poll']}:{group['votes']}"
                      for group in entry["groups"])
    return (f"{head} group={entry['group']} batch_seq={entry['batch_seq']} "
            f"time={entry['time']} votes={entry['votes']} groups=[{groups}] "
            f"key={entry['key_id']} batch {entry['batch_position'] + 1}/{entry['batch_count']}")


async def wal_records(config: Config, group: int, from_offset: int, limit: int,
                      shard: int | None = None) -> tuple[list[dict], dict]:
    """Up to `limit` records of the group's log from `from_offset` (only those concerning
    `shard` when given: not the vote batches without its votes), and where the listing
    stopped."""
    entries: list[dict] = []

    def take(frame: Frame) -> None:
        entry = describe(frame, group, shard)
        if entry is None:
            return
        if len(entries) >= limit:
            raise _Enough
        entries.append(entry)

    try:
        end = await read_frames(config, group, take, from_offset=from_offset)
        tail = {"end_offset": end.end_offset, "torn_tail": end.torn_tail, "more": False}
    except _Enough:
        tail = {"end_offset": None, "torn_tail": None, "more": True}
    return entries, tail


async def snapshot_summary(config: Config, shard: int) -> dict:
    snapshot = await newest_snapshot(config, shard)
    summary: dict = {
        "shard": shard,
        "manifest": [{"name": entry.name, "wal_offset_next": entry.wal_offset_next,
                      "sha256": entry.sha256, "size_bytes": entry.size_bytes,
                      "created": _time(entry.created_ms)} for entry in snapshot.manifest.snapshots],
        "note": snapshot.note, "newest_valid": None,
    }
    state = snapshot.state
    if state is not None:
        summary["newest_valid"] = {
            "name": snapshot.name, "wal_offset_next": state.wal_offset_next,
            "batch_seq_next": state.batch_seq_next, "votes_applied": state.votes_applied,
            "polls": {name: {"counts": poll.counts(), "total": sum(poll.tallies),
                             "voters": len(poll.voters), "closed": poll.closed,
                             "closed_ms": poll.closed_ms}
                      for name, poll in state.polls.items()},
        }
    return summary


def render_snapshots(summary: dict) -> str:
    lines = [(f"shard {summary['shard']}: {len(summary['manifest'])} snapshots in the manifest "
              "(newest first)")]
    for entry in summary["manifest"]:
        lines.append(f"  {entry['name']}  offset {entry['wal_offset_next']:,}  "
                     f"{entry['size_bytes']:,} bytes  sha256 {entry['sha256'][:16]}...  "
                     f"created {entry['created']}")
    if summary["note"]:
        lines.append(f"note: {summary['note']}")
    newest = summary["newest_valid"]
    if newest is None:
        lines.append("no usable snapshot")
        return "\n".join(lines)
    lines.append(f"newest valid: {newest['name']} at offset {newest['wal_offset_next']:,}, "
                 f"batch_seq_next {newest['batch_seq_next']}, {newest['votes_applied']:,} votes "
                 "applied")
    for name, poll in newest["polls"].items():
        counts = ", ".join(f"{option} {count:,}" for option, count in poll["counts"].items())
        state = "closed" if poll["closed"] else "open"
        lines.append(f"  poll {name} ({state}): {counts}; total {poll['total']:,}, "
                     f"{poll['voters']:,} voters")
    return "\n".join(lines)
