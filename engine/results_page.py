"""The results page (`/polls/{poll}`, static HTML+JS from engine/static/, no build step) and
the read-only receipt lookup (`GET /v1/receipts/{receipt}`), for the ingest role.

The page is the same bytes for every poll (the script reads the poll id from the path), sent
with a strict Content-Security-Policy (scripts and connections to this origin only, no
inline script, no framing) and the usual hardening headers (engine/security_headers.py).

Receipt lookup: the receipt must decode (else 400 `receipt-invalid`) and name a poll that
exists (else 404). `counted` when its Ed25519 signature and Merkle paths verify with the
engine's public key for its key id: the engine gives a receipt out only after the vote's
record is durable in the shard's log and applied, so a receipt it signed is a counted vote;
`not-counted` when the signature does not verify (a forged or altered receipt). `pending`
when the shard cannot answer yet (its owner is fencing or catching up). `final` says whether
the poll's results are final. The full audit of the log record is `votes replay prove`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from engine.errors import NotReady
from engine.receipts import decode_receipt, verify_receipt
from engine.security_headers import API_HEADERS, PAGE_HEADERS

STATIC_DIRECTORY = Path(__file__).resolve().parent / "static"
PAGE_FILES = {"results.js": "text/javascript", "results.css": "text/css",
              "pow.js": "text/javascript"}
# A page only for a well-formed poll id (the engine's id rule), so an invalid one is a 404
# like everywhere else; whether the poll exists the page's script finds out.
POLL_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


@functools.cache
def static_file(name: str) -> bytes:
    return (STATIC_DIRECTORY / name).read_bytes()


def page_response(parts: list[str]) -> tuple[int, list[tuple[str, str]], bytes] | None:
    """The answer for /polls/{poll} and /polls/static/{file}, or None for other paths."""
    if len(parts) == 2 and parts[0] == "polls" and POLL_ID_PATTERN.fullmatch(parts[1]):
        return 200, [("content-type", "text/html; charset=utf-8"), *PAGE_HEADERS], \
            static_file("results.html")
    if len(parts) == 3 and parts[:2] == ["polls", "static"] and parts[2] in PAGE_FILES:
        return 200, [("content-type", PAGE_FILES[parts[2]]), *PAGE_HEADERS], \
            static_file(parts[2])
    return None


async def receipt_status(node: Any, keyring: Any, receipt_text: str,
                         request: Any = None) -> dict[str, Any]:
    """The receipt's signature offline, then the owner's check of its log and state
    (engine/receipt_lookup.py). Pending while the poll's results or the shard are not
    ready; final once every shard applied the poll's close."""
    receipt = decode_receipt(receipt_text)
    answer = {"poll": receipt.poll, "shard": receipt.shard, "status": "pending",
              "final": False, "option": receipt.option}
    try:
        results = await node.results(receipt.poll)  # PollNotFound: 404
    except NotReady:
        return answer
    public_key = keyring.receipt_public_keys.get(receipt.key_id)
    if public_key is None or not verify_receipt(receipt, public_key):
        return answer | {"status": "not-counted", "final": bool(results["final"])}
    try:
        status = await node.receipt_state(receipt_text, receipt, request)
    except NotReady:
        return answer
    return answer | {"status": status, "final": bool(results["final"]) and status != "pending"}


class LocalStreams:
    """The ingest role's results stream (the embedded default, one port for everything):
    the worker's own merged results, re-read every EVENT_INTERVAL_S while a client listens,
    an event when they change; at most `subscribers_max` streams per worker."""

    def __init__(self, subscribers_max: int) -> None:
        self.subscribers_max = subscribers_max
        self.subscribers = 0

    async def serve(self, node: Any, scope: Any, proto: Any, poll: str) -> None:
        import asyncio
        import hashlib
        import json

        from engine.errors import Overloaded
        from engine.results_sse import EVENT_INTERVAL_S, Snapshot, stream_results

        async def read() -> Snapshot:
            document = await node.results(poll)
            content = {key: value for key, value in document.items() if key != "as_of"}
            event_id = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
            body = json.dumps(document, separators=(",", ":")).encode()
            return Snapshot(document, body, event_id[:16], 0.0)

        def tick() -> asyncio.Event:
            event = asyncio.Event()
            asyncio.get_running_loop().call_later(EVENT_INTERVAL_S, event.set)
            return event

        await read()  # 404 before the stream starts
        if self.subscribers >= self.subscribers_max:
            raise Overloaded(f"this worker already streams to {self.subscribers_max} clients")
        self.subscribers += 1
        try:
            transport = proto.response_stream(200, [
                ("content-type", "text/event-stream"), ("cache-control", "no-store"), *API_HEADERS])
            streaming = asyncio.ensure_future(stream_results(
                read, tick, transport.send_bytes, scope.headers.get("last-event-id")))
            disconnected = asyncio.ensure_future(proto.client_disconnect())
            await asyncio.wait([streaming, disconnected], return_when=asyncio.FIRST_COMPLETED)
            for task in (streaming, disconnected):
                task.cancel()
        finally:
            self.subscribers -= 1
