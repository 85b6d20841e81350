"""Proof-of-work on a real two-worker server that asks every vote for it
(VOTES_CHALLENGE_DIFFICULTY_BITS_MIN): a vote without a solution gets 428
`challenge-required` carrying a challenge; that challenge solved (engine/challenge.py
`solve`) is accepted with 201; the same solution again gets 409 `already-voted` on whichever
worker takes it (the challenge is bound to the voter and poll, so a second use is a
duplicate); another voter's or another poll's solution gets 403 `challenge-failed`;
`GET /v1/challenge` needs the voter's token and a strict query. Every rejection is counted by
reason in /metrics and in the results' `rejected`. Every answer is validated against
engine/openapi.yaml by the client.
"""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.challenge import CHALLENGE_HEADER, SOLUTION_HEADER, solve
from engine.metrics import FLUSH_INTERVAL_S
from tests.support.vote_client import bearer, problem_type

BITS = 12
POLL = "pow"


@pytest.fixture(scope="module")
def engine(server_factory):
    return server_factory(workers=2, env={"VOTES_CHALLENGE_DIFFICULTY_BITS_MIN": str(BITS)})


@pytest.fixture(scope="module")
def client(engine):
    return engine.client()


@pytest.fixture(scope="module")
def poll(engine, client) -> str:
    created = client.post("/v1/polls", headers=bearer(engine.admin_token()),
                          json={"id": POLL, "options": ["a", "b"]})
    assert created.status_code == 201, created.text
    return POLL


def cast(client, poll: str, token: str, challenge: str | None = None,
         solution: str | None = None):
    headers = bearer(token)
    if challenge is not None:
        headers[CHALLENGE_HEADER] = challenge
    if solution is not None:
        headers[SOLUTION_HEADER] = solution
    return client.post(f"/v1/polls/{poll}/votes", headers=headers, json={"option": "a"})


def test_a_vote_must_solve_and_a_solution_counts_once(engine, client, poll) -> None:
    token = engine.voter_tokens(100, 1, poll=poll)[0]
    asked = cast(client, poll, token)
    assert asked.status_code == 428 and problem_type(asked) == "/problems/challenge-required"
    document = asked.json()["challenge"]
    assert document["difficulty_bits"] == BITS
    solution = solve(document["challenge"], BITS)
    answer = cast(client, poll, token, document["challenge"], solution)
    assert answer.status_code == 201, answer.text
    # Each on a new connection, so both workers take some: a duplicate on every one.
    for _ in range(6):
        again = engine.client().post(
            f"/v1/polls/{poll}/votes", json={"option": "b"},
            headers={**bearer(token), CHALLENGE_HEADER: document["challenge"],
                     SOLUTION_HEADER: solution})
        assert again.status_code == 409 and problem_type(again) == "/problems/already-voted"
        assert again.json()["receipt"]["receipt"] == answer.json()["receipt"]


def test_a_solution_of_another_voter_or_poll_fails(engine, client, poll) -> None:
    first, second = engine.voter_tokens(200, 2, poll=poll)
    document = cast(client, poll, first).json()["challenge"]
    solution = solve(document["challenge"], BITS)
    stolen = cast(client, poll, second, document["challenge"], solution)
    assert stolen.status_code == 403 and problem_type(stolen) == "/problems/challenge-failed"
    assert stolen.json()["challenge"]["challenge"] != document["challenge"]
    wrong = cast(client, poll, first, document["challenge"], "x")
    assert wrong.status_code == 403 and problem_type(wrong) == "/problems/challenge-failed"
    assert cast(client, poll, first, document["challenge"], solution).status_code == 201


def test_the_challenge_endpoint(engine, client, poll) -> None:
    token = engine.voter_tokens(300, 1)[0]  # an unbound token: any poll
    answer = client.get("/v1/challenge", params={"poll": poll}, headers=bearer(token))
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert document["algorithm"] == "sha256" and document["difficulty_bits"] == BITS
    solution = solve(document["challenge"], BITS)
    assert cast(client, poll, token, document["challenge"], solution).status_code == 201
    assert client.get("/v1/challenge", params={"poll": poll}).status_code == 401
    for query in ({}, {"poll": poll, "other": "1"}):
        refused = client.get("/v1/challenge", params=query, headers=bearer(token))
        assert refused.status_code == 400 and problem_type(refused) == "/problems/bad-request"
    bound = engine.voter_tokens(301, 1, poll=poll)[0]
    other = client.get("/v1/challenge", params={"poll": "elsewhere"}, headers=bearer(bound))
    assert other.status_code == 403


def rejected_metric(client, reason: str) -> float:
    text = client.get("/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "vote_rejected_total" and sample.labels.get("reason") == reason)


def test_rejections_are_counted_in_metrics_and_results(engine, client, poll) -> None:
    time.sleep(FLUSH_INTERVAL_S)
    # 428: one per test above; 403: the stolen and the wrong solution.
    assert rejected_metric(client, "challenge-required") == 2
    assert rejected_metric(client, "challenge-failed") == 2
    rejected = client.get(f"/v1/polls/{poll}/results").json()["rejected"]
    assert rejected["challenge-required"] == 2 and rejected["challenge-failed"] == 2


def test_the_results_page_solver_in_chromium_is_accepted(engine, client, poll) -> None:
    """engine/static/pow.js, loaded by the results page in headless Debian chromium, solves
    a challenge of `GET /v1/challenge`; the vote carrying its solution is counted. Both
    solvers try 0, 1, 2, ... so pow.js must find the Python solver's solution exactly."""
    from playwright.sync_api import sync_playwright

    from deploy.local.installer import ensure_debian_package

    chromium = ensure_debian_package("chromium", "chromium")
    token = engine.voter_tokens(400, 1, poll=poll)[0]
    document = client.get("/v1/challenge", params={"poll": poll}, headers=bearer(token)).json()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{engine.base_url}/polls/{poll}")
            page.wait_for_function("window.votesPow !== undefined", timeout=10_000)
            solution = page.evaluate("([text, bits]) => window.votesPow.solve(text, bits)",
                                     [document["challenge"], document["difficulty_bits"]])
        finally:
            browser.close()
    assert solution == solve(document["challenge"], BITS)
    answer = cast(client, poll, token, document["challenge"], solution)
    assert answer.status_code == 201, answer.text
