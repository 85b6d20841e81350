"""The HTTP app (RSGI, served by Granian): routing, body limits, tokens, problem+json.

The vote path from here: `_vote` reads the bounded body, decodes it with a reused typed
msgspec decoder, verifies the voter token, and hands (poll, voter, option) to
`Node.vote`, which runs it on the owner of the voter's fencing group (shards/group_owner.py)
or forwards it there.
Every VotesError becomes one problem+json answer in `_problem`, as engine/problems.py
says; anything else is a bug, logged with its traceback and answered 500 without details.
No answer and no log line repeats what the client sent (path, poll or option names, header
values, decoder messages): details are fixed text, logs name the route label, and every
answer carries the security headers of engine/security_headers.py (docs/security.md).
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import logging
import re
import time

import msgspec

from engine import tokens, tracing
from engine.bans import Banned
from engine.challenge import ChallengeFailed, ChallengeRequired
from engine.cluster_node import make_node
from engine.config import Config, config_from_parent
from engine.defences import Defences, poll_of_query
from engine.errors import (
    AlreadyVoted,
    BadRequest,
    BodyTooLarge,
    InvariantViolation,
    MethodNotAllowed,
    NotFound,
    NotReady,
    PollClosed,
    PollExists,
    PollNotOpen,
    UnknownOption,
    VotesError,
)
from engine.keys import TokenKeyWatch, load_keys, reload_token_keys
from engine.logs import REQUEST_ID_HEADER, configure_logging, request_id, request_id_of
from engine.metrics import BUFFERED, FLUSH_INTERVAL_S, exposition
from engine.node import Node
from engine.ownership import FORWARDED_HEADER, ForwardedRequest, Relayed
from engine.problems import problem_of
from engine.ratelimit import FORWARDED_FOR_HEADER, GlobalSync, RateLimited, RateLimiter
from engine.regions import RegionForwarder
from engine.request_body import read_body
from engine.results_page import LocalStreams, page_response, receipt_status
from engine.results_publisher import start_publisher
from engine.security_headers import API_HEADERS
from shards.backends import durability
from shards.records import BREAKDOWNS, PollCreated

log = logging.getLogger("votes.app")

IDENTIFIER = r"^[A-Za-z0-9_-]{1,64}$"
IDENTIFIER_PATTERN = re.compile(IDENTIFIER)
OPTIONS_MAX = 64
GC_YOUNG_THRESHOLD = 20_000
TOKEN_KEYS_CHECK_S_MIN = 0.05

JSON = [("content-type", "application/json")]
PROBLEM_JSON = [("content-type", "application/problem+json")]
# What a malformed body answers: fixed text, since msgspec's messages name the unknown
# fields and values the client sent.
VOTE_BODY_EXPECTED = 'the body must be {"option": "<option id>"}'
POLL_BODY_EXPECTED = ('the body must be {"id": "<poll id>", "options": ["<option id>", ...]} '
                      'with optional "opens_at", "closes_at" (RFC 3339) and "embargo" (boolean)')
# The methods a log line may name; any other is logged as "other" (it is the client's text).
LOGGED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class VoteBody(msgspec.Struct, forbid_unknown_fields=True):
    option: str


class PollBody(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    options: list[str]
    opens_at: datetime.datetime | None = None
    closes_at: datetime.datetime | None = None
    embargo: bool = False
    breakdown: list[str] = []


_vote_decoder = msgspec.json.Decoder(VoteBody)
_poll_decoder = msgspec.json.Decoder(PollBody)
_json = msgspec.json.Encoder()

# Rejections counted beside the results, by error class.
_REJECTION_REASON: dict[type[VotesError], str] = {
    AlreadyVoted: "duplicate",
    tokens.TokenError: "bad-token",
    PollClosed: "closed-poll",
    PollNotOpen: "not-open",
    UnknownOption: "unknown-option",
    RateLimited: "rate-limited",
    ChallengeRequired: "challenge-required",
    ChallengeFailed: "challenge-failed",
    Banned: "banned",
}


def _rejection_reason(error: VotesError) -> str | None:
    reason = _REJECTION_REASON.get(type(error))
    if reason is not None:  # the exact class: one lookup, not a walk of the MRO
        return reason
    return next((_REJECTION_REASON[cls] for cls in type(error).__mro__
                 if cls in _REJECTION_REASON), None)


def _decode_vote(body: bytes) -> VoteBody:
    vote = _decode(_vote_decoder, body, VOTE_BODY_EXPECTED)
    if not IDENTIFIER_PATTERN.match(vote.option):
        raise BadRequest("option must be 1-64 characters of A-Z a-z 0-9 _ -")
    return vote


def _decode(decoder: msgspec.json.Decoder, body: bytes, expected: str):
    try:
        return decoder.decode(body)
    # msgspec reports invalid UTF-8 inside a string as UnicodeDecodeError, not DecodeError.
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        raise BadRequest(expected) from None


def _epoch_ms(moment: datetime.datetime | None) -> int | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise BadRequest("times must carry a UTC offset (RFC 3339)")
    return int(moment.timestamp() * 1000)


def _iso(epoch_ms: int | None) -> str | None:
    if epoch_ms is None:
        return None
    moment = datetime.datetime.fromtimestamp(epoch_ms / 1000, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def poll_record(body: PollBody) -> PollCreated:
    if not IDENTIFIER_PATTERN.match(body.id):
        raise BadRequest("id must be 1-64 characters of A-Z a-z 0-9 _ -")
    if not 1 <= len(body.options) <= OPTIONS_MAX:
        raise BadRequest(f"options must hold 1 to {OPTIONS_MAX} entries")
    if len(set(body.options)) != len(body.options):
        raise BadRequest("options must be unique")
    if not all(IDENTIFIER_PATTERN.match(option) for option in body.options):
        raise BadRequest("each option must be 1-64 characters of A-Z a-z 0-9 _ -")
    opens_at_ms, closes_at_ms = _epoch_ms(body.opens_at), _epoch_ms(body.closes_at)
    if opens_at_ms is not None and closes_at_ms is not None and closes_at_ms <= opens_at_ms:
        raise BadRequest("closes_at must be after opens_at")
    breakdown = body.breakdown
    if not set(breakdown) <= set(BREAKDOWNS) or len(set(breakdown)) != len(breakdown):
        raise BadRequest(f"breakdown must list distinct entries of {list(BREAKDOWNS)}")
    return PollCreated(poll=body.id, options=list(body.options), opens_at_ms=opens_at_ms,
                       closes_at_ms=closes_at_ms, embargo=body.embargo,
                       created_ms=time.time_ns() // 1_000_000, breakdown=list(breakdown))


def poll_body(record: PollCreated) -> dict:
    return {"id": record.poll, "options": record.options, "opens_at": _iso(record.opens_at_ms),
            "closes_at": _iso(record.closes_at_ms), "embargo": record.embargo,
            "breakdown": record.breakdown}


class App:
    """The RSGI application object Granian loads in each worker (`engine.app:app`)."""

    def __init__(self) -> None:
        self.config: Config | None = None
        self.node: Node | None = None
        self._cluster = False
        self._start_task: asyncio.Task | None = None
        self._ratelimit_sync: GlobalSync | None = None
        self._ratelimit_task: asyncio.Task | None = None
        self._regions = RegionForwarder(Config())  # single-region until __rsgi_init__

    def __rsgi_init__(self, loop) -> None:
        self.config = config_from_parent()
        self._cluster = self.config.uses_cluster  # a property: read once, not per vote
        configure_logging()
        tracing.configure(self.config.trace_sample_ratio, self.config.trace_otlp_endpoint)
        self.keyring = load_keys(self.config.data_path)
        self.node = make_node(self.config, self.keyring)
        self._regions = RegionForwarder(self.config)
        self._start_task = loop.create_task(self.node.start())
        self._flush_task = loop.create_task(_flush_metrics())
        self._token_keys_task = loop.create_task(self._watch_token_keys())
        # Results go to Redis only when one is configured (engine/results_publisher.py).
        self._results_task = start_publisher(loop, self.config, self.node)
        self._streams = LocalStreams(self.config.results_subscribers_max)
        self.limiter = RateLimiter(self.config)
        self._ratelimit_sync = (GlobalSync(self.config, self.limiter)
                                if self.config.ratelimit_redis_url else None)
        self._ratelimit_task = (loop.create_task(self._ratelimit_sync.run())
                                if self._ratelimit_sync is not None else None)
        self.defences = Defences(self.config, self.limiter)
        self._defences_task = loop.create_task(self.defences.run())
        # Every request allocates dozens of objects, so the default young-generation
        # threshold (700) ran a collection every few requests (~5% of the loop). Objects of
        # the start-up are frozen out of collections; young ones are collected every
        # GC_YOUNG_THRESHOLD allocations (measured: +5-7% votes/s, docs/performance.md).
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)

    def __rsgi_del__(self, loop) -> None:
        if self.node is not None:
            loop.run_until_complete(self.node.stop())
        if self._ratelimit_task is not None and self._ratelimit_sync is not None:
            self._ratelimit_task.cancel()
            loop.run_until_complete(self._ratelimit_sync.close())
        self._defences_task.cancel()
        loop.run_until_complete(self.defences.close())
        loop.run_until_complete(self._regions.close())
        BUFFERED.flush()
        tracing.shutdown()

    async def __rsgi__(self, scope, proto) -> None:
        if scope.proto != "http":
            return
        started = time.perf_counter()
        route = "unmatched"
        # Granian runs each request in its own task, so this id is this request's alone.
        current_request_id = request_id_of(scope.headers.get(REQUEST_ID_HEADER))
        request_id.set(current_request_id)
        span = tracing.start_request(scope.method)
        try:
            route, status, headers, body = await self._route(scope, proto, span)
        except VotesError as exc:
            route = _route_of(scope.path)  # the error left _route before it named the route
            status, headers, body = self._problem(exc)
            reason = _rejection_reason(exc)
            if reason is not None:
                BUFFERED.rejected(reason)  # labels() and a file write each were a tenth of a 401
                poll, node = _poll_of(scope.path), self.node
                if poll is not None and node is not None:
                    node.count_rejection(poll, reason)
        except Exception:
            log.exception("unhandled error on %s %s",
                          scope.method if scope.method in LOGGED_METHODS else "other",
                          _route_of(scope.path))
            status, headers, body = self._problem(VotesError("internal error"))
        if headers is not None:  # None: a stream, already answered
            # The page and its files carry their own, stricter set (engine/results_page.py).
            tail = [(REQUEST_ID_HEADER, current_request_id)]
            proto.response_bytes(status, headers + (tail if route == "page" else
                                                    tail + API_HEADERS), body)
        BUFFERED.request(route, status, time.perf_counter() - started)
        if span is not None:
            tracing.finish_request(span, route, status, _poll_of(scope.path))

    def _problem(self, exc: VotesError):
        # Most rejections come in a few shapes (a class, a fixed detail, a Retry-After of a
        # few seconds), so their answers are encoded once. Not those whose members differ
        # per request (a 409's receipt, a 428's challenge).
        if not exc.extra.keys() <= HEADER_ONLY_EXTRA:
            return self._encode_problem(exc)
        key = (type(exc), exc.detail, tuple(exc.extra.items()))
        answer = _plain_problems.get(key)
        if answer is None:
            if len(_plain_problems) >= PLAIN_PROBLEMS_MAX:
                _plain_problems.clear()
            answer = _plain_problems[key] = self._encode_problem(exc)
        return answer

    @staticmethod
    def _encode_problem(exc: VotesError):
        extra = dict(exc.extra)
        headers = PROBLEM_JSON
        allow = extra.pop("allow", None)
        if allow is not None:  # RFC 9110: a 405 names the methods the resource offers
            headers = PROBLEM_JSON + [("allow", str(allow))]
        retry_after = extra.pop("retry_after", None)
        if retry_after is not None:  # RFC 9110: whole seconds
            headers = PROBLEM_JSON + [("retry-after", str(retry_after))]
        if isinstance(exc, BodyTooLarge):
            # The rest of the body was never read, so the connection cannot carry another
            # request: say so, or a keep-alive client sends its next request into a socket
            # the server is closing.
            headers = PROBLEM_JSON + [("connection", "close")]
        problem = problem_of(exc)
        document = {"type": f"/problems/{problem.slug}", "title": problem.title,
                    "status": problem.status, "detail": exc.detail or problem.title, **extra}
        return problem.status, headers, _json.encode(document)

    async def _route(self, scope, proto, span=None):
        method = scope.method
        parts = scope.path.strip("/").split("/")
        if len(parts) == 4 and parts[0] == "v1" and parts[1] == "polls":
            poll, action = parts[2], parts[3]
            if action == "votes":
                _require(method, "POST")
                return ("vote",) + await self._vote(scope, proto, poll, span)
            if action == "close":
                _require(method, "POST")
                return ("close",) + await self._close(scope, poll)
            if action == "results":
                _require(method, "GET")
                return ("results", 200, JSON, _json.encode(await self._node().results(poll)))
        elif len(parts) == 5 and parts[:3] == ["internal", "v1", "polls"] and parts[4] == "summary":
            _require(method, "GET")
            return ("internal-summary",) + await self._internal_summary(scope, parts[3])
        elif len(parts) == 5 and parts[:2] == ["v1", "polls"] and parts[3:] == ["results", "stream"]:
            _require(method, "GET")
            await self._streams.serve(self._node(), scope, proto, parts[2])
            return "results-stream", 200, None, b""  # answered as a stream already
        elif len(parts) == 3 and parts[:2] == ["v1", "receipts"]:
            _require(method, "GET")
            status = await receipt_status(self._node(), self.keyring, parts[2],
                                          _forwarded(scope, b""))
            return "receipt", 200, JSON, _json.encode(status)
        elif parts[0] == "polls" and (page := page_response(parts)) is not None:
            _require(method, "GET")
            return ("page",) + page
        elif parts == ["v1", "challenge"]:
            _require(method, "GET")
            return "challenge", 200, JSON, _json.encode(self._challenge(scope))
        elif parts == ["v1", "polls"]:
            _require(method, "POST")
            return ("create",) + await self._create(scope, proto)
        elif len(parts) == 1 and parts[0] in ("healthz", "readyz", "metrics"):
            _require(method, "GET")
            return (parts[0],) + await self._operator(parts[0])
        raise NotFound("no route for this path")

    def _node(self) -> Node:
        if self.node is None:
            raise NotReady("the worker is starting")
        return self.node

    def _config(self) -> Config:
        if self.config is None:  # set by __rsgi_init__, before any request
            raise InvariantViolation("a request reached the worker before __rsgi_init__")
        return self.config

    async def _vote(self, scope, proto, poll: str, span=None):
        node = self._node()
        # The body is read first, however small, so the connection can carry the next
        # request after a rejection. Then the cheapest rejections first: the token (its MAC
        # is about a microsecond in the fast path), a client address already past its limit
        # (one read-only lookup), the body, and only then the limits' counting, whose state
        # a forged-token flood from fresh addresses would otherwise grow and synchronise to
        # Redis (perf/bench_attack.py, docs/security.md).
        body = await read_body(scope, proto, self._config().vote_body_bytes_max)
        if span is not None:  # a sampled request: the same steps, each in a child span
            return await self._vote_traced(scope, poll, body, span)
        claims = tokens.verify_voter_token(self.keyring, scope.headers.get("authorization"),
                                           int(time.time()), poll)
        peer, address = self.defences.client_address(scope.client,
                                                     scope.headers.get(FORWARDED_FOR_HEADER))
        self.defences.refuse_limited(peer, address)
        vote = _decode_vote(body)
        client = self.defences.check_client_at(peer, address,
                                               scope.headers.get(FORWARDED_HEADER) is not None)
        self.defences.check_voter(client, claims.voter, poll, scope.headers, self.keyring)
        if (home_url := self._regions.home_url(claims.region, scope.headers)) is not None:
            return await self._forward_home(scope, poll, body, home_url)
        # Only cluster mode can forward to another node; the embedded path builds nothing.
        request = _forwarded(scope, body) if self._cluster else None
        try:
            body = await node.vote(poll, claims.voter, vote.option, request, claims.country)
        except Relayed as relayed:  # the shard's owner on another node answered
            return relayed.status, [("content-type", relayed.content_type)], relayed.body
        return 201, JSON, body

    async def _vote_traced(self, scope, poll: str, body: bytes, span):
        node = self._node()
        with tracing.child(span, "verify-voter-token"):
            claims = tokens.verify_voter_token(
                self.keyring, scope.headers.get("authorization"), int(time.time()), poll)
        peer, address = self.defences.client_address(scope.client,
                                                     scope.headers.get(FORWARDED_FOR_HEADER))
        self.defences.refuse_limited(peer, address)
        vote = _decode_vote(body)
        with tracing.child(span, "defences"):
            client = self.defences.check_client_at(
                peer, address, scope.headers.get(FORWARDED_HEADER) is not None)
            self.defences.check_voter(client, claims.voter, poll, scope.headers, self.keyring)
        if (home_url := self._regions.home_url(claims.region, scope.headers)) is not None:
            with tracing.child(span, "region-forward"):
                return await self._forward_home(scope, poll, body, home_url)
        request = _forwarded(scope, body) if self._cluster else None
        try:
            with tracing.child(span, "node.vote"):
                body = await node.vote(poll, claims.voter, vote.option, request, claims.country)
        except Relayed as relayed:
            return relayed.status, [("content-type", relayed.content_type)], relayed.body
        return 201, JSON, body

    def _challenge(self, scope) -> dict:
        """`GET /v1/challenge?poll=P` with the voter's token: a challenge bound to both."""
        poll = poll_of_query(scope.query_string)
        client = self.defences.check_client(scope.client, scope.headers.get(FORWARDED_FOR_HEADER),
                                            False)
        claims = tokens.verify_voter_token(self.keyring, scope.headers.get("authorization"),
                                           int(time.time()), poll)
        return self.defences.challenge_for(client, poll, claims.voter, self.keyring)

    async def _forward_home(self, scope, poll: str, body: bytes, home_url: str):
        """The voter's home region counts the vote; its answer is ours (engine/regions.py)."""
        answer = await self._regions.forward(home_url, poll, body,
                                             scope.headers.get("authorization"), request_id.get())
        return answer.status, [("content-type", answer.content_type)], answer.body

    async def _create(self, scope, proto):
        node = self._node()
        body = await read_body(scope, proto, self._config().poll_body_bytes_max)
        tokens.verify_admin_token(self.keyring, scope.headers.get("authorization"), int(time.time()))
        record = poll_record(_decode(_poll_decoder, body, POLL_BODY_EXPECTED))
        try:
            if not await node.create_poll(record, _forwarded(scope, body)):
                raise PollExists("a poll with this id already exists")
        except Relayed as relayed:
            return relayed.status, [("content-type", relayed.content_type)], relayed.body
        return 201, JSON, _json.encode(poll_body(record))

    async def _close(self, scope, poll: str):
        node = self._node()
        tokens.verify_admin_token(self.keyring, scope.headers.get("authorization"), int(time.time()))
        try:
            await node.close_poll(poll, _forwarded(scope, b""))
        except Relayed as relayed:
            return relayed.status, [("content-type", relayed.content_type)], relayed.body
        results = await node.results(poll)
        return 200, JSON, _json.encode({"poll": poll, "closed": True, "final": results["final"]})

    async def _internal_summary(self, scope, poll: str):
        """This node's per-shard parts of a poll, for the node that sums results (cluster
        mode). Admin-only: under an embargo the parts hold counts nobody may see yet."""
        node = self._node()
        tokens.verify_admin_token(self.keyring, scope.headers.get("authorization"), int(time.time()))
        return 200, JSON, _json.encode(await node.cluster_summary(poll))

    async def _operator(self, name: str):
        if name == "healthz":
            return 200, JSON, b'{"status":"ok"}'
        if name == "metrics":
            BUFFERED.flush()
            body, content_type = exposition()
            return 200, [("content-type", content_type)], body
        config = self._config()
        readiness = await self._node().readiness() if self.node else {
            "ready": False, "durability": durability(config), "shards_total": config.shards,
            "shards_ready": 0, "groups_total": config.groups, "workers": config.workers}
        return (200 if readiness["ready"] else 503), JSON, _json.encode(readiness)


    async def _watch_token_keys(self) -> None:
        """Reload the token keys when `votes keys rotate|retire` replaced their files, within
        token_keys_check_s; off the vote path, which reads self.keyring and nothing more."""
        config = self._config()
        watch = TokenKeyWatch(config.data_path)
        while True:
            await asyncio.sleep(max(config.token_keys_check_s, TOKEN_KEYS_CHECK_S_MIN))
            if not watch.changed():
                continue
            try:
                self.keyring = reload_token_keys(config.data_path, self.keyring)
            except VotesError as exc:  # a broken file: keep serving with the keys we have
                log.error("token keys not reloaded, keeping the previous ones: %s", exc)
                continue
            if self.node is not None:  # its forwarded requests carry admin tokens it signs
                self.node.keyring = self.keyring
            log.info("token keys reloaded: voter key %s, admin key %s",
                     self.keyring.voter_key_current, self.keyring.admin_key_current)


async def _flush_metrics() -> None:
    while True:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        BUFFERED.flush()


def _forwarded(scope, body: bytes) -> ForwardedRequest:
    return ForwardedRequest(scope.headers.get("authorization"), body,
                            scope.headers.get(FORWARDED_HEADER) is not None)


# Problem answers by (class, detail, extra members): a flood of forged tokens or of
# requests past their limit gets the same few answers, encoded once. Details never carry
# the request's input (hardening), so the keys are few; the bound is for safety only.
PLAIN_PROBLEMS_MAX = 1024
HEADER_ONLY_EXTRA = frozenset({"retry_after", "allow"})  # they become headers, not members
_plain_problems: dict[tuple, tuple[int, list[tuple[str, str]], bytes]] = {}


def _require(method: str, allowed: str) -> None:
    if method != allowed:
        raise MethodNotAllowed(f"use {allowed}", allow=allowed)


_ACTION_ROUTES = {"votes": "vote", "close": "close", "results": "results"}


def _route_of(path: str) -> str:
    """The route label `_route` would have given `path` (for answers it raised)."""
    parts = path.strip("/").split("/")
    if len(parts) == 4 and parts[:2] == ["v1", "polls"] and parts[3] in _ACTION_ROUTES:
        return _ACTION_ROUTES[parts[3]]
    if len(parts) == 5 and parts[:3] == ["internal", "v1", "polls"] and parts[4] == "summary":
        return "internal-summary"
    if parts == ["v1", "polls"]:
        return "create"
    if parts == ["v1", "challenge"]:
        return "challenge"
    if len(parts) == 1 and parts[0] in ("healthz", "readyz", "metrics"):
        return parts[0]
    return "unmatched"


def _poll_of(path: str) -> str | None:
    parts = path.strip("/").split("/")
    if len(parts) == 4 and parts[:2] == ["v1", "polls"]:
        return parts[2]
    return None


app = App()
