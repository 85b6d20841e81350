"""The `results` role (`votes results`): an RSGI app (Granian) that serves merged results
from Redis and holds no shard state.

- GET /v1/polls/{poll}/results: the merged results, `Cache-Control: public, max-age=1,
  stale-while-revalidate=5` (a CDN turns many viewers into about one origin request per
  edge per second) and a strong ETag (the merge version), 304 on If-None-Match.
- GET /v1/polls/{poll}/results/stream: Server-Sent Events (engine/results_sse.py), a
  bounded number per process (503 `overloaded` beyond it, with Retry-After).
- GET /v1/receipts/{receipt}: whether a receipt's vote counted, checked offline and then
  by the ingest role (engine/results_receipts.py); 404 when `results_ingest_url` is unset.
- GET /polls/{poll}: the results page (engine/results_page.py), whose receipt box asks the
  endpoint above.
- GET /healthz.
Bad input answers problem+json through engine/problems.py, as the ingest role does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from engine.config import Config, config_from_parent
from engine.errors import MethodNotAllowed, NotFound, Overloaded, PollNotFound, VotesError
from engine.logs import configure_logging
from engine.problems import problem_of
from engine.results_page import page_response
from engine.results_receipts import IngestReceipts, cache_control
from engine.results_sse import ResultsHub
from engine.security_headers import API_HEADERS

log = logging.getLogger("votes.results")

IDENTIFIER_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
CACHE_CONTROL = "public, max-age=1, stale-while-revalidate=5"
REDIS_TIMEOUT_S = 2.0
RETRY_AFTER_S = "1"
# Every SSE send completes on Granian's Rust runtime thread, which needs the GIL that this
# worker's event loop holds while it serves a herd of woken streams: at Python's default
# 5 ms the runtime waited up to 5 ms per hand-over. perf/bench_results_fanout.py at 10,000
# streams, 10 updates/s: p99 1,358 ms at 5 ms, 644 ms at 0.5 ms, 696 ms at 0.1 ms; at 5,000
# streams 655, 405, 293 ms. This process runs no other Python thread, so nothing else pays.
GIL_SWITCH_INTERVAL_S = 0.0001


def poll_id(text: str) -> str:
    if not 1 <= len(text) <= 64 or not set(text) <= IDENTIFIER_CHARS:
        raise PollNotFound("no poll with this id: ids are 1-64 characters of A-Z a-z 0-9 _ -")
    return text


def problem_response(exc: VotesError) -> tuple[int, list[tuple[str, str]], bytes]:
    problem = problem_of(exc)
    headers = [("content-type", "application/problem+json")]
    if isinstance(exc, MethodNotAllowed):
        headers.append(("allow", "GET"))
    if isinstance(exc, Overloaded):
        headers.append(("retry-after", RETRY_AFTER_S))
    body = {"type": f"/problems/{problem.slug}", "title": problem.title,
            "status": problem.status, "detail": exc.detail or problem.title}
    return problem.status, headers, json.dumps(body).encode()


class ResultsApp:
    def __init__(self) -> None:
        self.hub: ResultsHub | None = None
        self.receipts: IngestReceipts | None = None

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import redis.asyncio

        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)

        config: Config = config_from_parent()
        configure_logging()
        client = redis.asyncio.Redis.from_url(config.redis_url, socket_timeout=REDIS_TIMEOUT_S,
                                              socket_connect_timeout=REDIS_TIMEOUT_S)
        self.hub = ResultsHub(client, config.results_subscribers_max, sent_at_once)
        self.hub.start(loop)
        if config.results_ingest_url:  # `votes results` checked the public keys load
            self.receipts = IngestReceipts.from_config(config)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.hub is not None:
            loop.run_until_complete(self.hub.stop())
        if self.receipts is not None:
            loop.run_until_complete(self.receipts.aclose())

    async def __rsgi__(self, scope, proto) -> None:
        if scope.proto != "http":
            return
        security_headers = API_HEADERS  # the page's answers carry their own, stricter set
        try:
            parts = scope.path.strip("/").split("/")
            if scope.method != "GET":
                if parts[:2] in (["v1", "polls"], ["v1", "receipts"]) or parts == ["healthz"]:
                    raise MethodNotAllowed("use GET", allow="GET")
                raise NotFound("no route for this path")
            if len(parts) == 4 and parts[:2] == ["v1", "polls"] and parts[3] == "results":
                status, headers, body = await self._results(scope, poll_id(parts[2]))
            elif len(parts) == 5 and parts[:2] == ["v1", "polls"] and parts[3:] == [
                    "results", "stream"]:
                await self._stream(scope, proto, poll_id(parts[2]))
                return
            elif len(parts) == 3 and parts[:2] == ["v1", "receipts"]:
                status, headers, body = await self._receipt(parts[2])
            elif parts[0] == "polls" and (page := page_response(parts)) is not None:
                status, headers, body = page
                security_headers = []
            elif parts == ["healthz"]:
                status, headers, body = 200, [("content-type", "application/json")], \
                    b'{"status":"ok"}'
            else:
                raise NotFound("no route for this path")
        except VotesError as exc:
            status, headers, body = problem_response(exc)
        except Exception:  # Redis down or a defect: no details to the client
            log.exception("results: unhandled error")  # nothing of the request: it is input
            status, headers, body = problem_response(_unavailable())
        proto.response_bytes(status, headers + security_headers, body)

    def _hub(self) -> ResultsHub:
        if self.hub is None:
            raise _unavailable()
        return self.hub

    async def _results(self, scope, poll: str):
        snapshot = await self._hub().snapshot(poll)
        etag = f'"{snapshot.event_id}"'
        headers = [("cache-control", CACHE_CONTROL), ("etag", etag)]
        if scope.headers.get("if-none-match") == etag:
            return 304, headers, b""
        return 200, [("content-type", "application/json"), *headers], snapshot.body

    async def _receipt(self, receipt_text: str):
        if self.receipts is None:
            raise NotFound("this results process does not look up receipts (results_ingest_url "
                           "is not set); ask the ingest role's GET /v1/receipts/{receipt}")
        hub = self._hub()

        async def poll_final(poll: str) -> bool:
            return bool((await hub.snapshot(poll_id(poll))).document["final"])

        answer = await self.receipts.status(receipt_text, poll_final)
        return 200, [("content-type", "application/json"),
                     ("cache-control", cache_control(answer))], json.dumps(answer).encode()

    async def _stream(self, scope, proto, poll: str) -> None:
        hub = self._hub()
        snapshot = await hub.snapshot(poll)  # 404 before the stream starts
        hub.admit()
        subscriber = None
        try:
            transport = proto.response_stream(200, [
                ("content-type", "text/event-stream"), ("cache-control", "no-store"),
                ("x-accel-buffering", "no"), *API_HEADERS])
            subscriber = hub.subscribe(poll, transport.send_bytes,
                                       scope.headers.get("last-event-id"), snapshot)
            disconnected = asyncio.ensure_future(proto.client_disconnect())
            await asyncio.wait([subscriber.ended, disconnected],
                               return_when=asyncio.FIRST_COMPLETED)
            disconnected.cancel()
        finally:
            if subscriber is not None:
                hub.unsubscribe(poll, subscriber)
            hub.leave()


def sent_at_once(pending: object) -> bool:
    """Granian 2 answers a send its channel took at once with an empty awaitable (not
    importable, so known by name): the broadcast skips awaiting it. Any other awaitable (a
    full channel, another Granian) is awaited off the broadcast, so a wrong name only costs
    speed, never an event."""
    return type(pending).__name__ == "PyEmptyAwaitable"


def _unavailable() -> VotesError:
    from engine.errors import NotReady

    return NotReady("the results store (Redis) cannot be reached; retry shortly")


app = ResultsApp()
