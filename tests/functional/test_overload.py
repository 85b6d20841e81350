"""Load shedding against the real server: a shard whose bounded queue is full answers 503
`overloaded` (problem+json, validated against engine/openapi.yaml), counts nothing for those
votes, and takes votes again once the burst is over.

The server runs one shard with the smallest queue the configuration allows
(`group_queue_votes_max` = `batch_votes_max` = 1, engine/config.py, through VOTES_<FIELD>):
a burst of concurrent votes then finds the queue holding a vote not yet taken by a commit
cycle, and the shard sheds the rest instead of queueing them.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from tests.support.http_client import REQUEST_TIMEOUT_S, ValidatingAsyncClient
from tests.support.vote_client import bearer, problem_type

POLL = "shed"
OPTIONS = ["yes", "no"]
TINY_QUEUE = {"VOTES_SHARDS": "1", "VOTES_BATCH_VOTES_MAX": "1",
              "VOTES_GROUP_QUEUE_VOTES_MAX": "1"}
BURST_VOTES = 300
CONCURRENCY = 64
# Bursts tried until one is shed (each almost surely is; the bound keeps a miss a failure).
BURSTS_MAX = 5
OVERLOADED = "/problems/overloaded"


async def burst(base_url: str, tokens: dict[int, str]) -> dict[int, httpx.Response]:
    """Every voter's vote at once, CONCURRENCY requests open."""
    slots = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with ValidatingAsyncClient(base_url=base_url, limits=limits,
                                     timeout=REQUEST_TIMEOUT_S) as client:
        async def send(voter: int) -> tuple[int, httpx.Response]:
            async with slots:
                return voter, await client.post(f"/v1/polls/{POLL}/votes",
                                                 json={"option": OPTIONS[voter % 2]},
                                                 headers=bearer(tokens[voter]))

        return dict(await asyncio.gather(*(send(voter) for voter in tokens)))


@pytest.fixture(scope="module")
def shedding(server_factory):
    return server_factory(env=TINY_QUEUE)


def test_full_queue_sheds_with_overloaded_and_counts_nothing(shedding) -> None:
    client = shedding.client()
    admin = bearer(shedding.admin_token())
    created = client.post("/v1/polls", headers=admin, json={"id": POLL, "options": OPTIONS})
    assert created.status_code == 201, created.text

    accepted: dict[int, str] = {}  # voter -> receipt
    shed: dict[int, httpx.Response] = {}
    all_tokens: dict[int, str] = {}
    next_voter = 1
    for _ in range(BURSTS_MAX):
        voters = range(next_voter, next_voter + BURST_VOTES)
        next_voter += BURST_VOTES
        tokens = dict(zip(voters, shedding.voter_tokens(voters[0], BURST_VOTES)))
        all_tokens.update(tokens)
        answers = asyncio.run(burst(shedding.base_url, tokens))
        kinds = Counter((answer.status_code, problem_type(answer)) for answer in answers.values())
        assert set(kinds) <= {(201, ""), (503, OVERLOADED)}, kinds
        accepted.update({voter: answer.json()["receipt"] for voter, answer in answers.items()
                         if answer.status_code == 201})
        shed.update({voter: answer for voter, answer in answers.items()
                     if answer.status_code == 503})
        if shed:
            break
    assert shed, f"{BURSTS_MAX} bursts of {BURST_VOTES} votes on a queue of 1: none was shed"
    print(f"\n[overload] {len(accepted)} accepted, {len(shed)} shed with 503 overloaded")

    for answer in shed.values():
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert answer.json()["status"] == 503
    # Nothing was counted for the shed votes: the total is the accepted votes exactly.
    results = client.get(f"/v1/polls/{POLL}/results").json()
    assert results["total"] == len(accepted)
    assert results["counts"] == {option: sum(1 for voter in accepted if OPTIONS[voter % 2] ==
                                             option) for option in OPTIONS}

    # After the burst the shard takes votes again: every shed voter, one at a time, is
    # accepted (a 201, not a 409: the log held nothing of theirs).
    for voter in shed:
        again = client.post(f"/v1/polls/{POLL}/votes", json={"option": OPTIONS[voter % 2]},
                            headers=bearer(all_tokens[voter]))
        assert again.status_code == 201, (voter, again.status_code, again.text)
    assert client.get(f"/v1/polls/{POLL}/results").json()["total"] == len(accepted) + len(shed)
    # An accepted voter is still held once: a repeat answers 409 with the original receipt.
    voter, receipt = next(iter(accepted.items()))
    repeat = client.post(f"/v1/polls/{POLL}/votes", json={"option": OPTIONS[voter % 2]},
                         headers=bearer(all_tokens[voter]))
    assert repeat.status_code == 409 and repeat.json()["receipt"]["receipt"] == receipt
