"""Proves the issuer role (`votes issuer`, engine/issuer_app.py) against a real OIDC provider
(npm oidc-provider, deploy/local/oidc_provider.py) and a real PostgreSQL
(deploy/local/postgres.py), both started once per session (tests/integration/conftest.py):

- a person logs in (the real authorization-code flow), the ID token buys a voter token, and
  `votes serve` on the same keys accepts that token for a vote (201);
- one identity always gets one voter id, also under 20 concurrent first logins; different
  identities get distinct ids, and the table's ids stay dense (0..n-1, no gaps);
- a tampered token, a token for another audience and an expired token answer 401 (a detail
  that does not echo the input); PostgreSQL or the provider unreachable answer 503;
- the provider rotating its signing key (a restart makes a new one): tokens of the new key
  verify after one JWKS refresh, tokens of the old key no longer do.
Every answer of the issuer is validated against engine/openapi.yaml.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from engine.issuer_oidc import JWKS_REFRESH_INTERVAL_S_MIN
from engine.keys import load_keys
from engine.tokens import issue_admin_token, verify_voter_token
from tests.support import http_client
from tests.support.cli import cli_command
from tests.support.engine_process import EngineProcess, free_port
from deploy.local.oidc_provider import granted_id_token, login_id_token
from tests.support.waiting import wait_until

DATABASE = "issuer_test"
CONCURRENT_LOGINS = 20
IDENTITIES = 12
START_WAIT_S = 30.0
STOP_WAIT_S = 10.0
TOKEN_TTL_S = 900


@contextmanager
def issuer_role(data_dir: Path, log_path: Path, *, oidc_url: str, database_url: str,
                audience: str = "votes-issuer"):
    """`votes issuer` on a free port; yields its base URL; stopped with SIGTERM."""
    port = free_port()
    environment = {"VOTES_ISSUER_OIDC_URL": oidc_url, "VOTES_ISSUER_OIDC_AUDIENCE": audience,
                   "VOTES_ISSUER_DATABASE_URL": database_url,
                   "VOTES_ISSUER_TOKEN_TTL_S": str(TOKEN_TTL_S)}
    with log_path.open("ab") as log:
        process = subprocess.Popen(cli_command("issuer", "--port", str(port), "--data-dir",
                                               str(data_dir)),
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **environment}, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            assert process.poll() is None, f"votes issuer exited ({log_path})"
            try:
                return http_client.get(base_url + "/healthz", timeout_s=1.0).status_code == 200
            except httpx.TransportError:
                return False
        wait_until(healthy, START_WAIT_S, f"votes issuer to answer /healthz ({log_path})")
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_WAIT_S)


@pytest.fixture(scope="module")
def database_url(issuer_postgres) -> str:
    return issuer_postgres.createdb(DATABASE)


@pytest.fixture(scope="module")
def issuer(tmp_path_factory, oidc_provider, database_url):
    directory = tmp_path_factory.mktemp("issuer")
    with issuer_role(directory / "data", directory / "issuer.log",
                     oidc_url=oidc_provider.issuer_url, database_url=database_url) as base_url:
        yield base_url, directory / "data"


def exchange(base_url: str, id_token: str, **extra) -> httpx.Response:
    with http_client.client_for(base_url) as client:
        return client.post("/v1/voter-tokens", json={"id_token": id_token, **extra})


def new_subject() -> str:
    return f"person-{uuid.uuid4().hex[:12]}"


def voter_ids_in_table(issuer_postgres) -> list[int]:
    text = issuer_postgres.query("SELECT voter_id FROM voter_identities ORDER BY voter_id",
                                 DATABASE)
    return [int(line) for line in text.splitlines()]


def test_a_login_buys_a_voter_token_the_engine_accepts(issuer, oidc_provider, tmp_path):
    base_url, issuer_data_dir = issuer
    id_token = login_id_token(oidc_provider.issuer_url, new_subject())
    answer = exchange(base_url, id_token)
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["expires_at"] - TOKEN_TTL_S <= time.time() <= body["expires_at"]

    engine = EngineProcess(tmp_path / "engine", tmp_path / "engine.log", {"VOTES_SHARDS": "4"},
                           keys_from=issuer_data_dir)
    engine.start()
    try:
        engine.wait_ready()
        admin = issue_admin_token(load_keys(engine.data_dir), ttl_s=600)
        with http_client.client_for(engine.base_url) as client:
            created = client.post("/v1/polls", json={"id": "issued", "options": ["a", "b"]},
                                  headers={"authorization": f"Bearer {admin}"})
            assert created.status_code == 201, created.text
            voted = client.post("/v1/polls/issued/votes", json={"option": "a"},
                                headers={"authorization": f"Bearer {body['token']}"})
            assert voted.status_code == 201, voted.text
            again = client.post("/v1/polls/issued/votes", json={"option": "b"},
                                headers={"authorization": f"Bearer {body['token']}"})
            assert again.status_code == 409  # the identity's one voter id votes once
    finally:
        engine.stop()


def test_one_identity_keeps_one_voter_id_and_poll_binding(issuer, oidc_provider):
    base_url, data_dir = issuer
    subject = new_subject()
    first = exchange(base_url, granted_id_token(oidc_provider.issuer_url, subject)).json()
    second = exchange(base_url, login_id_token(oidc_provider.issuer_url, subject),
                      poll="only-this").json()
    assert first["voter_id"] == second["voter_id"]
    claims = verify_voter_token(load_keys(data_dir), second["token"], int(time.time()),
                                "only-this")
    assert (claims.voter, claims.poll) == (first["voter_id"], "only-this")


def test_concurrent_first_logins_get_one_id_and_ids_stay_dense(issuer, oidc_provider,
                                                                issuer_postgres):
    base_url, _ = issuer
    subject = new_subject()
    id_tokens = [granted_id_token(oidc_provider.issuer_url, subject)
                 for _ in range(CONCURRENT_LOGINS)]
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT_LOGINS) as pool:
        answers = list(pool.map(lambda token: exchange(base_url, token), id_tokens))
    assert [answer.status_code for answer in answers] == [201] * CONCURRENT_LOGINS
    assert len({answer.json()["voter_id"] for answer in answers}) == 1

    subjects = [new_subject() for _ in range(IDENTITIES)]
    tokens = [granted_id_token(oidc_provider.issuer_url, subject) for subject in subjects]
    with concurrent.futures.ThreadPoolExecutor(IDENTITIES) as pool:
        ids = [answer.json()["voter_id"]
               for answer in pool.map(lambda token: exchange(base_url, token), tokens)]
    assert len(set(ids)) == IDENTITIES
    table = voter_ids_in_table(issuer_postgres)
    assert table == list(range(len(table)))  # dense: the 19 losers above burnt no id


def test_identity_store_assigns_once_under_concurrency(issuer_postgres, database_url):
    """engine/issuer_identities.py in-process, many first logins in flight on one loop at
    once (the HTTP test above cannot overlap them as tightly): one id per identity, and no id
    burnt by the losers. Without the per-identity lock the table gets gaps and this fails
    (checked by taking the lock out: ids [0, 2, 5, 6, 12, ...])."""
    from engine.issuer_identities import VoterIdentities

    async def scenario() -> tuple[list[int], list[list[int]]]:
        identities = VoterIdentities(database_url)
        try:
            same = await asyncio.gather(*(identities.voter_id("https://idp.test", "same")
                                          for _ in range(CONCURRENT_LOGINS)))
            rounds = []
            for round_number in range(3):  # several identities, each logging in 4 times at once
                calls = [identities.voter_id("https://idp.test", f"p{round_number}-{person}")
                         for person in range(IDENTITIES) for _ in range(4)]
                rounds.append(await asyncio.gather(*calls))
            return same, rounds
        finally:
            await identities.close()

    same, rounds = asyncio.run(scenario())
    assert len(set(same)) == 1
    for ids in rounds:
        per_person = [set(ids[person * 4:(person + 1) * 4]) for person in range(IDENTITIES)]
        assert all(len(person_ids) == 1 for person_ids in per_person)
        assert len(set(ids)) == IDENTITIES
    table = voter_ids_in_table(issuer_postgres)
    assert table == list(range(len(table)))


def test_bad_tokens_answer_401_without_echoing_them(issuer, oidc_provider):
    base_url, _ = issuer
    subject = new_subject()
    good = granted_id_token(oidc_provider.issuer_url, subject)
    header, payload, signature = good.split(".")
    tampered = f"{header}.{payload[:-4]}{'AAAA' if payload[-4:] != 'AAAA' else 'BBBB'}" \
               f".{signature}"
    wrong_audience = granted_id_token(oidc_provider.issuer_url, subject,
                                      client_id="other-client")
    expired = granted_id_token(oidc_provider.issuer_url, subject, expires_in_s=-120)
    for token, slug in [(tampered, "token-invalid"), (wrong_audience, "token-invalid"),
                        (expired, "token-expired"), ("not.a.jwt", "token-invalid")]:
        answer = exchange(base_url, token)
        assert answer.status_code == 401, (slug, answer.text)
        assert answer.json()["type"] == f"/problems/{slug}"
        assert subject not in answer.text and token[:20] not in answer.text
    assert exchange(base_url, good).status_code == 201  # the untampered one was fine
    with http_client.client_for(base_url) as client:
        assert client.post("/v1/voter-tokens", json={"id_token": good, "extra": 1}
                           ).status_code == 400
        assert client.post("/v1/voter-tokens", content=b"{" + b" " * 10_000 + b"}"
                           ).status_code == 413


def test_unreachable_database_or_provider_answers_503(tmp_path, oidc_provider):
    closed_port = free_port()
    with issuer_role(tmp_path / "data", tmp_path / "no-db.log",
                     oidc_url=oidc_provider.issuer_url,
                     database_url=f"postgresql://postgres@127.0.0.1:{closed_port}/x") as base_url:
        answer = exchange(base_url, granted_id_token(oidc_provider.issuer_url, new_subject()))
        assert answer.status_code == 503, answer.text
        assert answer.json()["type"] == "/problems/not-ready"
    with issuer_role(tmp_path / "data", tmp_path / "no-provider.log",
                     oidc_url=f"http://127.0.0.1:{closed_port}",
                     database_url=f"postgresql://postgres@127.0.0.1:{closed_port}/x") as base_url:
        answer = exchange(base_url, granted_id_token(oidc_provider.issuer_url, new_subject()))
        assert answer.status_code == 503, answer.text


def test_provider_key_rotation_is_picked_up(issuer, oidc_provider):
    """Last in this module: it restarts the session's provider (a new signing key)."""
    base_url, _ = issuer
    subject = new_subject()
    old_key_token = granted_id_token(oidc_provider.issuer_url, subject)
    assert exchange(base_url, old_key_token).status_code == 201
    oidc_provider.restart()
    new_key_token = granted_id_token(oidc_provider.issuer_url, subject)
    # The issuer fetches the JWKS again for the unknown kid, at most once per
    # JWKS_REFRESH_INTERVAL_S_MIN: within that bound the new key's tokens verify.
    started = time.monotonic()
    statuses = []

    def accepted() -> bool:
        statuses.append(exchange(base_url, new_key_token).status_code)
        return statuses[-1] == 201
    wait_until(accepted, JWKS_REFRESH_INTERVAL_S_MIN + 5.0, "the rotated key to verify",
               poll_s=0.5)
    assert time.monotonic() - started <= JWKS_REFRESH_INTERVAL_S_MIN + 5.0
    assert set(statuses) <= {401, 201}
    assert exchange(base_url, old_key_token).status_code == 401  # its key left the JWKS
