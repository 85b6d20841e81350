"""Proves that the compiled receipt loops (engine/_fastpath_crypto.pxi) and their pure-Python
twins (engine/fastpath_py.py) agree with each other and with the reference definitions in
engine/receipts.py: HMAC-SHA256 equals hmac.new for keys shorter than, equal to and longer
than a block; a batch tree has the reference voter hashes, leaves, root and paths; every 201
body is byte for byte the JSON of receipt_document(receipt) and its compact receipt verifies
offline, also for fields at their widest (64-bit offsets, path arrays past 15 entries, unicode
and quotes in poll and option ids); and malformed inputs raise the same errors in both."""

from __future__ import annotations

import array
import base64
import hashlib
import hmac
import json
import os

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import fastpath, fastpath_py, signing
from engine.fastpath_py import MerkleTree
from engine.keys import KeyRing
from engine.receipts import (
    decode_receipt,
    leaf_hash,
    verify_receipt,
    voter_hash,
)

if os.environ.get("VOTES_REQUIRE_CYTHON") == "1":
    from engine import _fastpath as compiled  # an ImportError here fails the run
else:
    compiled = pytest.importorskip("engine._fastpath", reason="the Cython extension is not built")

IMPLEMENTATIONS = {"cython": compiled, "python": fastpath_py}
TIME_MS = 1_700_000_000_123


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def implementation(request, monkeypatch):
    """Run engine.signing on one implementation's batch_tree (the facade picks the compiled
    one whenever it is built)."""
    module = IMPLEMENTATIONS[request.param]
    monkeypatch.setattr(fastpath, "batch_tree", module.batch_tree)
    monkeypatch.setattr(fastpath, "HmacSha256", module.HmacSha256)
    return module


@given(key=st.binary(max_size=200), prefix=st.binary(max_size=80), message=st.binary(max_size=300))
def test_hmac_is_hmac_sha256_in_both(key: bytes, prefix: bytes, message: bytes) -> None:
    expected = hmac.new(key, prefix + message, hashlib.sha256).digest()
    for module in IMPLEMENTATIONS.values():
        mac = module.HmacSha256(key, prefix)
        assert mac.digest(message) == expected
        assert mac.verify(message, expected)
        assert not mac.verify(message, expected[:-1] + bytes([expected[-1] ^ 1]))
        assert not mac.verify(message, expected[:31])


ids = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12)


@st.composite
def commit_votes(draw: st.DrawFn) -> list[tuple[str, int, str]]:
    polls = draw(st.lists(ids, min_size=1, max_size=3, unique=True))
    options = draw(st.lists(ids | st.just('a "quoted" \\ option'), min_size=1, max_size=5,
                            unique=True))
    return draw(st.lists(st.tuples(st.sampled_from(polls), st.integers(0, 2**64 - 1),
                                   st.sampled_from(options)), min_size=1, max_size=70))


@settings(max_examples=60, deadline=None)
@given(votes=commit_votes(), shard=st.integers(0, 2**32 - 2), split=st.integers(0, 70),
       offset=st.sampled_from([0, 127, 128, 65_536, 2**32, 2**63 - 1]),
       batch_seq=st.sampled_from([0, 255, 2**40]))
def test_batches_and_bodies_match_the_reference(keyring: KeyRing, votes, shard: int,
                                                split: int, offset: int, batch_seq: int) -> None:
    """A group batch holds two shards' runs (the votes before `split` of `shard`, the rest
    of the next shard): each leaf and body names its own shard."""
    split = min(split, len(votes))
    shard_of = [shard] * split + [shard + 1] * (len(votes) - split)
    runs = signing.vote_runs(shard, votes[:split]) + signing.vote_runs(shard + 1, votes[split:])
    signed_by = {}
    for name, module in IMPLEMENTATIONS.items():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fastpath, "batch_tree", module.batch_tree)
            patch.setattr(fastpath, "HmacSha256", module.HmacSha256)
            hasher = signing.VoterHasher(keyring.voter_hash_secret)
            (signed, _) = signing.sign_commit(keyring, hasher, TIME_MS,
                                              [(shard % 4, batch_seq, runs), (shard % 4 ^ 1, 7, runs)])
        signed_by[name] = signed
        tree = signed.tree
        hashes = [voter_hash(keyring.voter_hash_secret, poll, voter) for poll, voter, _ in votes]
        leaves = [leaf_hash(poll, shard_of[i], hashes[i], option)
                  for i, (poll, _, option) in enumerate(votes)]
        reference = MerkleTree(leaves)
        assert tree.root == reference.root
        assert [tree.voter_hash(i) for i in range(len(votes))] == hashes
        assert [tree.leaf(i) for i in range(len(votes))] == leaves
        assert [tree.path(i) for i in range(len(votes))] == reference.paths()
        bodies = signed.receipt_bodies(offset)
        assert bodies == [msgspec.json.encode(signing.receipt_document(receipt))
                          for receipt in signed.receipts(offset)]
        document = json.loads(bodies[-1])
        assert verify_receipt(decode_receipt(document["receipt"]),
                              keyring.receipt_public_key_bytes)
    assert signed_by["cython"].receipt_bodies(offset) == signed_by["python"].receipt_bodies(offset)


def test_paths_longer_than_a_fixarray(keyring: KeyRing, implementation) -> None:
    """2**15 + 1 leaves give leaf 0 a 16-entry path: a msgpack array16, not a fixarray."""
    count = 2**15 + 1
    runs = [signing.VoteRun(3, "p", ["a", "b"], array.array("Q", range(count)).tobytes(),
                            array.array("H", [i % 2 for i in range(count)]).tobytes())]
    (signed,) = signing.sign_commit(keyring, signing.VoterHasher(keyring.voter_hash_secret),
                                    TIME_MS, [(3, 9, runs)])
    assert len(signed.tree.path(0)) == 16 and len(signed.tree.path(count - 1)) == 1
    bodies = signed.receipt_bodies(2**40)
    for index in (0, count // 2, count - 1):
        receipt = signed.receipt(index, 2**40)
        assert bodies[index] == msgspec.json.encode(signing.receipt_document(receipt))
        assert verify_receipt(decode_receipt(json.loads(bodies[index])["receipt"]),
                              keyring.receipt_public_key_bytes)


def test_index_of_finds_a_voter_only_in_its_run(keyring: KeyRing, implementation) -> None:
    votes = [("p", 10, "a"), ("q", 11, "b"), ("p", 12, "b"), ("q", 10, "a")]
    hasher = signing.VoterHasher(keyring.voter_hash_secret)
    (signed,) = signing.sign_commit(keyring, hasher, TIME_MS,
                                    [(0, 1, signing.vote_runs(0, votes)
                                             + signing.vote_runs(4, [("p", 13, "a")]))])
    for index, (poll, voter, _) in enumerate(votes):
        assert signed.index_of(0, poll, hasher(poll, voter)) == index
    assert signed.index_of(4, "p", hasher("p", 13)) == len(votes)
    assert signed.index_of(0, "p", hasher("p", 13)) is None  # the voter of shard 4 only
    assert signed.index_of(0, "p", hasher("p", 11)) is None
    assert signed.index_of(0, "r", hasher("p", 10)) is None
    with pytest.raises(IndexError):
        signed.tree.index_of(0, len(votes) + 2, hasher("p", 10))


@pytest.mark.parametrize(
    ("voters", "option_indexes", "tails"),
    [
        (b"", b"", [b"\x00\x01a"]),
        (array.array("Q", [1, 2]).tobytes(), array.array("H", [0]).tobytes(), [b"\x00\x01a"]),
        (b"\x01" * 7, b"\x00\x00", [b"\x00\x01a"]),
        (array.array("Q", [1]).tobytes(), array.array("H", [1]).tobytes(), [b"\x00\x01a"]),
    ],
    ids=["no-leaves", "counts-differ", "voters-not-whole-uint64", "option-outside"],
)
def test_malformed_batches_raise_value_error_in_both(voters, option_indexes, tails) -> None:
    for module in IMPLEMENTATIONS.values():
        group = (module.HmacSha256(b"key"), b"head", tails, voters, option_indexes)
        with pytest.raises(ValueError):
            module.batch_tree(0, [group])


def test_malformed_body_groups_raise_value_error_in_both() -> None:
    for module in IMPLEMENTATIONS.values():
        voters = array.array("Q", [1, 2]).tobytes()
        tree = module.batch_tree(0, [(module.HmacSha256(b"k"), b"h", [b"t"], voters, b"\0\0\0\0")])
        segments = (b"", b"", b"", b"", b"", b"")
        for groups in ([(0, 1, b"\0\0", [b"o"], b"", b"")],  # covers 1 of 2 leaves
                       [(1, 2, b"\0\0\0\0", [b"o"], b"", b"")],  # past the last leaf
                       [(0, 2, b"\0\0", [b"o"], b"", b"")],  # one option index short
                       [(0, 2, b"\0\0\x01\0", [b"o"], b"", b"")]):  # option outside
            with pytest.raises(ValueError):
                tree.receipt_bodies(groups, *segments)
        with pytest.raises(IndexError):
            tree.path(2)


# --- bearer tokens ----------------------------------------------------------------------

TOKEN_KEYS = {b"k1": b"secret one", b"key-2": b"x" * 100}


def token_macs(module) -> dict:
    return {key_id: module.HmacSha256(key, b"v1." + key_id + b".")
            for key_id, key in TOKEN_KEYS.items()}


def signed_token(key_id: bytes, payload: bytes) -> bytes:
    """v1.<key_id>.<payload>.<signature>, signed by hmac.new: the reference."""
    def b64url(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")
    body = b"v1." + key_id + b"." + b64url(payload)
    return body + b"." + b64url(hmac.new(TOKEN_KEYS[key_id], body, hashlib.sha256).digest())


def both_token_payloads(authorization) -> object:
    results = {name: module.token_payload(token_macs(module), authorization)
               for name, module in IMPLEMENTATIONS.items()}
    assert results["cython"] == results["python"], (authorization, results)
    return results["python"]


@given(key_id=st.sampled_from(sorted(TOKEN_KEYS)), payload=st.binary(max_size=120),
       scheme=st.sampled_from(["Bearer ", "bearer  ", "BEARER \t", " Bearer ", ""]),
       as_text=st.booleans())
def test_valid_tokens_give_their_payload_in_both(key_id, payload, scheme, as_text) -> None:
    value = scheme.encode() + signed_token(key_id, payload) + b" \r\n"
    assert both_token_payloads(value.decode() if as_text else value) == payload


@given(key_id=st.sampled_from(sorted(TOKEN_KEYS)), payload=st.binary(max_size=60),
       position=st.integers(0, 200), byte=st.integers(0, 255), as_text=st.booleans())
def test_altered_tokens_fail_alike_in_both(key_id, payload, position, byte, as_text) -> None:
    """Any one byte changed, dropped or added: both give the same code (or, for a change that
    keeps the token valid such as the scheme's case, the same payload)."""
    token = bytearray(b"Bearer " + signed_token(key_id, payload))
    position %= len(token) + 1
    for altered in (token[:position] + bytes([byte]) + token[position + 1:],
                    token[:position] + token[position + 1:],
                    token[:position] + bytes([byte]) + token[position:]):
        value = bytes(altered)
        if as_text:
            value = value.decode("latin-1")
        both_token_payloads(value)


@given(value=st.one_of(st.binary(max_size=80), st.text(max_size=80)))
def test_arbitrary_authorization_values_give_the_same_answer(value) -> None:
    both_token_payloads(value)


def test_each_token_problem_has_its_code() -> None:
    token = signed_token(b"k1", b"claims")
    assert both_token_payloads(None) == fastpath_py.TOKEN_MISSING
    assert both_token_payloads("Bearer   ") == fastpath_py.TOKEN_MISSING
    assert both_token_payloads("Bearer") == fastpath_py.TOKEN_MISSING
    assert both_token_payloads("Bearer tökén") == fastpath_py.TOKEN_NOT_ASCII
    assert both_token_payloads(42) == fastpath_py.TOKEN_NOT_TEXT
    assert both_token_payloads(b"Bearer " + b"a" * 1020) == fastpath_py.TOKEN_TOO_LONG
    assert both_token_payloads(b"v2" + token[2:]) == fastpath_py.TOKEN_MALFORMED
    assert both_token_payloads(token + b".x") == fastpath_py.TOKEN_MALFORMED
    assert both_token_payloads(token.replace(b"k1", b"k9", 1)) == fastpath_py.TOKEN_KEY_UNKNOWN
    assert both_token_payloads(token[:-1] + b"A" if token[-1:] != b"A" else token[:-1] + b"B") \
        == fastpath_py.TOKEN_SIGNATURE_WRONG
    body = b"v1.k1.Y2xhaW1zx"  # 9 characters: one past a multiple of four
    signature = base64.urlsafe_b64encode(
        hmac.new(TOKEN_KEYS[b"k1"], body, hashlib.sha256).digest()).rstrip(b"=")
    assert both_token_payloads(body + b"." + signature) == \
        fastpath_py.TOKEN_PAYLOAD_NOT_BASE64URL
