"""Proves that voter and admin tokens round-trip, expire, fail on a wrong key or any tampering,
never verify as each other, honour poll binding (403), that bulk issue equals single issue,
and that verification raises only TokenError subclasses whatever it is fed."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import VotesError
from engine.keys import VOTER_TOKEN_FILE, KeyRing, ensure_keys, keys_dir, load_keys
from engine.problems import problem_of
from engine.tokens import (
    AdminClaims,
    TokenError,
    TokenExpired,
    TokenForbidden,
    TokenInvalid,
    TokenMissing,
    VoterClaims,
    issue_admin_token,
    issue_voter_token,
    issue_voter_tokens,
    verify_admin_token,
    verify_voter_token,
)

NOW_S = 1_700_000_000
TTL_S = 3600


@pytest.fixture(scope="module")
def other_keyring(tmp_path_factory: pytest.TempPathFactory) -> KeyRing:
    data_dir = tmp_path_factory.mktemp("other-keys")
    ensure_keys(data_dir)
    return load_keys(data_dir)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_payload(key_id: str, key: bytes, payload: bytes) -> str:
    """Build a token from raw claim bytes, independently of engine.tokens."""
    signed = f"v1.{key_id}.{b64url(payload)}"
    return f"{signed}.{b64url(hmac.digest(key, signed.encode(), hashlib.sha256))}"


def voter_signed(keyring: KeyRing, payload: bytes) -> str:
    current = keyring.voter_key_current
    return sign_payload(current, keyring.voter_keys[current], payload)


def test_voter_token_roundtrip(keyring: KeyRing) -> None:
    token = issue_voter_token(keyring, 42, region="eu-west", country="IE", ttl_s=TTL_S,
                              now_s=NOW_S)
    claims = verify_voter_token(keyring, token, NOW_S, "any-poll")
    assert claims == VoterClaims(typ="voter", voter=42, region="eu-west", country="IE",
                                 exp=NOW_S + TTL_S, poll=None)
    assert verify_voter_token(keyring, f"Bearer {token}", NOW_S, "p") == claims
    assert verify_voter_token(keyring, f"bearer   {token} ".encode(), NOW_S, "p") == claims
    assert token.isascii() and token.count(".") == 3 and "=" not in token


def test_voter_ids_at_the_edges(keyring: KeyRing) -> None:
    for voter in (0, 2**32 - 1):
        token = issue_voter_token(keyring, voter, ttl_s=TTL_S, now_s=NOW_S)
        assert verify_voter_token(keyring, token, NOW_S, "p").voter == voter
    for voter in (-1, 2**32):
        with pytest.raises(ValueError):
            issue_voter_token(keyring, voter, ttl_s=TTL_S, now_s=NOW_S)


def test_out_of_range_voter_in_signed_claims_is_invalid(keyring: KeyRing) -> None:
    payload = msgspec.msgpack.encode(["voter", 2**32, "local", "ZZ", NOW_S + TTL_S, None])
    with pytest.raises(TokenInvalid):
        verify_voter_token(keyring, voter_signed(keyring, payload), NOW_S, "p")


def test_expiry_is_exclusive(keyring: KeyRing) -> None:
    token = issue_voter_token(keyring, 7, ttl_s=10, now_s=NOW_S)
    assert verify_voter_token(keyring, token, NOW_S + 9, "p").voter == 7
    for now_s in (NOW_S + 10, NOW_S + 10_000):
        with pytest.raises(TokenExpired) as raised:
            verify_voter_token(keyring, token, now_s, "p")
        assert problem_of(raised.value)[:2] == (401, "token-expired")
    admin = issue_admin_token(keyring, ttl_s=10, now_s=NOW_S)
    assert verify_admin_token(keyring, admin, NOW_S + 9).sub == "admin"
    with pytest.raises(TokenExpired):
        verify_admin_token(keyring, admin, NOW_S + 10)


def test_missing_token(keyring: KeyRing) -> None:
    for value in (None, "", b"", "Bearer", "Bearer   ", "   "):
        with pytest.raises(TokenMissing) as raised:
            verify_voter_token(keyring, value, NOW_S, "p")
        assert problem_of(raised.value)[:2] == (401, "token-missing")
        with pytest.raises(TokenMissing):
            verify_admin_token(keyring, value, NOW_S)


def test_token_from_other_keys_is_invalid(keyring: KeyRing, other_keyring: KeyRing) -> None:
    token = issue_voter_token(other_keyring, 1, ttl_s=TTL_S, now_s=NOW_S)
    with pytest.raises(TokenInvalid) as raised:
        verify_voter_token(keyring, token, NOW_S, "p")
    assert problem_of(raised.value)[:2] == (401, "token-invalid")
    # The same key id with a different secret must fail on the signature, not pass.
    forged_ring = replace(other_keyring, voter_keys={
        keyring.voter_key_current: other_keyring.voter_keys[other_keyring.voter_key_current]},
        voter_key_current=keyring.voter_key_current)
    forged = issue_voter_token(forged_ring, 1, ttl_s=TTL_S, now_s=NOW_S)
    assert forged.split(".")[1] == keyring.voter_key_current
    with pytest.raises(TokenInvalid, match="signature"):
        verify_voter_token(keyring, forged, NOW_S, "p")


def test_any_single_character_change_is_invalid(keyring: KeyRing) -> None:
    token = issue_voter_token(keyring, 123456, ttl_s=TTL_S, poll="p", now_s=NOW_S)
    alphabet = "AQgw-_0."
    changed = 0
    for position in range(len(token)):
        for replacement in alphabet:
            if token[position] == replacement:
                continue
            tampered = token[:position] + replacement + token[position + 1:]
            with pytest.raises(TokenInvalid):
                verify_voter_token(keyring, tampered, NOW_S, "p")
            changed += 1
    assert changed > 7 * len(token)


def test_tampered_payload_with_valid_encoding_is_invalid(keyring: KeyRing) -> None:
    token = issue_voter_token(keyring, 5, ttl_s=TTL_S, now_s=NOW_S)
    version, key_id, _, signature = token.split(".")
    richer = msgspec.msgpack.encode(["voter", 6, "local", "ZZ", NOW_S + TTL_S, None])
    with pytest.raises(TokenInvalid, match="signature"):
        verify_voter_token(keyring, f"{version}.{key_id}.{b64url(richer)}.{signature}",
                           NOW_S, "p")
    with pytest.raises(TokenInvalid):
        verify_voter_token(keyring, f"{token}.extra", NOW_S, "p")
    with pytest.raises(TokenInvalid):
        verify_voter_token(keyring, "v2" + token[2:], NOW_S, "p")


def test_signed_but_malformed_claims_are_invalid(keyring: KeyRing) -> None:
    for payload in (b"", b"\xc1", msgspec.msgpack.encode({"typ": "voter"}),
                    msgspec.msgpack.encode(["voter", 1, "r", "c", NOW_S + 60, None, "extra"]),
                    msgspec.msgpack.encode(["voter", "1", "r", "c", NOW_S + 60, None]),
                    msgspec.msgpack.encode(["voter", 1, "r" * 500, "c", NOW_S + 60, None])):
        with pytest.raises(TokenInvalid):
            verify_voter_token(keyring, voter_signed(keyring, payload), NOW_S, "p")


def test_admin_token_roundtrip(keyring: KeyRing) -> None:
    token = issue_admin_token(keyring, ttl_s=TTL_S, sub="ops@example", now_s=NOW_S)
    assert verify_admin_token(keyring, f"Bearer {token}", NOW_S) == AdminClaims(
        typ="admin", sub="ops@example", exp=NOW_S + TTL_S)


def test_admin_and_voter_tokens_never_verify_as_each_other(keyring: KeyRing) -> None:
    admin = issue_admin_token(keyring, ttl_s=TTL_S, now_s=NOW_S)
    voter = issue_voter_token(keyring, 1, ttl_s=TTL_S, now_s=NOW_S)
    with pytest.raises(TokenInvalid):
        verify_voter_token(keyring, admin, NOW_S, "p")
    with pytest.raises(TokenInvalid):
        verify_admin_token(keyring, voter, NOW_S)
    # Even signed with the voter key, admin-typed claims are not a voter token.
    admin_claims = msgspec.msgpack.encode(["admin", 1, "local", "ZZ", NOW_S + TTL_S, None])
    with pytest.raises(TokenInvalid, match="not a voter token"):
        verify_voter_token(keyring, voter_signed(keyring, admin_claims), NOW_S, "p")


def test_poll_binding(keyring: KeyRing) -> None:
    token = issue_voter_token(keyring, 9, ttl_s=TTL_S, poll="final-2025", now_s=NOW_S)
    assert verify_voter_token(keyring, token, NOW_S, "final-2025").poll == "final-2025"
    with pytest.raises(TokenForbidden) as raised:
        verify_voter_token(keyring, token, NOW_S, "semi-2025")
    assert problem_of(raised.value)[:2] == (403, "token-forbidden")
    assert isinstance(raised.value, TokenError) and isinstance(raised.value, VotesError)
    unbound = issue_voter_token(keyring, 9, ttl_s=TTL_S, now_s=NOW_S)
    assert verify_voter_token(keyring, unbound, NOW_S, "semi-2025").poll is None


def test_bulk_issue_equals_single_issue(keyring: KeyRing) -> None:
    options = dict(region="us-east", country="US", ttl_s=TTL_S, poll="p1", now_s=NOW_S)
    bulk = list(issue_voter_tokens(keyring, 1000, 50, **options))
    single = [issue_voter_token(keyring, voter, **options) for voter in range(1000, 1050)]
    assert bulk == single
    assert [verify_voter_token(keyring, t, NOW_S, "p1").voter for t in bulk] == list(
        range(1000, 1050))
    assert list(issue_voter_tokens(keyring, 5, 0, ttl_s=TTL_S)) == []
    with pytest.raises(ValueError):
        issue_voter_tokens(keyring, 2**32 - 1, 2, ttl_s=TTL_S)


def test_rotated_out_key_still_verifies(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    old = load_keys(tmp_path)
    old_token = issue_voter_token(old, 3, ttl_s=TTL_S, now_s=NOW_S)
    path = keys_dir(tmp_path) / VOTER_TOKEN_FILE
    document = json.loads(path.read_text())
    document["keys"]["vnext"] = "22" * 32
    document["current"] = "vnext"
    path.write_text(json.dumps(document))
    rotated = load_keys(tmp_path)
    new_token = issue_voter_token(rotated, 4, ttl_s=TTL_S, now_s=NOW_S)
    assert new_token.split(".")[1] == "vnext"
    assert verify_voter_token(rotated, old_token, NOW_S, "p").voter == 3
    assert verify_voter_token(rotated, new_token, NOW_S, "p").voter == 4
    with pytest.raises(TokenInvalid):
        verify_voter_token(old, new_token, NOW_S, "p")


def test_issue_rejects_bad_arguments(keyring: KeyRing) -> None:
    with pytest.raises(ValueError):
        issue_voter_token(keyring, 1, ttl_s=0)
    with pytest.raises(ValueError):
        issue_voter_token(keyring, 1, ttl_s=10, region="r" * 100)
    with pytest.raises(ValueError):
        issue_admin_token(keyring, ttl_s=-5)


def _verify_both(keyring: KeyRing, value: object) -> None:
    for verify in (lambda: verify_voter_token(keyring, value, NOW_S, "p"),  # type: ignore[arg-type]
                   lambda: verify_admin_token(keyring, value, NOW_S)):  # type: ignore[arg-type]
        try:
            verify()
        except TokenError as error:
            assert problem_of(error).status in (401, 403)
            assert problem_of(error).slug in ("token-missing", "token-invalid", "token-expired",
                                     "token-forbidden")


def _token_like(keyring: KeyRing) -> st.SearchStrategy[str]:
    """Strings shaped like tokens: right version and key id, random other parts."""
    part = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/",
                   max_size=60)
    return st.builds(lambda payload, signature: f"v1.{keyring.voter_key_current}.{payload}."
                     f"{signature}", part, part)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.none(), st.binary(max_size=2048), st.text(max_size=2048),
                       st.integers(), st.lists(st.integers(), max_size=3)))
def test_verify_raises_only_token_errors_on_garbage(keyring: KeyRing, value: object) -> None:
    _verify_both(keyring, value)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_verify_raises_only_token_errors_on_token_like_garbage(keyring: KeyRing,
                                                               data: st.DataObject) -> None:
    _verify_both(keyring, data.draw(_token_like(keyring)))


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(
    st.binary(max_size=200),
    st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=40),
                       st.binary(max_size=10)), max_size=8).map(msgspec.msgpack.encode),
))
def test_verify_raises_only_token_errors_on_signed_garbage_claims(keyring: KeyRing,
                                                                  payload: bytes) -> None:
    """Garbage that passes the signature check still reaches the claims decoder safely."""
    token = voter_signed(keyring, payload)
    try:
        claims = verify_voter_token(keyring, token, NOW_S, "p")
    except TokenError:
        return
    assert claims.typ == "voter" and 0 <= claims.voter < 2**32 and claims.exp > NOW_S


def test_b64url_encode_is_unpadded_urlsafe_base64() -> None:
    from engine.tokens import b64url_encode

    for length in range(70):
        data = bytes((index * 37 + 251) % 256 for index in range(length))
        assert b64url_encode(data) == base64.urlsafe_b64encode(data).rstrip(b"=")


def test_signed_claims_with_invalid_utf8_are_an_invalid_token(keyring: KeyRing) -> None:
    """msgspec reports bad UTF-8 inside a string as UnicodeDecodeError, not DecodeError: a
    signed token whose claims hold one is still just an invalid token (hypothesis found it)."""
    payload = b"\x95\xa5vot\x80r*\xa0\xa0\xce\x00\x00\x00\x00"  # ["vot\x80r", 42, "", "", 0]
    with pytest.raises(TokenInvalid):
        verify_voter_token(keyring, voter_signed(keyring, payload), NOW_S, "p")
