"""Signed bearer tokens for voters and admins: HMAC-SHA256 with key ids, so keys can rotate.

Wire format (ASCII): `v1.<key_id>.<payload>.<signature>`, where `payload` is unpadded
base64url of the msgpack claims (an array, see VoterClaims / AdminClaims) and `signature` is
unpadded base64url of HMAC-SHA256(key, b"v1." + key_id + b"." + payload), i.e. of everything
before the last dot.

Invariants a caller can rely on:
- Verification raises only TokenError subclasses, whatever it is given (any bytes, any str,
  any object), and it checks the signature before it decodes anything the token says.
- Voter and admin tokens are signed with disjoint key sets and carry a `typ` claim, so
  neither kind ever verifies as the other.
- A token is valid while `now_s < exp`; at `exp` it has expired.
- A voter token bound to a poll (`poll` claim set) verifies only for that poll (else 403).
"""

from __future__ import annotations

import binascii
import re
import time
import weakref
from collections.abc import Iterator
from typing import Annotated

import msgspec

from engine import fastpath
from engine.errors import VotesError
from engine.fastpath import HmacSha256, token_payload
from engine.keys import KeyRing

TOKEN_VERSION = b"v1"
# The longest Authorization value looked at; a real token is about 100 bytes.
AUTHORIZATION_BYTES_MAX = 1024
VOTER_ID_END = 2**32
REGION_CHARS_MAX = 32
COUNTRY_CHARS_MAX = 8
# A country claim names per-country results (engine/crdt.py field names, which use "|"
# as their separator), so it is limited to the identifier characters.
COUNTRY_PATTERN = "^[A-Za-z0-9_-]*$"
POLL_ID_CHARS_MAX = 128
SUBJECT_CHARS_MAX = 128
VOTER_TYP = "voter"
ADMIN_TYP = "admin"


class TokenError(VotesError):
    """The token is not valid."""


class TokenMissing(TokenError):
    """A bearer token is required."""


class TokenInvalid(TokenError):
    """The token is not valid."""


class TokenExpired(TokenError):
    """The token has expired."""


class TokenForbidden(TokenError):
    """A valid token used outside its scope, e.g. bound to another poll."""


class VoterClaims(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True,
                  gc=False):
    typ: str
    voter: Annotated[int, msgspec.Meta(ge=0, lt=VOTER_ID_END)]
    region: Annotated[str, msgspec.Meta(max_length=REGION_CHARS_MAX)]
    country: Annotated[str, msgspec.Meta(max_length=COUNTRY_CHARS_MAX, pattern=COUNTRY_PATTERN)]
    exp: Annotated[int, msgspec.Meta(ge=0)]
    poll: Annotated[str, msgspec.Meta(max_length=POLL_ID_CHARS_MAX)] | None = None


class AdminClaims(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True,
                  gc=False):
    typ: str
    sub: Annotated[str, msgspec.Meta(max_length=SUBJECT_CHARS_MAX)]
    exp: Annotated[int, msgspec.Meta(ge=0)]


_claims_encoder = msgspec.msgpack.Encoder()
_voter_claims_decoder = msgspec.msgpack.Decoder(VoterClaims)
_admin_claims_decoder = msgspec.msgpack.Decoder(AdminClaims)

_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64url_encode(data: bytes) -> bytes:
    # binascii directly: base64.urlsafe_b64encode is two Python calls more per token.
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=")


class _MacSet:
    """HMAC-SHA256 per key id, each pre-fed with `v1.<key_id>.` (engine.fastpath.HmacSha256:
    a token costs two SHA-256 state copies; tests/unit/test_tokens.py checks it against
    hmac.new)."""

    __slots__ = ("by_key_id", "current")

    def __init__(self, keys: dict[str, bytes], current_key_id: str) -> None:
        self.by_key_id = {
            key_id.encode("ascii"): HmacSha256(key, _signed_prefix(key_id))
            for key_id, key in keys.items()
        }
        self.current = current_key_id.encode("ascii")


class _TokenCodec:
    __slots__ = ("voter", "admin", "__weakref__")

    def __init__(self, keyring: KeyRing) -> None:
        self.voter = _MacSet(keyring.voter_keys, keyring.voter_key_current)
        self.admin = _MacSet(keyring.admin_keys, keyring.admin_key_current)


_codecs: weakref.WeakKeyDictionary[KeyRing, _TokenCodec] = weakref.WeakKeyDictionary()


_last_codec: tuple[KeyRing, _TokenCodec] | None = None


def _codec(keyring: KeyRing) -> _TokenCodec:
    # A worker verifies every token with one keyring: check it by identity first
    # (WeakKeyDictionary.get is a Python-level call per token).
    global _last_codec
    last = _last_codec
    if last is not None and last[0] is keyring:
        return last[1]
    codec = _codecs.get(keyring)
    if codec is None:
        codec = _codecs[keyring] = _TokenCodec(keyring)
    _last_codec = (keyring, codec)
    return codec


def _signed_prefix(key_id: str) -> bytes:
    return TOKEN_VERSION + b"." + key_id.encode("ascii") + b"."


def issue_voter_token(keyring: KeyRing, voter: int, *, region: str = "local",
                      country: str = "ZZ", ttl_s: int, poll: str | None = None,
                      now_s: int | None = None) -> str:
    return next(issue_voter_tokens(keyring, voter, 1, region=region, country=country,
                                   ttl_s=ttl_s, poll=poll, now_s=now_s))


def issue_voter_tokens(keyring: KeyRing, first_voter: int, count: int, *,
                       region: str = "local", country: str = "ZZ", ttl_s: int,
                       poll: str | None = None, now_s: int | None = None) -> Iterator[str]:
    """Tokens for voters first_voter .. first_voter+count-1, in order, all with one expiry."""
    if not (0 <= first_voter and count >= 0 and first_voter + count <= VOTER_ID_END):
        raise ValueError(f"voter ids {first_voter}+{count} leave [0, 2**32)")
    _check_lengths(region=(region, REGION_CHARS_MAX), country=(country, COUNTRY_CHARS_MAX),
                   poll=(poll or "", POLL_ID_CHARS_MAX))
    if re.match(COUNTRY_PATTERN, country) is None:
        raise ValueError(f"country {country!r} is not made of A-Z a-z 0-9 _ -")
    exp = _expiry(ttl_s, now_s)
    return _issue_voter_tokens(_codec(keyring).voter, first_voter, count, region, country,
                               exp, poll)


def _issue_voter_tokens(macs: _MacSet, first_voter: int, count: int, region: str,
                        country: str, exp: int, poll: str | None) -> Iterator[str]:
    base = macs.by_key_id[macs.current]
    prefix = TOKEN_VERSION + b"." + macs.current + b"."
    encode = _claims_encoder.encode
    for voter in range(first_voter, first_voter + count):
        # A tuple encodes to the same msgpack array as the array_like VoterClaims, faster.
        payload = b64url_encode(encode((VOTER_TYP, voter, region, country, exp, poll)))
        yield (prefix + payload + b"." + b64url_encode(base.digest(payload))).decode("ascii")


def issue_admin_token(keyring: KeyRing, *, ttl_s: int, sub: str = "admin",
                      now_s: int | None = None) -> str:
    _check_lengths(sub=(sub, SUBJECT_CHARS_MAX))
    claims = AdminClaims(typ=ADMIN_TYP, sub=sub, exp=_expiry(ttl_s, now_s))
    return _sign(_codec(keyring).admin, _claims_encoder.encode(claims))


def verify_voter_token(keyring: KeyRing, authorization_value: bytes | str | None, now_s: int,
                       poll: str) -> VoterClaims:
    """Claims of a valid voter token for `poll`; raises a TokenError subclass otherwise."""
    payload = _verified_payload(_codec(keyring).voter, authorization_value)
    try:
        claims = _voter_claims_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec: bad UTF-8 in a string
        raise TokenInvalid("token claims are malformed") from None
    if claims.typ != VOTER_TYP:
        raise TokenInvalid("not a voter token")
    if now_s >= claims.exp:
        raise TokenExpired()
    if claims.poll is not None and claims.poll != poll:
        raise TokenForbidden("token is bound to another poll")
    return claims


def verify_admin_token(keyring: KeyRing, authorization_value: bytes | str | None,
                       now_s: int) -> AdminClaims:
    """Claims of a valid admin token; raises a TokenError subclass otherwise."""
    payload = _verified_payload(_codec(keyring).admin, authorization_value)
    try:
        claims = _admin_claims_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError):  # msgspec: bad UTF-8 in a string
        raise TokenInvalid("token claims are malformed") from None
    if claims.typ != ADMIN_TYP:
        raise TokenInvalid("not an admin token")
    if now_s >= claims.exp:
        raise TokenExpired()
    return claims


def _sign(macs: _MacSet, claims_msgpack: bytes) -> str:
    payload = b64url_encode(claims_msgpack)
    signature = b64url_encode(macs.by_key_id[macs.current].digest(payload))
    return (TOKEN_VERSION + b"." + macs.current + b"." + payload + b"." + signature).decode()


# What engine.fastpath.token_payload reports, as the error each one answers.
_TOKEN_PROBLEMS = {
    fastpath.TOKEN_MISSING: lambda: TokenMissing(),
    fastpath.TOKEN_NOT_ASCII: lambda: TokenInvalid("token is not ASCII"),
    fastpath.TOKEN_NOT_TEXT: lambda: TokenInvalid("token is neither str nor bytes"),
    fastpath.TOKEN_TOO_LONG: lambda: TokenInvalid(
        f"authorization value is longer than {AUTHORIZATION_BYTES_MAX} bytes"),
    fastpath.TOKEN_MALFORMED: lambda: TokenInvalid("token is malformed"),
    fastpath.TOKEN_KEY_UNKNOWN: lambda: TokenInvalid("token key id is unknown"),
    fastpath.TOKEN_SIGNATURE_WRONG: lambda: TokenInvalid("token signature does not match"),
    fastpath.TOKEN_PAYLOAD_NOT_BASE64URL: lambda: TokenInvalid(
        "token payload is not base64url"),
}


def _verified_payload(macs: _MacSet, authorization_value: object) -> bytes:
    """The decoded claims bytes of a token whose signature checks out under `macs`."""
    payload = token_payload(macs.by_key_id, authorization_value)
    if isinstance(payload, int):  # a status code: token_payload returns exactly int or bytes
        raise _TOKEN_PROBLEMS[payload]()
    return payload


def _expiry(ttl_s: int, now_s: int | None) -> int:
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    return (int(time.time()) if now_s is None else now_s) + ttl_s


def _check_lengths(**fields: tuple[str, int]) -> None:
    for name, (value, chars_max) in fields.items():
        if len(value) > chars_max:
            raise ValueError(f"{name} is longer than {chars_max} characters")
