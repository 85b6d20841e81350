"""Rate limits on a real server (engine/ratelimit.py): one client address over its limit
gets 429 `rate-limited` with Retry-After (whole seconds >= 1) while other addresses keep
getting 201; a voter over the voter limit gets 429 instead of 409; X-Forwarded-For names the
client only when the peer is a trusted proxy; every rejection is in
/metrics (`vote_rejected_total{reason="rate-limited"}`) and in the poll's results under
`rejected.rate-limited`.

Clients take distinct loopback source addresses (127.0.x.y, each its own /24), and the
server is told not to exempt loopback (VOTES_RATELIMIT_EXEMPT_NETWORKS=""), so the limits
apply as they would to remote clients.
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import FLUSH_INTERVAL_S
from tests.support.vote_client import bearer, problem_type

ADDRESS_BURST = 5
VOTER_BURST = 3
LIMITED_ENV = {
    "VOTES_RATELIMIT_EXEMPT_NETWORKS": "",
    # One a minute after the burst: nothing refills during the test.
    "VOTES_RATELIMIT_ADDRESS_PER_S": str(1 / 60),
    "VOTES_RATELIMIT_ADDRESS_BURST": str(ADDRESS_BURST),
    "VOTES_RATELIMIT_PREFIX_PER_S": "1000",
    "VOTES_RATELIMIT_PREFIX_BURST": "1000",
    "VOTES_RATELIMIT_VOTER_PER_S": str(1 / 60),
    "VOTES_RATELIMIT_VOTER_BURST": str(VOTER_BURST),
    "VOTES_TRUSTED_PROXIES": "127.0.8.0/24",
}
FLOOD_VOTES = 15
OTHER_ADDRESSES = ("127.0.3.1", "127.0.4.1")


@pytest.fixture(scope="module")
def engine(server_factory):
    return server_factory(workers=1, env=LIMITED_ENV)


def client_from(engine, address: str) -> httpx.Client:
    return engine.client(transport=httpx.HTTPTransport(local_address=address))


@pytest.fixture(scope="module")
def poll(engine) -> str:
    admin = bearer(engine.admin_token())
    created = client_from(engine, "127.0.9.1").post(
        "/v1/polls", headers=admin, json={"id": "limited", "options": ["a", "b"]})
    assert created.status_code == 201, created.text
    return "limited"


def cast(client: httpx.Client, poll: str, token: str) -> httpx.Response:
    return client.post(f"/v1/polls/{poll}/votes", headers=bearer(token), json={"option": "a"})


def test_one_address_over_its_limit_is_refused_others_are_not(engine, poll) -> None:
    flooder = client_from(engine, "127.0.2.1")
    answers = [cast(flooder, poll, token)
               for token in engine.voter_tokens(1000, FLOOD_VOTES, poll=poll)]
    assert Counter(answer.status_code for answer in answers) == {
        201: ADDRESS_BURST, 429: FLOOD_VOTES - ADDRESS_BURST}
    refused = [answer for answer in answers if answer.status_code == 429]
    assert all(problem_type(answer) == "/problems/rate-limited" for answer in refused)
    assert all(int(answer.headers["retry-after"]) >= 1 for answer in refused)
    # About a minute: what the next admission really waits for at one a minute.
    assert 50 <= int(refused[-1].headers["retry-after"]) <= 60
    for index, address in enumerate(OTHER_ADDRESSES):
        tokens = engine.voter_tokens(2000 + 10 * index, 3, poll=poll)
        assert [cast(client_from(engine, address), poll, token).status_code
                for token in tokens] == [201, 201, 201]


def test_a_voter_over_its_limit_is_refused(engine, poll) -> None:
    client = client_from(engine, "127.0.5.1")
    token = engine.voter_tokens(3000, 1, poll=poll)[0]
    statuses = [cast(client, poll, token).status_code for _ in range(VOTER_BURST + 2)]
    assert statuses == [201] + [409] * (VOTER_BURST - 1) + [429, 429]


def test_forwarded_for_names_the_client_only_behind_a_trusted_proxy(engine, poll) -> None:
    proxy = client_from(engine, "127.0.8.1")
    tokens = iter(engine.voter_tokens(4000, 3 * ADDRESS_BURST + 4, poll=poll))

    def cast_as(client: httpx.Client, forwarded_for: str) -> int:
        return client.post(f"/v1/polls/{poll}/votes", json={"option": "a"},
                           headers={**bearer(next(tokens)), "x-forwarded-for": forwarded_for}
                           ).status_code

    # Behind the proxy each client has its own budget, not the proxy's address.
    assert [cast_as(proxy, "203.0.113.9") for _ in range(ADDRESS_BURST + 1)] == (
        [201] * ADDRESS_BURST + [429])
    assert cast_as(proxy, "198.51.100.20") == 201
    # A peer that is not a trusted proxy cannot rotate its address through the header.
    direct = client_from(engine, "127.0.10.1")
    assert [cast_as(direct, f"192.0.2.{index}") for index in range(ADDRESS_BURST + 2)] == (
        [201] * ADDRESS_BURST + [429, 429])


def rate_limited_metric(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "vote_rejected_total"
               and sample.labels.get("reason") == "rate-limited")


def test_rejections_are_counted_in_metrics_and_results(engine, poll) -> None:
    expected = FLOOD_VOTES - ADDRESS_BURST + 2 + 1 + 2
    client = client_from(engine, "127.0.9.1")
    time.sleep(FLUSH_INTERVAL_S)
    assert rate_limited_metric(client) == expected
    results = client.get(f"/v1/polls/{poll}/results").json()
    assert results["rejected"]["rate-limited"] == expected
