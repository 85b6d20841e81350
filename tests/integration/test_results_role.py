"""Proves the `results` role (`votes results`, engine/results_app.py) on the local stack's
real Redis, fed by a real `votes serve` publishing to it: GET results equals the votes
acknowledged, with Cache-Control and an ETag that answers 304 until the next vote; the SSE
stream sends the current results, then an event after a new vote without reconnecting,
resumes from Last-Event-ID without repeating what the client saw, and ends with the final
event after the close; beyond its subscriber bound it answers 503 `overloaded` with
Retry-After; an embargoed poll shows no counts (nor a version) until it is closed. Receipt
lookups on the results role: the ingest role's answer for a real receipt, provisional then
final; an altered one not-counted without asking the ingest role; a final answer still
served with the ingest role stopped, any other lookup then 503.
Every non-streaming answer is validated against engine/openapi.yaml.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import msgspec

from engine.keys import load_keys
from engine.receipts import decode_receipt, encode_receipt
from engine.tokens import issue_admin_token, issue_voter_token
from tests.support import http_client
from tests.support.cli import cli_command
from tests.support.engine_process import EngineProcess, free_port
from tests.support.waiting import wait_until

SHARDS = 4
EVENT_WAIT_S = 10.0
SUBSCRIBERS_MAX = 3


@contextmanager
def results_role(redis_url: str, log_path: Path, subscribers_max: int = SUBSCRIBERS_MAX,
                 ingest: EngineProcess | None = None):
    """`votes results` on a free port (asking `ingest` for receipt lookups, with its public
    receipt keys); yields its base URL; stopped with SIGTERM."""
    port = free_port()
    environment = {"VOTES_RESULTS_SUBSCRIBERS_MAX": str(subscribers_max)}
    if ingest is not None:
        environment |= {"VOTES_RESULTS_INGEST_URL": ingest.base_url,
                        "VOTES_RECEIPT_PUBLIC_KEYS_PATH":
                            str(ingest.data_dir / "keys" / "receipt-public.json")}
    with log_path.open("ab") as log:
        process = subprocess.Popen(cli_command("results", "--port", str(port), "--redis-url",
                                               redis_url), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env={**os.environ, **environment},
                                   start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            try:
                return http_client.get(base_url + "/healthz", timeout_s=1.0).status_code == 200
            except httpx.TransportError:
                return False
        wait_until(healthy, 30.0, f"votes results to answer /healthz ({log_path})")
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def publishing_engine(tmp_path: Path, redis_url: str):
    engine = EngineProcess(tmp_path / "data", tmp_path / "engine.log",
                           {"VOTES_REDIS_URL": redis_url, "VOTES_SHARDS": str(SHARDS)})
    engine.start()
    try:
        engine.wait_ready()
        yield engine
    finally:
        engine.stop()


class Voting:
    def __init__(self, engine: EngineProcess) -> None:
        self.keyring = load_keys(engine.data_dir)
        self.base_url = engine.base_url
        self.admin = {"authorization": f"Bearer {issue_admin_token(self.keyring, ttl_s=600)}"}
        self.next_voter = 1

    def create(self, poll: str, embargo: bool = False) -> None:
        answer = http_client.post(self.base_url + "/v1/polls", headers=self.admin,
                                  json={"id": poll, "options": ["a", "b"], "embargo": embargo})
        assert answer.status_code == 201

    def vote(self, poll: str, option: str) -> dict:
        token = issue_voter_token(self.keyring, self.next_voter, ttl_s=600)
        self.next_voter += 1
        answer = http_client.post(f"{self.base_url}/v1/polls/{poll}/votes",
                                  json={"option": option},
                                  headers={"authorization": f"Bearer {token}"})
        assert answer.status_code == 201
        return answer.json()

    def close(self, poll: str) -> None:
        answer = http_client.post(f"{self.base_url}/v1/polls/{poll}/close", headers=self.admin)
        assert answer.status_code == 200


async def next_event(lines, timeout_s: float = EVENT_WAIT_S) -> tuple[str, dict]:
    """The next `results` event of an SSE stream: (id, data), skipping comments."""
    async def read() -> tuple[str, dict]:
        event_id, data = "", None
        async for line in lines:
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "" and data is not None:
                return event_id, data
        raise AssertionError("the stream ended before an event")
    return await asyncio.wait_for(read(), timeout_s)


def results_of(base_url: str, poll: str) -> dict:
    """The poll's results from the results role; {} (falsy) while the role answers 404, as it
    does until the ingest's first publication of the poll reaches Redis (about
    results_publish_ms after its creation)."""
    answer = http_client.get(f"{base_url}/v1/polls/{poll}/results")
    if answer.status_code == 404:
        return {}
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_results_role_serves_caches_and_streams(tmp_path: Path, stack_endpoints) -> None:
    redis_url = stack_endpoints["redis"]["url"]
    poll = f"role-{uuid.uuid4().hex[:8]}"
    with publishing_engine(tmp_path, redis_url) as engine, \
            results_role(redis_url, tmp_path / "results.log") as results_url:
        voting = Voting(engine)
        voting.create(poll)
        for option in ("a", "a", "b"):
            voting.vote(poll, option)
        document = wait_until(lambda: (lambda d: d if d and d["total"] == 3 else None)(
            results_of(results_url, poll)), 10.0, "results role totals of 3")
        assert document["counts"] == {"a": 2, "b": 1} and document["final"] is False
        assert document["regions"] == {"local": {"a": 2, "b": 1}}
        first = http_client.get(f"{results_url}/v1/polls/{poll}/results")
        assert "max-age=1" in first.headers["cache-control"]
        assert "stale-while-revalidate" in first.headers["cache-control"]
        etag = first.headers["etag"]
        same = http_client.get(f"{results_url}/v1/polls/{poll}/results",
                               headers={"if-none-match": etag})
        assert same.status_code == 304 and same.content == b""
        assert http_client.get(f"{results_url}/v1/polls/nope-{poll}/results").status_code == 404
        page = http_client.get(f"{results_url}/polls/{poll}")
        assert page.status_code == 200 and "default-src 'none'" in page.headers[
            "content-security-policy"]
        asyncio.run(stream_scenario(results_url, poll, voting))
        changed = http_client.get(f"{results_url}/v1/polls/{poll}/results",
                                  headers={"if-none-match": etag})
        assert changed.status_code == 200 and changed.json()["final"] is True


async def stream_scenario(results_url: str, poll: str, voting: Voting) -> None:
    url = f"{results_url}/v1/polls/{poll}/results/stream"
    async with http_client.async_client_for(timeout_s=30.0) as client:
        async with client.stream("GET", url) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            event_id, data = await next_event(lines)
            assert data["total"] == 3
            await asyncio.to_thread(voting.vote, poll, "a")
            newer_id, data = await next_event(lines)
            assert data["total"] == 4 and data["counts"] == {"a": 3, "b": 1}
            assert newer_id != event_id
        # Resuming at the id already seen: the first event is the next change, not a repeat.
        async with client.stream("GET", url, headers={"last-event-id": newer_id}) as stream:
            lines = stream.aiter_lines()
            await asyncio.to_thread(voting.vote, poll, "b")
            _, data = await next_event(lines)
            assert data["total"] == 5
        await bound_scenario(client, url)
        async with client.stream("GET", url) as stream:
            lines = stream.aiter_lines()
            _, data = await next_event(lines)
            assert data["total"] == 5 and data["final"] is False
            await asyncio.to_thread(voting.close, poll)
            while not data["final"]:
                _, data = await next_event(lines)
            assert data["counts"] == {"a": 3, "b": 2}
            assert [line async for line in lines if line.startswith("data: ")] == []


async def bound_scenario(client: httpx.AsyncClient, url: str) -> None:
    """SUBSCRIBERS_MAX streams are held; one more is refused with a clear 503."""
    streams = [await client.send(client.build_request("GET", url), stream=True)
               for _ in range(SUBSCRIBERS_MAX)]
    try:
        assert [stream.status_code for stream in streams] == [200] * SUBSCRIBERS_MAX
        refused = await client.get(url)
        assert refused.status_code == 503
        assert refused.json()["type"] == "/problems/overloaded"
        assert refused.headers["retry-after"] == "1"
    finally:
        for stream in streams:
            await stream.aclose()
    async def admitted() -> bool:
        async with client.stream("GET", url) as stream:
            return stream.status_code == 200
    await asyncio.sleep(0.2)  # the server notices the closed streams on their next write
    for _ in range(50):
        if await admitted():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("streams closed by their clients were not released")


def test_embargo_hides_counts_until_close(tmp_path: Path, stack_endpoints) -> None:
    redis_url = stack_endpoints["redis"]["url"]
    poll = f"embargo-{uuid.uuid4().hex[:8]}"
    with publishing_engine(tmp_path, redis_url) as engine, \
            results_role(redis_url, tmp_path / "results.log") as results_url:
        voting = Voting(engine)
        voting.create(poll, embargo=True)
        voting.vote(poll, "a")
        voting.vote(poll, "b")
        hidden = wait_until(lambda: (lambda d: d if d and d["rejected"] is not None else None)(
            results_of(results_url, poll)), 10.0, "embargoed results")
        assert hidden["embargoed"] is True and hidden["counts"] == {} and hidden["total"] == 0
        assert hidden["regions"] == {} and hidden["version"] == 0
        voting.close(poll)
        shown = wait_until(lambda: (lambda d: d if d and d["final"] else None)(
            results_of(results_url, poll)), 10.0, "final results after the close")
        assert shown["embargoed"] is False and shown["counts"] == {"a": 1, "b": 1}


def ingest_receipt_lookups(engine: EngineProcess) -> float:
    """How many receipt lookups the ingest role answered (its /metrics)."""
    metrics = http_client.get(engine.base_url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("vote_requests_total{") and 'route="receipt"' in line)


def test_results_role_looks_up_receipts_through_the_ingest_role(tmp_path: Path,
                                                                 stack_endpoints) -> None:
    redis_url = stack_endpoints["redis"]["url"]
    poll = f"receipts-{uuid.uuid4().hex[:8]}"
    with publishing_engine(tmp_path, redis_url) as engine, \
            results_role(redis_url, tmp_path / "results.log", ingest=engine) as results_url:
        voting = Voting(engine)
        voting.create(poll)
        first, second = voting.vote(poll, "a")["receipt"], voting.vote(poll, "b")["receipt"]
        wait_until(lambda: results_of(results_url, poll).get("total") == 2, 10.0,
                   "results role totals of 2")

        looked_up = http_client.get(f"{results_url}/v1/receipts/{first}")
        assert looked_up.status_code == 200, looked_up.text
        assert looked_up.json() == {"poll": poll, "shard": looked_up.json()["shard"],
                                    "status": "counted", "final": False, "option": "a"}
        assert looked_up.json() == http_client.get(f"{engine.base_url}/v1/receipts/{first}").json()
        assert looked_up.headers["cache-control"] == "no-store"

        # Altered (the other option): its leaf no longer matches the signed root, so the
        # results role answers alone, and the ingest role sees no lookup.
        asked_before = ingest_receipt_lookups(engine)
        altered = encode_receipt(msgspec.structs.replace(decode_receipt(first), option="b"))
        answer = http_client.get(f"{results_url}/v1/receipts/{altered}")
        assert answer.status_code == 200 and answer.json()["status"] == "not-counted"
        assert ingest_receipt_lookups(engine) == asked_before

        malformed = http_client.get(f"{results_url}/v1/receipts/r2.not-a-receipt")
        assert malformed.status_code == 400
        assert malformed.json()["type"] == "/problems/receipt-invalid"
        other_poll = encode_receipt(msgspec.structs.replace(decode_receipt(first), poll="nosuch"))
        assert http_client.get(f"{results_url}/v1/receipts/{other_poll}").status_code == 404

        voting.close(poll)
        wait_until(lambda: results_of(results_url, poll).get("final") is True, 10.0,
                   "final results on the results role")
        final = http_client.get(f"{results_url}/v1/receipts/{first}")
        assert final.json()["status"] == "counted" and final.json()["final"] is True
        assert final.headers["cache-control"] == "public, max-age=86400, immutable"

        engine.stop()
        # A final answer cannot change: kept, it is served without the ingest role; any
        # other lookup now has no one to ask, and says so instead of guessing.
        kept = http_client.get(f"{results_url}/v1/receipts/{first}")
        assert kept.status_code == 200 and kept.json() == final.json()
        unknown = http_client.get(f"{results_url}/v1/receipts/{second}")
        assert unknown.status_code == 503, unknown.text
        assert unknown.json()["type"] == "/problems/not-ready"


def test_results_role_without_an_ingest_url_points_receipts_to_the_ingest_role(
        tmp_path: Path, stack_endpoints) -> None:
    with results_role(stack_endpoints["redis"]["url"], tmp_path / "results.log") as results_url:
        answer = http_client.get(f"{results_url}/v1/receipts/r2.anything")
    assert answer.status_code == 404
    assert "results_ingest_url" in answer.json()["detail"]
