"""Proves the per-country breakdown end to end and the CRDT-vs-recount check at close, on the
local stack's real Redis with a real `votes serve` (4 shards, 2 workers) and `votes results`:

- A poll created with `breakdown: ["country"]` (anything else there is 400) counts the votes per country claim of the
  voter tokens: the ingest role's results, the results role's document and its SSE stream
  show the same countries, equal to the votes acknowledged, and `votes replay verify`
  recounts the same breakdown from the log.
- After the close, each worker compares the merged CRDT counters of its shards with its
  state at the close record: a poll whose counters agree counts nothing, a poll with one
  country counter raised in Redis by hand before the close counts exactly one
  `vote_crdt_recount_disagreements_total` and is logged; `votes replay verify
  --crdt-redis-url` reports no finding (exit 0) for the first and a `crdt` finding naming
  the shard, option and country (exit 1) for the second.
Every non-streaming answer is validated against engine/openapi.yaml.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from pathlib import Path

import redis

from engine.keys import load_keys
from engine.tokens import issue_admin_token, issue_voter_token
from tests.integration.test_results_role import next_event, results_of, results_role
from tests.support import http_client
from tests.support.cli import run_cli
from tests.support.engine_process import EngineProcess
from tests.support.waiting import wait_until

SHARDS = 4
WORKERS = 2
COUNTRIES = ["DE", "FR", "ZZ"]
VOTES = 24
CHECK_WAIT_S = 20.0  # the close check runs at the first full publish (every 5 s) after close
RAISED_BY = 5


def metric_value(base_url: str, name: str) -> float:
    for line in http_client.get(base_url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not exported")


class Polls:
    def __init__(self, engine: EngineProcess) -> None:
        self.engine = engine
        self.keyring = load_keys(engine.data_dir)
        self.admin = {"authorization": f"Bearer {issue_admin_token(self.keyring, ttl_s=600)}"}

    def create(self, poll: str) -> None:
        answer = http_client.post(self.engine.base_url + "/v1/polls", headers=self.admin,
                                  json={"id": poll, "options": ["a", "b"],
                                        "breakdown": ["country"]})
        assert answer.status_code == 201, answer.text
        assert answer.json()["breakdown"] == ["country"]

    def vote_all(self, poll: str, first_voter: int) -> dict[str, dict[str, int]]:
        """VOTES voters of mixed countries, options a/b; the expected breakdown."""
        expected: Counter = Counter()
        for voter in range(first_voter, first_voter + VOTES):
            country, option = COUNTRIES[voter % 3], "ab"[voter % 2]
            token = issue_voter_token(self.keyring, voter, country=country, ttl_s=600)
            answer = http_client.post(f"{self.engine.base_url}/v1/polls/{poll}/votes",
                                      json={"option": option},
                                      headers={"authorization": f"Bearer {token}"})
            assert answer.status_code == 201, answer.text
            expected[(country, option)] += 1
        return {country: {option: expected[(country, option)] for option in "ab"}
                for country in sorted(COUNTRIES)}

    def close(self, poll: str) -> None:
        answer = http_client.post(f"{self.engine.base_url}/v1/polls/{poll}/close",
                                  headers=self.admin)
        assert answer.status_code == 200, answer.text


def verify(data_dir: Path, redis_url: str, poll: str) -> tuple[int, dict]:
    completed = run_cli("replay", "verify", "--data-dir", str(data_dir), "--poll", poll,
                        "--crdt-redis-url", redis_url, "--json", check=False)
    assert completed.returncode in (0, 1), completed.stderr
    return completed.returncode, json.loads(completed.stdout)


async def first_stream_event(results_url: str, poll: str) -> dict:
    async with http_client.async_client_for(timeout_s=10.0) as client, client.stream(
            "GET", f"{results_url}/v1/polls/{poll}/results/stream") as answer:
        assert answer.status_code == 200
        _, data = await next_event(answer.aiter_lines())
        return data


def test_country_breakdown_and_the_crdt_check_at_close(tmp_path: Path, stack_endpoints) -> None:
    redis_url = stack_endpoints["redis"]["url"]
    agreeing, raised = (f"{name}-{uuid.uuid4().hex[:8]}" for name in ("countries", "raised"))
    engine = EngineProcess(tmp_path / "data", tmp_path / "engine.log",
                           {"VOTES_REDIS_URL": redis_url, "VOTES_SHARDS": str(SHARDS)},
                           workers=WORKERS)
    engine.start()
    try:
        engine.wait_ready()
        with results_role(redis_url, tmp_path / "results.log") as results_url:
            polls = Polls(engine)
            for breakdown in (["city"], ["country", "country"], "country"):
                refused = http_client.post(engine.base_url + "/v1/polls", headers=polls.admin,
                                           json={"id": "refused", "options": ["a"],
                                                 "breakdown": breakdown})
                assert refused.status_code == 400, refused.text
                assert refused.headers["content-type"].startswith("application/problem+json")
            polls.create(agreeing)
            polls.create(raised)
            expected = polls.vote_all(agreeing, 1)
            assert polls.vote_all(raised, 1001) == expected  # same mix of countries

            ingest = http_client.get(f"{engine.base_url}/v1/polls/{agreeing}/results").json()
            assert ingest["countries"] == expected
            document = wait_until(lambda: (lambda d: d if d and d["total"] == VOTES else None)(
                results_of(results_url, agreeing)), 10.0, f"results role totals of {VOTES}")
            assert document["countries"] == expected
            assert asyncio.run(first_stream_event(results_url, agreeing))["countries"] == expected

            wait_until(lambda: (results_of(results_url, raised) or {}).get("total") == VOTES,
                       10.0, f"results role totals of {VOTES} for {raised}")
            client = redis.Redis.from_url(redis_url)
            field = next(name.decode() for name in client.hkeys(f"results:{{{raised}}}:merged")
                         if name.decode().startswith("k|local|") and name.decode().endswith("|DE|a"))
            client.hincrby(f"results:{{{raised}}}:merged", field, RAISED_BY)
            before = metric_value(engine.base_url, "vote_crdt_recount_disagreements_total")
            polls.close(agreeing)
            polls.close(raised)
            wait_until(lambda: metric_value(engine.base_url,
                                            "vote_crdt_recount_disagreements_total") >= before + 1,
                       CHECK_WAIT_S, "the close check to count the raised counter")
            # Both polls were checked (each worker holds shards of both); one disagreed.
            wait_until(lambda: engine.log_text().count("disagrees with the log at close") >= 1,
                       CHECK_WAIT_S, "the close check's log line")
            assert f"poll '{raised}'" in engine.log_text()
            assert f"poll '{agreeing}'" not in engine.log_text()
            assert metric_value(engine.base_url,
                                "vote_crdt_recount_disagreements_total") == before + 1
            client.close()

        code, report = verify(engine.data_dir, redis_url, agreeing)
        assert code == 0, report["differences"]
        assert report["polls"][agreeing]["countries"] == expected
        code, report = verify(engine.data_dir, redis_url, raised)
        assert code == 1
        shard = int(field.split("|")[2])
        assert [(item["kind"], item["shard"], item["option"]) for item in report["differences"]
                ] == [("crdt", shard, "a")]
        assert "country 'DE'" in report["differences"][0]["detail"]
    finally:
        engine.stop()
