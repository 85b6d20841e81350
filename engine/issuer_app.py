"""The `issuer` role (`votes issuer`): an RSGI app (Granian) that exchanges an identity
provider's OIDC ID token for a voter token.

- POST /v1/voter-tokens, body {"id_token": "...", "poll"?: "..."} (at most
  REQUEST_BODY_BYTES_MAX bytes): verifies the ID token (engine/issuer_oidc.py), finds or
  assigns the identity's voter id (engine/issuer_identities.py), and answers 201
  {"token", "voter_id", "expires_at"} with a voter token (engine.tokens.issue_voter_token)
  for config `region` / `issuer_country`, valid issuer_token_ttl_s, bound to `poll` if given.
  401 for a bad, expired or foreign ID token (a fixed detail: nothing of the input is echoed);
  503 when the provider or PostgreSQL cannot be reached.
- GET /healthz (the process serves HTTP; whether PostgreSQL and the provider answer shows
  on the next exchange, as 201 or 503).
The voter token keys are the data dir's, reloaded when `votes keys rotate|retire` replaces
them (checked every token_keys_check_s), as the ingest role does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

import httpx
import msgspec

from engine.config import Config, config_from_parent
from engine.errors import BadRequest, MethodNotAllowed, NotFound, VotesError
from engine.issuer_identities import VoterIdentities
from engine.issuer_oidc import ID_TOKEN_BYTES_MAX, OidcVerifier
from engine.keys import KeyRing, TokenKeyWatch, load_keys, reload_token_keys
from engine.logs import configure_logging
from engine.problems import problem_of
from engine.request_body import read_body
from engine.security_headers import API_HEADERS
from engine.tokens import POLL_ID_CHARS_MAX, issue_voter_token

log = logging.getLogger("votes.issuer")

REQUEST_BODY_BYTES_MAX = ID_TOKEN_BYTES_MAX + 1024
TOKEN_KEYS_CHECK_S_MIN = 0.05
HTTP_CONNECTIONS_MAX = 4
JSON = [("content-type", "application/json")]


class VoterTokenRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id_token: Annotated[str, msgspec.Meta(min_length=1, max_length=ID_TOKEN_BYTES_MAX)]
    poll: Annotated[str, msgspec.Meta(min_length=1, max_length=POLL_ID_CHARS_MAX)] | None = None


class VoterTokenAnswer(msgspec.Struct, frozen=True):
    token: str
    voter_id: int
    expires_at: int  # Unix seconds


_request_decoder = msgspec.json.Decoder(VoterTokenRequest)
_encoder = msgspec.json.Encoder()


def problem_response(exc: VotesError) -> tuple[int, list[tuple[str, str]], bytes]:
    problem = problem_of(exc)
    headers = [("content-type", "application/problem+json")]
    if problem.status == 503:
        headers.append(("retry-after", "1"))
    if isinstance(exc, MethodNotAllowed):
        headers.append(("allow", "POST"))
    body = {"type": f"/problems/{problem.slug}", "title": problem.title,
            "status": problem.status, "detail": exc.detail or problem.title}
    return problem.status, headers, _encoder.encode(body)


class Issuer:
    """What one request needs: the verifier, the identity store, the token keys."""

    def __init__(self, config: Config, keyring: KeyRing, verifier: OidcVerifier,
                 identities: VoterIdentities) -> None:
        self.config = config
        self.keyring = keyring
        self.verifier = verifier
        self.identities = identities

    async def voter_token(self, body: bytes) -> VoterTokenAnswer:
        try:
            request = _request_decoder.decode(body)
        # msgspec reports invalid UTF-8 inside a string as UnicodeDecodeError, not DecodeError.
        except (msgspec.DecodeError, UnicodeDecodeError):
            raise BadRequest('the body must be {"id_token": "<ID token>", "poll"?: "<poll>"}') \
                from None
        identity = await self.verifier.verify(request.id_token)
        voter_id = await self.identities.voter_id(identity.issuer, identity.subject)
        now_s = int(time.time())
        ttl_s = self.config.issuer_token_ttl_s
        token = issue_voter_token(self.keyring, voter_id, region=self.config.region,
                                  country=self.config.issuer_country, ttl_s=ttl_s,
                                  poll=request.poll, now_s=now_s)
        return VoterTokenAnswer(token=token, voter_id=voter_id, expires_at=now_s + ttl_s)

    async def watch_token_keys(self) -> None:
        """Reload the voter token keys when `votes keys` replaced their files."""
        watch = TokenKeyWatch(self.config.data_path)
        while True:
            await asyncio.sleep(max(self.config.token_keys_check_s, TOKEN_KEYS_CHECK_S_MIN))
            if not watch.changed():
                continue
            try:
                self.keyring = reload_token_keys(self.config.data_path, self.keyring)
            except VotesError as exc:  # a broken file: keep issuing with the keys we have
                log.error("issuer: token keys not reloaded, keeping the previous ones: %s", exc)
                continue
            log.info("issuer: token keys reloaded: voter key %s", self.keyring.voter_key_current)


class IssuerApp:
    def __init__(self) -> None:
        self.issuer: Issuer | None = None
        self.http: httpx.AsyncClient | None = None
        self.tasks: list[asyncio.Task] = []

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        config = config_from_parent()
        configure_logging()
        self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=HTTP_CONNECTIONS_MAX),
                                      follow_redirects=False)
        verifier = OidcVerifier(config.issuer_oidc_url, config.issuer_oidc_audience, self.http)
        self.issuer = Issuer(config, load_keys(config.data_path), verifier,
                             VoterIdentities(config.issuer_database_url))
        self.tasks.append(loop.create_task(self.issuer.watch_token_keys()))

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        for task in self.tasks:
            task.cancel()
        if self.issuer is not None:
            loop.run_until_complete(self.issuer.identities.close())
        if self.http is not None:
            loop.run_until_complete(self.http.aclose())

    async def __rsgi__(self, scope, proto) -> None:
        if scope.proto != "http":
            return
        try:
            status, headers, body = await self._route(scope, proto)
        except VotesError as exc:
            status, headers, body = problem_response(exc)
        except Exception:  # a defect: no details to the client
            log.exception("issuer: unhandled error")  # nothing of the request: it is input
            status, headers, body = problem_response(VotesError())
        proto.response_bytes(status, headers + API_HEADERS, body)

    async def _route(self, scope, proto) -> tuple[int, list[tuple[str, str]], bytes]:
        issuer = self.issuer
        if issuer is None:
            raise VotesError("the issuer is not initialised")
        path = scope.path.rstrip("/")
        if path == "/v1/voter-tokens":
            if scope.method != "POST":
                raise MethodNotAllowed("use POST", allow="POST")
            answer = await issuer.voter_token(await read_body(scope, proto,
                                                              REQUEST_BODY_BYTES_MAX))
            return 201, [*JSON, ("cache-control", "no-store")], _encoder.encode(answer)
        if path == "/healthz":
            return 200, JSON, b'{"status":"ok"}'
        raise NotFound("no such route")


app = IssuerApp()
