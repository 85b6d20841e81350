"""The issuer role's ID token checks (engine/issuer_oidc.py) on tokens signed in the test with
local keys (joserfc), and the JWKS cache's refresh rules against an in-process JWKS server
(httpx.MockTransport; the real provider is in tests/integration/test_issuer_role.py).

Safety: test_wrong_audience_is_refused fails when the `aud` check is taken out of
verify_id_token (checked by hand, see the report of the issuer change).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey

from engine.issuer_oidc import (
    JWKS_REFRESH_INTERVAL_S_MIN,
    JWKS_STALE_S_MAX,
    JWKS_TTL_S,
    LEEWAY_S,
    Identity,
    IdTokenExpired,
    IdTokenInvalid,
    OidcVerifier,
    ProviderUnavailable,
    verify_id_token,
)
from engine.tokens import TokenError

ISSUER = "https://id.example.test"
AUDIENCE = "votes-issuer"
NOW_S = 1_800_000_000
ALGORITHMS = ("ES256", "RS256")

EC_KEY = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
OTHER_EC_KEY = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})  # same kid, other key
RSA_KEY = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})


def public_set(*keys) -> KeySet:
    return KeySet.import_key_set({"keys": [key.as_dict(private=False) for key in keys]})


KEYS = public_set(EC_KEY, RSA_KEY)


def claims(**changes) -> dict:
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "person-1", "iat": NOW_S - 5,
            "exp": NOW_S + 600}
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


def signed(token_claims: dict, key=EC_KEY, alg: str = "ES256") -> str:
    return jwt.encode({"alg": alg, "kid": key.kid}, token_claims, key)


def check(token: str, keys: KeySet = KEYS, now_s: int = NOW_S) -> Identity:
    return verify_id_token(token, keys, ALGORITHMS, issuer=ISSUER, audience=AUDIENCE,
                           now_s=now_s)


def test_a_valid_token_gives_its_identity() -> None:
    assert check(signed(claims())) == Identity(ISSUER, "person-1")
    assert check(signed(claims(sub="p2"), RSA_KEY, "RS256")) == Identity(ISSUER, "p2")


def test_wrong_audience_is_refused() -> None:
    with pytest.raises(IdTokenInvalid):
        check(signed(claims(aud="another-client")))
    with pytest.raises(IdTokenInvalid):
        check(signed(claims(aud=["another-client"])))


def test_several_audiences_need_azp_to_be_ours() -> None:
    with pytest.raises(IdTokenInvalid):
        check(signed(claims(aud=[AUDIENCE, "another-client"])))
    with pytest.raises(IdTokenInvalid):
        check(signed(claims(aud=[AUDIENCE, "another-client"], azp="another-client")))
    assert check(signed(claims(aud=[AUDIENCE, "x"], azp=AUDIENCE))).subject == "person-1"


def test_wrong_issuer_is_refused() -> None:
    with pytest.raises(IdTokenInvalid):
        check(signed(claims(iss="https://evil.example.test")))


def test_expiry_with_bounded_leeway() -> None:
    assert check(signed(claims(exp=NOW_S - LEEWAY_S + 1)))  # clock skew within the leeway
    with pytest.raises(IdTokenExpired):
        check(signed(claims(exp=NOW_S - LEEWAY_S)))
    with pytest.raises(IdTokenExpired):
        check(signed(claims(exp=NOW_S - 3600)))


def test_issued_or_valid_only_in_the_future_is_refused() -> None:
    with pytest.raises(IdTokenInvalid):
        check(signed(claims(iat=NOW_S + LEEWAY_S + 1)))
    with pytest.raises(IdTokenInvalid):
        check(signed(claims(nbf=NOW_S + LEEWAY_S + 1)))
    assert check(signed(claims(nbf=NOW_S + LEEWAY_S - 1)))


@pytest.mark.parametrize("missing", ["iss", "aud", "sub", "exp", "iat"])
def test_an_essential_claim_missing_is_refused(missing: str) -> None:
    with pytest.raises(IdTokenInvalid):
        check(signed(claims(**{missing: None})))


def test_subject_bounds() -> None:
    with pytest.raises(IdTokenInvalid):
        check(signed(claims(sub="")))
    with pytest.raises(IdTokenInvalid):
        check(signed(claims(sub="x" * 256)))
    assert check(signed(claims(sub="x" * 255)))


def test_a_signature_by_another_key_is_refused() -> None:
    with pytest.raises(IdTokenInvalid):
        check(signed(claims(), OTHER_EC_KEY))


def test_a_tampered_payload_is_refused() -> None:
    header, _payload, signature = signed(claims()).split(".")
    forged = jwt.encode({"alg": "ES256", "kid": "ec-1"}, claims(sub="someone-else"),
                        OTHER_EC_KEY).split(".")[1]
    with pytest.raises(IdTokenInvalid):
        check(f"{header}.{forged}.{signature}")


def test_symmetric_and_unsigned_tokens_are_refused() -> None:
    # An HMAC "signed" with the provider's public key material, and alg none.
    secret = OctKey.import_key(json.dumps(EC_KEY.as_dict(private=False)).encode(),
                               parameters={"kid": "ec-1"})
    with pytest.raises(IdTokenInvalid):
        check(jwt.encode({"alg": "HS256", "kid": "ec-1"}, claims(), secret,
                         algorithms=["HS256"]))
    header, payload, _signature = signed(claims()).split(".")
    none_header = "eyJhbGciOiJub25lIiwia2lkIjoiZWMtMSJ9"  # {"alg":"none","kid":"ec-1"}
    with pytest.raises(IdTokenInvalid):
        check(f"{none_header}.{payload}.")


@given(st.text(max_size=300))
def test_any_text_raises_only_token_errors(text: str) -> None:
    with pytest.raises(TokenError):
        check(text)


# --- the JWKS cache --------------------------------------------------------------------------


class Provider:
    """An in-process discovery document and JWKS; counts fetches; can be made to fail."""

    def __init__(self, *keys) -> None:
        self.keys = list(keys)
        self.jwks_fetches = 0
        self.down = False

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("provider down", request=request)
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json={"issuer": ISSUER, "jwks_uri": f"{ISSUER}/jwks",
                                             "id_token_signing_alg_values_supported": ["ES256"]})
        self.jwks_fetches += 1
        return httpx.Response(200, json={"keys": [key.as_dict(private=False)
                                                  for key in self.keys]})


class Clock:
    def __init__(self) -> None:
        self.monotonic_s = 1000.0

    def __call__(self) -> float:
        return self.monotonic_s


def verifier_for(provider: Provider, clock: Clock) -> OidcVerifier:
    client = httpx.AsyncClient(transport=httpx.MockTransport(provider.handle))
    return OidcVerifier(ISSUER, AUDIENCE, client, clock_s=lambda: NOW_S, monotonic_s=clock)


def test_jwks_is_cached_then_refreshed_after_its_ttl() -> None:
    provider, clock = Provider(EC_KEY), Clock()
    verifier = verifier_for(provider, clock)

    async def scenario() -> None:
        token = signed(claims())
        for _ in range(5):
            assert (await verifier.verify(token)).subject == "person-1"
        assert provider.jwks_fetches == 1
        clock.monotonic_s += JWKS_TTL_S + 1
        await verifier.verify(token)
        assert provider.jwks_fetches == 2

    asyncio.run(scenario())


def test_an_unknown_kid_refreshes_at_most_once_per_interval() -> None:
    provider, clock = Provider(EC_KEY), Clock()
    verifier = verifier_for(provider, clock)
    rotated = ECKey.generate_key("P-256", parameters={"kid": "ec-2"})

    async def scenario() -> None:
        await verifier.verify(signed(claims()))
        clock.monotonic_s += JWKS_REFRESH_INTERVAL_S_MIN
        provider.keys.append(rotated)  # the provider rotates: a new kid appears
        assert (await verifier.verify(signed(claims(sub="new"), rotated))).subject == "new"
        assert provider.jwks_fetches == 2
        made_up = ECKey.generate_key("P-256", parameters={"kid": "made-up"})
        for _ in range(20):  # a flood of made-up kids: no fetch within the interval
            with pytest.raises(IdTokenInvalid):
                await verifier.verify(signed(claims(), made_up))
        assert provider.jwks_fetches == 2
        clock.monotonic_s += JWKS_REFRESH_INTERVAL_S_MIN
        with pytest.raises(IdTokenInvalid):
            await verifier.verify(signed(claims(), made_up))
        assert provider.jwks_fetches == 3

    asyncio.run(scenario())


def test_provider_down_is_unavailable_and_stale_keys_are_bounded() -> None:
    provider, clock = Provider(EC_KEY), Clock()
    verifier = verifier_for(provider, clock)

    async def scenario() -> None:
        provider.down = True
        with pytest.raises(ProviderUnavailable):
            await verifier.verify(signed(claims()))
        provider.down = False
        clock.monotonic_s += JWKS_REFRESH_INTERVAL_S_MIN
        await verifier.verify(signed(claims()))
        provider.down = True
        clock.monotonic_s += JWKS_TTL_S + 1  # stale, refresh fails: the cached keys serve
        assert (await verifier.verify(signed(claims()))).subject == "person-1"
        clock.monotonic_s += JWKS_STALE_S_MAX  # too stale: no guessing
        with pytest.raises(ProviderUnavailable):
            await verifier.verify(signed(claims()))

    asyncio.run(scenario())


# --- the issuer's config fields ---------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("issuer_token_ttl_s", 59), ("issuer_token_ttl_s", 8 * 86400),
    ("issuer_oidc_url", "http://idp.example.test"),  # plain http off this host
    ("issuer_oidc_url", "http://127.0.0.1.example.test"), ("issuer_oidc_url", "ftp://x"),
    ("issuer_database_url", "mysql://x"), ("issuer_country", ""),
])
def test_issuer_config_checks_refuse(field: str, value) -> None:
    from engine.config import load_config
    from engine.errors import ConfigError

    with pytest.raises(ConfigError):
        load_config(None, **{field: value})


def test_issuer_config_accepts_a_local_provider() -> None:
    from engine.config import load_config

    config = load_config(None, issuer_oidc_url="http://127.0.0.1:19950",
                         issuer_database_url="postgresql://postgres@127.0.0.1:19960/x",
                         issuer_token_ttl_s=600)
    assert (config.issuer_token_ttl_s, config.issuer_country) == (600, "ZZ")
