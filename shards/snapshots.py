"""Shard snapshots: a frozen copy of bitmaps, tallies, locators and the WAL offset they cover.

A poll's receipt locator is carried as its open run (and the log offset it starts at) and
the entries of the sealed runs before it (shards/locator_runs.py), so the snapshot alone
restores the shard on any host: recovery (ShardState.attach_locator) uses the run files on
this host when they cover the snapshot, else writes out the runs the snapshot carried. That
costs 12 bytes per counted vote in every snapshot (docs/performance.md, the locator
section); a snapshot of an older release, which carried no runs, is usable only with the
run files beside it, else the shard is rebuilt from the log. Without a locator directory
every entry is carried in the open run.

The snapshot records its layout (shards_total and groups): its offsets are in the log of
its fencing group, and recovery refuses a snapshot of another layout (shards/recovery.py).

`freeze_deferred` runs synchronously on the event loop between two applied records (a batch
boundary), so the copy is consistent: it copies bitmaps and tallies and captures the runs
(FrozenShard); `FrozenShard.save_to` reads the run files, encodes and saves, off the loop
and a bounded number of shards at once.
A store keeps, per shard, snapshot objects plus a manifest listing them newest first with
their SHA-256; the object is written first and the manifest is replaced atomically after,
so a crash or failure in between leaves the previous snapshot in use. Loading walks the
manifest newest first and takes the first object whose checksum and decoding check out.

`SnapshotStore` is the contract the shard owner types against (`save`, `load`, `close`);
`DirectorySnapshotStore` is the embedded default and shards/s3_snapshots.py the S3 store;
which one is chosen once at start-up (shards/backends.py). A failed `save` raises OSError
and leaves the previous snapshot in use (docs/design.md "Snapshots").
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import logging
import os
import time
import weakref
from pathlib import Path
from collections.abc import Awaitable, Sequence
from typing import Protocol

import msgspec
from pyroaring import BitMap

from engine.fastpath import Locator
from shards.locator_runs import PollLocator, RunSource, RunWrite, restored_run, runs_durable
from shards.records import PollCreated
from shards.segment_log import fsync_directory
from shards.state import PollState, ShardState

log = logging.getLogger("votes.snapshots")


class RunSnapshot(msgspec.Struct, array_like=True, frozen=True):
    """A sealed locator run the snapshot relies on: packed uint32 voters, uint64 values."""

    seq: int
    offset_first: int
    offset_next: int
    voters: bytes
    values: bytes


class PollSnapshot(msgspec.Struct, array_like=True, frozen=True):
    definition: PollCreated
    closed_ms: int | None
    voters: bytes  # roaring portable serialization
    tallies: list[int]
    # The receipt locator's open run: the log offset from which it holds the counted votes
    # (run files cover what lies before), packed uint32 voter indexes and uint64 values.
    locator_open_from: int
    locator_voters: bytes
    locator_values: bytes
    # The sealed runs covering [0, locator_open_from), oldest first. Fields added last, with
    # a default, so a snapshot of the release before decodes (it carried no runs).
    locator_runs: list[RunSnapshot] = []
    # Per country claim, votes per option index (a poll with the country breakdown only).
    country_tallies: dict[str, list[int]] = {}


class ShardSnapshot(msgspec.Struct, array_like=True, frozen=True):
    shard: int
    shards_total: int
    wal_offset_next: int
    batch_seq_next: int
    votes_applied: int
    polls: list[PollSnapshot]
    groups: int = 0  # the layout's fencing groups; 0: a release that did not record it


class ManifestEntry(msgspec.Struct, frozen=True):
    name: str
    wal_offset_next: int
    sha256: str
    size_bytes: int
    created_ms: int


class Manifest(msgspec.Struct, frozen=True):
    shard: int
    snapshots: list[ManifestEntry]  # newest first


_snapshot_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(ShardSnapshot)
_manifest_decoder = msgspec.json.Decoder(Manifest)


class FrozenShard:
    """A shard state captured at a batch boundary; `encode` (blocking: it reads the run files
    the snapshot relies on) turns it into the snapshot's bytes, once."""

    def __init__(self, snapshot: ShardSnapshot, sources: list[list[RunSource]],
                 writes: Sequence[RunWrite] = ()) -> None:
        self.snapshot = snapshot
        self.sources = sources  # per poll of the snapshot, its runs
        self.writes = writes  # run files being written when it was frozen

    async def save_to(self, store: SnapshotStore, wal_offset_next: int) -> ManifestEntry:
        """The shard owner's snapshot writer: once the run writes it was frozen with are
        durable (their OSError if one failed: this snapshot is not published), encode it on
        a thread and save it, at most SNAPSHOTS_IN_FLIGHT_MAX of the process at once."""
        slots = _in_flight_slots()
        try:
            await runs_durable(self.writes)
            await slots.acquire()
        except BaseException:
            self.close()
            raise
        try:
            data = await asyncio.to_thread(self.encode)  # which closes the sources itself
            return await store.save(data, wal_offset_next)
        finally:
            slots.release()

    def encode(self) -> bytes:
        try:
            polls = [
                msgspec.structs.replace(poll, locator_runs=[
                    RunSnapshot(source.seq, source.offset_first, source.offset_next,
                                *source.read())
                    for source in sources])
                for poll, sources in zip(self.snapshot.polls, self.sources, strict=True)]
        finally:
            self.close()
        return _snapshot_encoder.encode(msgspec.structs.replace(self.snapshot, polls=polls))

    def close(self) -> None:
        """Release the captured runs (a snapshot abandoned before `encode`)."""
        for sources in self.sources:
            for source in sources:
                source.close()


# Snapshots of one process being encoded or saved at once. Each holds up to ~24 B per counted
# vote of its shard (the runs read, then the encoded bytes) until its store has it, and
# shards fill at the same rate, so they fall due together: they queue here instead of
# holding every shard's copy at once.
SNAPSHOTS_IN_FLIGHT_MAX = 2
_in_flight: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary())


def _in_flight_slots() -> asyncio.Semaphore:
    """The running loop's semaphore (an asyncio.Semaphore belongs to one loop)."""
    loop = asyncio.get_running_loop()
    slots = _in_flight.get(loop)
    if slots is None:
        slots = _in_flight[loop] = asyncio.Semaphore(SNAPSHOTS_IN_FLIGHT_MAX)
    return slots


def freeze_deferred(state: ShardState) -> FrozenShard:
    """Capture the whole shard state in one synchronous step (a batch boundary).

    It runs on the event loop: bitmaps and tallies are serialized, a locator adds its open
    run (at most locator_run_entries + one group's votes, 12 bytes each) and opens its run
    files; their entries are read by `FrozenShard.encode`, off the loop."""
    polls = []
    sources = []
    try:
        for poll in state.polls.values():
            sources.append(poll.locator.snapshot_sources())
            open_from, voters, values = poll.locator.snapshot_entries()
            polls.append(PollSnapshot(
                definition=poll.definition,
                closed_ms=poll.closed_ms,
                voters=poll.voters.serialize(),
                tallies=poll.tallies.tolist(),
                locator_open_from=open_from,
                locator_voters=voters,
                locator_values=values,
                country_tallies=poll.country_counts(),
            ))
    except BaseException:
        FrozenShard(ShardSnapshot(state.shard, state.shards_total, 0, 0, 0, []), sources).close()
        raise
    snapshot = ShardSnapshot(
        shard=state.shard,
        shards_total=state.shards_total,
        wal_offset_next=state.wal_offset_next,
        batch_seq_next=state.batch_seq_next,
        votes_applied=state.votes_applied,
        polls=polls,
        groups=state.groups,
    )
    return FrozenShard(snapshot, sources, state.locator_writes_pending())


def freeze(state: ShardState) -> bytes:
    """The snapshot's bytes at once (tools and tests; the shard owner uses freeze_deferred
    and encodes off the loop, since this reads the run files where it is called)."""
    return freeze_deferred(state).encode()


def thaw(data: bytes) -> ShardState:
    snapshot = _snapshot_decoder.decode(data)
    state = ShardState(snapshot.shard, snapshot.shards_total, groups=snapshot.groups)
    state.wal_offset_next = snapshot.wal_offset_next
    state.batch_seq_next = snapshot.batch_seq_next
    state.votes_applied = snapshot.votes_applied
    for poll_snapshot in snapshot.polls:
        open_run = Locator.from_entries(poll_snapshot.locator_voters, poll_snapshot.locator_values)
        runs = [restored_run(run.seq, run.offset_first, run.offset_next, run.voters, run.values)
                for run in poll_snapshot.locator_runs]
        poll = PollState(poll_snapshot.definition,
                         PollLocator(open_from=poll_snapshot.locator_open_from, open_run=open_run,
                                     runs=runs))
        poll.closed_ms = poll_snapshot.closed_ms
        poll.voters = BitMap.deserialize(poll_snapshot.voters)
        poll.tallies = array.array("Q", poll_snapshot.tallies)
        poll.country_tallies = {country: array.array("Q", tallies)
                                for country, tallies in poll_snapshot.country_tallies.items()}
        state.polls[poll_snapshot.definition.poll] = poll
    return state


def snapshot_name(wal_offset_next: int) -> str:
    return f"snapshot-{wal_offset_next:020d}.bin"


class SnapshotStore(Protocol):
    # The directory store reads its manifest in the caller's thread, S3 asynchronously.
    def read_manifest(self) -> Manifest | Awaitable[Manifest]: ...

    async def save(self, data: bytes, wal_offset_next: int) -> ManifestEntry: ...

    async def load(self) -> ShardState | None: ...

    def location(self) -> str: ...

    async def close(self) -> None: ...


class DirectorySnapshotStore:
    """Snapshots of one shard in a local directory (the embedded default)."""

    def __init__(self, directory: Path, shard: int, kept: int) -> None:
        self.directory = Path(directory)
        self.shard = shard
        self.kept = kept

    @property
    def manifest_path(self) -> Path:
        return self.directory / "MANIFEST.json"

    def location(self) -> str:
        return str(self.directory)

    def read_manifest(self) -> Manifest:
        try:
            return _manifest_decoder.decode(self.manifest_path.read_bytes())
        except FileNotFoundError:
            return Manifest(shard=self.shard, snapshots=[])
        except msgspec.DecodeError as exc:
            # A damaged manifest vouches for no snapshot: recover from the log alone.
            log.warning("snapshot manifest %s does not decode (%s); using no snapshot",
                        self.manifest_path, exc)
            return Manifest(shard=self.shard, snapshots=[])

    def write(self, data: bytes, wal_offset_next: int) -> ManifestEntry:
        """Object first, then the manifest by atomic rename; then prune what fell out."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = snapshot_name(wal_offset_next)
        _write_atomically(self.directory / name, data, paced=True)
        entry = ManifestEntry(
            name=name,
            wal_offset_next=wal_offset_next,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            created_ms=int(time.time() * 1000),
        )
        previous = [item for item in self.read_manifest().snapshots if item.name != name]
        manifest = Manifest(shard=self.shard, snapshots=[entry, *previous][: self.kept])
        _write_atomically(self.manifest_path, msgspec.json.encode(manifest))
        kept_names = {item.name for item in manifest.snapshots}
        for path in self.directory.glob("snapshot-*.bin"):
            if path.name not in kept_names:
                path.unlink(missing_ok=True)
        return entry

    async def save(self, data: bytes, wal_offset_next: int) -> ManifestEntry:
        return await asyncio.to_thread(self.write, data, wal_offset_next)

    async def load(self) -> ShardState | None:
        return await asyncio.to_thread(self.load_newest)

    async def close(self) -> None:
        """Nothing to release (an S3 store closes its client here)."""

    def load_newest(self) -> ShardState | None:
        for entry in self.read_manifest().snapshots:
            try:
                data = (self.directory / entry.name).read_bytes()
            except OSError as exc:
                log.warning("snapshot %s unreadable (%s); trying an older one", entry.name, exc)
                continue
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                log.warning("snapshot %s fails its checksum; trying an older one", entry.name)
                continue
            try:
                return thaw(data)
            except (msgspec.DecodeError, ValueError) as exc:
                log.warning("snapshot %s does not decode (%s); trying an older one", entry.name, exc)
        return None


# A snapshot is written to disk in slices, each flushed, with a pause between them. It
# shares the disk with the shard logs, and one fsync of a whole 16+ MB snapshot held every
# log fsync queued behind it: the open-loop p99 at 13.7k votes/s was 14-37 ms with it, and
# 7-11 ms written this way (docs/performance.md). A 100 MB snapshot then takes ~0.5 s, on
# its own thread.
SNAPSHOT_WRITE_SLICE_BYTES = 1 << 20
SNAPSHOT_WRITE_PAUSE_S = 0.002


def _write_atomically(path: Path, data: bytes, paced: bool = False) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        if paced:
            view = memoryview(data)
            for start in range(0, len(view), SNAPSHOT_WRITE_SLICE_BYTES):
                handle.write(view[start:start + SNAPSHOT_WRITE_SLICE_BYTES])
                handle.flush()
                os.fdatasync(handle.fileno())
                time.sleep(SNAPSHOT_WRITE_PAUSE_S)
        else:
            handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)
