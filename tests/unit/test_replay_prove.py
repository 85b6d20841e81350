"""Proves that `votes replay prove` (replay/prove.py) checks a receipt of log format 3, where a
batch is its fencing group's and holds votes of several of its shards:
- a receipt of a vote that is not first in its two-shard batch (its index counts the other
  shard's votes before it) is COUNTED, and the listing names the batch's group;
- a properly signed receipt whose shard is not in its group in this layout (shard mod
  groups) fails that check with a message naming both groups, before any log is read;
- a record whose vote group at the receipt's index was moved to another shard of the group,
  its stored signature and node intact, fails the shard check naming both shards.
"""

from __future__ import annotations

import array
import shutil
from pathlib import Path

import msgspec
from click.testing import CliRunner

from engine.keys import keys_dir, load_keys
from engine.receipts import encode_receipt
from engine.signing import SignedBatch, VoteRun, VoterHasher, sign_commit
from replay.cli import main as replay_main
from replay.errors import EXIT_FINDING, EXIT_OK
from shards.records import VoteBatch
from tests.support.records import CREATED_MS, group_batch, poll_created, write_group_log
from tests.unit.test_replay_groups import GROUP, GROUPS, MEMBERS, OPTIONS, SHARDS, config_for

FIRST, SECOND = MEMBERS[0], MEMBERS[1]  # shards 1 and 3, both in GROUP
VOTES = {FIRST: [(4, 0), (6, 1)], SECOND: [(4, 1)]}


def signed(data_dir: Path, group: int, votes: dict[int, list[tuple[int, int]]]
           ) -> tuple[VoteBatch, SignedBatch]:
    """Batch 0 of `group` holding `votes` (per shard, voter index and option index of poll
    "a"), signed as the engine signs a commit cycle, and its record."""
    keyring = load_keys(data_dir)
    runs = [VoteRun(shard, "a", OPTIONS,
                    array.array("Q", [voter * SHARDS + shard
                                      for voter, _ in shard_votes]).tobytes(),
                    array.array("H", [option for _, option in shard_votes]).tobytes())
            for shard, shard_votes in votes.items()]
    (batch,) = sign_commit(keyring, VoterHasher(keyring.voter_hash_secret), CREATED_MS,
                           [(group, 0, runs)])
    record = group_batch(group, 0, {shard: {"a": shard_votes} for shard, shard_votes
                                    in votes.items()},
                         time_ms=CREATED_MS, batch_position=batch.batch_position,
                         batch_nodes=list(batch.batch_nodes), signature=batch.signature,
                         key_id=batch.key_id)
    return record, batch


def prove(data_dir: Path, receipt: str) -> tuple[int, str]:
    result = CliRunner().invoke(replay_main, ["prove", "--data-dir", str(data_dir), receipt])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def seeded(data_dir: Path, record: VoteBatch) -> int:
    """The group's log holding poll "a" and `record`; the record's offset."""
    config_for(data_dir)
    write_group_log(data_dir, SHARDS, GROUPS, 0, [])
    return write_group_log(data_dir, SHARDS, GROUPS, GROUP, [poll_created("a", OPTIONS),
                                                            record])[1][0]


def test_a_vote_after_another_shards_votes_is_proven_counted(tmp_path):
    config_for(tmp_path)
    record, batch = signed(tmp_path, GROUP, VOTES)
    offset = seeded(tmp_path, record)
    index = len(VOTES[FIRST])  # SECOND's one vote, after FIRST's two in the batch
    code, out = prove(tmp_path, encode_receipt(batch.receipt(index, offset)))
    assert code == EXIT_OK, out
    assert f"shard {SECOND}, offset {offset}, batch 0 of group {GROUP}, vote {index} of 3" in out
    assert f"[ok] shard {SECOND} is in the receipt's fencing group {GROUP}" in out
    assert f"[ok] vote {index} of the record is of shard {SECOND}" in out
    assert "VERDICT: COUNTED" in out


def test_a_receipt_whose_shard_is_not_in_its_group_fails(tmp_path):
    config_for(tmp_path)
    other_group = 1 - GROUP
    _, batch = signed(tmp_path, other_group, {FIRST: VOTES[FIRST]})
    code, out = prove(tmp_path, encode_receipt(batch.receipt(0, 0)))
    assert code == EXIT_FINDING, out
    assert "[ok] signature" in out
    assert (f"[FAILED] shard {FIRST} is in the receipt's fencing group {other_group}: no, this "
            f"deployment's {GROUPS} groups put it in group {GROUP}") in out, out
    assert "VERDICT: NOT COUNTED" in out


def test_a_vote_group_moved_to_another_shard_fails_the_shard_check(tmp_path):
    config_for(tmp_path)
    record, batch = signed(tmp_path, GROUP, VOTES)
    moved_to = MEMBERS[2]
    moved = msgspec.structs.replace(record, groups=[
        msgspec.structs.replace(group, shard=moved_to) if group.shard == SECOND else group
        for group in record.groups])
    offset = seeded(tmp_path, moved)
    index = len(VOTES[FIRST])
    receipt = encode_receipt(batch.receipt(index, offset))
    code, out = prove(tmp_path, receipt)
    assert code == EXIT_FINDING, out
    assert "[ok] the record holds 3 votes and the receipt's signature and batch node" in out
    assert (f"[FAILED] vote {index} of the record is of shard {SECOND}: no, its vote group "
            f"names shard {moved_to}") in out, out
    # The same receipt against the record as signed: counted.
    intact = tmp_path / "intact"
    shutil.copytree(keys_dir(tmp_path), keys_dir(intact))  # the keys that signed it
    assert seeded(intact, record) == offset
    assert prove(intact, receipt)[0] == EXIT_OK
