"""`prove RECEIPT`: was this vote counted?

Steps, each of which can fail the proof:
1. The receipt's signature and Merkle paths verify offline with the engine's public key for
   its key id (engine/receipts.verify_receipt).
2. The receipt's shard is in the receipt's fencing group in this deployment's layout
   (group = shard mod groups: the signature binds the batch to the group, and which shards a
   group holds is the layout's), the record at the receipt's offset of that group's log (the
   log's header checked first) is vote batch `batch_seq` of `group`, holds `leaf_count` votes
   and carries the receipt's signature and batch node.
3. Vote `index` of that batch is in a vote group of the receipt's shard and poll, and its
   voter hash (keyed with the data dir's voter hash secret) and option rebuild the receipt's
   leaf.
4. An independent recount of the shard from its group's log (replay/recount.py) says whether the vote counted
   (its voter's first vote in the poll, the poll open at that point of the log), where it
   sits in the shard's hash chain for the poll, and whether the poll is closed (final).
5. With an export file: the shard's chain digest at the export's end offset must equal the
   export's, and the vote must be inside it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import Config
from engine.errors import InvariantViolation
from engine.keys import load_keys
from engine.receipts import (
    Receipt,
    batch_node,
    decode_receipt,
    leaf_hash,
    path_root,
    verify_receipt,
    voter_hash,
)
from replay.errors import BadInput, DataDamaged
from replay.export import read_export
from replay.rawlog import Batch, decode_raw
from replay.recount import recount_shard
from replay.sources import read_record


@dataclass
class Proof:
    receipt: Receipt
    counted: bool = False
    checks: list[tuple[bool, str]] = field(default_factory=list)
    option: str | None = None

    def check(self, ok: bool, text: str) -> bool:
        self.checks.append((ok, text))
        return ok

    @property
    def failed(self) -> bool:
        return not all(ok for ok, _ in self.checks)


async def prove(config: Config, receipt_text: str, *, export_path: Path | None = None) -> Proof:
    receipt = decode_receipt(receipt_text.strip())
    if receipt.shard >= config.shards:
        raise BadInput(f"the receipt names shard {receipt.shard}; this deployment has shards "
                       f"0..{config.shards - 1}")
    claimed = read_export(export_path) if export_path is not None else None
    if claimed is not None and claimed["poll"] != receipt.poll:
        raise BadInput(f"the export is of poll {claimed['poll']!r}, the receipt of {receipt.poll!r}")
    keyring = load_keys(config.data_path)
    proof = Proof(receipt)
    public_key = keyring.receipt_public_keys.get(receipt.key_id)
    if not proof.check(public_key is not None and verify_receipt(receipt, public_key),
                       f"signature by key {receipt.key_id} over the receipt's Merkle paths"):
        return proof
    batch = await _receipts_batch(proof, config, receipt)
    if batch is None:
        return proof
    shard, poll, voter_index, option_index = vote_of(batch, receipt.index)
    of_shard = f"vote {receipt.index} of the record is of shard {receipt.shard}"
    if not proof.check(shard == receipt.shard, of_shard if shard == receipt.shard else
                       f"{of_shard}: no, its vote group names shard {shard}"):
        return proof
    voter_id = voter_index * config.shards + receipt.shard
    until = None if claimed is None else claimed["shards"].get(receipt.shard, {}).get("end_offset")
    recount = await recount_shard(config, receipt.shard, chain=[receipt.poll],
                                  watch=(receipt.offset, receipt.index),
                                  capture_at=[] if until is None else [until])
    tally = recount.polls.get(receipt.poll)
    options = tally.options if tally is not None else []
    option = options[option_index] if option_index < len(options) else None
    proof.option = option
    same_leaf = poll == receipt.poll and option is not None and hmac.compare_digest(
        leaf_hash(poll, receipt.shard, voter_hash(keyring.voter_hash_secret, poll, voter_id),
                  option),
        leaf_hash(receipt.poll, receipt.shard, receipt.voter_hash, receipt.option))
    if not proof.check(same_leaf, f"vote {receipt.index} of the record is this voter's vote "
                                  f"in poll {receipt.poll!r} (voter hash and option match)"):
        return proof
    outcome = recount.watched
    if outcome is None or not outcome.counted:
        reason = "the recount did not reach it" if outcome is None else outcome.reason
        proof.check(False, f"counted by the recount of shard {receipt.shard}: no ({reason})")
        return proof
    chain_position = outcome.chain_position
    if tally is None or chain_position is None:
        raise InvariantViolation(f"the recount counted vote {receipt.index} at offset "
                                 f"{receipt.offset} outside poll {receipt.poll!r}'s chain")
    proof.counted = proof.check(
        True, f"counted by the recount of shard {receipt.shard}: vote {chain_position} "
              f"of {tally.chained_votes} in the shard's chain for the poll")
    proof.checks.append((True, (f"shard {receipt.shard} chain digest "
                                f"{tally.chain_digest.hex()} over {tally.chained_votes} votes")))
    closed = "closed in this shard: the count is final" if tally.closed else \
        "still open in this shard: the count may grow, this vote stays counted"
    proof.checks.append((True, f"poll {receipt.poll!r} {closed}"))
    if claimed is not None:
        _check_export(proof, claimed, recount, until, chain_position)
    return proof


async def _receipts_batch(proof: Proof, config: Config, receipt: Receipt) -> Batch | None:
    """The vote batch the receipt names, read from its group's log, once the receipt's shard
    is found in that group; None (the failed check recorded) otherwise."""
    group = config.group_of(receipt.shard)
    in_group = f"shard {receipt.shard} is in the receipt's fencing group {receipt.group}"
    if not proof.check(group == receipt.group, in_group if group == receipt.group else
                       f"{in_group}: no, this deployment's {config.groups} groups put it in "
                       f"group {group}"):
        return None
    try:
        batch = decode_raw(await read_record(config, group, receipt.offset),
                           f"group {group} record at offset {receipt.offset}")
    except (BadInput, DataDamaged) as exc:
        # The engine signed this batch, so a log without it at that offset lost or moved it.
        proof.check(False, f"the log of group {group} (shard {receipt.shard}'s) holds a record "
                           f"at offset {receipt.offset}: no ({exc})")
        return None
    if not _check_record(proof, receipt, batch) or not isinstance(batch, Batch):
        return None  # _check_record found it is not a vote batch
    return batch


def _check_record(proof: Proof, receipt: Receipt, batch) -> bool:
    if not proof.check(is_receipts_batch(receipt, batch),
                       f"the record at offset {receipt.offset} is batch {receipt.batch_seq} of "
                       f"group {receipt.group}"):
        return False
    return proof.check(
        batch_holds_signature(receipt, batch),
        f"the record holds {receipt.leaf_count} votes and the receipt's signature and batch node")


def is_receipts_batch(receipt: Receipt, batch: object) -> bool:
    """Whether a decoded record (replay/rawlog.py) is vote batch `batch_seq` of the
    receipt's group (step 2 of the module docstring; the receipt lookup of the live
    engine, engine/receipt_lookup.py, runs the same checks)."""
    return isinstance(batch, Batch) and batch.group == receipt.group \
        and batch.batch_seq == receipt.batch_seq


def batch_holds_receipt(receipt: Receipt, batch: Batch) -> bool:
    """Whether the batch holds the receipt's vote count, signature and batch node, and its
    vote `index` is in a vote group of the receipt's shard (the receipt's leaf binds the
    shard: a record whose vote there names another shard is not the batch that was signed,
    and would count the vote for another voter)."""
    return batch_holds_signature(receipt, batch) and \
        _shard_at(batch, receipt.index) == receipt.shard


def batch_holds_signature(receipt: Receipt, batch: Batch) -> bool:
    """Whether the batch holds the receipt's vote count, signature and batch node."""
    leaf = leaf_hash(receipt.poll, receipt.shard, receipt.voter_hash, receipt.option)
    batch_root = path_root(leaf, receipt.index, receipt.leaf_count, receipt.path)
    node = None if batch_root is None else batch_node(receipt.group, receipt.batch_seq,
                                                       receipt.leaf_count, batch_root)
    return (batch.vote_count == receipt.leaf_count and batch.signature == receipt.signature
            and 0 <= batch.batch_position < len(batch.batch_nodes)
            and batch.batch_position == receipt.batch_position
            and batch.batch_nodes[batch.batch_position] == node)


def _shard_at(batch: Batch, index: int) -> int | None:
    for group in batch.groups:
        if index < group.size:
            return group.shard
        index -= group.size
    return None


def vote_of(batch: Batch, index: int) -> tuple[int, str, int, int]:
    """(shard, poll, voter index, option index) of vote `index` in the batch's leaf order
    (every vote group of the batch, of any shard, in record order)."""
    for group in batch.groups:
        if index < group.size:
            voter = int.from_bytes(group.voters[4 * index:4 * index + 4], "little")
            option = int.from_bytes(group.options[2 * index:2 * index + 2], "little")
            return group.shard, group.poll, voter, option
        index -= group.size
    raise BadInput(f"the batch holds no vote {index}")


def vote_at(batch: Batch, index: int) -> tuple[str, int, int]:
    """(poll, voter index, option index) of vote `index` in the batch's leaf order; its
    shard is checked by batch_holds_receipt (the live receipt lookup,
    engine/receipt_lookup.py, checks a receipt with these two)."""
    _, poll, voter, option = vote_of(batch, index)
    return poll, voter, option


def _check_export(proof: Proof, claimed: dict, recount, until: int | None,
                  chain_position: int) -> None:
    entry = claimed["shards"].get(recount.shard)
    capture = recount.captures.get(until) if until is not None else None
    poll = None if capture is None or capture.polls is None else \
        capture.polls.get(claimed["poll"])
    if entry is None or poll is None:
        proof.check(False, f"the export has shard {recount.shard} and its end offset is a "
                           "point of the log where the poll exists")
        return
    proof.check(poll.chain_digest.hex() == entry["chain_digest"]
                and poll.chained_votes == entry["chained_votes"],
                f"the export's shard {recount.shard} digest {entry['chain_digest'][:16]}... over "
                f"{entry['chained_votes']} votes matches the log at offset {until}")
    proof.check(chain_position <= poll.chained_votes,
                f"the export includes this vote (position {chain_position} of "
                f"{poll.chained_votes})")
