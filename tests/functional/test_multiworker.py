"""One server with three workers sharing one listening socket behaves like one engine.

Proves that votes landing on any worker are forwarded to their shard's owner and counted
exactly once, that a poll created or closed through one worker is known to every shard
at once, and that results served by any worker converge to the exact totals and then stay
there. How fast they converge (the realtime budget) is perf/'s to measure: here the wait
is only bounded, generously, so a loaded machine does not fail a correct engine.
"""

from __future__ import annotations

import itertools
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.vote_client import bearer
from tests.support.waiting import wait_until

WORKERS = 3
VOTERS = 200
THREADS = 32
# Owners publish results every ~100 ms; these bound the waits, they do not time them.
RESULTS_FRESH_S = 30.0
FINAL_WAIT_S = 30.0
RESULT_READS = 30
OPTIONS = ["a", "b", "c"]

_poll_numbers = itertools.count()


# A fresh connection per request lets the kernel hand each one to any of the workers.
FRESH_CONNECTION = {"Connection": "close"}


@pytest.fixture(scope="module")
def cluster(server_factory):
    return server_factory(workers=WORKERS)


@pytest.fixture(scope="module")
def client(cluster) -> httpx.Client:
    return cluster.client(headers=FRESH_CONNECTION)


@pytest.fixture(scope="module")
def admin(cluster) -> dict[str, str]:
    return bearer(cluster.admin_token())


@pytest.fixture(scope="module")
def shards_total(client) -> int:
    body = client.get("/readyz").json()
    assert (body["ready"], body["workers"]) == (True, WORKERS)
    assert body["shards_ready"] == body["shards_total"]
    return body["shards_total"]


def create_poll(client: httpx.Client, admin: dict[str, str]) -> str:
    poll = f"multi-{next(_poll_numbers)}"
    response = client.post("/v1/polls", headers=admin, json={"id": poll, "options": OPTIONS})
    assert response.status_code == 201, response.text
    return poll


def vote(client: httpx.Client, poll: str, token: str, option: str) -> httpx.Response:
    return client.post(f"/v1/polls/{poll}/votes", headers=bearer(token), json={"option": option})


def results(client: httpx.Client, poll: str) -> dict:
    """Results, with `counts` listing every option (the server may omit zeros)."""
    response = client.get(f"/v1/polls/{poll}/results")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body["counts"]) <= set(OPTIONS), body
    body["counts"] = {option: body["counts"].get(option, 0) for option in OPTIONS}
    return body


def converge(client: httpx.Client, poll: str, done, timeout_s: float, what: str) -> dict:
    """Read results until `done(body)` (return that body); fail the test after timeout_s."""
    def reached() -> dict | None:
        body = results(client, poll)
        return body if done(body) else None

    return wait_until(reached, timeout_s, f"results of {poll} to show {what}")


def vote_all(client: httpx.Client, poll: str, tokens: list[str],
             options: list[str]) -> list[httpx.Response]:
    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(lambda pair: vote(client, poll, *pair), zip(tokens, options)))


def test_many_voters_count_once_and_results_agree_on_every_worker(
        cluster, client, admin, shards_total) -> None:
    poll = create_poll(client, admin)
    first_voter = 10_000
    tokens = cluster.voter_tokens(first_voter, VOTERS)
    options = ["abc"[(voter * 7) % 3] for voter in range(VOTERS)]
    sent = {option: options.count(option) for option in OPTIONS}

    answers = vote_all(client, poll, tokens, options)
    assert Counter(a.status_code for a in answers) == {201: VOTERS}, \
        [a.text for a in answers if a.status_code != 201][:5]
    receipts = [a.json() for a in answers]
    assert [r["shard"] for r in receipts] == [
        (first_voter + n) % shards_total for n in range(VOTERS)]
    assert len({(r["shard"], r["offset"], r["index"]) for r in receipts}) == VOTERS

    # Converge: every worker publishes its shards' counts; no read ever over-counts.
    def full(body: dict) -> bool:
        assert body["total"] <= VOTERS and all(
            body["counts"][o] <= n for o, n in sent.items()), body
        return body["counts"] == sent

    body = converge(client, poll, full, RESULTS_FRESH_S, f"the {VOTERS} votes sent")
    assert (body["counts"], body["total"]) == (sent, VOTERS)

    # Then stay: reads on fresh connections, landing on any worker, all show the full totals.
    reads = [results(client, poll) for _ in range(RESULT_READS)]
    assert [(r["counts"], r["total"]) for r in reads] == [(sent, VOTERS)] * RESULT_READS

    # Every voter voted once: repeats answer 409 with that voter's original receipt.
    repeats = vote_all(client, poll, tokens, ["a"] * VOTERS)
    assert Counter(a.status_code for a in repeats) == {409: VOTERS}
    assert [a.json()["receipt"]["receipt"] for a in repeats] == [r["receipt"] for r in receipts]
    # Each repeat is counted as one rejection, wherever it landed, and nothing more.
    body = converge(client, poll, lambda b: sum(b["rejected"].values()) >= VOTERS,
                    RESULTS_FRESH_S, f"{VOTERS} rejections")
    assert (body["total"], sum(body["rejected"].values())) == (VOTERS, VOTERS), body


def test_new_poll_is_known_to_every_shard_at_once(cluster, client, admin, shards_total) -> None:
    poll = create_poll(client, admin)
    # Voters 20000.. cover every shard (shard = voter mod S), twice over.
    tokens = cluster.voter_tokens(20_000, 2 * shards_total)
    answers = vote_all(client, poll, tokens, ["b"] * len(tokens))
    assert Counter(a.status_code for a in answers) == {201: len(tokens)}, \
        [a.text for a in answers if a.status_code != 201][:5]
    assert {a.json()["shard"] for a in answers} == set(range(shards_total))


def test_close_is_final_on_every_worker(cluster, client, admin, shards_total) -> None:
    poll = create_poll(client, admin)
    early = cluster.voter_tokens(30_000, shards_total)
    assert Counter(a.status_code for a in vote_all(client, poll, early, ["c"] * len(early))) \
        == {201: len(early)}

    closed = client.post(f"/v1/polls/{poll}/close", headers=admin)
    assert closed.status_code == 200 and closed.json()["closed"] is True

    # Every shard has the close record before it answers: late votes, any worker, any shard.
    late = cluster.voter_tokens(40_000, 2 * shards_total)
    answers = vote_all(client, poll, late, ["a"] * len(late))
    assert Counter((a.status_code, a.json()["type"]) for a in answers) == {
        (422, "/problems/poll-closed"): len(late)}

    body = converge(client, poll, lambda b: b["final"], FINAL_WAIT_S, "final: true")
    assert body["final"] is True, body
    body = converge(client, poll, lambda b: sum(b["rejected"].values()) >= len(late),
                    RESULTS_FRESH_S, f"{len(late)} rejections")
    reads = [results(client, poll) for _ in range(RESULT_READS)]
    assert {(r["final"], r["total"], r["counts"]["c"], r["counts"]["a"],
             sum(r["rejected"].values())) for r in reads} == {
        (True, len(early), len(early), 0, len(late))}
