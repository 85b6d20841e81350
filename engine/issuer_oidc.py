"""Verifies an identity provider's OIDC ID token for the issuer role, with joserfc.

What a token must satisfy (any failure is IdTokenInvalid or IdTokenExpired, with a fixed
detail that never echoes the token):
- compact JWS of at most ID_TOKEN_BYTES_MAX bytes, signed with an asymmetric algorithm in
  ALGORITHMS (never `none`, never HMAC: a provider's public JWKS must not become a secret);
- its `kid` names a key of the provider's JWKS, and the signature verifies with it;
- `iss` equals the configured provider URL (and the discovery document's `issuer`), `aud`
  contains the configured audience (with several audiences, `azp` must be ours too), `sub`
  is 1..SUBJECT_CHARS_MAX characters, `exp` is in the future and `iat`/`nbf` not in the
  future, each within LEEWAY_S of clock skew.

The discovery document and the JWKS are fetched with httpx (bounded time and size), cached for
JWKS_TTL_S, and fetched again early when a token names a kid the cache lacks (the provider
rotated its key), at most once per JWKS_REFRESH_INTERVAL_S_MIN so that tokens with made-up
kids cannot turn the issuer into a flood of requests to the provider. When a refresh fails
the cached keys stay in use up to JWKS_STALE_S_MAX; with no usable keys the answer is
ProviderUnavailable (503).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from joserfc import jws, jwt
from joserfc.errors import ExpiredTokenError, JoseError
from joserfc.jwk import KeySet

from engine.errors import NotReady
from engine.tokens import TokenExpired, TokenInvalid

log = logging.getLogger("votes.issuer")

# The asymmetric algorithms accepted; the provider's discovery document narrows them.
ALGORITHMS = ("ES256", "RS256", "PS256", "EdDSA")
ID_TOKEN_BYTES_MAX = 8192
SUBJECT_CHARS_MAX = 255
LEEWAY_S = 60
JWKS_TTL_S = 300.0
JWKS_REFRESH_INTERVAL_S_MIN = 10.0
JWKS_STALE_S_MAX = 3600.0
FETCH_TIMEOUT_S = 2.0
DOCUMENT_BYTES_MAX = 256 * 1024


class IdTokenInvalid(TokenInvalid):
    """The ID token is not valid."""


class IdTokenExpired(TokenExpired):
    """The ID token has expired."""


class ProviderUnavailable(NotReady):
    """The identity provider cannot be reached; retry shortly."""


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified login: the provider's issuer URL and the person's subject there."""

    issuer: str
    subject: str


@dataclass(slots=True)
class _ProviderKeys:
    key_set: KeySet
    kids: frozenset[str]
    algorithms: tuple[str, ...]
    fetched_at_s: float


class OidcVerifier:
    """One provider's ID tokens for one audience. Safe to share between tasks of one loop."""

    def __init__(self, issuer_url: str, audience: str, client: httpx.AsyncClient, *,
                 clock_s: Callable[[], float] = time.time,
                 monotonic_s: Callable[[], float] = time.monotonic) -> None:
        self.issuer_url = issuer_url.rstrip("/")
        self.audience = audience
        self.client = client
        self.clock_s = clock_s
        self.monotonic_s = monotonic_s
        self.keys: _ProviderKeys | None = None
        self.last_fetch_attempt_s = -JWKS_REFRESH_INTERVAL_S_MIN
        self.refreshing = asyncio.Lock()

    async def verify(self, id_token: str) -> Identity:
        """The identity in a valid ID token; IdTokenInvalid / IdTokenExpired otherwise, or
        ProviderUnavailable when the provider's keys cannot be had."""
        if not isinstance(id_token, str) or not 0 < len(id_token) <= ID_TOKEN_BYTES_MAX \
                or not id_token.isascii():
            raise IdTokenInvalid()
        kid = _key_id(id_token)
        keys = await self._keys_knowing(kid)
        return verify_id_token(id_token, keys.key_set, keys.algorithms, issuer=self.issuer_url,
                               audience=self.audience, now_s=int(self.clock_s()))

    async def _keys_knowing(self, kid: str) -> _ProviderKeys:
        keys = self.keys
        now_s = self.monotonic_s()
        if keys is not None and kid in keys.kids and now_s - keys.fetched_at_s < JWKS_TTL_S:
            return keys
        async with self.refreshing:  # one fetch at a time; waiters reuse its result
            keys = self.keys
            fresh = keys is not None and self.monotonic_s() - keys.fetched_at_s < JWKS_TTL_S
            may_fetch = self.monotonic_s() - self.last_fetch_attempt_s \
                >= JWKS_REFRESH_INTERVAL_S_MIN
            if (keys is None or not fresh or kid not in keys.kids) and may_fetch:
                self.last_fetch_attempt_s = self.monotonic_s()
                try:
                    keys = self.keys = await self._fetch_keys()
                except ProviderUnavailable:
                    if keys is None or self.monotonic_s() - keys.fetched_at_s > JWKS_STALE_S_MAX:
                        raise
                    log.warning("issuer: JWKS refresh failed, using keys fetched %.0f s ago",
                                self.monotonic_s() - keys.fetched_at_s)
        if keys is None or self.monotonic_s() - keys.fetched_at_s > JWKS_STALE_S_MAX:
            raise ProviderUnavailable()
        if kid not in keys.kids:
            raise IdTokenInvalid()
        return keys

    async def _fetch_keys(self) -> _ProviderKeys:
        discovery = await self._fetch_json(f"{self.issuer_url}/.well-known/openid-configuration")
        if not isinstance(discovery, dict) or discovery.get("issuer") != self.issuer_url \
                or not isinstance(discovery.get("jwks_uri"), str):
            # A provider that names another issuer is misconfigured, not merely unreachable.
            log.error("issuer: discovery document of %s names issuer %r", self.issuer_url,
                      discovery.get("issuer") if isinstance(discovery, dict) else None)
            raise ProviderUnavailable()
        advertised = discovery.get("id_token_signing_alg_values_supported") or ALGORITHMS
        algorithms = tuple(alg for alg in ALGORITHMS if alg in advertised)
        document = await self._fetch_json(discovery["jwks_uri"])
        try:
            if not isinstance(document, dict):
                raise ValueError("the JWKS is not a JSON object")
            key_set = KeySet.import_key_set(document)  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            log.error("issuer: the JWKS of %s does not import: %r", self.issuer_url, exc)
            raise ProviderUnavailable() from None
        kids = frozenset(key.kid for key in key_set.keys if key.kid)
        log.info("issuer: JWKS of %s fetched, key ids %s", self.issuer_url, sorted(kids))
        return _ProviderKeys(key_set, kids, algorithms, self.monotonic_s())

    async def _fetch_json(self, url: str) -> object:
        try:
            async with self.client.stream("GET", url, timeout=FETCH_TIMEOUT_S) as response:
                if response.status_code != 200:
                    raise ProviderUnavailable(f"{url} answered {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > DOCUMENT_BYTES_MAX:
                        raise ProviderUnavailable(f"{url} is over {DOCUMENT_BYTES_MAX} bytes")
            return json.loads(body)
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("issuer: fetching %s failed: %r", url, exc)
            raise ProviderUnavailable() from None


def _key_id(id_token: str) -> str:
    try:
        header = jws.extract_compact(id_token.encode("ascii")).protected
    except (JoseError, ValueError, TypeError):
        raise IdTokenInvalid() from None
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or header.get("alg") not in ALGORITHMS:
        raise IdTokenInvalid()
    return kid


def verify_id_token(id_token: str, key_set: KeySet, algorithms: tuple[str, ...], *,
                    issuer: str, audience: str, now_s: int) -> Identity:
    """The identity of `id_token` if its signature and claims check out (see the module
    docstring); pure: no I/O, the keys and the time are given."""
    try:
        token = jwt.decode(id_token, key_set, algorithms=list(algorithms))
        jwt.JWTClaimsRegistry(
            now=now_s, leeway=LEEWAY_S,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
        ).validate(token.claims)
    except ExpiredTokenError:
        raise IdTokenExpired() from None
    except (JoseError, ValueError, TypeError, KeyError):
        raise IdTokenInvalid() from None
    claims = token.claims
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    if len(audiences) > 1 and claims.get("azp") != audience:
        raise IdTokenInvalid()  # OIDC Core 3.1.3.7: several audiences need azp = us
    subject = claims["sub"]
    if not 0 < len(subject) <= SUBJECT_CHARS_MAX:
        raise IdTokenInvalid()
    return Identity(issuer=claims["iss"], subject=subject)
