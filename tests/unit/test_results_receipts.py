"""engine/results_receipts.py's handling of the ingest role's answers: only a 200 that fits
the documented schema is relayed; anything else (an error status, a body that is not the
schema, a connection refused) is 503 `not-ready`, never a 500 or a guessed status; and the
lookups in flight are bounded (beyond: 503 `overloaded`). The ingest role here is a fake
transport: what is under test is the relaying, and the real round trip is
tests/integration/test_results_role.py's."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from engine.errors import NotReady, Overloaded
from engine.results_receipts import IngestReceipts

ANSWER = {"poll": "p", "shard": 3, "status": "counted", "final": False, "option": "a"}


def receipts_answering(handler) -> IngestReceipts:
    receipts = IngestReceipts("http://ingest.invalid", {}, timeout_s=1.0, connections_max=2)
    receipts.http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return receipts


def test_a_documented_answer_is_relayed() -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json=ANSWER)

    answer = asyncio.run(receipts_answering(handler)._ask_ingest("r1.abc_-"))
    assert answer.status == "counted" and answer.shard == 3
    assert seen == ["/v1/receipts/r1.abc_-"]


@pytest.mark.parametrize("response", [
    httpx.Response(500, json={"title": "boom"}),
    httpx.Response(503, json={"type": "/problems/not-ready"}),
    httpx.Response(200, content=b"not json"),
    httpx.Response(200, json=ANSWER | {"status": "probably"}),
    httpx.Response(200, json=ANSWER | {"extra": 1}),
    httpx.Response(200, content=json.dumps(ANSWER).encode() + b" " * 5000),
])
def test_anything_else_is_not_ready(response: httpx.Response) -> None:
    with pytest.raises(NotReady):
        asyncio.run(receipts_answering(lambda request: response)._ask_ingest("r1.x"))


def test_an_unreachable_ingest_is_not_ready() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(NotReady, match="ConnectError"):
        asyncio.run(receipts_answering(refuse)._ask_ingest("r1.x"))


def test_lookups_in_flight_are_bounded() -> None:
    async def run() -> list:
        release = asyncio.Event()

        async def slow(request: httpx.Request) -> httpx.Response:
            await release.wait()
            return httpx.Response(200, json=ANSWER)

        receipts = receipts_answering(slow)
        first = [asyncio.ensure_future(receipts._ask_ingest("r1.x")) for _ in range(2)]
        await asyncio.sleep(0.05)  # both hold their slot
        with pytest.raises(Overloaded):
            await receipts._ask_ingest("r1.x")
        release.set()
        return await asyncio.gather(*first)

    assert [answer.status for answer in asyncio.run(run())] == ["counted", "counted"]
