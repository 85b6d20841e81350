"""Proves that a commit cycle makes ONE durable write and ONE vote batch per owned fencing
group, whatever the number of shards in it (docs/design.md "Fencing groups"): with 1 and with
32 shards in the group, votes for every shard of the group submitted together go out in one
append of the group's log, holding one record, the group's batch, with every shard's votes
(one vote group per shard and poll), and one fsync of its segment.

Shown to fail when broken: with one log append per shard batch (a `Wal` per shard, as
before fencing groups), the 32-shard case makes 32 appends and 32 fsyncs; with one batch
per shard in the group's append (log format 2), it makes one append of 32 records.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine import signing
from engine.config import Config
from engine.keys import KeyRing
from shards import segment_log
from shards.group_owner import GroupOwner
from shards.segment_log import SegmentLog
from shards.snapshots import DirectorySnapshotStore
from shards.wal import EmbeddedWal
from shards.records import Record, VoteBatch, decode_record, vote_count
from tests.support.records import poll_created

GROUP = 0
VOTERS_PER_SHARD = 3


class CountingWal(EmbeddedWal):
    """The embedded log, counting its appends and the records in each."""

    def __init__(self, log: SegmentLog) -> None:
        super().__init__(log)
        self.appends: list[int] = []
        self.records: list[Record] = []

    def append(self, payloads: list[bytes]):
        self.appends.append(len(payloads))
        self.records += [decode_record(payload) for payload in payloads]
        return super().append(payloads)


@pytest.mark.parametrize("shards_in_group", [1, 32])
def test_one_append_and_one_fsync_per_group_per_cycle(
        tmp_path: Path, keyring: KeyRing, monkeypatch: pytest.MonkeyPatch,
        shards_in_group: int) -> None:
    fsyncs: list[int] = []
    real_fsync = segment_log._fsync_segment

    def counting_fsync(descriptor: int) -> None:
        fsyncs.append(descriptor)
        real_fsync(descriptor)

    monkeypatch.setattr(segment_log, "_fsync_segment", counting_fsync)
    config = Config(data_dir=str(tmp_path), shards=shards_in_group, groups=1,
                    group_commit_ms=1.0).validate()

    async def scenario() -> None:
        wal = CountingWal(SegmentLog(tmp_path / "wal", config.segment_bytes_max))
        stores = {shard: DirectorySnapshotStore(tmp_path / f"snapshots-{shard}", shard, 2)
                  for shard in config.shards_of_group(GROUP)}
        owner = GroupOwner(GROUP, config, wal, stores, keyring,
                           signing.VoterHasher(keyring.voter_hash_secret))
        await owner.start()
        try:
            assert await owner.create_poll(poll_created("p", ["a", "b"]))
            appends_before, fsyncs_before = len(wal.appends), len(fsyncs)
            records_before = len(wal.records)
            voters = [index * shards_in_group + shard for shard in range(shards_in_group)
                      for index in range(VOTERS_PER_SHARD)]
            answers = await asyncio.gather(*(owner.submit_vote("p", voter, "a") for voter in voters))
            assert len(answers) == len(voters)
            # Every vote waited in the queue before the committer ran: one cycle took them.
            assert wal.appends[appends_before:] == [1], wal.appends
            assert len(fsyncs) - fsyncs_before == 1
            (batch,) = wal.records[records_before:]
            assert isinstance(batch, VoteBatch) and batch.group == GROUP
            assert sorted(group.shard for group in batch.groups) == list(range(shards_in_group))
            assert vote_count(batch) == len(voters)
            assert sum(sum(part[2]) for part in owner.poll_summaries("p")) == len(voters)
        finally:
            await owner.stop()

    asyncio.run(scenario())
