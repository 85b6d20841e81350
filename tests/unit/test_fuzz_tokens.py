"""Fuzzing of the token parser: valid voter and admin tokens mutated (bytes flipped, cut,
inserted, parts swapped, scheme and whitespace changed), fed to verify_voter_token and
verify_admin_token, and to both fast-path twins of token_payload
(engine/_fastpath_crypto.pxi and engine/fastpath_py.py).

Proves: verification raises only TokenError subclasses; a mutated token verifies only if
its signed part is unchanged (the claims are the original's); and the compiled and Python
token_payload give the same answer (bytes or the same status code) for every input, never
an exception. tests/unit/test_tokens.py covers garbage and signed garbage claims.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import fastpath_py
from engine.keys import KeyRing
from engine.tokens import (
    TokenError,
    _codec,
    issue_admin_token,
    issue_voter_token,
    verify_admin_token,
    verify_voter_token,
)

if os.environ.get("VOTES_REQUIRE_CYTHON") == "1":
    from engine import _fastpath as compiled  # an ImportError here fails the run
else:
    compiled = pytest.importorskip("engine._fastpath", reason="the Cython extension is not built")

NOW_S = 1_700_000_000
EXAMPLES = 400


def mutations(token: str) -> st.SearchStrategy[bytes]:
    raw = token.encode("ascii")

    def flip(position: int, value: int) -> bytes:
        index = position % len(raw)
        return raw[:index] + bytes([value]) + raw[index + 1:]

    def cut(start: int, end: int) -> bytes:
        return raw[:start % len(raw)] + raw[end % (len(raw) + 1):]

    def insert(position: int, data: bytes) -> bytes:
        index = position % (len(raw) + 1)
        return raw[:index] + data + raw[index:]

    def swap_parts(first: int, second: int) -> bytes:
        parts = raw.split(b".")
        parts[first % len(parts)], parts[second % len(parts)] = \
            parts[second % len(parts)], parts[first % len(parts)]
        return b".".join(parts)

    positions = st.integers(0, 4096)
    mutated = st.one_of(
        st.builds(flip, positions, st.integers(0, 255)),
        st.builds(cut, positions, positions),
        st.builds(insert, positions, st.binary(min_size=1, max_size=16)),
        st.builds(insert, positions, st.sampled_from([b".", b"..", b"=", b" ", b"\x00"])),
        st.builds(swap_parts, st.integers(0, 3), st.integers(0, 3)),
    )
    schemes = st.sampled_from([b"", b"Bearer ", b"bearer ", b"BEARER  ", b"Basic ", b" Bearer\t"])
    return st.builds(lambda scheme, body, tail: scheme + body + tail, schemes, mutated,
                     st.sampled_from([b"", b" ", b"\r\n", b"\t"]))


def as_given(value: bytes, as_text: bool) -> bytes | str:
    return value.decode("latin-1") if as_text else value


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data(), as_text=st.booleans())
def test_mutated_voter_tokens_raise_only_token_errors(keyring: KeyRing, data, as_text) -> None:
    token = issue_voter_token(keyring, 7, ttl_s=3600, poll="p", now_s=NOW_S)
    value = as_given(data.draw(mutations(token)), as_text)
    try:
        claims = verify_voter_token(keyring, value, NOW_S, "p")
    except TokenError:
        return
    # Accepted: only when what is signed is intact (a change of scheme or outer whitespace).
    assert (claims.voter, claims.poll) == (7, "p")


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data(), as_text=st.booleans())
def test_mutated_admin_tokens_raise_only_token_errors(keyring: KeyRing, data, as_text) -> None:
    token = issue_admin_token(keyring, ttl_s=3600, sub="fuzz", now_s=NOW_S)
    value = as_given(data.draw(mutations(token)), as_text)
    try:
        claims = verify_admin_token(keyring, value, NOW_S)
    except TokenError:
        return
    assert claims.sub == "fuzz"


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data(), admin=st.booleans(), as_text=st.booleans())
def test_both_token_payload_twins_agree_on_every_input(keyring: KeyRing, data, admin,
                                                       as_text) -> None:
    codec = _codec(keyring)
    macs = codec.admin if admin else codec.voter
    token = (issue_admin_token(keyring, ttl_s=60, now_s=NOW_S) if admin
             else issue_voter_token(keyring, 3, ttl_s=60, now_s=NOW_S))
    value = as_given(data.draw(st.one_of(mutations(token), st.binary(max_size=1100))), as_text)
    python_answer = fastpath_py.token_payload(
        {key_id: fastpath_py.HmacSha256(*_key_of(keyring, key_id, admin))
         for key_id in macs.by_key_id}, value)
    compiled_answer = compiled.token_payload(macs.by_key_id, value)
    assert type(python_answer) is type(compiled_answer) and python_answer == compiled_answer


def _key_of(keyring: KeyRing, key_id: bytes, admin: bool) -> tuple[bytes, bytes]:
    """The twin's HmacSha256 arguments for `key_id`: the key and the signed prefix."""
    keys = keyring.admin_keys if admin else keyring.voter_keys
    return keys[key_id.decode()], b"v1." + key_id + b"."
