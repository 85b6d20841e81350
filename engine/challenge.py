"""Proof-of-work challenges: stateless, signed, bound to one voter and one poll.

Wire format (ASCII): `c1.<key_id>.<payload>.<signature>`, where `payload` is unpadded
base64url of the msgpack array (poll, voter, difficulty_bits, expires_s, nonce) and
`signature` is unpadded base64url of HMAC-SHA256(challenge key, everything before the last
dot). The challenge key of each voter-token key id is HMAC-SHA256(that voter key,
CHALLENGE_KEY_LABEL): every host that verifies the voter's tokens verifies its challenges,
and a rotation of the voter keys rotates the challenge keys with them.

A solution is decimal digits (at most SOLUTION_CHARS_MAX) such that
SHA-256(challenge + "." + solution) starts with at least `difficulty_bits` zero bits. It is
sent with the vote in the X-Vote-Challenge and X-Vote-Solution headers.

Invariants a caller can rely on:
- `verify` raises only ChallengeRequired (428: expired, or easier than asked for now; it
  carries nothing) or ChallengeFailed (403: anything forged, malformed, bound to another
  voter or poll, or wrongly solved), whatever bytes it is given, and it checks the
  signature before it decodes anything the challenge says.
- A solved challenge counts for one vote: it names its voter and poll, and the shard takes
  one vote per voter and poll, so a second use is a duplicate (409) on every worker and
  host without shared state. No seen-set is kept (docs/security.md "Accepted once").
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import weakref
from collections.abc import Callable
from typing import Annotated

import msgspec

from engine.errors import VotesError
from engine.keys import KeyRing

CHALLENGE_VERSION = b"c1"
ALGORITHM = "sha256"
CHALLENGE_KEY_LABEL = b"votes proof-of-work challenge key v1"
CHALLENGE_HEADER = "x-vote-challenge"
SOLUTION_HEADER = "x-vote-solution"
# A real challenge is about 110 bytes; anything much longer is not one of ours.
CHALLENGE_BYTES_MAX = 512
SOLUTION_CHARS_MAX = 20
NONCE_BYTES = 12
DIFFICULTY_BITS_MAX = 32
POLL_ID_CHARS_MAX = 128


class ChallengeRequired(VotesError):
    """A proof-of-work solution is required."""


class ChallengeFailed(VotesError):
    """The proof-of-work solution is not valid."""


class ChallengeClaims(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True,
                      gc=False):
    poll: Annotated[str, msgspec.Meta(max_length=POLL_ID_CHARS_MAX)]
    voter: Annotated[int, msgspec.Meta(ge=0)]
    difficulty_bits: Annotated[int, msgspec.Meta(ge=0, le=DIFFICULTY_BITS_MAX)]
    expires_s: Annotated[int, msgspec.Meta(ge=0)]
    nonce: bytes


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ChallengeClaims)
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def _b64url_encode(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=")


def _b64url_decode(text: bytes) -> bytes:
    return binascii.a2b_base64(text.translate(_FROM_URLSAFE) + b"=" * (-len(text) % 4),
                               strict_mode=True)


def leading_zero_bits(digest: bytes) -> int:
    """How many zero bits the digest starts with (at most 64 looked at)."""
    head = int.from_bytes(digest[:8], "big")
    return 64 - head.bit_length()


def solution_digest(challenge: bytes, solution: bytes) -> bytes:
    return hashlib.sha256(challenge + b"." + solution).digest()


def solve(challenge: str, difficulty_bits: int, solution_first: int = 0) -> str:
    """The first solution from `solution_first` on: about 2**difficulty_bits hashes.

    The Python solver of the tests and bots (perf/bench_challenge.py measures its rate):
    the prefix's SHA-256 state is copied per try, so a try hashes only the digits."""
    if not 0 <= difficulty_bits <= DIFFICULTY_BITS_MAX:
        raise ValueError(f"difficulty_bits must be in 0..{DIFFICULTY_BITS_MAX}")
    prefix = hashlib.sha256(challenge.encode("ascii") + b".")
    shift = 256 - difficulty_bits
    candidate = solution_first
    while True:
        attempt = prefix.copy()
        digits = b"%d" % candidate
        attempt.update(digits)
        if int.from_bytes(attempt.digest(), "big") >> shift == 0:
            return digits.decode("ascii")
        candidate += 1


class _Keys:
    __slots__ = ("by_key_id", "current", "__weakref__")

    def __init__(self, keyring: KeyRing) -> None:
        self.by_key_id = {
            key_id.encode("ascii"): hmac.digest(key, CHALLENGE_KEY_LABEL, "sha256")
            for key_id, key in keyring.voter_keys.items()}
        self.current = keyring.voter_key_current.encode("ascii")


_keys_of: weakref.WeakKeyDictionary[KeyRing, _Keys] = weakref.WeakKeyDictionary()


def _keys(keyring: KeyRing) -> _Keys:
    keys = _keys_of.get(keyring)
    if keys is None:
        keys = _keys_of[keyring] = _Keys(keyring)
    return keys


def issue(keyring: KeyRing, poll: str, voter: int, difficulty_bits: int, now_s: int,
          ttl_s: int, nonce_source: Callable[[int], bytes] = os.urandom) -> str:
    """A signed challenge for `voter` in `poll`, valid for ttl_s seconds from now_s."""
    keys = _keys(keyring)
    claims = (poll, voter, difficulty_bits, now_s + ttl_s, nonce_source(NONCE_BYTES))
    signed = (CHALLENGE_VERSION + b"." + keys.current + b"."
              + _b64url_encode(_encoder.encode(claims)))
    signature = hmac.digest(keys.by_key_id[keys.current], signed, "sha256")
    return (signed + b"." + _b64url_encode(signature)).decode("ascii")


def _text(value: object, limit: int) -> bytes | None:
    if isinstance(value, str):
        if len(value) > limit or not value.isascii():
            return None
        return value.encode("ascii")
    if isinstance(value, bytes) and len(value) <= limit and value.isascii():
        return value
    return None


def _verified_claims(keyring: KeyRing, challenge: bytes) -> ChallengeClaims:
    signed, dot, signature_text = challenge.rpartition(b".")
    version, _, rest = signed.partition(b".")
    key_id, _, payload = rest.partition(b".")
    key = _keys(keyring).by_key_id.get(key_id)
    if not dot or version != CHALLENGE_VERSION or key is None:
        raise ChallengeFailed("the challenge is not one of ours")
    try:
        signature = _b64url_decode(signature_text)
        if not hmac.compare_digest(signature, hmac.digest(key, signed, "sha256")):
            raise ChallengeFailed("the challenge's signature does not match")
        return _decoder.decode(_b64url_decode(payload))
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise ChallengeFailed("the challenge is malformed") from None


def verify(keyring: KeyRing, challenge_value: object, solution_value: object, poll: str,
           voter: int, now_s: int, difficulty_bits_min: int) -> int:
    """The difficulty of a valid solution of a challenge of ours for (poll, voter), at least
    `difficulty_bits_min` and unexpired; else ChallengeRequired or ChallengeFailed."""
    challenge = _text(challenge_value, CHALLENGE_BYTES_MAX)
    solution = _text(solution_value, SOLUTION_CHARS_MAX)
    if challenge_value is None and solution_value is None:
        raise ChallengeRequired("solve the challenge and send the solution with the vote")
    if challenge is None or solution is None or not solution.isdigit():
        raise ChallengeFailed("the challenge or its solution is malformed")
    claims = _verified_claims(keyring, challenge)
    if claims.poll != poll or claims.voter != voter:
        raise ChallengeFailed("the challenge was issued for another vote")
    if now_s >= claims.expires_s:
        raise ChallengeRequired("the challenge has expired; solve the new one")
    if claims.difficulty_bits < difficulty_bits_min:
        raise ChallengeRequired("the challenge is easier than the one asked for now")
    if leading_zero_bits(solution_digest(challenge, solution)) < claims.difficulty_bits:
        raise ChallengeFailed("the solution does not solve the challenge")
    return claims.difficulty_bits


def expires_s_of(challenge: str) -> int:
    """The expiry of a challenge we issued (for its JSON form); no signature check."""
    payload = challenge.encode("ascii").split(b".")[2]
    return _decoder.decode(_b64url_decode(payload)).expires_s
