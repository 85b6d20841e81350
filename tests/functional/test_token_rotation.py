"""Proves that a running server (two workers) picks up `votes keys rotate|retire` without a
restart, within token_keys_check_s: after a rotation, tokens of the new key are accepted and
tokens of the old key still are; after a retirement, the old key's tokens are answered 401
token-invalid (problem+json). Tampered key ids and claims, an admin token used as a voter
token and a voter token used as an admin token are 401 too, before and after rotation."""

from __future__ import annotations

import base64
import json

import msgspec
import pytest

from tests.support.vote_client import bearer
from tests.support.waiting import wait_until

KEYS_CHECK_S = 0.2
# A worker reloads within KEYS_CHECK_S; both workers must have, so allow many rounds.
RELOAD_WAIT_S = 10.0
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory(workers=2, env={"VOTES_TOKEN_KEYS_CHECK_S": str(KEYS_CHECK_S)})


def _create_poll(client, server, poll: str) -> None:
    answer = client.post("/v1/polls", headers=bearer(server.admin_token()),
                         json={"id": poll, "options": ["a", "b"]})
    assert answer.status_code == 201, answer.text


def _vote(client, poll: str, token: str):
    return client.post(f"/v1/polls/{poll}/votes", headers=bearer(token), json={"option": "a"})


def _assert_token_invalid(answer) -> None:
    assert answer.status_code == 401, answer.text
    assert answer.headers["content-type"] == PROBLEM
    assert answer.json()["type"] == "/problems/token-invalid"


def _current_key(server, key_set: str) -> str:
    listed = server.run_cli("keys", "list", key_set).stdout
    return listed.split("current ")[1].split(";")[0]


def _accepted_by_every_worker(client, poll: str, tokens: list[str]) -> bool:
    """Each call uses a fresh voter, so 201 means accepted (409 would mean counted twice)."""
    return _vote(client, poll, tokens.pop()).status_code == 201


def test_rotate_then_retire_on_a_running_server(server) -> None:
    client = server.client()
    poll = "rotation"
    _create_poll(client, server, poll)
    old_key = _current_key(server, "voter")
    old_tokens = server.voter_tokens(1, 3)
    assert _vote(client, poll, old_tokens[0]).status_code == 201

    server.run_cli("keys", "rotate", "voter")
    new_key = _current_key(server, "voter")
    assert new_key != old_key
    new_tokens = server.voter_tokens(100, 200)
    assert all(token.split(".")[1] == new_key for token in new_tokens)
    wait_until(lambda: _accepted_by_every_worker(client, poll, new_tokens), RELOAD_WAIT_S,
               "a worker to accept a token of the rotated-in key")
    # Several in a row: every worker has reloaded, not only the one that answered first.
    for _ in range(20):
        assert _vote(client, poll, new_tokens.pop()).status_code == 201
    assert _vote(client, poll, old_tokens[1]).status_code == 201  # old key: still accepted

    server.run_cli("keys", "retire", "voter", old_key)
    wait_until(lambda: _vote(client, poll, old_tokens[2]).status_code == 401, RELOAD_WAIT_S,
               "the retired key's tokens to be refused")
    for _ in range(20):
        _assert_token_invalid(_vote(client, poll, old_tokens[2]))
    assert _vote(client, poll, new_tokens.pop()).status_code == 201


def test_admin_rotation_reaches_the_admin_endpoints(server) -> None:
    client = server.client()
    old_admin = server.admin_token()
    server.run_cli("keys", "rotate", "admin")
    new_admin = server.admin_token()
    assert new_admin.split(".")[1] != old_admin.split(".")[1]
    wait_until(lambda: client.post("/v1/polls", headers=bearer(new_admin),
                                   json={"id": "admin-rotated", "options": ["a"]}
                                   ).status_code == 201,
               RELOAD_WAIT_S, "the rotated admin key to be accepted")
    answer = client.post("/v1/polls", headers=bearer(old_admin),
                         json={"id": "admin-old-key", "options": ["a"]})
    assert answer.status_code == 201, answer.text  # not retired yet: still accepted


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(token: str) -> list:
    payload = token.split(".")[2]
    return msgspec.msgpack.decode(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_tampered_and_cross_scope_tokens_are_401(server) -> None:
    client = server.client()
    poll = "tampered"
    _create_poll(client, server, poll)
    token = server.voter_tokens(5000, 1)[0]
    version, key_id, payload, signature = token.split(".")
    admin_key = _current_key(server, "admin")
    claims = _claims(token)
    claims[1] = 5001  # another voter, same signature
    forged_claims = _b64url(msgspec.msgpack.encode(claims))
    tampered = [
        f"{version}.{admin_key}.{payload}.{signature}",      # the admin key's id
        f"{version}.{key_id}x.{payload}.{signature}",        # an unknown key id
        f"{version}.{key_id}.{forged_claims}.{signature}",   # claims changed
        f"{version}.{key_id}.{payload}.{signature[:-2]}AA",  # signature changed
        server.admin_token(),                                # an admin token as a voter's
    ]
    for forged in tampered:
        _assert_token_invalid(_vote(client, poll, forged))
    voter_as_admin = client.post("/v1/polls", headers=bearer(token),
                                 json={"id": "voter-as-admin", "options": ["a"]})
    _assert_token_invalid(voter_as_admin)
    assert _vote(client, poll, token).status_code == 201  # the untampered one is fine
    counted = client.get(f"/v1/polls/{poll}/results").json()
    assert counted["total"] == 1
    assert json.dumps(counted["rejected"]) and sum(counted["rejected"].values()) == 5
