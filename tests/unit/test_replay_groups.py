"""Proves that the replay tool reads the fencing-group layout and refuses any other:
- a group's log is read ONCE for all the shards asked for in it (recount, verify and rebuild
  each open one read of the log per group), and each shard's counts are its own vote groups'
  (log format 3: a batch of the group holds votes of several of its shards);
- a batch holding votes of two shards is recounted per shard (each counts only its own vote
  groups, its votes at their indexes among all the batch's votes in the chain), as the
  engine applies it; a batch holding votes of a shard outside the log's group, or naming
  another group, is damage naming the record's offset, for recount, verify, rebuild and
  export, and rebuild writes nothing;
- rebuild --group writes every shard's snapshot equal to the engine's own group apply
  (shards/recovery.apply_record) of the log;
- a log whose first record is not this layout's LogHeader for its group (a format-1 log that
  starts with a poll, the header of another group or another shard count) is refused by every
  verb with exit 2 and a message naming the segment file, and rebuild writes nothing;
- a data dir whose cluster.json is of layout format 1 is refused with exit 2 and a message
  saying what to do, by replay and by `votes serve`'s own check (shards/layout.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

import replay.rawlog
import shards.segment_log
from engine.cli import prepare_data_dir
from engine.config import Config
from engine.errors import VotesError
from replay.cli import main as replay_main
from replay import chain as export_chain
from replay.errors import EXIT_CANNOT, EXIT_FINDING, EXIT_OK, DataDamaged, WrongLayout
from replay.recount import recount, recount_group
from replay.verify import verify
from shards.backends import group_directory, shard_directory
from shards.layout import check_layout
from shards.records import VoteBatch, decode_record, frame_record
from shards.recovery import apply_record
from shards.snapshots import DirectorySnapshotStore
from shards.state import ShardState
from tests.support.records import (
    GROUP_OF_LOG,
    fingerprint,
    group_batch,
    log_header,
    poll_created,
    vote_batch,
    write_group_log,
)

SHARDS = 8
GROUPS = 2
GROUP = 1
MEMBERS = list(range(GROUP, SHARDS, GROUPS))  # 1, 3, 5, 7
OPTIONS = ["x", "y"]


def config_for(data_dir: Path) -> Config:
    config = Config(data_dir=str(data_dir), shards=SHARDS, groups=GROUPS).validate()
    prepare_data_dir(config)  # keys and cluster.json, as `votes serve` leaves them
    return config


def member_votes(shard: int, cycle: int) -> list[tuple[int, int]]:
    return [(cycle * 10 + voter, (voter + shard) % 2) for voter in range(shard + 1)]


def group_records() -> list:
    """Poll "a" created once for the group, then a cycle whose one batch holds every member
    shard's votes, then a cycle of one batch per member shard (as control records between
    them would cut it); batch_seq counts the group's batches."""
    records: list = [poll_created("a", OPTIONS),
                     group_batch(GROUP_OF_LOG, 0, {shard: {"a": member_votes(shard, 0)}
                                                   for shard in MEMBERS})]
    for seq, shard in enumerate(MEMBERS, start=1):
        records.append(vote_batch(shard, seq, {"a": member_votes(shard, 1)}))
    return records


def as_logged(record, group: int = GROUP):
    """The record as write_group_log wrote it: a vote batch left to it names the log's group."""
    if isinstance(record, VoteBatch) and record.group == GROUP_OF_LOG:
        return msgspec.structs.replace(record, group=group)
    return record


def seeded(tmp_path: Path, header=None) -> tuple[Config, list, list[tuple[int, int]]]:
    config = config_for(tmp_path)
    records = group_records()
    positions = write_group_log(tmp_path, SHARDS, GROUPS, GROUP, records, header=header)
    # The other group's log is empty but for its header, as a fresh owner leaves it.
    write_group_log(tmp_path, SHARDS, GROUPS, 0, [])
    return config, records, positions


def engine_states(records: list, positions: list[tuple[int, int]]) -> dict[int, ShardState]:
    states = {shard: ShardState(shard, SHARDS) for shard in MEMBERS}
    header = log_header(SHARDS, GROUPS, GROUP)
    apply_record(states, GROUP, 0, positions[0][0], header)
    for record, (offset, next_offset) in zip(records, positions, strict=True):
        apply_record(states, GROUP, offset, next_offset,
                     decode_record(frame_record(as_logged(record))[8:]))
    for state in states.values():  # as recover_group leaves them: covering the whole log
        state.advance_to(positions[-1][1])
    return states


def expected_counts(shard: int) -> dict[str, int]:
    counts = {"x": 0, "y": 0}
    for voter in range(shard + 1):
        counts[OPTIONS[(voter + shard) % 2]] += 2
    return counts


@pytest.fixture
def reads(monkeypatch) -> dict[str, int]:
    """How many reads of a log start: the replay reader's and the engine's (a spy that
    counts, then reads as usual)."""
    counted = {"replay": 0, "engine": 0}
    frames, read_from = replay.rawlog.SegmentReader.frames, shards.segment_log.SegmentLog.read_from

    def counting_frames(self, from_offset=0, until_offset=None):
        counted["replay"] += 1
        return frames(self, from_offset, until_offset)

    def counting_read_from(self, offset):
        counted["engine"] += 1
        return read_from(self, offset)

    monkeypatch.setattr(replay.rawlog.SegmentReader, "frames", counting_frames)
    monkeypatch.setattr(shards.segment_log.SegmentLog, "read_from", counting_read_from)
    return counted


def test_recount_reads_a_group_log_once_for_all_its_shards(tmp_path, reads):
    config, _, _ = seeded(tmp_path)
    results = asyncio.run(recount_group(config, GROUP))
    assert reads["replay"] == 1
    assert sorted(results) == MEMBERS
    for shard in MEMBERS:
        assert results[shard].polls["a"].counts == expected_counts(shard), shard
    reads["replay"] = 0
    everything = asyncio.run(recount(config, chain=False))
    assert reads["replay"] == GROUPS  # one read per group, not one per shard
    assert sorted(everything) == list(range(SHARDS))
    assert all("a" not in everything[shard].polls for shard in range(0, SHARDS, GROUPS))


def test_verify_reads_a_group_log_once_and_agrees(tmp_path, reads):
    config, _, _ = seeded(tmp_path)
    report = asyncio.run(verify(config, MEMBERS, check_signatures=False))
    assert reads["replay"] == 1
    assert report.ok
    assert [line["shard"] for line in report.shards] == MEMBERS


def test_rebuild_of_a_group_matches_the_engine_apply_from_one_read(tmp_path, reads):
    config, records, positions = seeded(tmp_path)
    result = CliRunner().invoke(replay_main, ["rebuild", "--data-dir", str(tmp_path),
                                              "--group", str(GROUP), "--quiet"])
    assert result.exit_code == EXIT_OK, result.output
    assert reads["engine"] == 1
    assert f"rebuilt {len(MEMBERS)} shards of 1 groups" in result.output
    expected = engine_states(records, positions)
    for shard in MEMBERS:
        store = DirectorySnapshotStore(shard_directory(tmp_path, shard) / "snapshots", shard, 3)
        state = store.load_newest()
        assert state is not None
        assert fingerprint(state) == fingerprint(expected[shard]), shard
        assert state.polls["a"].counts() == expected_counts(shard)
    assert not (shard_directory(tmp_path, 0) / "snapshots").exists()
    listed = CliRunner().invoke(replay_main, ["inspect", "snapshots", "--data-dir",
                                              str(tmp_path), "--group", str(GROUP), "--json"])
    assert listed.exit_code == EXIT_OK, listed.output
    summaries = json.loads(listed.output)
    assert [summary["shard"] for summary in summaries] == MEMBERS
    assert all(summary["newest_valid"]["wal_offset_next"] == positions[-1][1]
               for summary in summaries)


WRONG_HEADERS = {
    "other-group": log_header(SHARDS, GROUPS, 0),
    "other-shard-count": log_header(4, GROUPS, GROUP),
    "format-1": None,  # no header at all: the log starts with a poll
}


@pytest.mark.parametrize("wrong", WRONG_HEADERS, ids=list(WRONG_HEADERS))
def test_a_log_of_another_layout_or_group_is_refused_by_every_verb(tmp_path, wrong):
    config = config_for(tmp_path)
    records = group_records()
    if wrong == "format-1":
        # A format-1 log: records only, no header (write the first record as the "header").
        write_group_log(tmp_path, SHARDS, GROUPS, GROUP, records[1:], header=records[0])
    else:
        write_group_log(tmp_path, SHARDS, GROUPS, GROUP, records, header=WRONG_HEADERS[wrong])
    write_group_log(tmp_path, SHARDS, GROUPS, 0, [])  # the other group's log is fine
    segment = group_directory(tmp_path, GROUP) / "wal" / f"{0:020d}.log"
    with pytest.raises(WrongLayout, match=str(segment)):
        asyncio.run(recount_group(config, GROUP))
    runner = CliRunner()
    for verb in (["verify", "--group", str(GROUP)], ["rebuild", "--shard", str(MEMBERS[0])],
                 ["inspect", "wal", "--group", str(GROUP)], ["export", "--poll", "a"]):
        result = runner.invoke(replay_main, [*verb, "--data-dir", str(tmp_path)])
        assert result.exit_code == EXIT_CANNOT, (verb, result.output)
        assert str(segment) in result.output and "another layout or for another group" in \
            result.output, (verb, result.output)
        assert "Traceback" not in result.output
    assert not any((shard_directory(tmp_path, shard) / "snapshots").exists()
                   for shard in range(SHARDS)), "a refused rebuild wrote a snapshot"


def test_a_read_from_a_later_offset_checks_the_header_first(tmp_path):
    config = config_for(tmp_path)
    records = group_records()
    positions = write_group_log(tmp_path, SHARDS, GROUPS, GROUP, records,
                                header=log_header(SHARDS, GROUPS, 0))
    result = CliRunner().invoke(replay_main, ["inspect", "wal", "--data-dir", str(tmp_path),
                                              "--group", str(GROUP), "--from",
                                              str(positions[2][0])])
    assert result.exit_code == EXIT_CANNOT, result.output
    assert "another layout or for another group" in result.output
    assert config.groups == GROUPS


def test_a_format_1_data_dir_is_refused_with_what_to_do(tmp_path):
    config = config_for(tmp_path)
    (tmp_path / "cluster.json").write_text(json.dumps({"format": 1, "shards": SHARDS}) + "\n")
    result = CliRunner().invoke(replay_main, ["verify", "--data-dir", str(tmp_path)])
    assert result.exit_code == EXIT_CANNOT, result.output
    assert "layout format 1" in result.output and "release that wrote it" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(VotesError, match="layout format 1"):
        check_layout(tmp_path, {"format": 1, "shards": SHARDS}, config)
    with pytest.raises(VotesError, match="fencing groups"):
        check_layout(tmp_path, {"format": 3, "shards": SHARDS, "groups": 4}, config)
    check_layout(tmp_path, {"format": 3, "shards": SHARDS, "groups": GROUPS}, config)


def test_a_batch_of_two_shards_is_recounted_per_shard_and_a_foreign_shard_is_damage(tmp_path):
    config = config_for(tmp_path)
    shard, other = MEMBERS[0], MEMBERS[1]  # 1 and 3: both in GROUP
    # Voter index 0 is voter 1 in shard 1 and voter 3 in shard 3: two voters, one bitmap each.
    records = [poll_created("a", OPTIONS),
               group_batch(GROUP_OF_LOG, 0, {shard: {"a": [(0, 0), (1, 1)]},
                                             other: {"a": [(0, 1), (5, 1), (0, 0)]}}),
               group_batch(GROUP_OF_LOG, 1, {other: {"a": [(1, 0)]},
                                             shard: {"a": [(0, 1), (2, 0)]}})]
    positions = write_group_log(tmp_path, SHARDS, GROUPS, GROUP, records)
    write_group_log(tmp_path, SHARDS, GROUPS, 0, [])
    first, second = positions[1][0], positions[2][0]
    results = asyncio.run(recount_group(config, GROUP, keep_voters=True))
    mine, theirs = results[shard].polls["a"], results[other].polls["a"]
    assert mine.counts == {"x": 2, "y": 1} and theirs.counts == {"x": 1, "y": 2}
    assert mine.rejected["duplicate"] == theirs.rejected["duplicate"] == 1
    assert mine.voter_options == {0 * SHARDS + shard: "x", 1 * SHARDS + shard: "y",
                                  2 * SHARDS + shard: "x"}
    assert theirs.voter_options == {0 * SHARDS + other: "y", 5 * SHARDS + other: "y",
                                    1 * SHARDS + other: "x"}
    assert (results[shard].records, results[shard].votes_seen) == (3, 4)
    assert (results[other].records, results[other].votes_seen) == (3, 4)
    for idle in MEMBERS[2:]:  # no vote in either batch: they pass them by
        assert (results[idle].records, results[idle].votes_seen) == (1, 0)
        assert results[idle].polls["a"].counts == {"x": 0, "y": 0}
    # Each vote's chain step carries its index among ALL votes of its batch (its receipt's).
    assert mine.chain_digest == export_chain.chain_digest("a", shard, [
        (first, 0, 0 * SHARDS + shard, "x"), (first, 1, 1 * SHARDS + shard, "y"),
        (second, 2, 2 * SHARDS + shard, "x")])
    assert theirs.chain_digest == export_chain.chain_digest("a", other, [
        (first, 2, 0 * SHARDS + other, "y"), (first, 3, 5 * SHARDS + other, "y"),
        (second, 0, 1 * SHARDS + other, "x")])
    engine = engine_states(records, positions)
    for number in MEMBERS:  # as the engine's own apply of the group's log counts them
        assert results[number].polls["a"].counts == engine[number].polls["a"].counts(), number
        assert results[number].polls["a"].voters == engine[number].polls["a"].voters, number
    listed = CliRunner().invoke(replay_main, ["inspect", "wal", "--data-dir", str(tmp_path),
                                              "--shard", str(MEMBERS[2]), "--json"])
    assert listed.exit_code == EXIT_OK, listed.output
    assert [record["kind"] for record in json.loads(listed.output)["records"]] == [
        "log-header", "poll-created"]

    # Damage: a batch holding votes of shard 2 (group 0) in group 1's log, and a batch that
    # names group 0 in group 1's log.
    foreign_shard = group_batch(GROUP_OF_LOG, 2, {shard: {"a": [(7, 0)]}, 2: {"a": [(8, 0)]}})
    other_group = group_batch(0, 3, {shard: {"a": [(9, 0)]}})
    for bad, wanted in (
            (foreign_shard, "a vote batch holding votes of shard 2, which is not in group 1"),
            (other_group, "a vote batch of group 0 in the log of group 1")):
        damaged = tmp_path / f"damaged-{bad.batch_seq}"
        config = config_for(damaged)
        offset = write_group_log(damaged, SHARDS, GROUPS, GROUP, records + [bad])[-1][0]
        write_group_log(damaged, SHARDS, GROUPS, 0, [])
        with pytest.raises(DataDamaged, match=f"offset {offset}: {wanted}"):
            asyncio.run(recount_group(config, GROUP))
        for verb in (["verify", "--group", str(GROUP)], ["rebuild", "--group", str(GROUP)],
                     ["export", "--poll", "a"]):
            result = CliRunner().invoke(replay_main, [*verb, "--data-dir", str(damaged)])
            assert result.exit_code == EXIT_FINDING, (verb, result.output)
            assert f"offset {offset}" in result.output and "Traceback" not in result.output, \
                (verb, result.output)
        assert not any((shard_directory(damaged, number) / "snapshots").exists()
                       for number in range(SHARDS)), "a rebuild of a damaged log wrote a snapshot"
