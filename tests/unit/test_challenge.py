"""Proof-of-work challenges (engine/challenge.py): a solved challenge verifies for its own
voter and poll only, before its expiry, at no less than the difficulty asked for now; a
forged, tampered, malformed or wrongly solved one is refused with ChallengeFailed and a
missing or stale one with ChallengeRequired, whatever bytes arrive; `solve` finds what
`verify` takes.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import challenge
from engine.challenge import ChallengeFailed, ChallengeRequired, issue, solve, verify
from engine.keys import KeyRing, ensure_keys, load_keys
from engine.problems import problem_of

NOW_S = 1_700_000_000
TTL_S = 120
BITS = 10


@pytest.fixture(scope="module")
def other_keyring(tmp_path_factory: pytest.TempPathFactory) -> KeyRing:
    data_dir = tmp_path_factory.mktemp("other-keys")
    ensure_keys(data_dir)
    return load_keys(data_dir)


@pytest.fixture(scope="module")
def solved(keyring: KeyRing) -> tuple[str, str]:
    text = issue(keyring, "p1", 42, BITS, NOW_S, TTL_S)
    return text, solve(text, BITS)


def test_a_solution_verifies_for_its_voter_and_poll(keyring, solved) -> None:
    text, solution = solved
    assert verify(keyring, text, solution, "p1", 42, NOW_S, BITS) == BITS
    # Headers arrive as str or bytes; both are taken.
    assert verify(keyring, text.encode(), solution.encode(), "p1", 42, NOW_S + 1, 0) == BITS
    digest = hashlib.sha256(f"{text}.{solution}".encode()).digest()
    assert int.from_bytes(digest, "big") >> (256 - BITS) == 0


def test_a_solution_is_bound_to_its_voter_and_poll(keyring, solved) -> None:
    text, solution = solved
    with pytest.raises(ChallengeFailed):
        verify(keyring, text, solution, "p1", 43, NOW_S, BITS)  # another voter
    with pytest.raises(ChallengeFailed):
        verify(keyring, text, solution, "p2", 42, NOW_S, BITS)  # another poll


def test_an_expired_or_too_easy_challenge_asks_for_a_new_one(keyring, solved) -> None:
    text, solution = solved
    with pytest.raises(ChallengeRequired):
        verify(keyring, text, solution, "p1", 42, NOW_S + TTL_S, BITS)
    with pytest.raises(ChallengeRequired):
        verify(keyring, text, solution, "p1", 42, NOW_S, BITS + 1)
    with pytest.raises(ChallengeRequired):
        verify(keyring, None, None, "p1", 42, NOW_S, BITS)


def test_a_wrong_solution_fails(keyring, solved) -> None:
    text, solution = solved
    wrong = next(str(n) for n in range(1000)
                 if challenge.leading_zero_bits(challenge.solution_digest(
                     text.encode(), str(n).encode())) < BITS)
    with pytest.raises(ChallengeFailed):
        verify(keyring, text, wrong, "p1", 42, NOW_S, BITS)
    for malformed in ("", "12a", "-1", "1" * 21, None):
        with pytest.raises(ChallengeFailed):
            verify(keyring, text, malformed, "p1", 42, NOW_S, BITS)
    with pytest.raises(ChallengeFailed):
        verify(keyring, None, solution, "p1", 42, NOW_S, BITS)


def test_forged_and_tampered_challenges_fail(keyring, other_keyring) -> None:
    forged = issue(other_keyring, "p1", 42, 0, NOW_S, TTL_S)
    with pytest.raises(ChallengeFailed):
        verify(keyring, forged, "0", "p1", 42, NOW_S, 0)
    text = issue(keyring, "p1", 42, 0, NOW_S, TTL_S)
    version, key_id, payload, signature = text.split(".")
    # An easier difficulty or a later expiry cannot be written into a signed challenge.
    tampered = issue(keyring, "p1", 42, 0, NOW_S + 10_000, TTL_S).split(".")[2]
    for changed in (f"{version}.{key_id}.{tampered}.{signature}",
                    f"c2.{key_id}.{payload}.{signature}",
                    f"{version}.other.{payload}.{signature}",
                    f"{version}.{key_id}.{payload}.{signature[:-2]}",
                    f"{version}.{key_id}.{payload}"):
        with pytest.raises(ChallengeFailed):
            verify(keyring, changed, "0", "p1", 42, NOW_S, 0)


def test_a_challenge_of_a_rotated_out_key_still_verifies(keyring) -> None:
    text = issue(keyring, "p1", 7, 0, NOW_S, TTL_S)
    rotated = replace(keyring, voter_key_current="next",
                      voter_keys={**keyring.voter_keys, "next": b"k" * 32})
    assert verify(rotated, text, "0", "p1", 7, NOW_S, 0) == 0
    assert issue(rotated, "p1", 7, 0, NOW_S, TTL_S).split(".")[1] == "next"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=600), st.binary(max_size=600)),
       st.one_of(st.none(), st.text(max_size=30), st.binary(max_size=30)))
def test_any_input_is_refused_with_a_challenge_error_only(keyring, challenge_value,
                                                          solution_value) -> None:
    try:
        verify(keyring, challenge_value, solution_value, "p1", 42, NOW_S, 1)
    except (ChallengeRequired, ChallengeFailed) as exc:
        assert problem_of(exc).status in (403, 428)


def test_solve_bounds() -> None:
    with pytest.raises(ValueError):
        solve("x", 33)
    assert solve("x", 0) == "0"
