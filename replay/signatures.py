"""Batch signatures for `verify`: does every vote batch in the log carry a signature, by a key of
this deployment, over exactly the votes it holds?

A vote batch record (replay/rawlog.Batch, one fencing group's batch holding votes of any of
its shards) stores its commit cycle's batch nodes, its own position among them, the Ed25519
signature and the signing key id (engine/receipts.py has the format). Each batch record is
checked once, whatever the number of shards with votes in it, in order:
1. the key id is one of the deployment's public keys (keys/receipt-public.json in the data
   dir, current and rotated-out ones);
2. the batch position and the nodes fit together (position inside the list, 32-byte nodes),
   and the record names the group of the log it sits in (its node binds that group);
3. the signature verifies over (time_ms, batch count, root of the nodes), the message the
   engine signed;
4. with the voter hash secret (keys/voter-hash-keys.json): the batch's own votes rebuild its
   node (each vote's leaf from poll, its vote group's shard, keyed voter hash and option, the
   voter id being voter index x shards + that shard; the batch tree over every vote group in
   record order; the node bound to group, batch_seq and leaf count), so a signature copied
   onto other votes, or votes moved to another shard, do not pass. Without the secret this
   step is skipped and said so in a note.

The hashes and the message come from engine/receipts.py's reference functions (the same ones
`votes receipt verify` uses), and the batch tree is built here, not through the engine's
compiled signing path, so a bug in that path shows up as a finding instead of being repeated.
Invariant: a batch is reported at most once, with the first check it fails.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from engine.errors import VotesError
from engine.keys import RECEIPT_PUBLIC_FILE, keys_dir, load_keys, load_public_key_document
from engine.receipts import (
    HASH_BYTES,
    SIGNATURE_BYTES,
    VOTER_HASH_BYTES,
    _leaf_head,
    _leaf_tail,
    batch_node,
    commit_message,
    node_hash,
)
from replay.rawlog import Batch

# Options of a poll as the group's log created it, or None when the log has not created it.
OptionsOf = Callable[[str], Sequence[str] | None]


def merkle_root(nodes: Sequence[bytes]) -> bytes:
    """Root of the receipt tree shape: pair left to right, promote an odd last node."""
    if not nodes:
        raise ValueError("a Merkle tree needs at least one node")
    level = list(nodes)
    while len(level) > 1:
        paired = [node_hash(level[index], level[index + 1])
                  for index in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


class BatchSignatures:
    """The deployment's keys, loaded once, and the check of one batch (`problem_of`)."""

    def __init__(self, public_keys: dict[str, bytes] | None, voter_hash_secret: bytes | None,
                 shards_total: int, keys_problem: str | None = None) -> None:
        self.public_keys = public_keys
        self.voter_hash_secret = voter_hash_secret
        self.shards_total = shards_total
        # Why no batch can be checked (no public key document): one finding, not one per batch.
        self.keys_problem = keys_problem
        self._poll_keys: dict[str, bytes] = {}
        # One commit cycle's signature is stored in every batch of that cycle (a group's
        # control records can split its votes of a cycle into several batches).
        self._verified: set[tuple[str, bytes, bytes]] = set()
        self.nodes_not_rebuilt = 0

    @classmethod
    def from_data_dir(cls, data_dir: Path, shards_total: int) -> BatchSignatures:
        directory = keys_dir(data_dir)
        try:
            public_keys = load_public_key_document(directory / RECEIPT_PUBLIC_FILE)
        except VotesError as exc:
            return cls(None, None, shards_total,
                       f"batch signatures cannot be checked: {exc.detail}")
        try:
            secret = load_keys(data_dir).voter_hash_secret
        except VotesError:
            secret = None  # step 4 is skipped; `notes` says so
        return cls(public_keys, secret, shards_total)

    def for_group(self) -> BatchSignatures:
        """A checker with the same keys and its own caches and counters: group logs are read
        in threads at once, each with its own."""
        return BatchSignatures(self.public_keys, self.voter_hash_secret, self.shards_total,
                               self.keys_problem)

    def notes(self, nodes_not_rebuilt: int) -> list[str]:
        """What the check could not do; `nodes_not_rebuilt` summed over the groups' checkers."""
        notes = []
        if self.public_keys is not None and self.voter_hash_secret is None:
            notes.append("batch nodes not rebuilt from their votes: no voter hash secret in the "
                         "data dir's keys (signatures over the stored nodes were checked)")
        if nodes_not_rebuilt:
            notes.append(f"{nodes_not_rebuilt} batches' nodes not rebuilt from their votes: "
                         "they hold votes for a poll their group's log has not created")
        return notes

    def problem_of(self, batch: Batch, group: int, options_of: OptionsOf) -> str | None:
        """Why this batch, read from the log of `group`, does not hold its signature, or None
        when it does."""
        if self.public_keys is None:
            return None  # reported once, as keys_problem
        public_key = self.public_keys.get(batch.key_id)
        if public_key is None:
            return f"signed by key id {batch.key_id!r}, which is not a key of this deployment"
        nodes = batch.batch_nodes
        if not nodes or not 0 <= batch.batch_position < len(nodes) or \
                any(len(node) != HASH_BYTES for node in nodes):
            return (f"batch position {batch.batch_position} and {len(nodes)} batch nodes do not "
                    f"form a commit tree of {HASH_BYTES}-byte nodes")
        if batch.group != group:
            # Its node binds the group it was signed for: moved to another group's log it
            # would pass for a batch of that group.
            return f"the record says group {batch.group}, it sits in the log of group {group}"
        problem = self._signature_problem(batch, public_key)
        secret = self.voter_hash_secret
        if problem is None and secret is not None:
            problem = self._node_problem(batch, options_of, secret)
        return problem

    def _signature_problem(self, batch: Batch, public_key: bytes) -> str | None:
        try:
            message = commit_message(batch.time_ms, len(batch.batch_nodes),
                                     merkle_root(batch.batch_nodes))
        except ValueError as exc:
            return f"the signed message cannot be formed: {exc}"
        cached = (batch.key_id, message, batch.signature)
        if cached in self._verified:
            return None
        if len(batch.signature) != SIGNATURE_BYTES:
            return f"the signature is {len(batch.signature)} bytes, not {SIGNATURE_BYTES}"
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(batch.signature, message)
        except InvalidSignature:
            return (f"the signature does not verify under key {batch.key_id} over its commit "
                    f"(time_ms {batch.time_ms}, {len(batch.batch_nodes)} batch nodes)")
        self._verified.add(cached)
        return None

    def _node_problem(self, batch: Batch, options_of: OptionsOf,
                      voter_hash_secret: bytes) -> str | None:
        leaves: list[bytes] = []
        for group in batch.groups:
            options = options_of(group.poll)
            if options is None:
                self.nodes_not_rebuilt += 1
                return None
            poll_key = self._poll_key(group.poll, voter_hash_secret)
            head = _leaf_head(group.poll, group.shard, VOTER_HASH_BYTES)
            tails = [_leaf_tail(option) for option in options]
            for position in range(group.size):
                voter_index = int.from_bytes(group.voters[4 * position:4 * position + 4], "little")
                option_index = int.from_bytes(group.options[2 * position:2 * position + 2],
                                              "little")
                if option_index >= len(tails):
                    return (f"vote {len(leaves)} names option index {option_index}; poll "
                            f"{group.poll!r} has {len(tails)} options")
                voter_id = voter_index * self.shards_total + group.shard
                voter_hash = hmac.digest(poll_key, voter_id.to_bytes(8, "big"),
                                         "sha256")[:VOTER_HASH_BYTES]
                leaves.append(hashlib.sha256(head + voter_hash + tails[option_index]).digest())
        if not leaves:
            return "the batch holds no vote, so no signed node can be rebuilt"
        try:
            node = batch_node(batch.group, batch.batch_seq, len(leaves), merkle_root(leaves))
        except ValueError as exc:
            return f"the batch node cannot be formed: {exc}"
        if not hmac.compare_digest(node, batch.batch_nodes[batch.batch_position]):
            return (f"its {len(leaves)} votes do not rebuild the signed batch node at position "
                    f"{batch.batch_position}: the votes are not the ones signed")
        return None

    def _poll_key(self, poll: str, voter_hash_secret: bytes) -> bytes:
        key = self._poll_keys.get(poll)
        if key is None:
            key = hmac.digest(voter_hash_secret, b"poll:" + poll.encode(), "sha256")
            self._poll_keys[poll] = key
        return key
