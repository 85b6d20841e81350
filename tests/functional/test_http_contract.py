"""The HTTP contract (v1) of one real server with one worker.

Proves each documented outcome of every endpoint: status, problem type and body shape
(every response is validated against engine/openapi.yaml by the client), and that counts
are exact: a 201 counts once, a repeat answers 409 with the original receipt, and every
other rejection counts nowhere.
"""

from __future__ import annotations

import datetime
import itertools
import json
import re
import shutil
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support import cli
from tests.support.vote_client import bearer
from tests.support.waiting import wait_until

_poll_numbers = itertools.count()
FINAL_WAIT_S = 5.0
# A poll with closes_at this far ahead: time for one vote before it closes by itself.
CLOSES_IN_S = 3.0


def new_poll_id(prefix: str) -> str:
    return f"{prefix}-{next(_poll_numbers)}"


def create_poll(client: httpx.Client, admin: dict[str, str], options=("a", "b", "c"),
                **fields) -> str:
    poll = new_poll_id(fields.pop("prefix", "poll"))
    response = client.post("/v1/polls", headers=admin,
                           json={"id": poll, "options": list(options), **fields})
    assert response.status_code == 201, response.text
    return poll


def vote(client: httpx.Client, poll: str, token: str, option: str) -> httpx.Response:
    return client.post(f"/v1/polls/{poll}/votes", headers=bearer(token), json={"option": option})


def problem_type(response: httpx.Response) -> str:
    return response.json()["type"]


def rejected_total(body: dict) -> int:
    """All rejections counted for a poll, whatever the reason names are."""
    return sum(body["rejected"].values())


def results(client: httpx.Client, poll: str) -> dict:
    response = client.get(f"/v1/polls/{poll}/results")
    assert response.status_code == 200, response.text
    return response.json()


def wait_final(client: httpx.Client, poll: str) -> dict:
    """Results once final: close records apply on every shard within a bounded time."""
    return wait_until(lambda: (body := results(client, poll))["final"] and body,
                      FINAL_WAIT_S, f"results of {poll} to be final after close")


def flip_middle(text: str) -> str:
    """`text` with one character near its middle changed to another of the same alphabet."""
    middle = len(text) // 2
    while not text[middle].isalnum():
        middle += 1
    replacement = "B" if text[middle] == "A" else "A"
    return text[:middle] + replacement + text[middle + 1:]


def rfc3339(moment: datetime.datetime) -> str:
    """Whole seconds: the contract does not promise sub-second precision for poll times."""
    whole = moment.astimezone(datetime.UTC).replace(microsecond=0)
    return whole.isoformat().replace("+00:00", "Z")


def counts_of(body: dict, options=("a", "b", "c")) -> dict[str, int]:
    """Counts per option with absent options as 0 (the server may list zeros or omit them)."""
    assert set(body["counts"]) <= set(options), body
    return {option: body["counts"].get(option, 0) for option in options}


# Poll creation and administration.

def test_create_poll_answers_the_poll(client, admin) -> None:
    poll = new_poll_id("create")
    closes_at = rfc3339(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1))
    response = client.post("/v1/polls", headers=admin, json={
        "id": poll, "options": ["x", "y"], "closes_at": closes_at, "embargo": False})
    assert response.status_code == 201
    body = response.json()
    assert (body["id"], body["options"], body["opens_at"], body["embargo"]) == (
        poll, ["x", "y"], None, False)
    assert datetime.datetime.fromisoformat(body["closes_at"]) == \
        datetime.datetime.fromisoformat(closes_at)
    assert counts_of(results(client, poll), ("x", "y")) == {"x": 0, "y": 0}


def test_duplicate_create_is_poll_exists(client, admin) -> None:
    poll = create_poll(client, admin)
    again = client.post("/v1/polls", headers=admin, json={"id": poll, "options": ["z"]})
    assert (again.status_code, problem_type(again)) == (409, "/problems/poll-exists")
    assert counts_of(results(client, poll)) == {"a": 0, "b": 0, "c": 0}


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": "p", "options": ["a"]',
        b"not json",
        b"",
        b'["p", ["a"]]',
        json.dumps({"id": 5, "options": ["a"]}).encode(),
        json.dumps({"id": "p", "options": "a"}).encode(),
        json.dumps({"id": "p", "options": [1, 2]}).encode(),
        json.dumps({"id": "p", "options": ["a"], "embargo": "yes"}).encode(),
        json.dumps({"id": "p", "options": ["a"], "opens_at": "tomorrow"}).encode(),
        json.dumps({"id": "p", "options": ["a"], "colour": "red"}).encode(),
        json.dumps({"options": ["a"]}).encode(),
        json.dumps({"id": "p"}).encode(),
        json.dumps({"id": "p", "options": []}).encode(),
        json.dumps({"id": "p", "options": ["a", "a"]}).encode(),
        json.dumps({"id": "p", "options": [f"o{i}" for i in range(65)]}).encode(),
        json.dumps({"id": "p", "options": [""]}).encode(),
        json.dumps({"id": "p", "options": ["has space"]}).encode(),
        json.dumps({"id": "", "options": ["a"]}).encode(),
        json.dumps({"id": "bad id", "options": ["a"]}).encode(),
        json.dumps({"id": "p/q", "options": ["a"]}).encode(),
        json.dumps({"id": "p" * 65, "options": ["a"]}).encode(),
    ],
    ids=[
        "truncated-json", "not-json", "empty", "array", "id-int", "options-string",
        "options-ints", "embargo-string", "opens-at-not-date", "unknown-field", "missing-id",
        "missing-options", "empty-options", "duplicate-options", "65-options", "empty-option",
        "option-with-space", "empty-id", "id-with-space", "id-with-slash", "id-65-chars",
    ],
)
def test_bad_poll_body_is_bad_request(client, admin, body: bytes) -> None:
    response = client.post("/v1/polls", headers={**admin, "Content-Type": "application/json"},
                           content=body)
    assert (response.status_code, problem_type(response)) == (400, "/problems/bad-request")
    # Nothing was created: the id (when it was valid) is still free.
    assert client.get("/v1/polls/p/results").status_code == 404


def test_huge_poll_body_is_body_too_large(client, admin) -> None:
    poll = new_poll_id("huge")
    body = json.dumps({"id": poll, "options": ["a"], "pad": "x" * 70_000}).encode()
    response = client.post("/v1/polls", headers={**admin, "Content-Type": "application/json"},
                           content=body)
    assert (response.status_code, problem_type(response)) == (413, "/problems/body-too-large")
    # The unread body leaves the connection unusable: the answer says it closes, so the
    # client opens a new one for its next request.
    assert response.headers["connection"] == "close"
    assert client.get(f"/v1/polls/{poll}/results").status_code == 404


@pytest.mark.parametrize(
    ("headers", "slug"),
    [
        ({}, "token-missing"),
        ({"Authorization": "Bearer not-a-token"}, "token-invalid"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"Authorization": "Bearer"}, None),
    ],
    ids=["none", "garbage", "basic-scheme", "empty-bearer"],
)
def test_admin_endpoints_refuse_missing_or_garbage_tokens(client, admin, headers, slug) -> None:
    poll = new_poll_id("noauth")
    created = client.post("/v1/polls", headers=headers, json={"id": poll, "options": ["a"]})
    assert created.status_code == 401
    assert slug is None or problem_type(created) == f"/problems/{slug}"
    assert client.get(f"/v1/polls/{poll}/results").status_code == 404

    existing = create_poll(client, admin)
    closed = client.post(f"/v1/polls/{existing}/close", headers=headers)
    assert closed.status_code == 401
    assert results(client, existing)["final"] is False


def test_forged_admin_token_is_token_invalid(client, admin) -> None:
    poll = new_poll_id("forged")
    forged = {"Authorization": "Bearer " + flip_middle(admin["Authorization"][7:])}
    response = client.post("/v1/polls", headers=forged, json={"id": poll, "options": ["a"]})
    assert (response.status_code, problem_type(response)) == (401, "/problems/token-invalid")
    assert client.get(f"/v1/polls/{poll}/results").status_code == 404


def test_expired_admin_token_is_token_expired(server, client) -> None:
    token = cli.expired_admin_token(server.data_dir)
    poll = new_poll_id("expired-admin")
    response = client.post("/v1/polls", headers=bearer(token),
                           json={"id": poll, "options": ["a"]})
    assert (response.status_code, problem_type(response)) == (401, "/problems/token-expired")
    assert client.get(f"/v1/polls/{poll}/results").status_code == 404


def test_voter_token_on_admin_endpoint_is_token_invalid(server, client, admin) -> None:
    # Admin tokens are signed with separate keys, so a voter token is simply not valid here.
    voter = bearer(server.voter_tokens(1, 1)[0])
    poll = new_poll_id("voter-admin")
    created = client.post("/v1/polls", headers=voter, json={"id": poll, "options": ["a"]})
    assert (created.status_code, problem_type(created)) == (401, "/problems/token-invalid")
    assert client.get(f"/v1/polls/{poll}/results").status_code == 404

    existing = create_poll(client, admin)
    closed = client.post(f"/v1/polls/{existing}/close", headers=voter)
    assert (closed.status_code, problem_type(closed)) == (401, "/problems/token-invalid")
    assert results(client, existing)["final"] is False


def test_close_unknown_poll_is_not_found(client, admin) -> None:
    response = client.post(f"/v1/polls/{new_poll_id('ghost')}/close", headers=admin)
    assert (response.status_code, problem_type(response)) == (404, "/problems/poll-not-found")


# The vote path.

def test_vote_then_repeat_answers_the_original_receipt(server, client, admin) -> None:
    poll = create_poll(client, admin)
    token = server.voter_tokens(100, 1)[0]
    first = vote(client, poll, token, "b")
    assert first.status_code == 201
    receipt = first.json()
    assert receipt["poll"] == poll and receipt["receipt"].startswith("r2.")

    again = vote(client, poll, token, "c")
    assert (again.status_code, problem_type(again)) == (409, "/problems/already-voted")
    assert again.json()["receipt"]["receipt"] == receipt["receipt"]
    assert again.json()["receipt"] == receipt
    body = results(client, poll)
    assert (counts_of(body), body["total"]) == ({"a": 0, "b": 1, "c": 0}, 1)
    assert rejected_total(body) == 1


def test_receipt_verify_accepts_real_and_rejects_tampered(server, client, admin) -> None:
    poll = create_poll(client, admin)
    receipt = vote(client, poll, server.voter_tokens(7, 1)[0], "a").json()["receipt"]

    good = server.run_cli("receipt", "verify", receipt, check=False)
    assert good.returncode == 0, good.stdout + good.stderr

    # An auditor holds the public key document only, no private key file.
    auditor = server.data_dir.parent / "auditor"
    (auditor / "keys").mkdir(parents=True, exist_ok=True)
    shutil.copy(server.data_dir / "keys" / "receipt-public.json", auditor / "keys")
    public_only = cli.run_cli("receipt", "verify", receipt, "--data-dir", str(auditor),
                              check=False)
    assert public_only.returncode == 0, public_only.stdout + public_only.stderr
    assert public_only.stdout.startswith("valid: "), public_only.stdout

    bad = server.run_cli("receipt", "verify", flip_middle(receipt), check=False)
    assert bad.returncode != 0
    message = (bad.stdout + bad.stderr).strip()
    assert message, "a rejected receipt must say why"
    assert "Traceback" not in message, message


@pytest.mark.parametrize(
    ("body", "status", "slug"),
    [
        (b'{"option": "a"', 400, "bad-request"),
        (b"", 400, "bad-request"),
        (b'"a"', 400, "bad-request"),
        (b"{}", 400, "bad-request"),
        (b'{"option": 5}', 400, "bad-request"),
        (b'{"option": null}', 400, "bad-request"),
        (b'{"option": "a", "weight": 2}', 400, "bad-request"),
        (b'{"option": "a b"}', 400, "bad-request"),
        (json.dumps({"option": "a" * 65}).encode(), 400, "bad-request"),
        (b'{"option": "zzz"}', 422, "unknown-option"),
        (json.dumps({"option": "a" * 5000}).encode(), 413, "body-too-large"),
        (b'{"option": "\x80"}', 400, "bad-request"),
    ],
    ids=["truncated-json", "empty", "string", "missing-option", "option-int", "option-null",
         "unknown-field", "option-invalid-chars", "option-65-chars", "unknown-option",
         "huge-body", "invalid-utf8"],
)
def test_bad_vote_is_rejected_and_not_counted(server, client, admin, body, status,
                                              slug) -> None:
    poll = create_poll(client, admin)
    token = server.voter_tokens(200, 1)[0]
    response = client.post(f"/v1/polls/{poll}/votes",
                           headers={**bearer(token), "Content-Type": "application/json"},
                           content=body)
    assert (response.status_code, problem_type(response)) == (status, f"/problems/{slug}")
    assert results(client, poll)["total"] == 0
    # The rejection did not use up the voter's vote.
    assert vote(client, poll, token, "a").status_code == 201


def test_vote_for_unknown_poll_is_poll_not_found(server, client) -> None:
    response = vote(client, new_poll_id("ghost"), server.voter_tokens(300, 1)[0], "a")
    assert (response.status_code, problem_type(response)) == (404, "/problems/poll-not-found")


@pytest.mark.parametrize(
    ("make_headers", "slug"),
    [
        (lambda token: {}, "token-missing"),
        (lambda token: bearer("not-a-token"), "token-invalid"),
        (lambda token: bearer(flip_middle(token)), "token-invalid"),
    ],
    ids=["missing", "garbage", "forged"],
)
def test_vote_without_valid_token_is_unauthorized(server, client, admin, make_headers,
                                                  slug) -> None:
    poll = create_poll(client, admin)
    token = server.voter_tokens(400, 1)[0]
    response = client.post(f"/v1/polls/{poll}/votes", headers=make_headers(token),
                           json={"option": "a"})
    assert (response.status_code, problem_type(response)) == (401, f"/problems/{slug}")
    assert results(client, poll)["total"] == 0


def test_expired_voter_token_is_token_expired(server, client, admin) -> None:
    poll = create_poll(client, admin)
    token = cli.expired_voter_token(server.data_dir, 500)
    response = vote(client, poll, token, "a")
    assert (response.status_code, problem_type(response)) == (401, "/problems/token-expired")
    assert results(client, poll)["total"] == 0
    # The same voter with a valid token is still free to vote: nothing was counted.
    assert vote(client, poll, server.voter_tokens(500, 1)[0], "a").status_code == 201


def test_expired_voter_token_is_token_expired_on_any_poll(server, client, admin) -> None:
    poll = create_poll(client, admin)
    token = cli.expired_voter_token(server.data_dir, 501)
    response = vote(client, poll, token, "b")
    assert (response.status_code, problem_type(response)) == (401, "/problems/token-expired")
    assert results(client, poll)["total"] == 0


def test_token_bound_to_another_poll_is_forbidden(server, client, admin) -> None:
    poll, other = create_poll(client, admin), create_poll(client, admin)
    token = server.voter_tokens(600, 1, poll=other)[0]
    response = vote(client, poll, token, "a")
    assert (response.status_code, problem_type(response)) == (403, "/problems/token-forbidden")
    assert results(client, poll)["total"] == 0
    assert vote(client, other, token, "a").status_code == 201


def test_counts_are_exact_after_distinct_votes(server, client, admin) -> None:
    poll = create_poll(client, admin)
    tokens = server.voter_tokens(1000, 30)
    sent = {"a": 0, "b": 0, "c": 0}
    for position, token in enumerate(tokens):
        option = "abc"[(position * position) % 3]
        response = vote(client, poll, token, option)
        assert response.status_code == 201, response.text
        sent[option] += 1
    body = results(client, poll)
    assert counts_of(body) == sent
    assert body["total"] == 30
    assert (body["final"], body["embargoed"]) == (False, False)


def test_receipts_are_distinct_positions_in_the_log(server, client, admin) -> None:
    poll = create_poll(client, admin)
    receipts = [vote(client, poll, token, "a").json()
                for token in server.voter_tokens(2000, 12)]
    positions = {(r["shard"], r["offset"], r["index"]) for r in receipts}
    assert len(positions) == 12
    assert len({r["voter_hash"] for r in receipts}) == 12
    assert len({r["receipt"] for r in receipts}) == 12


def test_close_is_final_and_refuses_later_votes(server, client, admin) -> None:
    poll = create_poll(client, admin)
    tokens = server.voter_tokens(3000, 4)
    for token in tokens[:3]:
        assert vote(client, poll, token, "a").status_code == 201

    closed = client.post(f"/v1/polls/{poll}/close", headers=admin)
    assert closed.status_code == 200
    assert closed.json()["poll"] == poll and closed.json()["closed"] is True

    late = vote(client, poll, tokens[3], "b")
    assert (late.status_code, problem_type(late)) == (422, "/problems/poll-closed")
    body = wait_final(client, poll)
    assert (counts_of(body), body["total"]) == ({"a": 3, "b": 0, "c": 0}, 3)
    assert rejected_total(body) == 1

    again = client.post(f"/v1/polls/{poll}/close", headers=admin)
    assert again.status_code == 200 and again.json()["closed"] is True
    assert results(client, poll)["total"] == 3


def test_poll_whose_closes_at_has_passed_is_closed_from_the_start(server, client,
                                                                  admin) -> None:
    closes_at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    poll = create_poll(client, admin, closes_at=rfc3339(closes_at))
    refused = vote(client, poll, server.voter_tokens(3400, 1)[0], "a")
    assert (refused.status_code, problem_type(refused)) == (422, "/problems/poll-closed")
    body = wait_final(client, poll)
    assert (counts_of(body), body["total"]) == ({"a": 0, "b": 0, "c": 0}, 0)


def test_poll_closes_by_itself_at_closes_at(server, client, admin) -> None:
    early, late = server.voter_tokens(3500, 2)  # first: the CLI takes a while
    closes_at = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=CLOSES_IN_S)
                 ).replace(microsecond=0)  # as rfc3339() sends it
    poll = create_poll(client, admin, closes_at=rfc3339(closes_at))
    first = vote(client, poll, early, "a")
    answered_before_close = datetime.datetime.now(datetime.UTC) < closes_at
    # An answer that came before closes_at was decided before it: the vote counts. (On a
    # machine so slow that closes_at passed meanwhile, the vote may be refused instead.)
    allowed = {201} if answered_before_close else {201, 422}
    assert first.status_code in allowed, first.text
    counted = int(first.status_code == 201)

    # No sleep for closes_at: the engine closes the poll by itself, and its results turn final.
    body = wait_until(lambda: (answer := results(client, poll))["final"] and answer,
                      CLOSES_IN_S + FINAL_WAIT_S, f"poll {poll} to close by itself at closes_at")
    assert (counts_of(body), body["total"]) == ({"a": counted, "b": 0, "c": 0}, counted)
    refused = vote(client, poll, late, "b")
    assert (refused.status_code, problem_type(refused)) == (422, "/problems/poll-closed")
    assert wait_final(client, poll)["total"] == counted


def test_embargo_hides_counts_until_close(server, client, admin) -> None:
    poll = create_poll(client, admin, embargo=True)
    for token in server.voter_tokens(4000, 5):
        assert vote(client, poll, token, "c").status_code == 201
    hidden = results(client, poll)
    assert (hidden["counts"], hidden["total"], hidden["embargoed"], hidden["final"]) == (
        {}, 0, True, False)

    assert client.post(f"/v1/polls/{poll}/close", headers=admin).status_code == 200
    shown = wait_final(client, poll)
    assert (counts_of(shown), shown["total"], shown["embargoed"]) == (
        {"a": 0, "b": 0, "c": 5}, 5, False)


def test_poll_not_yet_open_refuses_votes(server, client, admin) -> None:
    opens_at = rfc3339(datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1))
    poll = create_poll(client, admin, opens_at=opens_at)
    response = vote(client, poll, server.voter_tokens(5000, 1)[0], "a")
    assert (response.status_code, problem_type(response)) == (422, "/problems/poll-not-open")
    assert results(client, poll)["total"] == 0


def test_results_of_unknown_poll_is_not_found(client) -> None:
    response = client.get(f"/v1/polls/{new_poll_id('ghost')}/results")
    assert (response.status_code, problem_type(response)) == (404, "/problems/poll-not-found")


def test_concurrent_votes_of_one_voter_count_once(server, client, admin) -> None:
    poll = create_poll(client, admin)
    token = server.voter_tokens(6000, 1)[0]
    callers = 20
    start = threading.Barrier(callers)

    def cast(_: int) -> httpx.Response:
        start.wait(timeout=30)
        return vote(client, poll, token, "b")

    with ThreadPoolExecutor(callers) as pool:
        answers = list(pool.map(cast, range(callers)))
    statuses = Counter(answer.status_code for answer in answers)
    assert statuses == {201: 1, 409: callers - 1}
    receipt = next(a.json() for a in answers if a.status_code == 201)
    assert {a.json()["receipt"]["receipt"] for a in answers if a.status_code == 409} == {
        receipt["receipt"]}
    body = results(client, poll)
    assert (counts_of(body), body["total"]) == ({"a": 0, "b": 1, "c": 0}, 1)
    assert rejected_total(body) == callers - 1


# Operator endpoints and routing.

def test_healthz(client) -> None:
    response = client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_readyz_reports_embedded_durability(server, client) -> None:
    body = client.get("/readyz").json()
    assert (body["ready"], body["durability"], body["workers"]) == (True, "embedded-fsync", 1)
    assert body["shards_ready"] == body["shards_total"] >= 1


def test_metrics_expose_vote_metrics(server, client, admin) -> None:
    poll = create_poll(client, admin)
    assert vote(client, poll, server.voter_tokens(7000, 1)[0], "a").status_code == 201
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = re.findall(r"^(vote_[a-z0-9_]+)(?:\{[^}]*\})? ([0-9.e+-]+|NaN|[+-]Inf)$",
                         response.text, re.MULTILINE)
    names = {name for name, _ in samples}
    assert names, response.text[:2000]
    assert any(name.endswith("_total") for name in names), sorted(names)
    assert any(float(value) > 0 for name, value in samples if name.endswith("_total")), \
        sorted(names)


@pytest.mark.parametrize("path", ["/nope", "/v1/polls/x", "/v1/polls/x/votes/extra", "/v2/polls"])
def test_unknown_route_is_not_found(client, path) -> None:
    response = client.get(path)
    assert (response.status_code, problem_type(response)) == (404, "/problems/not-found")


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/polls"), ("DELETE", "/v1/polls"), ("GET", "/v1/polls/x/votes"),
     ("PUT", "/v1/polls/x/close"), ("POST", "/v1/polls/x/results"), ("POST", "/healthz")],
)
def test_wrong_method_is_method_not_allowed(client, method, path) -> None:
    response = client.request(method, path)
    assert (response.status_code, problem_type(response)) == (
        405, "/problems/method-not-allowed")
