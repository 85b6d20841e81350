"""Proves the caches behind a repeat vote's 409 (shards/repeat_receipts.py, engine/signing.py
`_commit_tree_of`) change what a repeat costs, never what it answers:

- on a real group owner (embedded log), voters whose batches left the recently-signed cache
  repeat three times: every 409 carries exactly the receipt of their 201, and only the first
  repeat of each reads the log (the others are answered from RepeatReceipts);
- RepeatReceipts keeps at most `entries_max`, the least recently used out first;
- a cached commit tree is reused only for the very nodes it was built from: another
  record with the same signature and other nodes gets a tree of its own.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from engine import signing
from engine.config import Config
from engine.errors import AlreadyVoted
from shards.group_owner import SIGNED_BATCHES_CACHED, GroupOwner
from shards.repeat_receipts import RepeatReceipts
from shards.segment_log import SegmentLog
from shards.snapshots import DirectorySnapshotStore
from shards.wal import EmbeddedWal
from tests.support.records import poll_created

VOTERS_PER_CYCLE = 4
CYCLES = SIGNED_BATCHES_CACHED + 36  # the first cycles' batches leave the signed cache
REPEATS = 3


class CountingWal(EmbeddedWal):
    """The real embedded WAL, counting the records read back (receipts of repeats)."""

    reads = 0

    async def read_at(self, offset: int) -> bytes:
        self.reads += 1
        return await super().read_at(offset)


def test_repeats_carry_the_original_receipt_and_read_the_log_once(tmp_path: Path,
                                                                   keyring) -> None:
    config = Config(data_dir=str(tmp_path), shards=1, groups=1).validate()
    wal = CountingWal(SegmentLog(tmp_path / "wal", config.segment_bytes_max))
    owner = GroupOwner(0, config, wal, {0: DirectorySnapshotStore(tmp_path / "snapshots", 0, 2)},
                       keyring, signing.VoterHasher(keyring.voter_hash_secret))
    voters = list(range(1, VOTERS_PER_CYCLE * CYCLES + 1))
    early = voters[:VOTERS_PER_CYCLE * 8]  # in batches long gone from the signed cache

    async def scenario() -> None:
        await owner.start()
        try:
            assert await owner.create_poll(poll_created("song", ["a", "b"]))
            first = {}
            for start in range(0, len(voters), VOTERS_PER_CYCLE):
                part = voters[start:start + VOTERS_PER_CYCLE]
                bodies = await asyncio.gather(*(owner.submit_vote("song", voter, "a")
                                                for voter in part))
                first.update({voter: json.loads(body) for voter, body in zip(part, bodies,
                                                                               strict=True)})
            for round_number in range(REPEATS):
                for voter in early:
                    with pytest.raises(AlreadyVoted) as repeat:
                        await owner.submit_vote("song", voter, "b")
                    assert repeat.value.extra["receipt"] == first[voter], (round_number, voter)
                if round_number == 0:
                    assert wal.reads == len(early)  # each early voter's record read once
            assert wal.reads == len(early)  # and never again
        finally:
            await owner.stop()

    asyncio.run(scenario())


def test_repeat_receipts_keep_the_most_recently_used() -> None:
    cache = RepeatReceipts(entries_max=3)
    for voter in (1, 2, 3):
        cache.put("p", voter, {"receipt": f"r{voter}"})
    assert cache.get("p", 1) == {"receipt": "r1"}  # 1 is now the most recent
    cache.put("p", 4, {"receipt": "r4"})
    assert cache.get("p", 2) is None  # the least recently used went out
    assert [cache.get("p", voter) for voter in (1, 3, 4)] == [
        {"receipt": "r1"}, {"receipt": "r3"}, {"receipt": "r4"}]
    assert cache.get("q", 1) is None  # per poll


def test_a_commit_tree_is_reused_only_for_the_nodes_it_was_built_from() -> None:
    nodes = [bytes([value]) * 32 for value in range(5)]
    signature = b"s" * 64
    tree = signing._commit_tree_of(list(nodes), signature)
    assert signing._commit_tree_of(list(nodes), signature) is tree
    other_nodes = [*nodes[:4], b"x" * 32]
    other = signing._commit_tree_of(other_nodes, signature)
    assert other.leaves == other_nodes and other.root != tree.root
