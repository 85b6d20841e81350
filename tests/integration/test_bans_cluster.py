"""Ban lists in the session's real Redis Cluster (deploy/local/redis_cluster.py), managed by
`votes ban add|remove|list` (engine/ban_cli.py), applied by every worker of a two-worker
server from its local copy (engine/bans.py): a banned address, prefix or voter gets 403
`banned` (the detail names nothing of the request) within the staleness bound
(bans_refresh_ms + bans_store_timeout_ms) on both workers, while others get 201; a removal
lets it vote again within the same bound; a ban ends on its own at its TTL. The CLI refuses
bad values, a missing store and a store that does not answer with a message and a non-zero
exit. Each refusal is counted as `banned` in /metrics and in the results.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.keys import load_keys
from engine.metrics import FLUSH_INTERVAL_S
from engine.tokens import issue_admin_token, issue_voter_token
from tests.support import http_client
from tests.support.cli import run_cli
from tests.support.engine_process import EngineProcess, free_port

POLL = "banned"
REFRESH_MS = 200
STORE_TIMEOUT_MS = 300
STALENESS_S = (REFRESH_MS + STORE_TIMEOUT_MS) / 1000
# Slack for the test's own requests and process scheduling on a shared machine.
APPLY_WAIT_S = STALENESS_S + 1.0
VOTES_PER_CHECK = 6  # each on a new connection, so both workers answer some


@pytest.fixture(scope="module")
def server(tmp_path_factory, redis_cluster):
    root: Path = tmp_path_factory.mktemp("bans")
    engine = EngineProcess(root / "data", root / "engine.log", {
        "VOTES_BANS_REDIS_URL": redis_cluster.url,
        "VOTES_BANS_REFRESH_MS": str(REFRESH_MS),
        "VOTES_BANS_STORE_TIMEOUT_MS": str(STORE_TIMEOUT_MS),
        "VOTES_SHARDS": "4"}, workers=2)
    engine.start()
    try:
        engine.wait_ready()
        keyring = load_keys(root / "data")
        admin = {"authorization": f"Bearer {issue_admin_token(keyring, ttl_s=600)}"}
        created = http_client.post(engine.base_url + "/v1/polls", headers=admin,
                                   json={"id": POLL, "options": ["a"]})
        assert created.status_code == 201, created.text
        yield engine, keyring
    finally:
        engine.stop()
        assert "Traceback" not in engine.log_text(), engine.log_tail()


_voters = itertools.count(1000)


def statuses(server, address: str, voter: int | None = None) -> list[int]:
    """VOTES_PER_CHECK votes from `address`, each on a new connection and by a new voter
    (or all by `voter`); the statuses, 403s checked to be `banned` saying nothing of the
    request."""
    engine, keyring = server
    answers = []
    for _ in range(VOTES_PER_CHECK):
        token = issue_voter_token(keyring, next(_voters) if voter is None else voter,
                                  ttl_s=600, poll=POLL)
        with http_client.client_for(engine.base_url, transport=httpx.HTTPTransport(
                local_address=address)) as client:
            answer = client.post(f"/v1/polls/{POLL}/votes", json={"option": "a"},
                                 headers={"authorization": f"Bearer {token}"})
        if answer.status_code == 403:
            problem = answer.json()
            assert problem["type"] == "/problems/banned"
            assert address not in answer.text and str(voter) not in problem["detail"]
        answers.append(answer.status_code)
    return answers


def wait_until(server, address: str, status: int, voter: int | None = None) -> float:
    """Seconds until every vote of a check answers `status`; fails after APPLY_WAIT_S."""
    started = time.monotonic()
    while True:
        if set(statuses(server, address, voter)) <= {status, 409}:
            return time.monotonic() - started
        assert time.monotonic() - started < APPLY_WAIT_S, f"not {status} in {APPLY_WAIT_S} s"
        time.sleep(0.05)


def ban(redis_cluster, *args: str, check: bool = True):
    return run_cli("ban", *args, "--redis-url", redis_cluster.url, check=check)


def test_an_address_ban_applies_then_its_removal(server, redis_cluster) -> None:
    assert set(statuses(server, "127.0.11.1")) == {201}
    ban(redis_cluster, "add", "address", "127.0.11.1", "--ttl-s", "600")
    applied_s = wait_until(server, "127.0.11.1", 403)
    assert set(statuses(server, "127.0.11.2")) == {201}  # its neighbour is not banned
    listed = ban(redis_cluster, "list", "address").stdout.split()
    assert listed[:2] == ["address", "127.0.11.1"] and 590 <= int(listed[2]) <= 600
    ban(redis_cluster, "remove", "address", "127.0.11.1")
    lifted_s = wait_until(server, "127.0.11.1", 201)
    print(f"ban applied in {applied_s:.2f} s, lifted in {lifted_s:.2f} s "
          f"(bound {STALENESS_S:.2f} s + the checks' own time)")
    assert "127.0.11.1" not in ban(redis_cluster, "list").stdout
    missing = ban(redis_cluster, "remove", "address", "127.0.11.1", check=False)
    assert missing.returncode != 0 and "not banned" in missing.stderr


def test_a_prefix_ban_ends_at_its_ttl(server, redis_cluster) -> None:
    ban(redis_cluster, "add", "prefix", "127.0.12.77/24", "--ttl-s", "3")
    wait_until(server, "127.0.12.5", 403)
    assert set(statuses(server, "127.0.13.5")) == {201}
    assert "prefix 127.0.12.0/24" in ban(redis_cluster, "list").stdout
    time.sleep(3)
    assert set(statuses(server, "127.0.12.5")) == {201}  # expired, never removed
    assert "127.0.12.0" not in ban(redis_cluster, "list").stdout


def test_a_voter_ban(server, redis_cluster) -> None:
    ban(redis_cluster, "add", "voter", "777", "--ttl-s", "600")
    wait_until(server, "127.0.14.1", 403, voter=777)
    assert set(statuses(server, "127.0.14.1")) == {201}  # other voters, same address
    ban(redis_cluster, "remove", "voter", "777")
    wait_until(server, "127.0.14.1", 201, voter=777)


def test_the_cli_refuses_bad_input_and_an_absent_store(redis_cluster) -> None:
    for args in (["add", "address", "10.1.2", "--ttl-s", "60"],
                 ["add", "prefix", "10.0.0.0/16", "--ttl-s", "60"],
                 ["add", "voter", "-4", "--ttl-s", "60"],
                 ["add", "voter", "4", "--ttl-s", "0"],
                 ["add", "poll", "p", "--ttl-s", "60"]):
        refused = ban(redis_cluster, *args, check=False)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    down = run_cli("ban", "list", "--redis-url", f"redis://127.0.0.1:{free_port()}",
                   check=False)
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert "ban store" in down.stderr and len(down.stderr.strip().splitlines()) == 1
    unset = run_cli("ban", "list", check=False)
    assert unset.returncode == 1 and "no ban store" in unset.stderr


def test_refusals_are_counted(server) -> None:
    engine, _ = server
    time.sleep(FLUSH_INTERVAL_S)
    text = http_client.get(engine.base_url + "/metrics").text
    counted = sum(sample.value for family in text_string_to_metric_families(text)
                  for sample in family.samples if sample.name == "vote_rejected_total"
                  and sample.labels.get("reason") == "banned")
    results = http_client.get(f"{engine.base_url}/v1/polls/{POLL}/results").json()
    assert counted >= 3 * VOTES_PER_CHECK
    assert results["rejected"]["banned"] == counted
