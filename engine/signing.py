"""Signing a group-commit cycle and cutting its receipts (the receipt format is engine/receipts.py).

A cycle signs one batch per fencing group with votes queued (shards/commit.py). A batch's
votes come as runs of one shard and poll (`VoteRun`: voter ids and option indexes, packed),
which is how the group owner groups them for its log record; their leaves are the Merkle
tree's leaves in run order. The per-vote work (voter hash, leaf, tree, and after the append each vote's 201 body)
runs in engine.fastpath's compiled loops; this module prepares their per-poll and per-batch
inputs once and keeps the Python objects around them.
"""

from __future__ import annotations

import array
import bisect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import msgspec

from engine import fastpath
from engine.errors import VotesError
from engine.keys import KeyRing
from engine.receipts import (
    VOTER_HASH_BYTES,
    Receipt,
    _leaf_head,
    _leaf_tail,
    batch_node,
    commit_message,
    encode_receipt,
)

VOTER_HASHER_POLLS_MAX = 4096

_msgpack = msgspec.msgpack.Encoder()
_json = msgspec.json.Encoder()
# A receipt is a msgpack array of Receipt's fields: msgspec writes 16 elements as array16.
_RECEIPT_HEAD = b"\xdc" + len(Receipt.__struct_fields__).to_bytes(2, "big")


class _ByShard(dict[int, bytes]):
    """A shard's encoded form, computed once per shard: `form(shard)` on first use."""

    __slots__ = ("form",)

    def __init__(self, form: Callable[[int], bytes]) -> None:
        super().__init__()
        self.form = form

    def __missing__(self, shard: int) -> bytes:
        value = self[shard] = self.form(shard)
        return value


# Per shard: its part of a leaf head (u32 big-endian, then the voter hash length), its
# msgpack in a receipt, and its JSON in a 201 body (a worker runs at most config's 4,096
# shards, so these stay small).
_SHARD_HEADS = _ByShard(lambda shard: shard.to_bytes(4, "big") + bytes((VOTER_HASH_BYTES,)))
_SHARD_MSGPACK = _ByShard(_msgpack.encode)
_SHARD_JSON = _ByShard(lambda shard: b',"shard":%d' % shard)


class VoteRun(NamedTuple):
    """Consecutive votes of one shard and poll in a batch: the leaves first .. first +
    count - 1."""

    shard: int
    poll: str
    options: Sequence[str]  # the poll's options; option_indexes point into them
    voters: bytes  # voter ids, packed native uint64
    option_indexes: bytes  # packed native uint16


def vote_runs(shard: int, votes: Sequence[tuple[str, int, str]]) -> list[VoteRun]:
    """(poll, voter, option) tuples of one shard as runs, in their order (for tools and
    tests). Each poll's options are the ones its votes name, sorted."""
    options_of: dict[str, list[str]] = {}
    for poll, _, option in votes:
        options_of.setdefault(poll, [])
        if option not in options_of[poll]:
            options_of[poll].append(option)
    for options in options_of.values():
        options.sort()
    runs: list[VoteRun] = []
    start = 0
    while start < len(votes):
        poll = votes[start][0]
        end = start
        while end < len(votes) and votes[end][0] == poll:
            end += 1
        options = options_of[poll]
        runs.append(VoteRun(
            shard, poll, options, array.array("Q", [voter for _, voter, _ in votes[start:end]]).tobytes(),
            array.array("H", [options.index(option) for _, _, option in votes[start:end]]).tobytes()))
        start = end
    return runs


class _PollCodec:
    """What the compiled loops need of one poll, computed once: the voter hash key, and the
    encoded forms of the poll id and of its options."""

    __slots__ = ("mac", "head_prefix", "receipt_head", "json_poll", "_options", "_forms")

    def __init__(self, mac: fastpath.HmacSha256, poll: str) -> None:
        self.mac = mac
        head = _leaf_head(poll, 0, VOTER_HASH_BYTES)
        self.head_prefix = head[:-5]  # the leaf head up to its u32 shard and u8 hash length
        self.receipt_head = _RECEIPT_HEAD + _msgpack.encode(poll)
        self.json_poll = b'","poll":' + _json.encode(poll)
        self._options: Sequence[str] | None = None
        self._forms: tuple[list[bytes], list[bytes]] = ([], [])

    def option_forms(self, options: Sequence[str]) -> tuple[list[bytes], list[bytes]]:
        """The options' leaf tails and msgpack forms (kept for the last options list seen)."""
        if self._options is not options and self._options != options:
            self._forms = ([_leaf_tail(option) for option in options],
                           [_msgpack.encode(option) for option in options])
            self._options = options
        return self._forms


class VoterHasher:
    """voter_hash (engine/receipts.py) with per-poll state cached (at most `polls_max`
    polls, oldest out); the unit tests check it against `receipts.voter_hash`."""

    __slots__ = ("_secret_mac", "_polls", "_polls_max")

    def __init__(self, voter_hash_secret: bytes, polls_max: int = VOTER_HASHER_POLLS_MAX):
        if polls_max < 1:
            raise ValueError("polls_max must be at least 1")
        self._secret_mac = fastpath.HmacSha256(voter_hash_secret, b"poll:")
        self._polls: dict[str, _PollCodec] = {}
        self._polls_max = polls_max

    def __call__(self, poll: str, voter: int) -> bytes:
        return self.codec(poll).mac.digest(voter.to_bytes(8, "big"))[:VOTER_HASH_BYTES]

    def codec(self, poll: str) -> _PollCodec:
        codec = self._polls.get(poll)
        if codec is None:
            if len(self._polls) >= self._polls_max:
                del self._polls[next(iter(self._polls))]
            poll_key = self._secret_mac.digest(poll.encode())
            codec = self._polls[poll] = _PollCodec(fastpath.HmacSha256(poll_key), poll)
        return codec


# Commit trees of batches read back from the log (receipts of repeat votes), by the cycle's
# signature: a cycle's batches share one tree, so a repeat of another voter of the same cycle
# (of any of its groups) does not hash the cycle's batch nodes again.
COMMIT_TREES_CACHED = 256
_commit_trees: OrderedDict[bytes, fastpath.MerkleTree] = OrderedDict()


def _commit_tree_of(nodes: list[bytes], signature: bytes) -> fastpath.MerkleTree:
    tree = _commit_trees.get(signature)
    if tree is not None and tree.leaves == nodes:  # a log that disagrees is not papered over
        _commit_trees.move_to_end(signature)
        return tree
    tree = _commit_trees[signature] = fastpath.MerkleTree(nodes)
    while len(_commit_trees) > COMMIT_TREES_CACHED:
        _commit_trees.popitem(last=False)
    return tree


def sign_commit(keyring: KeyRing, hasher: VoterHasher, time_ms: int,
                batches: Sequence[tuple[int, int, Sequence[VoteRun]]]) -> list[SignedBatch]:
    """Sign one group-commit cycle: `batches` holds (group, batch_seq, runs) per group
    batch. One signature covers them all."""
    built = [SignedBatch._leaves(hasher, group, batch_seq, time_ms, runs)
             for group, batch_seq, runs in batches]
    nodes = [signed.node for signed in built]
    commit_tree = fastpath.MerkleTree(nodes)
    signature = keyring.receipt_signing_key.sign(
        commit_message(time_ms, len(nodes), commit_tree.root))
    for position, signed in enumerate(built):
        signed._commit(position, nodes, commit_tree, keyring.receipt_key_id, signature)
    return built


class SignedBatch:
    """One group batch of a signed commit cycle, from which each vote's receipt is cut.

    Built before the append (the signature travels in the log record); receipts are cut
    once the log has made the batch durable and assigned its offset.
    """

    __slots__ = ("group", "batch_seq", "time_ms", "runs", "run_starts", "run_forms", "tree",
                 "node", "batch_position", "batch_nodes", "commit_tree", "key_id", "signature")

    # Declared for the type checker; set by `_leaves` and `sign_commit` (no __init__: the
    # constructor is on the hot path).
    group: int
    batch_seq: int
    time_ms: int
    runs: Sequence[VoteRun]
    run_starts: list[int]  # the leaf index of each run's first vote
    run_forms: list[tuple[_PollCodec, list[bytes]]]  # each run's codec and options' msgpack
    tree: fastpath.BatchTree
    node: bytes
    batch_position: int
    batch_nodes: list[bytes]
    commit_tree: fastpath.MerkleTree
    key_id: str
    signature: bytes

    @classmethod
    def _leaves(cls, hasher: VoterHasher, group: int, batch_seq: int, time_ms: int,
                runs: Sequence[VoteRun]) -> SignedBatch:
        signed = cls.__new__(cls)
        signed.group = group
        signed.batch_seq = batch_seq
        signed.time_ms = time_ms
        signed.runs = runs
        groups: list[tuple[object, ...]] = []  # the compiled batch_tree's input, per run
        starts: list[int] = []
        forms: list[tuple[_PollCodec, list[bytes]]] = []
        first = 0
        for run in runs:
            codec = hasher.codec(run.poll)
            tails, options_msgpack = codec.option_forms(run.options)
            # The run's shard in its leaf heads: u32 big-endian shard, then the hash length.
            groups.append((codec.mac, codec.head_prefix + _SHARD_HEADS[run.shard], tails,
                           run.voters, run.option_indexes))
            starts.append(first)
            forms.append((codec, options_msgpack))
            first += len(run.voters) // 8
        signed.run_starts = starts
        signed.run_forms = forms
        signed.tree = fastpath.batch_tree(group, groups)
        signed.node = batch_node(group, batch_seq, signed.tree.leaf_count, signed.tree.root)
        return signed

    def _commit(self, position: int, nodes: list[bytes], commit_tree: fastpath.MerkleTree,
                key_id: str, signature: bytes) -> None:
        self.batch_position = position
        self.batch_nodes = nodes
        self.commit_tree = commit_tree
        self.key_id = key_id
        self.signature = signature

    @classmethod
    def restore(cls, hasher: VoterHasher, *, group: int, batch_seq: int, time_ms: int,
                runs: Sequence[VoteRun], batch_position: int, batch_nodes: Sequence[bytes],
                key_id: str, signature: bytes) -> SignedBatch:
        """Rebuild a batch read back from the log, keeping the signature it was stored with.

        The runs must be in their original order; a rebuilt node that differs from the
        stored one means the log or the voter hash secret changed, and is not papered over.
        """
        signed = cls._leaves(hasher, group, batch_seq, time_ms, runs)
        if not 0 <= batch_position < len(batch_nodes) or \
                batch_nodes[batch_position] != signed.node:
            raise VotesError(f"batch {batch_seq} of group {group} rebuilds to another Merkle "
                             "node than the one stored with it")
        nodes = list(batch_nodes)
        signed._commit(batch_position, nodes, _commit_tree_of(nodes, signature), key_id,
                       signature)
        return signed

    @property
    def root(self) -> bytes:
        return self.commit_tree.root

    def index_of(self, shard: int, poll: str, voter_hash: bytes) -> int | None:
        """The leaf index of this voter's vote in `poll` (the voter of `shard`), or None when
        it is not in the batch."""
        for run, first in zip(self.runs, self.run_starts, strict=True):
            if run.poll == poll and run.shard == shard:
                index = self.tree.index_of(first, first + len(run.voters) // 8, voter_hash)
                if index is not None:
                    return index
        return None

    def receipt(self, index: int, offset: int) -> Receipt:
        run_number = bisect.bisect_right(self.run_starts, index) - 1
        if not 0 <= index < self.tree.leaf_count or run_number < 0:
            raise IndexError(f"leaf {index} is outside a batch of {self.tree.leaf_count} votes")
        run = self.runs[run_number]
        position = index - self.run_starts[run_number]
        option = run.options[array.array("H", run.option_indexes)[position]]
        return Receipt(
            poll=run.poll, shard=run.shard, group=self.group, offset=offset,
            batch_seq=self.batch_seq,
            index=index, leaf_count=self.tree.leaf_count, voter_hash=self.tree.voter_hash(index),
            option=option, time_ms=self.time_ms, path=self.tree.path(index),
            batch_position=self.batch_position, batch_count=len(self.batch_nodes),
            batch_path=self.commit_tree.path(self.batch_position), root=self.commit_tree.root,
            signature=self.signature, key_id=self.key_id,
        )

    def receipts(self, offset: int) -> list[Receipt]:
        """Every vote's receipt, in leaf order (the reference for receipt_bodies)."""
        return [self.receipt(index, offset) for index in range(self.tree.leaf_count)]

    def receipt_bodies(self, offset: int) -> list[bytes]:
        """Every vote's 201 body, in leaf order: byte for byte the JSON of
        receipt_document(receipt(i, offset)), cut in one compiled pass over the tree."""
        group, batch_seq, time_ms = self.group, self.batch_seq, self.time_ms
        json_batch_head = b',"group":%d,"offset":%d,"index":' % (group, offset)
        # Per run: the msgpack receipt head (array header, poll, then the run's shard) and
        # the JSON up to the index; the fields after them are the batch's.
        groups: list[tuple[object, ...]] = [
            (first, len(run.option_indexes) // 2, run.option_indexes, options_msgpack,
             codec.receipt_head + _SHARD_MSGPACK[run.shard],
             codec.json_poll + _SHARD_JSON[run.shard] + json_batch_head)
            for run, first, (codec, options_msgpack) in zip(self.runs, self.run_starts,
                                                            self.run_forms, strict=True)
        ]
        encode = _msgpack.encode
        return self.tree.receipt_bodies(
            groups,
            encode((group, offset, batch_seq))[1:],  # three fields after a fixarray header
            encode(self.tree.leaf_count),
            encode(time_ms),
            encode((self.batch_position, len(self.batch_nodes),
                    self.commit_tree.path(self.batch_position), self.commit_tree.root,
                    self.signature, self.key_id))[1:],
            b',"batch_seq":%d,"voter_hash":"' % batch_seq,
            b'","time_ms":%d}' % time_ms,
        )


ReceiptDocument = dict[str, str | int]


def receipt_document(receipt: Receipt) -> ReceiptDocument:
    """The 201 body (and the `receipt` of a 409): the compact receipt plus where it sits."""
    return {
        "receipt": encode_receipt(receipt),
        "poll": receipt.poll,
        "shard": receipt.shard,
        "group": receipt.group,
        "offset": receipt.offset,
        "index": receipt.index,
        "batch_seq": receipt.batch_seq,
        "voter_hash": receipt.voter_hash.hex(),
        "time_ms": receipt.time_ms,
    }
