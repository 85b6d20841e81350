"""Pure-Python twin of engine/_fastpath.pyx: the reference semantics, vote by vote.

Same signatures and results as the compiled module; used where the extension is not built
and by the parity test as the model the compiled code must match.
"""

from __future__ import annotations

import array
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from typing import cast

from pyroaring import BitMap

class Locator:
    """Open run of one poll's receipt locator in one shard: (voter index, value) pairs in the
    order they were counted, value = log offset of the record that counted the vote + 1; the
    newest entry of a voter wins (see the compiled twin)."""

    __slots__ = ("_voters", "_values")

    def __init__(self) -> None:
        self._voters = array.array("I")
        self._values = array.array("Q")

    @property
    def entries(self) -> int:
        return len(self._voters)

    def get(self, index: int) -> int:
        if index < 0:
            raise IndexError("voter index is negative")
        for position in range(len(self._voters) - 1, -1, -1):
            if self._voters[position] == index:
                return self._values[position]
        return 0

    def set(self, index: int, value: int) -> None:
        if not 0 <= index < 2**32:
            raise IndexError("voter index is outside 0..2**32-1")
        self._voters.append(index)
        self._values.append(value)

    def entries_bytes(self) -> tuple[bytes, bytes]:
        return self._voters.tobytes(), self._values.tobytes()

    def take_sorted(self) -> tuple[bytes, bytes]:
        voters, values = self.entries_bytes()
        del self._voters[:], self._values[:]
        return sort_run(voters, values)

    @staticmethod
    def from_entries(voters_bytes: bytes, values_bytes: bytes) -> Locator:
        locator = Locator()
        locator._voters.frombytes(voters_bytes)
        locator._values.frombytes(values_bytes)
        if len(locator._voters) != len(locator._values):
            raise ValueError("a run needs one uint64 value per uint32 voter")
        return locator

    @property
    def nbytes(self) -> int:
        return 12 * len(self._voters)


def sort_run(voters_bytes: bytes, values_bytes: bytes) -> tuple[bytes, bytes]:
    """(voters, values) sorted by voter, the last entry of a voter kept (see the compiled twin)."""
    voters = array.array("I", voters_bytes)
    values = array.array("Q", values_bytes)
    if len(voters) != len(values):
        raise ValueError("a run needs one uint64 value per uint32 voter")
    newest = dict(zip(voters, values, strict=True))  # later entries overwrite earlier ones
    ordered = sorted(newest)
    return (array.array("I", ordered).tobytes(),
            array.array("Q", [newest[voter] for voter in ordered]).tobytes())


def apply_group(
    voters_bitmap: BitMap,
    tallies: array.array[int],
    locator: Locator,
    voters_bytes: bytes,
    options_bytes: bytes,
    locator_value: int,
) -> tuple[int, bytearray]:
    voters = array.array("I", voters_bytes)
    options = array.array("H", options_bytes)
    if len(voters) != len(options):
        raise ValueError("voters and options differ in length")
    flags = bytearray(len(voters))
    option_count = len(tallies)
    counted = 0
    for index, voter in enumerate(voters):
        option = options[index]
        if option >= option_count or voter in voters_bitmap:
            continue
        voters_bitmap.add(voter)
        tallies[option] += 1
        locator._voters.append(voter)
        locator._values.append(locator_value)
        flags[index] = 1
        counted += 1
    return counted, flags


# --- receipts (twin of engine/_fastpath_crypto.pxi) ------------------------------------

HASH_BYTES = 32
VOTER_HASH_BYTES = 16
_SHA256_BLOCK_BYTES = 64
_NODE_DOMAIN = b"\x01"
_XOR_INNER_PAD = bytes(byte ^ 0x36 for byte in range(256))
_XOR_OUTER_PAD = bytes(byte ^ 0x5C for byte in range(256))
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


class HmacSha256:
    """HMAC-SHA256 (RFC 2104) under one key of messages that all start with `prefix`."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes, prefix: bytes = b"") -> None:
        if len(key) > _SHA256_BLOCK_BYTES:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_SHA256_BLOCK_BYTES, b"\0")
        self._inner = hashlib.sha256(key.translate(_XOR_INNER_PAD) + prefix)
        self._outer = hashlib.sha256(key.translate(_XOR_OUTER_PAD))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def verify(self, message: bytes, expected: bytes) -> bool:
        return hmac.compare_digest(self.digest(message), expected)


# batch_tree's input per run of one poll: the poll's voter hash MAC, the leaf head, the
# options' leaf tails, packed uint64 voter ids and packed uint16 option indexes.
VoteGroup = tuple[HmacSha256, bytes, Sequence[bytes], bytes, bytes]
# receipt_bodies' input per run: its first leaf, vote count, packed uint16 option indexes,
# the options' msgpack forms, the receipt's msgpack head and the body's JSON head.
ReceiptGroup = tuple[int, int, bytes, Sequence[bytes], bytes, bytes]


class MerkleTree:
    """All levels of the tree over `leaves` (leaf hashes): O(n) to build, O(log n) per path.
    The shape is engine/receipts.py's; the commit tree over a cycle's batch nodes uses this
    class in both modes."""

    __slots__ = ("_levels",)

    def __init__(self, leaves: Sequence[bytes]) -> None:
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        level = list(leaves)
        levels = [level]
        sha256 = hashlib.sha256
        while len(level) > 1:
            # An odd last node has no partner: it is carried up below, not paired.
            paired_end = len(level) - (len(level) & 1)
            parents = [sha256(_NODE_DOMAIN + left + right).digest()
                       for left, right in zip(level[0:paired_end:2], level[1:paired_end:2],
                                              strict=True)]
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

    @property
    def leaves(self) -> list[bytes]:
        return self._levels[0]

    def path(self, index: int) -> list[bytes]:
        """Sibling hashes from leaf `index` up to the root, skipping promoted levels."""
        self._check_index(index)
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

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self._levels[0]):
            raise IndexError(f"leaf {index} is outside a tree of {self.leaf_count} leaves")


class BatchTree(MerkleTree):
    """One batch's voter hashes (16 bytes per leaf) and its Merkle tree."""

    __slots__ = ("_voter_hashes",)

    def __init__(self, voter_hashes: list[bytes], leaves: list[bytes]) -> None:
        super().__init__(leaves)
        self._voter_hashes = voter_hashes

    def voter_hash(self, index: int) -> bytes:
        self._check_index(index)
        return self._voter_hashes[index]

    def leaf(self, index: int) -> bytes:
        self._check_index(index)
        return self._levels[0][index]

    def index_of(self, first: int, end: int, voter_hash: bytes) -> int | None:
        if not 0 <= first <= end <= self.leaf_count:
            raise IndexError(f"leaves [{first}, {end}) are outside {self.leaf_count} leaves")
        for index in range(first, end):
            if self._voter_hashes[index] == voter_hash:
                return index
        return None

    def receipt_bodies(self, groups: list[ReceiptGroup], batch_fields: bytes,
                       leaf_count_field: bytes, time_field: bytes, commit_fields: bytes,
                       json_batch: bytes, json_time: bytes) -> list[bytes]:
        bodies: list[bytes | None] = [None] * self.leaf_count
        filled = 0
        for first, count, option_indexes, options, head, json_head in groups:
            if count < 0 or first < 0 or first + count > self.leaf_count:
                raise ValueError("a group's leaves are outside the tree")
            if len(option_indexes) != 2 * count:
                raise ValueError("a group needs one uint16 option index per leaf")
            for position, option_index in enumerate(array.array("H", option_indexes)):
                if option_index >= len(options):
                    raise ValueError("an option index is outside the group's options")
                leaf = first + position
                voter_hash = self._voter_hashes[leaf]
                path = self.path(leaf)
                packed = b"".join([
                    head, batch_fields, _msgpack_uint(leaf), leaf_count_field,
                    b"\xc4\x10", voter_hash, options[option_index], time_field,
                    _msgpack_array_header(len(path)),
                    *(b"\xc4\x20" + sibling for sibling in path), commit_fields])
                encoded = binascii.b2a_base64(packed, newline=False).translate(_TO_URLSAFE)
                bodies[leaf] = b"".join([b'{"receipt":"r2.', encoded.rstrip(b"="), json_head,
                                         str(leaf).encode(), json_batch,
                                         voter_hash.hex().encode(), json_time])
            filled += count
        if filled != self.leaf_count:
            raise ValueError(f"groups cover {filled} of {self.leaf_count} leaves")
        # Groups that cover every leaf once (as engine/signing.py cuts them) fill every body;
        # overlapping ones would leave a None, as in the compiled twin, which is not checked.
        return cast("list[bytes]", bodies)


def batch_tree(shard: int, groups: list[VoteGroup]) -> BatchTree:
    """Voter hashes, leaves and Merkle tree of one group batch (see the compiled twin)."""
    voter_hashes: list[bytes] = []
    leaves: list[bytes] = []
    sha256 = hashlib.sha256
    for mac, head, tails, voters, option_indexes in groups:
        if len(voters) % 8 or len(option_indexes) * 4 != len(voters):
            raise ValueError("a group needs packed uint64 voters and one uint16 option each")
        for voter, option_index in zip(array.array("Q", voters), array.array("H", option_indexes),
                                      strict=True):
            if option_index >= len(tails):
                raise ValueError("an option index is outside the group's options")
            voter_hash = mac.digest(voter.to_bytes(8, "big"))[:VOTER_HASH_BYTES]
            voter_hashes.append(voter_hash)
            leaves.append(sha256(head + voter_hash + tails[option_index]).digest())
    return BatchTree(voter_hashes, leaves)


# What is wrong with a token, as token_payload returns it; the same numbers as the compiled
# module's TOKEN_* (engine/tokens.py maps each to its error).
TOKEN_MISSING = 1
TOKEN_NOT_ASCII = 2
TOKEN_NOT_TEXT = 3
TOKEN_TOO_LONG = 4
TOKEN_MALFORMED = 5
TOKEN_KEY_UNKNOWN = 6
TOKEN_SIGNATURE_WRONG = 7
TOKEN_PAYLOAD_NOT_BASE64URL = 8
_AUTHORIZATION_BYTES_MAX = 1024
# Swapping the alphabets (and turning "=" into "!") makes "+", "/" and explicit padding invalid
# for the strict decoder, so only unpadded base64url is accepted.
_FROM_URLSAFE = bytes.maketrans(b"-_+/=", b"+/-_!")


def token_payload(macs: dict[bytes, HmacSha256], authorization: object) -> bytes | int:
    """The decoded claims bytes of a valid `v1.<key_id>.<payload>.<signature>` bearer
    token (see the compiled twin), or an int saying what is wrong."""
    if authorization is None:
        return TOKEN_MISSING
    if isinstance(authorization, str):
        if not authorization.isascii():
            return TOKEN_NOT_ASCII
        value = authorization.encode("ascii")
    elif isinstance(authorization, bytes):
        value = authorization
    else:
        return TOKEN_NOT_TEXT
    if len(value) > _AUTHORIZATION_BYTES_MAX:
        return TOKEN_TOO_LONG
    value = value.strip()
    scheme, _, rest = value.partition(b" ")
    if scheme.lower() == b"bearer":
        value = rest.strip()
    if not value:
        return TOKEN_MISSING
    parts = value.split(b".")
    if len(parts) != 4 or parts[0] != b"v1":
        return TOKEN_MALFORMED
    mac = macs.get(parts[1])
    if mac is None:
        return TOKEN_KEY_UNKNOWN
    signature = binascii.b2a_base64(mac.digest(parts[2]), newline=False)
    if not hmac.compare_digest(signature.translate(_TO_URLSAFE).rstrip(b"="), parts[3]):
        return TOKEN_SIGNATURE_WRONG
    payload = parts[2]
    try:
        return binascii.a2b_base64(payload.translate(_FROM_URLSAFE) + b"=" * (-len(payload) % 4),
                                   strict_mode=True)
    except ValueError:
        return TOKEN_PAYLOAD_NOT_BASE64URL


def _msgpack_uint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    for marker, size in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if value < 1 << (8 * size):
            return bytes((marker,)) + value.to_bytes(size, "big")
    raise OverflowError(f"{value} does not fit a msgpack uint64")


def _msgpack_array_header(length: int) -> bytes:
    return bytes((0x90 | length,)) if length <= 15 else b"\xdc" + length.to_bytes(2, "big")
