"""Fuzzing of the issuer's ID-token check (engine/issuer_oidc.py), pure: keys made in the test,
no provider, no network.

Inputs: ID tokens validly signed by the provider's key whose payload is any bytes, any JSON
or a claims object whose every claim may have any JSON type or value (a provider that
misbehaves, or a parser confused by types); tokens whose protected header is any JSON;
and valid tokens mutated (bytes flipped, cut, parts swapped).
Proves: verify_id_token and the key-id extraction raise only IdTokenInvalid or
IdTokenExpired (TokenError subclasses, answered 401), and a token it accepts names the
configured issuer, audience and a subject within bounds.
"""

from __future__ import annotations

import base64
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jws, jwt
from joserfc.jwk import ECKey, KeySet

from engine.issuer_oidc import SUBJECT_CHARS_MAX, Identity, _key_id, verify_id_token
from engine.tokens import TokenError

ISSUER = "https://id.example.test"
AUDIENCE = "votes-issuer"
NOW_S = 1_800_000_000
ALGORITHMS = ("ES256", "RS256")
EXAMPLES = 300
KEY = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
KEYS = KeySet.import_key_set({"keys": [KEY.as_dict(private=False)]})
HEADER = {"alg": "ES256", "kid": "ec-1"}

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40)),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
# Each claim: usually its valid value, sometimes anything, sometimes absent.
VALID = {"iss": ISSUER, "aud": AUDIENCE, "sub": "person-1", "exp": NOW_S + 600,
         "iat": NOW_S - 5, "nbf": NOW_S - 5, "azp": AUDIENCE}
claims_objects = st.fixed_dictionaries({}, optional={
    name: st.one_of(st.just(value), json_values, st.lists(st.just(value), max_size=3))
    for name, value in VALID.items()})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed_payload(payload: bytes) -> str:
    return jws.serialize_compact(HEADER, payload, KEY, algorithms=["ES256"])


def check(token: str) -> Identity:
    return verify_id_token(token, KEYS, ALGORITHMS, issuer=ISSUER, audience=AUDIENCE,
                           now_s=NOW_S)


def accepted_or_token_error(token: str) -> None:
    try:
        _key_id(token)
        identity = check(token)
    except TokenError:
        return
    assert identity.issuer == ISSUER and 0 < len(identity.subject) <= SUBJECT_CHARS_MAX


@settings(max_examples=EXAMPLES, deadline=None)
@given(claims=claims_objects)
def test_signed_claims_of_any_type(claims: dict) -> None:
    accepted_or_token_error(signed_payload(json.dumps(claims).encode()))


@settings(max_examples=EXAMPLES, deadline=None)
@given(payload=st.one_of(st.binary(max_size=200),
                         json_values.map(lambda value: json.dumps(value).encode())))
def test_signed_payloads_of_any_shape(payload: bytes) -> None:
    accepted_or_token_error(signed_payload(payload))


@settings(max_examples=EXAMPLES, deadline=None)
@given(header=st.one_of(json_values, st.fixed_dictionaries(
    {"alg": st.one_of(st.sampled_from(["ES256", "RS256", "none", "HS256"]), json_values),
     "kid": st.one_of(st.just("ec-1"), json_values)},
    optional={"crit": json_values, "b64": json_values, "typ": json_values})))
def test_protected_headers_of_any_shape(header: object) -> None:
    token = signed_payload(json.dumps(VALID).encode())
    _header, payload, signature = token.split(".")
    accepted_or_token_error(f"{b64url(json.dumps(header).encode())}.{payload}.{signature}")


@settings(max_examples=EXAMPLES, deadline=None)
@given(position=st.integers(0, 2000), value=st.sampled_from("A_-.=+/0z"),
       cut=st.integers(0, 2000), swap=st.booleans())
def test_mutated_valid_tokens(position: int, value: str, cut: int, swap: bool) -> None:
    token = jwt.encode(HEADER, VALID, KEY)
    index = position % len(token)
    mutated = token[:index] + value + token[index + 1:]
    mutated = mutated[:len(mutated) - cut % len(mutated)]
    if swap:
        parts = mutated.split(".")
        mutated = ".".join(reversed(parts))
    accepted_or_token_error(mutated)
