"""Vote receipts: one Ed25519 signature per group-commit cycle, over a two-level Merkle tree.

A worker's commit cycle writes one batch per fencing group with votes queued
(shards/commit.py), holding the votes of any of the group's shards. Each group batch's
votes are the leaves of a batch tree (each leaf names its shard); each batch tree's root,
bound to (group, batch_seq, leaf count), is a node of the commit tree; the commit tree's
root is signed once. Each voter gets the path from their leaf to the batch root and from the batch
node to the commit root, so anyone holding the public key (keys/receipt-public.json)
checks a receipt offline, without the log or the engine.

What a verified receipt proves: the key `key_id` signed, at `time_ms`, a commit whose
batch `batch_position` of `batch_count` is batch `batch_seq` of fencing group `group`
holding `leaf_count` votes, and leaf `index` of that batch is the vote (poll, shard,
voter_hash, option). That the shard is in the group (shard mod groups) is the deployment's
layout, which `votes replay prove` checks against the data dir.

- Signed (commit_message): time_ms, batch_count, root; through the root every batch node
  (group, batch_seq, leaf_count, batch root) and every leaf (poll, shard, voter_hash,
  option).
- Not signed: `offset`, the log position of the batch record. A batch is signed before it is
  appended (so the signature travels inside the record and receipts can be rebuilt on
  replay), and the log assigns the offset only afterwards. The offset is a locator; the
  signed position of a vote is (group, batch_seq, index). An auditor holding the log checks
  that the record at `offset` of the group's log is batch `batch_seq` of `group`.
- `key_id` is a lookup hint for the public key; the signature does not depend on it.

Hashes (SHA-256, domain-separated so a leaf, an interior node and a batch node can never
pass for one another):
- leaf = H(0x00 || u16 len || poll utf-8 || u32 shard || u8 len || voter_hash
           || u16 len || option utf-8), all integers big-endian.
- node = H(0x01 || left || right).
- batch node = H(0x02 || u32 group || u64 batch_seq || u32 leaf_count || batch root).
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
from engine.keys import KEY_ID_PATTERN

# "r1." receipts (the release before group batches) bound a batch to its shard; they are
# refused by their prefix, never misread.
RECEIPT_PREFIX = "r2."
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

_LEAF_DOMAIN = b"\x00"
_NODE_DOMAIN = b"\x01"
_BATCH_NODE_DOMAIN = b"\x02"
# group, batch_seq, leaf_count (then the batch's leaf root)
_BATCH_NODE_LAYOUT = struct.Struct(">IQI")
_COMMIT_DOMAIN = b"votes/receipt-commit/v1\x00"
# time_ms, batch_count, commit root
_COMMIT_LAYOUT = struct.Struct(">QI32s")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class ReceiptInvalid(VotesError):
    """The receipt is malformed."""


_Hash = Annotated[bytes, msgspec.Meta(min_length=HASH_BYTES, max_length=HASH_BYTES)]
_UInt32 = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
_NonNegative64 = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]


class Receipt(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True,
              gc=False):
    poll: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    shard: _UInt32
    group: _UInt32
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


def batch_node(group: int, batch_seq: int, leaf_count: int, batch_root: bytes) -> bytes:
    """A group batch's node in its commit tree: binds the batch's leaf root to its position
    in the group's log (group, batch_seq) and its size."""
    if len(batch_root) != HASH_BYTES:
        raise ValueError(f"batch root must be {HASH_BYTES} bytes")
    try:
        return hashlib.sha256(_BATCH_NODE_DOMAIN + _BATCH_NODE_LAYOUT.pack(
            group, batch_seq, leaf_count) + batch_root).digest()
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


def verify_receipt(receipt: Receipt, public_key_bytes: bytes) -> bool:
    """True when the receipt's leaf, both paths and the commit signature check out."""
    try:
        leaf = leaf_hash(receipt.poll, receipt.shard, receipt.voter_hash, receipt.option)
        batch_root = path_root(leaf, receipt.index, receipt.leaf_count, receipt.path)
        if batch_root is None:
            return False
        node = batch_node(receipt.group, receipt.batch_seq, receipt.leaf_count, batch_root)
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
    """The compact form: "r2." + unpadded base64url of the msgpack array."""
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
    except (msgspec.DecodeError, ValueError):
        raise ReceiptInvalid("receipt is malformed: its content does not decode") from None
    _check_receipt_shape(receipt)
    return receipt


def receipt_json(receipt: Receipt) -> dict[str, Any]:
    """A readable JSON-able form (bytes as hex) for HTTP bodies and the CLI."""
    return {
        "poll": receipt.poll,
        "shard": receipt.shard,
        "group": receipt.group,
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
    except (msgspec.ValidationError, ValueError, TypeError, KeyError):
        raise ReceiptInvalid("receipt JSON is malformed") from None
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
