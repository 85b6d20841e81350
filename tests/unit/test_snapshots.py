"""Proves that a shard snapshot (shards/snapshots.py) thaws to the same state it froze (polls,
bitmaps, tallies, locators, a closed poll, offsets), that the directory store keeps exactly the
`kept` newest snapshots and deletes the rest from disk, that a damaged newest object makes
loading fall back to the previous snapshot, and that a failure between writing the object and
the manifest leaves the previous snapshot in use.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import Config
from shards import snapshots
from shards.snapshot_policy import snapshot_due
from shards.records import PollClosed
from shards.snapshots import DirectorySnapshotStore, freeze, snapshot_name, thaw
from shards.state import ShardState
from tests.support.records import Log, fingerprint, poll_created, vote_batch

SHARD = 3
SHARDS_TOTAL = 8


def busy_state() -> ShardState:
    state = ShardState(SHARD, SHARDS_TOTAL)
    log = Log(state)
    log.apply(poll_created("song", ["a", "b", "c"]))
    log.apply(poll_created("quiz", ["yes", "no"]))
    log.apply(vote_batch(SHARD, 0, {"song": [(1, 0), (2, 2), (1, 1), (70_000, 2)],
                                    "quiz": [(5, 1)]}))
    log.apply(vote_batch(SHARD, 1, {"quiz": [(6, 0), (5, 0)]}))
    log.apply(PollClosed(poll="quiz", closed_ms=1_700_000_000_500))
    log.apply(vote_batch(SHARD, 2, {"quiz": [(7, 0)], "song": [(3, 1)]}))
    return state


def test_thaw_restores_what_freeze_captured() -> None:
    state = busy_state()
    assert state.polls["song"].counts() == {"a": 1, "b": 1, "c": 2}
    assert state.polls["quiz"].counts() == {"yes": 1, "no": 1}
    assert state.polls["quiz"].closed
    restored = thaw(freeze(state))
    assert fingerprint(restored) == fingerprint(state)
    # The restored state keeps working: the same test-and-set, the same closed poll.
    Log(restored).apply(vote_batch(SHARD, 3, {"song": [(2, 0), (4, 0)], "quiz": [(8, 0)]}))
    assert restored.polls["song"].counts() == {"a": 2, "b": 1, "c": 2}
    assert restored.polls["quiz"].counts() == {"yes": 1, "no": 1}
    assert restored.votes_applied == state.votes_applied + 1
    # Locators hold the offset of the record that counted the vote: batch 3 went in at 600,
    # batch 0 at 200 (the Log helper spaces records 100 apart).
    assert restored.record_of_voter(restored.polls["song"], 4) == 600
    assert restored.record_of_voter(restored.polls["song"], 70_000) == 200


def test_the_live_state_keeps_growing_after_a_freeze() -> None:
    """freeze() encodes the locators through memoryviews of their pages; the live state goes
    on taking votes (and locator pages) after it, and the frozen bytes do not change."""
    state = busy_state()
    frozen = freeze(state)
    Log(state).apply(vote_batch(SHARD, 3, {"song": [(900_000, 1)]}))
    assert state.record_of_voter(state.polls["song"], 900_000) is not None
    # The earlier freeze still restores the state as it was then.
    restored = thaw(frozen)
    assert not restored.polls["song"].voters.__contains__(900_000)
    assert restored.polls["song"].counts() == {"a": 1, "b": 1, "c": 2}


def test_a_paced_write_is_the_same_file(tmp_path: Path) -> None:
    """A snapshot larger than one slice, written in flushed slices, reads back whole."""
    data = bytes(range(256)) * (3 * snapshots.SNAPSHOT_WRITE_SLICE_BYTES // 256 + 17)
    snapshots._write_atomically(tmp_path / "paced.bin", data, paced=True)
    assert (tmp_path / "paced.bin").read_bytes() == data
    assert not (tmp_path / "paced.bin.tmp").exists()


def test_an_empty_state_round_trips() -> None:
    state = ShardState(SHARD, SHARDS_TOTAL)
    assert fingerprint(thaw(freeze(state))) == fingerprint(state)


def advance(state: ShardState, batch_seq: int) -> None:
    Log(state).apply(vote_batch(SHARD, batch_seq, {"song": [(100 + batch_seq, batch_seq % 3)]}))


def test_the_store_keeps_the_newest_and_deletes_the_rest(tmp_path: Path) -> None:
    store = DirectorySnapshotStore(tmp_path / "snapshots", SHARD, kept=3)
    state = busy_state()
    written = []
    for batch_seq in range(3, 9):
        advance(state, batch_seq)
        store.write(freeze(state), state.wal_offset_next)
        written.append((state.wal_offset_next, fingerprint(state)))
    newest_three = [offset for offset, _ in reversed(written[-3:])]
    assert [entry.wal_offset_next for entry in store.read_manifest().snapshots] == newest_three
    on_disk = sorted(path.name for path in store.directory.iterdir())
    assert on_disk == sorted(["MANIFEST.json", *(snapshot_name(o) for o in newest_three)])
    assert fingerprint(store.load_newest()) == written[-1][1]


def test_an_empty_store_loads_nothing(tmp_path: Path) -> None:
    assert DirectorySnapshotStore(tmp_path / "none", SHARD, kept=2).load_newest() is None


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "delete"])
def test_a_damaged_newest_snapshot_falls_back_to_the_previous(tmp_path: Path, damage: str) -> None:
    store = DirectorySnapshotStore(tmp_path / "snapshots", SHARD, kept=3)
    state = busy_state()
    store.write(freeze(state), state.wal_offset_next)
    previous = fingerprint(state)
    advance(state, 3)
    newest = store.write(freeze(state), state.wal_offset_next)
    path = store.directory / newest.name
    data = bytearray(path.read_bytes())
    if damage == "flip-byte":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-1]))
    else:
        path.unlink()
    assert fingerprint(store.load_newest()) == previous


def test_a_failure_between_object_and_manifest_keeps_the_previous_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DirectorySnapshotStore(tmp_path / "snapshots", SHARD, kept=2)
    state = busy_state()
    store.write(freeze(state), state.wal_offset_next)
    previous = fingerprint(state)
    manifest_before = store.manifest_path.read_bytes()
    write_atomically = snapshots._write_atomically

    def fail_on_manifest(path: Path, data: bytes, paced: bool = False) -> None:
        if path == store.manifest_path:
            raise OSError(28, "No space left on device")
        write_atomically(path, data, paced)

    monkeypatch.setattr(snapshots, "_write_atomically", fail_on_manifest)
    advance(state, 3)
    with pytest.raises(OSError):
        store.write(freeze(state), state.wal_offset_next)
    assert store.manifest_path.read_bytes() == manifest_before
    assert fingerprint(store.load_newest()) == previous

    # The next successful write takes over and removes the orphaned object.
    monkeypatch.setattr(snapshots, "_write_atomically", write_atomically)
    advance(state, 4)
    store.write(freeze(state), state.wal_offset_next)
    assert fingerprint(store.load_newest()) == fingerprint(state)
    assert len(list(store.directory.glob("snapshot-*.bin"))) == 2


def test_snapshots_wait_for_a_share_of_the_state_or_the_interval() -> None:
    """A snapshot needs snapshot_votes_min new votes and half the votes the last one held,
    or any new vote once the interval has passed."""
    config = Config(snapshot_votes_min=100, snapshot_votes_share=0.5, snapshot_interval_s=60)
    assert not snapshot_due(config, 0, 99, 1.0)
    assert snapshot_due(config, 0, 100, 1.0)
    assert not snapshot_due(config, 1_000, 1_499, 1.0)  # 499 new: under half of 1,000
    assert snapshot_due(config, 1_000, 1_500, 1.0)
    assert not snapshot_due(config, 1_000, 1_000, 3600.0)  # nothing new: nothing to save
    assert snapshot_due(config, 1_000, 1_001, 60.0)
    flat = Config(snapshot_votes_min=100, snapshot_votes_share=0.0)
    assert snapshot_due(flat, 1_000_000, 1_000_100, 1.0)
