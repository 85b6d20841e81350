"""Vote receipts: one Ed25519 signature per group-commit cycle, over a two-level Merkle tree.

A worker's commit cycle writes one batch per shard with votes queued (shards/commit.py).
Each shard batch's votes are the leaves of a batch tree; each batch tree's root, bound to
(shard, batch_seq, leaf count), is a node of the commit tree; the commit tree's root is
signed once. Each voter gets the path from their leaf to the batch root and from the batch
node to the commit root, so anyone holding the public key (keys/receipt-public.json)
checks a receipt offline, without the log or the engine.

What a verified receipt proves: the key `key_id` signed, at `time_ms`, a commit whose
batch `batch_position` of `batch_count` is batch `batch_seq` of `shard` holding
`leaf_count` votes, and leaf `index` of that batch is the vote (poll, shard, voter_hash,
option).

- Signed (commit_message): time_ms, batch_count, root; through the root every batch node
  (shard, batch_seq, leaf_count, batch root) and every leaf (poll, voter_hash, option).
- Not signed: `offset`, the log position of the batch record. A batch is signed before it is
  appended (so the signature travels inside the record and receipts can be rebuilt on
  replay), and the log assigns the offset only afterwards. The offset is a locator; the
  signed position of a vote is (shard, batch_seq, index). An auditor holding the log checks
  that the record at `offset` is batch `batch_seq` of `shard`.
- `key_id` is a lookup hint for the public key; the signature does not depend on it.

Hashes (SHA-256, domain-separated so a leaf, an interior node and a batch node can never
pass for one another):
- leaf = H(0x00 || u16 len || poll utf-8 || u32 shard || u8 len || voter_hash
           || u16 len || option utf-8), all integers big-endian.
- node = H(0x01 || left || right).
- batch node = H(0x02 || u32 shard || u64 batch_seq || u32 leaf_count || batch root).
- Tree shape (both levels): pair nodes left to right, level by level; the odd last node of
  a level is promoted unchanged (never duplicated, so no two leaf lists share a root).
  A path lists sibling hashes bottom-up, skipping levels where the node was promoted;
  whether each sibling sits left or right follows from (index, count).

The voter hash is keyed per poll: poll_key = HMAC-SHA256(secret, b"poll:" + poll), and
voter_hash = HMAC-SHA256(poll_key, voter as 8 bytes big-endian)[:16], so receipts and exports
of one poll can't be joined with another's, nor reversed by hashing the whole id space.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import struct
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from engine.errors import VotesError
from engine.keys import KEY_ID_PATTERN, KeyRing

RECEIPT_PREFIX = "r1."
RECEIPT_CHARS_MAX = 16 * 1024
HASH_BYTES = 32
VOTER_HASH_BYTES = 16
SIGNATURE_BYTES = 64
POLL_ID_BYTES_MAX = 0xFFFF
OPTION_ID_BYTES_MAX = 0xFFFF
SHARD_END = 2**32
# msgspec bounds must fit an int64, so 64-bit fields stop at 2**63 - 1.
INT64_MAX = 2**63 - 1
PATH_LENGTH_MAX = 64
VOTER_HASHER_POLLS_MAX = 4096

_LEAF_DOMAIN = b"\x00"
_NODE_DOMAIN = b"\x01"
_BATCH_NODE_DOMAIN = b"\x02"
# shard, batch_seq, leaf_count (then the batch's leaf root)
_BATCH_NODE_LAYOUT = struct.Struct(">IQI")
_COMMIT_DOMAIN = b"votes/receipt-commit/v1\x00"
# time_ms, batch_count, commit root
_COMMIT_LAYOUT = struct.Struct(">QI32s")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
# bytes.translate tables that XOR every byte with HMAC's inner and outer pads.
_XOR_INNER_PAD = bytes(byte ^ 0x36 for byte in range(256))
_XOR_OUTER_PAD = bytes(byte ^ 0x5C for byte in range(256))


class ReceiptInvalid(VotesError):
    status = 400
    problem = "receipt-invalid"
    title = "The receipt is malformed"


_Hash = Annotated[bytes, msgspec.Meta(min_length=HASH_BYTES, max_length=HASH_BYTES)]
_UInt32 = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
_NonNegative64 = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]


class Receipt(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True,
              gc=False):
    poll: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    shard: _UInt32
    offset: _NonNegative64
    batch_seq: _NonNegative64
    index: _UInt32
    leaf_count: Annotated[int, msgspec.Meta(ge=1, lt=2**32)]
    voter_hash: Annotated[bytes, msgspec.Meta(min_length=VOTER_HASH_BYTES,
                                              max_length=VOTER_HASH_BYTES)]
    option: Annotated[str, msgspec.Meta(max_length=1024)]
    time_ms: _NonNegative64
    path: Annotated[list[_Hash], msgspec.Meta(max_length=PATH_LENGTH_MAX)]
    batch_position: _UInt32
    batch_count: Annotated[int, msgspec.Meta(ge=1, lt=2**32)]
    batch_path: Annotated[list[_Hash], msgspec.Meta(max_length=PATH_LENGTH_MAX)]
    root: _Hash
    signature: Annotated[bytes, msgspec.Meta(min_length=SIGNATURE_BYTES,
                                             max_length=SIGNATURE_BYTES)]
    key_id: Annotated[str, msgspec.Meta(pattern=f"^{KEY_ID_PATTERN.pattern}\\Z")]


_receipt_encoder = msgspec.msgpack.Encoder()
_receipt_decoder = msgspec.msgpack.Decoder(Receipt)
# Swapping the alphabets (and turning "=" into "!") makes "+", "/" and explicit padding invalid
# for the strict decoder, so only canonical unpadded base64url is accepted.
_FROM_URLSAFE = bytes.maketrans(b"-_+/=", b"+/-_!")


def voter_hash(voter_hash_secret: bytes, poll: str, voter: int) -> bytes:
    poll_key = hmac.digest(voter_hash_secret, b"poll:" + poll.encode(), "sha256")
    return hmac.digest(poll_key, voter.to_bytes(8, "big"), "sha256")[:VOTER_HASH_BYTES]


class VoterHasher:
    """voter_hash with per-poll state cached (at most `polls_max` polls, oldest out).

    HMAC is computed from SHA-256 states pre-fed with the padded poll key (RFC 2104's inner
    and outer pads), which costs about half of `hmac.HMAC.copy()` per voter; the unit tests
    check it against `voter_hash`.
    """

    __slots__ = ("_secret", "_poll_states", "_polls_max")

    def __init__(self, voter_hash_secret: bytes, polls_max: int = VOTER_HASHER_POLLS_MAX):
        if polls_max < 1:
            raise ValueError("polls_max must be at least 1")
        self._secret = voter_hash_secret
        self._poll_states: dict[str, tuple[Any, Any]] = {}
        self._polls_max = polls_max

    def __call__(self, poll: str, voter: int) -> bytes:
        states = self._poll_states.get(poll)
        if states is None:
            states = self._add_poll(poll)
        inner = states[0].copy()
        inner.update(voter.to_bytes(8, "big"))
        outer = states[1].copy()
        outer.update(inner.digest())
        return outer.digest()[:VOTER_HASH_BYTES]

    def _add_poll(self, poll: str) -> tuple[Any, Any]:
        if len(self._poll_states) >= self._polls_max:
            del self._poll_states[next(iter(self._poll_states))]
        # A 32-byte poll key is shorter than SHA-256's 64-byte block, so it is zero-padded.
        poll_key = hmac.digest(self._secret, b"poll:" + poll.encode(), "sha256").ljust(64, b"\0")
        inner = hashlib.sha256(poll_key.translate(_XOR_INNER_PAD))
        outer = hashlib.sha256(poll_key.translate(_XOR_OUTER_PAD))
        states = self._poll_states[poll] = (inner, outer)
        return states


def leaf_hash(poll: str, shard: int, voter_hash: bytes, option: str) -> bytes:
    preimage = _leaf_head(poll, shard, len(voter_hash)) + voter_hash + _leaf_tail(option)
    return hashlib.sha256(preimage).digest()


def leaf_hashes(shard: int, votes: Sequence[tuple[str, bytes, str]]) -> list[bytes]:
    """leaf_hash of each (poll, voter_hash, option) of one shard's batch, encoding each
    distinct poll and option once. Every voter hash must be VOTER_HASH_BYTES long."""
    heads: dict[str, bytes] = {}
    tails: dict[str, bytes] = {}
    sha256 = hashlib.sha256
    leaves = []
    for poll, voter_hash_, option in votes:
        if len(voter_hash_) != VOTER_HASH_BYTES:
            raise ValueError(f"voter hash is {len(voter_hash_)} bytes, not {VOTER_HASH_BYTES}")
        head = heads.get(poll)
        if head is None:
            head = heads[poll] = _leaf_head(poll, shard, VOTER_HASH_BYTES)
        tail = tails.get(option)
        if tail is None:
            tail = tails[option] = _leaf_tail(option)
        leaves.append(sha256(head + voter_hash_ + tail).digest())
    return leaves


def _leaf_head(poll: str, shard: int, voter_hash_bytes: int) -> bytes:
    """The leaf preimage up to the voter hash: 0x00, u16 len, poll, u32 shard, u8 len."""
    poll_bytes = poll.encode()
    if len(poll_bytes) > POLL_ID_BYTES_MAX:
        raise ValueError(f"poll id is longer than {POLL_ID_BYTES_MAX} bytes")
    if not 0 <= shard < SHARD_END or voter_hash_bytes > 0xFF:
        raise ValueError("shard or voter hash out of range for a receipt leaf")
    return (_LEAF_DOMAIN + _U16.pack(len(poll_bytes)) + poll_bytes + _U32.pack(shard)
            + bytes((voter_hash_bytes,)))


def _leaf_tail(option: str) -> bytes:
    """The leaf preimage after the voter hash: u16 len, option."""
    option_bytes = option.encode()
    if len(option_bytes) > OPTION_ID_BYTES_MAX:
        raise ValueError(f"option id is longer than {OPTION_ID_BYTES_MAX} bytes")
    return _U16.pack(len(option_bytes)) + option_bytes


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE_DOMAIN + left + right).digest()


class MerkleTree:
    """All levels of the tree over `leaves` (leaf hashes): O(n) to build, O(log n) per path."""

    __slots__ = ("_levels",)

    def __init__(self, leaves: Sequence[bytes]) -> None:
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        level = list(leaves)
        levels = [level]
        sha256 = hashlib.sha256
        while len(level) > 1:
            parents = [sha256(_NODE_DOMAIN + left + right).digest()
                       for left, right in zip(level[0::2], level[1::2])]
            if len(level) & 1:
                parents.append(level[-1])
            levels.append(parents)
            level = parents
        self._levels = levels

    @property
    def root(self) -> bytes:
        return self._levels[-1][0]

    @property
    def leaf_count(self) -> int:
        return len(self._levels[0])

    def path(self, index: int) -> list[bytes]:
        """Sibling hashes from leaf `index` up to the root, skipping promoted levels."""
        if not 0 <= index < len(self._levels[0]):
            raise IndexError(f"leaf {index} is outside a tree of {self.leaf_count} leaves")
        path = []
        for level in self._levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            index >>= 1
        return path

    def paths(self) -> list[list[bytes]]:
        """path(i) for every leaf, built top-down: a node's path is its sibling followed by
        its parent's path, so each level costs one list per node (O(n log n) copying in C)."""
        paths: list[list[bytes]] = [[]]
        for level in reversed(self._levels[:-1]):
            paired = len(level) & ~1
            paths_below = [[level[p ^ 1]] + paths[p >> 1] for p in range(paired)]
            if paired < len(level):
                # The odd last node was promoted: it has no sibling here.
                paths_below.append(list(paths[paired >> 1]))
            paths = paths_below
        return paths


def path_length(index: int, leaf_count: int) -> int:
    """How many siblings the path of leaf `index` holds in a tree of `leaf_count` leaves."""
    length = 0
    while leaf_count > 1:
        if index ^ 1 < leaf_count:
            length += 1
        index >>= 1
        leaf_count = (leaf_count + 1) >> 1
    return length


def path_root(leaf: bytes, index: int, leaf_count: int, path: Sequence[bytes]) -> bytes | None:
    """The root that `path` leads to from `leaf` at `index` of `leaf_count` leaves, or None
    when the path does not fit that position."""
    if not 0 <= index < leaf_count or len(path) > PATH_LENGTH_MAX:
        return None
    node = leaf
    used = 0
    while leaf_count > 1:
        if index ^ 1 < leaf_count:
            if used == len(path):
                return None
            sibling = path[used]
            used += 1
            if len(sibling) != HASH_BYTES:
                return None
            node = node_hash(sibling, node) if index & 1 else node_hash(node, sibling)
        index >>= 1
        leaf_count = (leaf_count + 1) >> 1
    return node if used == len(path) else None


def verify_path(leaf: bytes, index: int, leaf_count: int, path: Sequence[bytes],
                root: bytes) -> bool:
    """True when `path` leads from `leaf` at `index` of `leaf_count` leaves to `root`."""
    node = path_root(leaf, index, leaf_count, path)
    return node is not None and hmac.compare_digest(node, root)


def batch_node(shard: int, batch_seq: int, leaf_count: int, batch_root: bytes) -> bytes:
    """A shard batch's node in its commit tree: binds the batch's leaf root to its position
    in the shard's log (shard, batch_seq) and its size."""
    if len(batch_root) != HASH_BYTES:
        raise ValueError(f"batch root must be {HASH_BYTES} bytes")
    try:
        return hashlib.sha256(_BATCH_NODE_DOMAIN + _BATCH_NODE_LAYOUT.pack(
            shard, batch_seq, leaf_count) + batch_root).digest()
    except struct.error as exc:
        raise ValueError(f"batch field out of range: {exc}") from None


def commit_message(time_ms: int, batch_count: int, root: bytes) -> bytes:
    """The exact bytes a commit signature covers: a domain tag and a fixed 44-byte layout."""
    if len(root) != HASH_BYTES:
        raise ValueError(f"root must be {HASH_BYTES} bytes")
    try:
        return _COMMIT_DOMAIN + _COMMIT_LAYOUT.pack(time_ms, batch_count, root)
    except struct.error as exc:
        raise ValueError(f"commit field out of range: {exc}") from None


def sign_commit(keyring: KeyRing, hasher: VoterHasher, time_ms: int,
                batches: Sequence[tuple[int, int, Sequence[tuple[str, int, str]]]]
                ) -> list[SignedBatch]:
    """Sign one group-commit cycle: `batches` holds (shard, batch_seq, votes) per shard
    batch, votes as (poll, voter, option) in batch order. One signature covers them all."""
    built = [SignedBatch._leaves(hasher, shard, batch_seq, time_ms, votes)
             for shard, batch_seq, votes in batches]
    nodes = [signed.node for signed in built]
    commit_tree = MerkleTree(nodes)
    signature = keyring.receipt_signing_key.sign(
        commit_message(time_ms, len(nodes), commit_tree.root))
    for position, signed in enumerate(built):
        signed._commit(position, nodes, commit_tree, keyring.receipt_key_id, signature)
    return built


class SignedBatch:
    """One shard batch of a signed commit cycle, from which each vote's receipt is cut.

    Built before the append (the signature travels in the log record); receipts are cut
    once the log has made the batch durable and assigned its offset.
    """

    __slots__ = ("shard", "batch_seq", "time_ms", "votes", "tree", "node", "batch_position",
                 "batch_nodes", "commit_tree", "key_id", "signature")

    @classmethod
    def _leaves(cls, hasher: VoterHasher, shard: int, batch_seq: int, time_ms: int,
                votes: Sequence[tuple[str, int, str]]) -> SignedBatch:
        signed = cls.__new__(cls)
        signed.shard = shard
        signed.batch_seq = batch_seq
        signed.time_ms = time_ms
        # (poll, voter_hash, option) per leaf: the voter id itself never enters a receipt.
        signed.votes = [(poll, hasher(poll, voter), option) for poll, voter, option in votes]
        signed.tree = MerkleTree(leaf_hashes(shard, signed.votes))
        signed.node = batch_node(shard, batch_seq, len(signed.votes), signed.tree.root)
        return signed

    def _commit(self, position: int, nodes: list[bytes], commit_tree: MerkleTree, key_id: str,
                signature: bytes) -> None:
        self.batch_position = position
        self.batch_nodes = nodes
        self.commit_tree = commit_tree
        self.key_id = key_id
        self.signature = signature

    @classmethod
    def restore(cls, hasher: VoterHasher, *, shard: int, batch_seq: int, time_ms: int,
                votes: Sequence[tuple[str, int, str]], batch_position: int,
                batch_nodes: Sequence[bytes], key_id: str, signature: bytes) -> SignedBatch:
        """Rebuild a batch read back from the log, keeping the signature it was stored with.

        The votes must be in their original order; a rebuilt node that differs from the
        stored one means the log or the voter hash secret changed, and is not papered over.
        """
        signed = cls._leaves(hasher, shard, batch_seq, time_ms, votes)
        if not 0 <= batch_position < len(batch_nodes) or \
                batch_nodes[batch_position] != signed.node:
            raise VotesError(f"batch {batch_seq} of shard {shard} rebuilds to another Merkle "
                             "node than the one stored with it")
        nodes = list(batch_nodes)
        signed._commit(batch_position, nodes, MerkleTree(nodes), key_id, signature)
        return signed

    @property
    def root(self) -> bytes:
        return self.commit_tree.root

    def index_of(self, poll: str, voter_hash_: bytes) -> int | None:
        """The leaf index of this voter's vote in `poll`, or None when it is not in the batch."""
        for index, (leaf_poll, leaf_voter_hash, _) in enumerate(self.votes):
            if leaf_voter_hash == voter_hash_ and leaf_poll == poll:
                return index
        return None

    def receipt(self, index: int, offset: int) -> Receipt:
        poll, voter_hash_, option = self.votes[index]
        return Receipt(
            poll=poll, shard=self.shard, offset=offset, batch_seq=self.batch_seq, index=index,
            leaf_count=len(self.votes), voter_hash=voter_hash_, option=option,
            time_ms=self.time_ms, path=self.tree.path(index),
            batch_position=self.batch_position, batch_count=len(self.batch_nodes),
            batch_path=self.commit_tree.path(self.batch_position), root=self.commit_tree.root,
            signature=self.signature, key_id=self.key_id,
        )

    def receipts(self, offset: int) -> list[Receipt]:
        """Every vote's receipt, in batch order: equal to receipt(i) for each i, but all leaf
        paths come from one top-down pass (MerkleTree.paths), about 20 times cheaper."""
        shard, batch_seq, time_ms, leaf_count = (self.shard, self.batch_seq, self.time_ms,
                                                 len(self.votes))
        position, batch_count = self.batch_position, len(self.batch_nodes)
        batch_path = self.commit_tree.path(position)
        root, signature, key_id = self.commit_tree.root, self.signature, self.key_id
        return [
            Receipt(poll, shard, offset, batch_seq, index, leaf_count, voter_hash_, option,
                    time_ms, path, position, batch_count, list(batch_path), root, signature,
                    key_id)
            for index, ((poll, voter_hash_, option), path)
            in enumerate(zip(self.votes, self.tree.paths()))
        ]


def verify_receipt(receipt: Receipt, public_key_bytes: bytes) -> bool:
    """True when the receipt's leaf, both paths and the commit signature check out."""
    try:
        leaf = leaf_hash(receipt.poll, receipt.shard, receipt.voter_hash, receipt.option)
        batch_root = path_root(leaf, receipt.index, receipt.leaf_count, receipt.path)
        if batch_root is None:
            return False
        node = batch_node(receipt.shard, receipt.batch_seq, receipt.leaf_count, batch_root)
        if not verify_path(node, receipt.batch_position, receipt.batch_count,
                           receipt.batch_path, receipt.root):
            return False
        message = commit_message(receipt.time_ms, receipt.batch_count, receipt.root)
        Ed25519PublicKey.from_public_bytes(public_key_bytes).verify(receipt.signature, message)
    except (InvalidSignature, ValueError, TypeError, AttributeError, OverflowError):
        # A receipt built in code rather than decoded may hold wrong types; it does not verify.
        return False
    return True


def encode_receipt(receipt: Receipt) -> str:
    """The compact form: "r1." + unpadded base64url of the msgpack array."""
    packed = _receipt_encoder.encode(receipt)
    return RECEIPT_PREFIX + _b64url_encode(packed).decode("ascii")


def decode_receipt(text: str | bytes) -> Receipt:
    """Parse the compact form; raises ReceiptInvalid, and only that, on any malformed input."""
    if isinstance(text, str):
        try:
            raw = text.encode("ascii")
        except UnicodeEncodeError:
            raise ReceiptInvalid("receipt is not ASCII") from None
    elif isinstance(text, bytes):
        raw = text
    else:
        raise ReceiptInvalid("receipt is neither str nor bytes")
    if len(raw) > RECEIPT_CHARS_MAX:
        raise ReceiptInvalid(f"receipt is longer than {RECEIPT_CHARS_MAX} characters")
    if not raw.startswith(RECEIPT_PREFIX.encode()):
        raise ReceiptInvalid(f"receipt does not start with {RECEIPT_PREFIX!r}")
    try:
        receipt = _receipt_decoder.decode(_b64url_decode(raw[len(RECEIPT_PREFIX):]))
    except (msgspec.DecodeError, ValueError) as exc:
        raise ReceiptInvalid(f"receipt is malformed: {exc}") from None
    _check_receipt_shape(receipt)
    return receipt


def receipt_json(receipt: Receipt) -> dict[str, Any]:
    """A readable JSON-able form (bytes as hex) for HTTP bodies and the CLI."""
    return {
        "poll": receipt.poll,
        "shard": receipt.shard,
        "offset": receipt.offset,
        "batch_seq": receipt.batch_seq,
        "index": receipt.index,
        "leaf_count": receipt.leaf_count,
        "voter_hash": receipt.voter_hash.hex(),
        "option": receipt.option,
        "time_ms": receipt.time_ms,
        "path": [sibling.hex() for sibling in receipt.path],
        "batch_position": receipt.batch_position,
        "batch_count": receipt.batch_count,
        "batch_path": [sibling.hex() for sibling in receipt.batch_path],
        "root": receipt.root.hex(),
        "signature": receipt.signature.hex(),
        "key_id": receipt.key_id,
    }


def receipt_from_json(document: object) -> Receipt:
    """Inverse of receipt_json; raises ReceiptInvalid, and only that, on malformed input."""
    try:
        if not isinstance(document, dict):
            raise ValueError("receipt JSON is not an object")
        if set(document) != set(Receipt.__struct_fields__):
            raise ValueError("receipt JSON does not have exactly the receipt's fields")
        fields = dict(document)
        for name in ("voter_hash", "root", "signature"):
            fields[name] = bytes.fromhex(fields[name])
        fields["path"] = [bytes.fromhex(sibling) for sibling in fields["path"]]
        fields["batch_path"] = [bytes.fromhex(sibling) for sibling in fields["batch_path"]]
        # Receipt is array_like, so it converts from its fields in declaration order.
        receipt = msgspec.convert([fields[name] for name in Receipt.__struct_fields__], Receipt)
    except (msgspec.ValidationError, ValueError, TypeError, KeyError) as exc:
        raise ReceiptInvalid(f"receipt JSON is malformed: {exc!r}") from None
    _check_receipt_shape(receipt)
    return receipt


def _check_receipt_shape(receipt: Receipt) -> None:
    """Cross-field rules the per-field types can't express."""
    if receipt.index >= receipt.leaf_count:
        raise ReceiptInvalid("receipt index is not below its leaf count")
    if len(receipt.path) != path_length(receipt.index, receipt.leaf_count):
        raise ReceiptInvalid("receipt path length does not fit its index and leaf count")
    if receipt.batch_position >= receipt.batch_count:
        raise ReceiptInvalid("receipt batch position is not below its batch count")
    if len(receipt.batch_path) != path_length(receipt.batch_position, receipt.batch_count):
        raise ReceiptInvalid("receipt batch path length does not fit its position and count")


_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64url_encode(data: bytes) -> bytes:
    # binascii directly: base64.urlsafe_b64encode adds two Python calls per receipt.
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=")


def _b64url_decode(text: bytes) -> bytes:
    """Strict unpadded base64url decode; raises binascii.Error (a ValueError) on bad input."""
    padded = text.translate(_FROM_URLSAFE) + b"=" * (-len(text) % 4)
    return binascii.a2b_base64(padded, strict_mode=True)
