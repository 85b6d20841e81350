"""Proves that Merkle paths verify for every leaf of trees of many sizes, that every receipt
of a signed commit cycle (several group batches, each holding several shards' votes, one
signature) verifies offline with the public key and round-trips through its compact and JSON forms, that changing any signed field
(or a path, the root or the signature) makes verification fail, that the unsigned offset does
not, that a batch restored from the log cuts the same receipts, and that decoding garbage
raises only ReceiptInvalid."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import VotesError
from engine.fastpath_py import MerkleTree
from engine.keys import KeyRing, ensure_keys, load_keys
from engine.problems import problem_of
from engine.receipts import (
    Receipt,
    ReceiptInvalid,
    batch_node,
    commit_message,
    decode_receipt,
    encode_receipt,
    leaf_hash,
    leaf_hashes,
    node_hash,
    path_length,
    receipt_from_json,
    receipt_json,
    verify_path,
    verify_receipt,
    voter_hash,
)
from engine.signing import SignedBatch, VoterHasher, sign_commit, vote_runs

SEED = 20250101
TIME_MS = 1_700_000_000_123
# (group, batch_seq, [(shard, vote count), ...]) of the group batches in the commit cycle
# under test: 4 groups, shard s in group s mod 4.
COMMIT_BATCHES = [(2, 40, [(2, 5)]), (1, 812, [(5, 20), (9, 17), (1, 3)]), (3, 3, [(7, 1)]),
                  (0, 77, [(0, 12), (4, 2)])]


def batch_runs(parts: list[tuple[int, int]]) -> list:
    return [run for shard, count in parts for run in vote_runs(shard, commit_votes(shard, count))]


def batch_shards(parts: list[tuple[int, int]]) -> list[int]:
    """The shard of each leaf of a batch, in leaf order."""
    return [shard for shard, count in parts for _ in range(count)]


def commit_votes(shard: int, count: int) -> list[tuple[str, int, str]]:
    return [(f"poll-{i % 3}", (1_000_003 * i * 16 + shard) % 2**32, f"option-{i % 4}")
            for i in range(count)]


@pytest.fixture(scope="module")
def commit(keyring: KeyRing) -> list[SignedBatch]:
    return sign_commit(keyring, VoterHasher(keyring.voter_hash_secret), TIME_MS,
                       [(group, seq, batch_runs(parts)) for group, seq, parts in COMMIT_BATCHES])


@pytest.fixture(scope="module")
def batch(commit: list[SignedBatch]) -> SignedBatch:
    return commit[1]


@pytest.fixture(scope="module")
def receipt(batch: SignedBatch) -> Receipt:
    return batch.receipt(17, offset=4096)


def leaves_for(count: int) -> list[bytes]:
    return [hashlib.sha256(b"leaf %d" % i).digest() for i in range(count)]


def reference_root(leaves: list[bytes]) -> bytes:
    """The documented shape, written recursively: pair left to right, promote an odd last."""
    if len(leaves) == 1:
        return leaves[0]
    parents = [node_hash(leaves[i], leaves[i + 1]) for i in range(0, len(leaves) - 1, 2)]
    if len(leaves) % 2:
        parents.append(leaves[-1])
    return reference_root(parents)


@pytest.mark.parametrize("count", [*range(1, 71), 127, 128, 129, 1000, 3072, 4095, 4096])
def test_every_path_verifies(count: int) -> None:
    leaves = leaves_for(count)
    tree = MerkleTree(leaves)
    assert tree.root == reference_root(leaves)
    assert tree.leaf_count == count
    paths = tree.paths()
    assert len(paths) == count
    for index, leaf in enumerate(leaves):
        path = tree.path(index)
        assert paths[index] == path
        assert len(path) == path_length(index, count)
        assert verify_path(leaf, index, count, path, tree.root)


@pytest.mark.parametrize("count", [2, 3, 5, 8, 13, 70])
def test_path_fails_for_wrong_leaf_index_or_sibling(count: int) -> None:
    """The leaf count is bound by the batch node (so by the signature), not by the path (the
    left part of a tree has the same shape in a larger tree): the receipt tests tamper with it."""
    leaves = leaves_for(count)
    tree = MerkleTree(leaves)
    for index, leaf in enumerate(leaves):
        path = tree.path(index)
        assert not verify_path(leaves[(index + 1) % count], index, count, path, tree.root)
        for other in range(count):
            if other != index:
                assert not verify_path(leaf, other, count, path, tree.root)
        for position in range(len(path)):
            bent = list(path)
            bent[position] = bytes(32)
            assert not verify_path(leaf, index, count, bent, tree.root)
        assert not verify_path(leaf, index, count, path + [bytes(32)], tree.root)
        assert not verify_path(leaf, index, count, path[:-1], tree.root)


def test_tree_shape_is_the_documented_one() -> None:
    a, b, c = leaves_for(3)
    assert MerkleTree([a]).root == a
    assert MerkleTree([a, b]).root == hashlib.sha256(b"\x01" + a + b).digest()
    assert MerkleTree([a, b, c]).root == node_hash(node_hash(a, b), c)
    assert MerkleTree([a, b, c]).path(2) == [node_hash(a, b)]
    with pytest.raises(ValueError):
        MerkleTree([])
    with pytest.raises(IndexError):
        MerkleTree([a]).path(1)


def test_leaf_encoding_is_domain_separated_and_unambiguous() -> None:
    voter = bytes(range(16))
    leaf = leaf_hash("poll", 3, voter, "yes")
    expected = hashlib.sha256(b"\x00" + b"\x00\x04poll" + b"\x00\x00\x00\x03" + b"\x10" + voter
                              + b"\x00\x03yes").digest()
    assert leaf == expected
    # Moving bytes between adjacent fields changes the leaf.
    assert leaf_hash("pol", 3, voter, "lyes") != leaf_hash("poll", 3, voter, "yes")
    assert leaf_hash("poll", 3, voter, "yes") != leaf_hash("poll", 4, voter, "yes")
    assert leaf_hashes(3, [("poll", voter, "yes"), ("poll", voter, "no")]) == [
        leaf, leaf_hash("poll", 3, voter, "no")]
    with pytest.raises(ValueError):
        leaf_hashes(3, [("poll", b"short", "yes")])


def test_voter_hash_is_keyed_per_poll_and_hasher_agrees() -> None:
    secret = bytes(range(32))
    poll_key = hmac.digest(secret, b"poll:final", "sha256")
    expected = hmac.digest(poll_key, (77).to_bytes(8, "big"), "sha256")[:16]
    assert voter_hash(secret, "final", 77) == expected
    assert voter_hash(secret, "semi", 77) != expected
    assert voter_hash(bytes(32), "final", 77) != expected
    hasher = VoterHasher(secret, polls_max=2)
    rng = random.Random(SEED)
    for _ in range(500):
        poll = rng.choice(["final", "semi", "quarter", "ünïcode"])
        voter = rng.randrange(2**32)
        assert hasher(poll, voter) == voter_hash(secret, poll, voter)
    assert len(hasher._polls) <= 2


def test_batch_node_and_commit_message_layouts() -> None:
    root = bytes(range(32))
    assert batch_node(1, 2, 3, root) == hashlib.sha256(
        b"\x02" + (1).to_bytes(4, "big") + (2).to_bytes(8, "big") + (3).to_bytes(4, "big")
        + root).digest()
    assert commit_message(3, 4, root) == (b"votes/receipt-commit/v1\x00" + (3).to_bytes(8, "big")
                                          + (4).to_bytes(4, "big") + root)
    for bad in [(-1, 2, 3, root), (1, 2**64, 3, root), (1, 2, 3, root[:31])]:
        with pytest.raises(ValueError):
            batch_node(*bad)
    for bad in [(-1, 4, root), (3, 2**32, root), (3, 4, root[:31])]:
        with pytest.raises(ValueError):
            commit_message(*bad)


def test_every_receipt_of_a_commit_verifies(keyring: KeyRing, commit: list[SignedBatch]) -> None:
    """One signature covers every group batch of the cycle; each receipt checks out alone,
    and names the shard of its own vote."""
    assert len({signed.signature for signed in commit}) == 1
    assert len({signed.root for signed in commit}) == 1
    for position, (signed, (group, seq, parts)) in enumerate(zip(commit, COMMIT_BATCHES)):
        count = sum(count for _, count in parts)
        receipts = signed.receipts(offset=4096 + position)
        assert [r.index for r in receipts] == list(range(count))
        assert receipts == [signed.receipt(index, 4096 + position) for index in range(count)]
        assert [r.shard for r in receipts] == batch_shards(parts)
        for r in receipts:
            assert (r.group, r.batch_seq, r.leaf_count) == (group, seq, count)
            assert (r.batch_position, r.batch_count) == (position, len(COMMIT_BATCHES))
            assert r.key_id == keyring.receipt_key_id and r.time_ms == TIME_MS
            assert verify_receipt(r, keyring.receipt_public_key_bytes)
    signature = commit[0].signature
    assert len(signature) == 64
    keyring.receipt_signing_key.public_key().verify(
        signature, commit_message(TIME_MS, len(COMMIT_BATCHES), commit[0].root))


def test_a_commit_of_one_batch_verifies(keyring: KeyRing) -> None:
    (signed,) = sign_commit(keyring, VoterHasher(keyring.voter_hash_secret), TIME_MS,
                            [(0, 1, vote_runs(4, commit_votes(4, 3)))])
    for r in signed.receipts(offset=0):
        assert r.batch_count == 1 and r.batch_path == []
        assert verify_receipt(r, keyring.receipt_public_key_bytes)


def test_receipt_does_not_verify_under_another_key(receipt: Receipt, tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    other = load_keys(tmp_path)
    assert not verify_receipt(receipt, other.receipt_public_key_bytes)
    assert not verify_receipt(receipt, b"short key")


TAMPERINGS = {
    "poll": lambda r: "poll-other",
    "batch_position": lambda r: r.batch_position + 1,
    "batch_count": lambda r: r.batch_count + 1,
    "batch_path": lambda r: [bytes(32)] + r.batch_path[1:],
    "shard": lambda r: r.shard + 1,
    "group": lambda r: r.group + 1,
    "batch_seq": lambda r: r.batch_seq + 1,
    "index": lambda r: r.index + 1,
    "leaf_count": lambda r: r.leaf_count + 1,
    "voter_hash": lambda r: bytes(16),
    "option": lambda r: "option-other",
    "time_ms": lambda r: r.time_ms + 1,
    "root": lambda r: bytes(32),
    "path": lambda r: [bytes(32)] + r.path[1:],
    "signature": lambda r: r.signature[:-1] + bytes([r.signature[-1] ^ 1]),
}


@pytest.mark.parametrize("field", sorted(TAMPERINGS))
def test_tampering_any_signed_field_fails(keyring: KeyRing, receipt: Receipt, field: str) -> None:
    tampered = msgspec.structs.replace(receipt, **{field: TAMPERINGS[field](receipt)})
    assert tampered != receipt
    assert not verify_receipt(tampered, keyring.receipt_public_key_bytes)


@pytest.mark.parametrize("field", ["path", "batch_path"])
def test_every_path_element_is_bound(keyring: KeyRing, receipt: Receipt, field: str) -> None:
    assert len(receipt.path) == path_length(17, 40)
    assert len(receipt.batch_path) == path_length(1, len(COMMIT_BATCHES)) > 0
    for position in range(len(getattr(receipt, field))):
        path = list(getattr(receipt, field))
        path[position] = bytes(a ^ 0xFF for a in path[position])
        tampered = msgspec.structs.replace(receipt, **{field: path})
        assert not verify_receipt(tampered, keyring.receipt_public_key_bytes)


def test_offset_is_not_signed(keyring: KeyRing, receipt: Receipt) -> None:
    """Documented: the offset is a locator assigned after signing; (group, batch_seq) is the
    signed position, so a different offset still verifies."""
    moved = msgspec.structs.replace(receipt, offset=receipt.offset + 1)
    assert verify_receipt(moved, keyring.receipt_public_key_bytes)


def test_wrongly_typed_receipt_does_not_verify(keyring: KeyRing, receipt: Receipt) -> None:
    for field, value in [("poll", None), ("path", [1, 2]), ("signature", "x"), ("shard", -1),
                         ("voter_hash", None), ("leaf_count", "37")]:
        broken = msgspec.structs.replace(receipt, **{field: value})
        assert verify_receipt(broken, keyring.receipt_public_key_bytes) is False


def test_compact_roundtrip(keyring: KeyRing, commit: list[SignedBatch]) -> None:
    for r in [r for signed in commit for r in signed.receipts(offset=2**40)]:
        text = encode_receipt(r)
        assert text.startswith("r2.") and text.isascii() and "=" not in text
        decoded = decode_receipt(text)
        assert decoded == r
        assert decode_receipt(text.encode()) == r
        assert verify_receipt(decoded, keyring.receipt_public_key_bytes)


def test_json_roundtrip(keyring: KeyRing, receipt: Receipt) -> None:
    document = receipt_json(receipt)
    assert document["voter_hash"] == receipt.voter_hash.hex()
    assert document["path"] == [p.hex() for p in receipt.path]
    assert document["batch_path"] == [p.hex() for p in receipt.batch_path]
    assert msgspec.json.decode(msgspec.json.encode(document)) == document
    assert receipt_from_json(document) == receipt
    for broken in ({**document, "root": "zz"}, {**document, "extra": 1},
                   {k: v for k, v in document.items() if k != "poll"}, [], "text",
                   {**document, "index": 40}, {**document, "shard": "5"}):
        with pytest.raises(ReceiptInvalid):
            receipt_from_json(broken)


def test_decode_rejects_inconsistent_receipts(receipt: Receipt) -> None:
    for change in ({"index": receipt.leaf_count}, {"path": receipt.path[:-1]},
                   {"path": receipt.path + [bytes(32)]}, {"path": [b"short"] * len(receipt.path)},
                   {"voter_hash": bytes(15)}, {"signature": bytes(63)}, {"key_id": "a.b"},
                   {"key_id": "ab\n"}, {"leaf_count": 0},
                   {"batch_position": receipt.batch_count}, {"batch_count": 0},
                   {"batch_path": receipt.batch_path + [bytes(32)]}):
        text = encode_receipt(msgspec.structs.replace(receipt, **change))
        with pytest.raises(ReceiptInvalid) as raised:
            decode_receipt(text)
        assert problem_of(raised.value)[:2] == (400, "receipt-invalid")


def test_decode_rejects_non_canonical_text(receipt: Receipt) -> None:
    text = encode_receipt(receipt)
    # "r1.": a receipt of the release before group batches, refused by its prefix.
    for bad in (text + "=", text.replace("r2.", "r1.", 1), text.replace("r2.", "r3.", 1),
                text[:-1] + "!", text + "A",
                "r2." + text[3:].replace("-", "+").replace("_", "/"), text[:-5], "",
                "r2.", "é" + text):
        if bad == text:
            continue
        with pytest.raises(ReceiptInvalid):
            decode_receipt(bad)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text(max_size=300), st.binary(max_size=300),
                       st.binary(max_size=600).map(
                           lambda raw: "r2." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()),
                       st.integers(), st.none()))
def test_decode_raises_only_receipt_invalid_on_garbage(value: object) -> None:
    try:
        decoded = decode_receipt(value)  # type: ignore[arg-type]
    except ReceiptInvalid as error:
        assert isinstance(error, VotesError)
        return
    assert isinstance(decoded, Receipt)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_decode_survives_mutations_of_a_real_receipt(receipt: Receipt, data: st.DataObject) -> None:
    text = encode_receipt(receipt)
    position = data.draw(st.integers(0, len(text) - 1))
    replacement = data.draw(st.text(alphabet="ABCDwxyz0189-_+/=.", min_size=0, max_size=3))
    mutated = text[:position] + replacement + text[position + 1:]
    try:
        decoded = decode_receipt(mutated)
    except ReceiptInvalid:
        return
    # Whatever still decodes is a well-formed receipt; verification decides, without raising.
    assert isinstance(verify_receipt(decoded, bytes(32)), bool)


def test_restored_batch_gives_the_same_receipts(keyring: KeyRing,
                                               commit: list[SignedBatch]) -> None:
    """A batch rebuilt from what the log stores (votes, batch nodes, position, key id,
    signature) cuts the same receipts as the original; a rebuild that disagrees with the
    stored batch node fails."""
    hasher = VoterHasher(keyring.voter_hash_secret)
    nodes = [signed.node for signed in commit]
    for position, (group, seq, parts) in enumerate(COMMIT_BATCHES):
        original = commit[position]
        restored = SignedBatch.restore(hasher, group=group, batch_seq=seq, time_ms=TIME_MS,
                                       runs=batch_runs(parts), batch_position=position,
                                       batch_nodes=nodes,
                                       key_id=original.key_id, signature=original.signature)
        assert restored.receipts(offset=9) == original.receipts(offset=9)
    group, seq, parts = COMMIT_BATCHES[1]
    votes = commit_votes(9, 17)  # the batch's second shard: leaves 20..36
    poll, voter, _ = votes[1]
    assert commit[1].index_of(9, poll, hasher(poll, voter)) == 21
    assert commit[1].index_of(5, poll, hasher(poll, voter)) is None  # another shard's voter
    assert commit[1].index_of(9, "poll-9", hasher(poll, voter)) is None
    runs = batch_runs(parts)
    moved = [runs[0]._replace(shard=1), *runs[1:]]  # one run claimed by another shard
    for bad_runs, bad_group, bad_position in ((runs[::-1], group, 1), (runs, group, 2),
                                              (runs, group, 7), (runs, 3, 1), (moved, group, 1)):
        with pytest.raises(VotesError):
            SignedBatch.restore(hasher, group=bad_group, batch_seq=seq, time_ms=TIME_MS,
                                runs=bad_runs, batch_position=bad_position,
                                batch_nodes=nodes,
                                key_id=commit[1].key_id, signature=commit[1].signature)
