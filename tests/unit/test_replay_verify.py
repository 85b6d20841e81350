"""Proves that verify (replay/verify.py) compares each shard's newest usable snapshot with the
recount at that snapshot's offset: snapshots the engine's own replay produced agree; when the
newest snapshot fails its checksum, verify says so in a note and compares the older one
(recovery would use it too); a snapshot that calls an open poll closed, or misses a voter,
is a difference naming the shard and poll; and a snapshot whose offset falls inside a record
cannot be matched with the log, which is a difference too.

Signatures (replay/signatures.py): the logs here are signed as the engine signs them
(engine/signing.sign_commit; each batch of the group holds votes of two shards, OTHER_SHARD's
vote group first, and each commit cycle holds a batch of another group too, so the signed
root covers two nodes). A clean signed log has no finding; a batch whose signature is all
zeros, has one flipped byte, names an unknown key, or whose votes were changed under an
intact signature (a vote of the shard asked for, a vote of the batch's other shard, or a
vote group moved to another shard) is a finding naming the group, the record's offset and
the batch's shards, and `votes replay verify` exits 1 on it; a batch is checked once
however many of its shards are asked for; a batch that says another group than its log's
fails the check; a data dir without the public key document is a finding too.
"""

from __future__ import annotations

import array
import asyncio
import shutil
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from engine.cli import prepare_data_dir
from engine.config import Config
from engine.keys import RECEIPT_PUBLIC_FILE, ensure_keys, keys_dir, load_keys
from engine.signing import VoteRun, VoterHasher, sign_commit
from replay.cli import main as replay_main
from replay.errors import EXIT_FINDING, EXIT_OK
from replay.rawlog import decode_raw
from replay.signatures import BatchSignatures
from replay.verify import render, verify
from shards.backends import shard_directory
from shards.records import VoteBatch, decode_record, encode_record, frame_record
from shards.snapshots import DirectorySnapshotStore, freeze
from shards.state import ShardState
from tests.support.records import CREATED_MS, group_batch, poll_created, vote_batch
from tests.unit.test_replay_recount import GROUPS, write_log

SHARD = 1
SHARDS_TOTAL = 3
OTHER_SHARD = 0  # in the same group as SHARD (GROUPS = 1): their votes share batches
GROUP = 0
# The other group of a worker owning two, whose batch is signed in the same cycles: only its
# node is in this log (its record is in its own group's log, never read here).
OTHER_GROUP = 1
OPTIONS = ["x", "y"]


def signed_batch(data_dir: Path, seq: int, votes: list[tuple[int, int]]) -> VoteBatch:
    """Vote batch `seq` of GROUP holding `votes` (voter index, option index) of SHARD in poll
    "a" after one vote of OTHER_SHARD, signed as the engine signs a commit cycle: here with a
    batch of OTHER_GROUP before it."""
    keyring = load_keys(data_dir)
    hasher = VoterHasher(keyring.voter_hash_secret)

    def run(shard: int, shard_votes: list[tuple[int, int]]) -> VoteRun:
        return VoteRun(shard, "a", OPTIONS,
                       array.array("Q", [voter * SHARDS_TOTAL + shard
                                         for voter, _ in shard_votes]).tobytes(),
                       array.array("H", [option for _, option in shard_votes]).tobytes())

    time_ms = CREATED_MS + seq
    other_votes = [(seq, 0)]
    _, signed = sign_commit(keyring, hasher, time_ms,
                            [(OTHER_GROUP, seq, [run(OTHER_SHARD, [(7, 0)])]),
                             (GROUP, seq, [run(OTHER_SHARD, other_votes), run(SHARD, votes)])])
    return group_batch(GROUP, seq, {OTHER_SHARD: {"a": other_votes}, SHARD: {"a": votes}},
                       time_ms=time_ms, batch_position=signed.batch_position,
                       batch_nodes=list(signed.batch_nodes), signature=signed.signature,
                       key_id=signed.key_id)


def seeded(tmp_path: Path, tamper=None
           ) -> tuple[Config, list, list[tuple[int, int]], DirectorySnapshotStore]:
    """A signed log of poll "a" in SHARD: the poll, then six batches of ten votes. `tamper`
    maps (batch_seq, batch) to the batch written in its place."""
    config = Config(data_dir=str(tmp_path), shards=SHARDS_TOTAL, groups=GROUPS).validate()
    prepare_data_dir(config)  # keys and cluster.json, as `votes serve` leaves them
    batches = [signed_batch(tmp_path, seq, [(seq * 10 + voter, voter % 2) for voter in range(10)])
               for seq in range(6)]
    if tamper is not None:
        batches = [tamper(seq, batch) for seq, batch in enumerate(batches)]
    records = [poll_created("a", OPTIONS)] + batches
    positions = write_log(tmp_path, SHARD, records)
    store = DirectorySnapshotStore(shard_directory(tmp_path, SHARD) / "snapshots", SHARD, 3)
    return config, records, positions, store


def state_after(records: list, positions: list[tuple[int, int]], count: int) -> ShardState:
    state = ShardState(SHARD, SHARDS_TOTAL)
    for record, (offset, next_offset) in list(zip(records, positions))[:count]:
        state.apply(offset, next_offset, decode_record(frame_record(record)[8:]))
    return state


def run(config: Config):
    return asyncio.run(verify(config, [SHARD]))


def test_engine_snapshots_agree_and_a_damaged_newest_one_is_noted(tmp_path):
    config, records, positions, store = seeded(tmp_path)
    older = state_after(records, positions, 3)
    newer = state_after(records, positions, 6)
    store.write(freeze(older), older.wal_offset_next)
    entry = store.write(freeze(newer), newer.wal_offset_next)
    report = run(config)
    assert report.ok, render(report)
    assert report.shards[0]["snapshot_offset"] == newer.wal_offset_next
    assert report.polls["a"].wal_at_snapshots == newer.polls["a"].counts()

    path = store.directory / entry.name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    report = run(config)
    assert report.ok, render(report)
    assert report.shards[0]["snapshot_offset"] == older.wal_offset_next
    assert any(entry.name in note and "checksum" in note and
               f"the snapshot at offset {older.wal_offset_next} is used" in note
               for note in report.notes), report.notes


def test_closed_flag_and_missing_voter_are_differences(tmp_path):
    config, records, positions, store = seeded(tmp_path)
    state = state_after(records, positions, 4)
    poll = state.polls["a"]
    poll.closed_ms = 1
    poll.voters.remove(next(iter(poll.voters)))
    store.write(freeze(state), state.wal_offset_next)
    report = run(config)
    details = [str(difference) for difference in report.differences]
    assert any(f"shard {SHARD} poll 'a': snapshot says closed, the log says open at" in detail
               for detail in details), details
    assert any("voters bitmap differs" in detail and "0 voter indexes only in the snapshot" in detail
               and "1 only in the log" in detail for detail in details), details


def test_snapshot_offset_inside_a_record_is_a_difference(tmp_path):
    config, records, positions, store = seeded(tmp_path)
    state = state_after(records, positions, 2)
    state.wal_offset_next = positions[2][0] + 5
    store.write(freeze(state), state.wal_offset_next)
    report = run(config)
    assert not report.ok
    assert "not at a record boundary" in str(report.differences[0])


# Signatures ----------------------------------------------------------------------------------

TAMPERED_SEQ = 3


def signature_findings(report) -> list[str]:
    return [str(difference) for difference in report.differences
            if difference.kind == "signature"]


def tampered(change):
    """A `tamper` for seeded() that applies `change` to batch TAMPERED_SEQ only."""
    return lambda seq, batch: change(batch) if seq == TAMPERED_SEQ else batch


def flip_byte(data: bytes, index: int) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 0x01
    return bytes(changed)


def assert_one_finding_at_the_tampered_batch(config, positions, wanted: str,
                                             shards: str = f"{OTHER_SHARD}, {SHARD}") -> None:
    report = run(config)
    findings = signature_findings(report)
    offset = positions[1 + TAMPERED_SEQ][0]
    assert not report.ok
    assert len(findings) == 1, findings
    assert findings[0].startswith(f"signature: group {GROUP}: offset {offset}: vote batch "
                                  f"{TAMPERED_SEQ} (votes of shards {shards}): "), findings
    assert wanted in findings[0], findings
    result = CliRunner().invoke(replay_main, ["verify", "--data-dir", str(config.data_path),
                                               "--shard", str(SHARD)])
    assert result.exit_code == EXIT_FINDING, result.output
    assert f"signature: group {GROUP}: offset {offset}" in result.output, result.output
    # Both shards of the batch asked for: the batch is still checked, and reported, once.
    both = asyncio.run(verify(config, [OTHER_SHARD, SHARD]))
    assert signature_findings(both) == findings, signature_findings(both)


def test_a_clean_signed_log_has_no_signature_finding(tmp_path):
    config, _, _, _ = seeded(tmp_path)
    report = run(config)
    assert report.ok, render(report)
    assert signature_findings(report) == []
    result = CliRunner().invoke(replay_main, ["verify", "--data-dir", str(tmp_path),
                                              "--shard", str(SHARD)])
    assert result.exit_code == EXIT_OK, result.output


def test_an_all_zero_signature_is_a_finding_naming_shard_and_offset(tmp_path):
    config, _, positions, _ = seeded(tmp_path, tampered(
        lambda batch: msgspec.structs.replace(batch, signature=bytes(64))))
    assert_one_finding_at_the_tampered_batch(config, positions, "the signature does not verify")


def test_a_signature_with_one_flipped_byte_is_a_finding(tmp_path):
    config, _, positions, _ = seeded(tmp_path, tampered(
        lambda batch: msgspec.structs.replace(batch, signature=flip_byte(batch.signature, 17))))
    assert_one_finding_at_the_tampered_batch(config, positions, "the signature does not verify")


def changed_group(batch: VoteBatch, of_shard: int, **fields) -> VoteBatch:
    """The batch with `fields` replaced in its vote group of shard `of_shard`."""
    return msgspec.structs.replace(batch, groups=[
        msgspec.structs.replace(group, **fields) if group.shard == of_shard else group
        for group in batch.groups])


def other_option(batch: VoteBatch, shard: int) -> VoteBatch:
    group = next(group for group in batch.groups if group.shard == shard)
    options = bytearray(group.options)
    options[0] ^= 0x01  # the group's vote 0 now names the other option
    return changed_group(batch, shard, options=bytes(options))


@pytest.mark.parametrize("change", [
    lambda batch: other_option(batch, SHARD),
    # A vote of the batch's other shard: the batch's one node covers every shard's votes.
    lambda batch: other_option(batch, OTHER_SHARD),
    # The other shard's votes moved to shard 2 (in the group too): a leaf binds its shard.
    lambda batch: changed_group(batch, OTHER_SHARD, shard=2),
], ids=["vote-of-the-shard", "vote-of-the-other-shard", "votes-moved-to-another-shard"])
def test_votes_changed_under_an_intact_signature_are_a_finding(tmp_path, change):
    """The signature still verifies over the stored nodes; the votes no longer rebuild them."""
    config, records, positions, _ = seeded(tmp_path, tampered(change))
    shards = ", ".join(map(str, dict.fromkeys(group.shard
                                              for group in records[1 + TAMPERED_SEQ].groups)))
    assert_one_finding_at_the_tampered_batch(config, positions,
                                             "the votes are not the ones signed", shards)


def test_an_unknown_key_id_is_a_finding(tmp_path):
    config, _, positions, _ = seeded(tmp_path, tampered(
        lambda batch: msgspec.structs.replace(batch, key_id="r-elsewhere")))
    assert_one_finding_at_the_tampered_batch(config, positions, "not a key of this deployment")


def test_a_data_dir_without_the_public_key_document_is_a_finding(tmp_path):
    config, _, _, _ = seeded(tmp_path)
    (keys_dir(tmp_path) / RECEIPT_PUBLIC_FILE).unlink()
    report = run(config)
    assert not report.ok
    assert any("batch signatures cannot be checked" in finding
               for finding in signature_findings(report)), render(report)


def test_a_log_signed_with_another_deployment_key_fails_on_every_batch(tmp_path):
    config, _, _, _ = seeded(tmp_path)
    shutil.rmtree(keys_dir(tmp_path))
    ensure_keys(tmp_path)  # new keys: every stored signature is by an unknown key id
    report = run(config)
    assert len(signature_findings(report)) == 6, render(report)


def test_with_polls_asked_for_only_their_batches_are_checked(tmp_path):
    """Another deployment's poll in the same log, signed with its key (a shared Kafka topic):
    not a finding when verify is asked about poll "a" only, a finding without --poll."""
    config, _, _, _ = seeded(tmp_path)
    foreign = vote_batch(SHARD, 99, {"b": [(500, 0)]}, batch_position=0,
                         batch_nodes=[bytes(32)], signature=bytes(64), key_id="r-elsewhere")
    write_log(tmp_path, SHARD, [poll_created("b", OPTIONS), foreign])
    report = asyncio.run(verify(config, [SHARD], polls=["a"]))
    assert report.ok, render(report)
    assert any("1 vote batches hold no vote of the polls asked for" in note
               for note in report.notes), report.notes
    assert len(signature_findings(run(config))) == 1


def test_a_batch_that_names_another_group_than_its_log_fails_the_check(tmp_path):
    """Its node binds the group it was signed for: read from another group's log it would
    pass for a batch of that group. (The recount refuses such a log as damage first; this is
    the check itself.)"""
    seeded(tmp_path)
    batch = decode_raw(encode_record(signed_batch(tmp_path, 0, [(1, 0)])), "here")
    signatures = BatchSignatures.from_data_dir(tmp_path, SHARDS_TOTAL)
    options_of = {"a": OPTIONS}.get
    assert signatures.problem_of(batch, GROUP, options_of) is None
    assert signatures.problem_of(batch, OTHER_GROUP, options_of) == (
        f"the record says group {GROUP}, it sits in the log of group {OTHER_GROUP}")
