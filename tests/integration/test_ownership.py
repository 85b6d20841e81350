"""Fencing-group ownership across hosts: two `votes serve` processes ("hosts") on the real
stack, Kafka WAL + Redis leases per group (engine/ownership.py). These tests run one shard per
group (tests/support/engine_process.py kafka_env), so "shard N" below is also group N.

- static map: node A prefers shards 0-3, node B 4-7; both become ready holding exactly
  those; votes for voters of every shard sent to A all get 201 (forwarded to B when B holds
  the shard: the receipt names the voter's shard), both nodes report exact counts, and
  every receipt's lookup answers "counted" through either node;
- `votes shard move 5 --to A`: B stops serving 5, A fences, replays and serves it; a voter
  acknowledged on shard 5 before the move gets 409 with the identical receipt after it (at
  A and through B); new votes on shard 5 get 201; counts are exact (nothing lost or doubled);
- takeover: B's process group is SIGKILLed; within lease_ttl_s + a few seconds A holds all
  shards and serves them; every vote B acknowledged is 409 at A with the identical receipt;
  new votes for B's former shards get 201; counts are exact;
- zombie: B is SIGSTOPped until A took (and fenced) its shards, then resumed: B finds its
  leases lost and stops serving them; as their preferred owner it gets them back through
  the fence (A hands them over); B's acknowledged votes are 409 with identical receipts,
  new votes get 201; counts are exact.
The WAL topic and transactional ids are shared by all tests: each test uses a fresh poll,
fresh node ids, and clears this topic's lease keys in Redis before and after.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from engine.keys import ensure_keys
from tests.support import http_client
from tests.support.cli import votes_cli
from tests.support.engine_process import KAFKA_READINESS, EngineProcess, free_port, kafka_env
from tests.support.http_client import ValidatingAsyncClient
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

OPTIONS = ["red", "green", "blue"]
LEASE_TTL_S = 3.0
TAKEOVER_SLACK_S = 12.0  # fence + replay of four shards on top of the lease expiry
LEASE_LOST_WAIT_S = 10.0
# B's lease ticks after a finished move, each a chance to take the shard back.
TICKS_AFTER_MOVE = 3
REQUEST_TIMEOUT_S = 20.0
VOTERS = 48  # six voters on each of the eight shards


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Cluster:
    """Two engines sharing keys, node ids unique to one test, map A=first half, B=rest."""

    def __init__(self, local_stack, tmp_path: Path) -> None:
        self.stack = local_stack
        self.shards = local_stack.partitions
        suffix = uuid.uuid4().hex[:6]
        self.a_id, self.b_id = f"a-{suffix}", f"b-{suffix}"
        half = self.shards // 2
        self.group_map = f"{self.a_id}=0-{half - 1},{self.b_id}={half}-{self.shards - 1}"
        template = tmp_path / "keys-template"
        ensure_keys(template)
        self.a = self._engine(tmp_path, "a", self.a_id, template)
        self.b = self._engine(tmp_path, "b", self.b_id, template)
        self.redis = redis.Redis.from_url(local_stack.redis_url, decode_responses=True)

    def _engine(self, tmp_path: Path, name: str, node_id: str, template: Path) -> EngineProcess:
        port = free_port()
        env = self.env(VOTES_NODE_ID=node_id, VOTES_ADVERTISE_URL=f"http://127.0.0.1:{port}",
                       VOTES_LEASE_TTL_S=str(LEASE_TTL_S))
        return EngineProcess(tmp_path / name, tmp_path / f"{name}.log", env,
                             keys_from=template, port=port, **KAFKA_READINESS)

    def env(self, **extra: str) -> dict[str, str]:
        return kafka_env(self.stack, VOTES_REDIS_URL=self.stack.redis_url,
                         VOTES_GROUP_MAP=self.group_map, **extra)

    def clear_keys(self) -> None:
        keys = list(self.redis.scan_iter(f"votes:{self.stack.wal_topic}:*"))
        if keys:
            self.redis.delete(*keys)

    def holders(self) -> dict[int, str | None]:
        values = self.redis.mget([f"votes:{self.stack.wal_topic}:lease:{shard}"
                                  for shard in range(self.shards)])
        return {shard: value.split(" ")[0] if value else None for shard, value in enumerate(values)}

    def start(self) -> None:
        self.a.start()
        self.b.start()
        took_a = self.a.wait_ready()
        took_b = self.b.wait_ready()
        print(f"ready: A {took_a:.1f} s, B {took_b:.1f} s")

    def stop(self) -> None:
        self.a.kill()
        self.b.kill()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True,
                              text=True, timeout=90, env={**os.environ, **self.env()}, check=False)

    def open_poll(self) -> tuple[str, list[str]]:
        poll = f"own-{uuid.uuid4().hex[:12]}"
        admin = votes_cli("admin-token", "--data-dir", str(self.a.data_dir)).strip()
        created = http_client.post(self.a.base_url + "/v1/polls", headers=bearer(admin),
                                   json={"id": poll, "options": OPTIONS},
                                   timeout=REQUEST_TIMEOUT_S)
        assert created.status_code == 201, created.text
        tokens = votes_cli("token", "--data-dir", str(self.a.data_dir), "--voter", "1",
                           "--count", str(VOTERS + 2 * self.shards)).split()
        return poll, tokens


@pytest.fixture
def cluster(local_stack, tmp_path):
    cluster = Cluster(local_stack, tmp_path)
    cluster.clear_keys()
    try:
        yield cluster
    finally:
        cluster.stop()
        cluster.clear_keys()
        for engine in (cluster.a, cluster.b):
            assert "Traceback" not in engine.log_text(), engine.log_tail()


def option_of(voter: int) -> str:
    return OPTIONS[voter % len(OPTIONS)]


async def _send_all(base_url: str, poll: str, tokens: list[str], voters) -> dict[int, httpx.Response]:
    async with ValidatingAsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        async def send(voter: int) -> tuple[int, httpx.Response]:
            return voter, await client.post(f"{base_url}/v1/polls/{poll}/votes",
                                            json={"option": option_of(voter)},
                                            headers=bearer(tokens[voter - 1]))

        return dict(await asyncio.gather(*(send(voter) for voter in voters)))


def send_all(engine: EngineProcess, poll: str, tokens: list[str], voters) -> dict[int, httpx.Response]:
    return asyncio.run(_send_all(engine.base_url, poll, tokens, voters))


def acked(responses: dict[int, httpx.Response], shards: int) -> dict[int, str]:
    """voter -> receipt string; fails unless every answer is 201 on the voter's shard."""
    bad = {voter: (answer.status_code, answer.text[:200]) for voter, answer in responses.items()
           if answer.status_code != 201 or answer.json()["shard"] != voter % shards}
    assert not bad, bad
    return {voter: answer.json()["receipt"] for voter, answer in responses.items()}


def assert_repeats(responses: dict[int, httpx.Response], receipts: dict[int, str]) -> None:
    wrong = {voter: (answer.status_code, answer.text[:200]) for voter, answer in responses.items()
             if answer.status_code != 409
             or answer.json()["type"] != "/problems/already-voted"
             or answer.json()["receipt"]["receipt"] != receipts[voter]}
    assert not wrong, wrong


def assert_counts(engine: EngineProcess, poll: str, voters) -> None:
    expected = {option: 0 for option in OPTIONS}
    for voter in voters:
        expected[option_of(voter)] += 1
    answer = http_client.get(f"{engine.base_url}/v1/polls/{poll}/results",
                             timeout=REQUEST_TIMEOUT_S)
    assert answer.status_code == 200, answer.text
    assert answer.json()["counts"] == expected, (answer.json(), expected)


def test_static_map_forwards_votes_to_the_shard_holder(cluster):
    started = time.monotonic()
    cluster.start()
    half = cluster.shards // 2
    assert cluster.holders() == {shard: cluster.a_id if shard < half else cluster.b_id
                                 for shard in range(cluster.shards)}
    readiness = http_client.get(cluster.b.base_url + "/readyz").json()
    assert (readiness["node_id"], readiness["shards_held"]) == (cluster.b_id, cluster.shards - half)
    poll, tokens = cluster.open_poll()
    voters = range(1, VOTERS + 1)
    receipts = acked(send_all(cluster.a, poll, tokens, voters), cluster.shards)
    assert_counts(cluster.a, poll, voters)
    assert_counts(cluster.b, poll, voters)
    # A repeat through either node finds the original receipt at the holder.
    assert_repeats(send_all(cluster.b, poll, tokens, voters), receipts)
    # A receipt lookup through either node is answered by the holder of its group's log
    # (engine/receipt_lookup.py; relayed once to the other node).
    for node in (cluster.a, cluster.b):
        for receipt in receipts.values():
            answer = http_client.get(f"{node.base_url}/v1/receipts/{receipt}")
            assert (answer.status_code, answer.json()["status"]) == (200, "counted"), answer.text
    print(f"static map test: {time.monotonic() - started:.1f} s")


def test_shard_move_hands_over_through_the_fence(cluster):
    started = time.monotonic()
    cluster.start()
    moved_shard = cluster.shards // 2 + 1  # one of B's shards (5 of 8)
    poll, tokens = cluster.open_poll()
    voters = list(range(1, VOTERS + 1))
    receipts = acked(send_all(cluster.b, poll, tokens, voters), cluster.shards)
    on_moved = [voter for voter in voters if voter % cluster.shards == moved_shard]

    moving = time.monotonic()
    completed = cluster.cli("shard", "move", str(moved_shard), "--to", cluster.a_id, "--timeout-s", "30")
    assert completed.returncode == 0, completed.stderr + completed.stdout
    print(f"move: {completed.stdout.strip()} (cli {time.monotonic() - moving:.1f} s)")
    assert cluster.holders()[moved_shard] == cluster.a_id
    assert f"group {moved_shard} stopped" in cluster.b.log_text()
    status = cluster.cli("group", "status")
    assert status.returncode == 0 and cluster.a_id in status.stdout, status.stderr

    # Acknowledged before the move: 409 with the same receipt, asked at A or through B.
    assert_repeats(send_all(cluster.a, poll, tokens, on_moved), receipts)
    assert_repeats(send_all(cluster.b, poll, tokens, on_moved), receipts)
    new_voters = [voter for voter in range(VOTERS + 1, VOTERS + 2 * cluster.shards + 1)
                  if voter % cluster.shards == moved_shard]
    new_receipts = acked(send_all(cluster.b, poll, tokens, new_voters), cluster.shards)
    assert len(new_receipts) == 2
    # A move does not bounce back: B (the map's choice) stays off the shard while A is alive,
    # through lease ticks of B's that all saw the move finished (no sleep guessing how many).
    wait_lease_ticks(cluster, cluster.b_id, TICKS_AFTER_MOVE)
    assert cluster.holders()[moved_shard] == cluster.a_id
    assert_counts(cluster.a, poll, voters + new_voters)
    assert_counts(cluster.b, poll, voters + new_voters)

    bad = cluster.cli("shard", "move", str(cluster.shards), "--to", cluster.a_id)
    assert bad.returncode != 0 and "unknown shard" in bad.stderr
    bad = cluster.cli("shard", "move", "0", "--to", "no-such-node")
    assert bad.returncode != 0 and "not alive" in bad.stderr
    print(f"move test: {time.monotonic() - started:.1f} s")


def wait_lease_ticks(cluster: Cluster, node_id: str, ticks: int) -> None:
    """Wait until `node_id` has run `ticks` more lease ticks: each tick first refreshes the
    node's alive key (engine/ownership.py), so its PTTL jumping back up marks one."""
    key = f"votes:{cluster.stack.wal_topic}:node:{node_id}"
    seen = {"ticks": 0, "pttl_ms": cluster.redis.pttl(key)}

    def ticked() -> bool:
        pttl_ms = cluster.redis.pttl(key)
        if pttl_ms > seen["pttl_ms"]:
            seen["ticks"] += 1
        seen["pttl_ms"] = pttl_ms
        return seen["ticks"] >= ticks

    wait_until(ticked, ticks * LEASE_TTL_S + TAKEOVER_SLACK_S, f"{ticks} lease ticks of {node_id}",
               poll_s=0.05)


def serves_all(cluster: Cluster, engine: EngineProcess, node_id: str) -> bool:
    """Whether every lease names node_id and that node's /readyz says ready."""
    if set(cluster.holders().values()) != {node_id}:
        return False
    try:
        return http_client.get(engine.base_url + "/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_all_held_by(cluster: Cluster, engine: EngineProcess, node_id: str) -> float:
    """Seconds until every lease names node_id and that node's /readyz says ready."""
    started = time.monotonic()
    wait_until(lambda: serves_all(cluster, engine, node_id), LEASE_TTL_S + TAKEOVER_SLACK_S,
               f"{node_id} to hold every shard's lease and answer /readyz 200")
    return time.monotonic() - started


def test_live_node_takes_over_a_dead_nodes_shards(cluster):
    started = time.monotonic()
    cluster.start()
    poll, tokens = cluster.open_poll()
    voters = list(range(1, VOTERS + 1))
    receipts = acked(send_all(cluster.b, poll, tokens, voters), cluster.shards)

    cluster.b.kill()  # SIGKILL of B's whole process group
    took = wait_all_held_by(cluster, cluster.a, cluster.a_id)
    readiness = http_client.get(cluster.a.base_url + "/readyz").json()
    assert readiness["ready"] and readiness["shards_held"] == cluster.shards, readiness
    print(f"takeover: A holds and serves all {cluster.shards} shards {took:.1f} s after the kill")

    assert_repeats(send_all(cluster.a, poll, tokens, voters), receipts)
    half = cluster.shards // 2
    new_voters = [voter for voter in range(VOTERS + 1, VOTERS + 2 * cluster.shards + 1)
                  if voter % cluster.shards >= half]
    acked(send_all(cluster.a, poll, tokens, new_voters), cluster.shards)
    assert_counts(cluster.a, poll, voters + new_voters)
    print(f"takeover test: {time.monotonic() - started:.1f} s")


def test_resumed_zombie_finds_its_leases_lost_and_forwards(cluster):
    started = time.monotonic()
    cluster.start()
    poll, tokens = cluster.open_poll()
    voters = list(range(1, VOTERS + 1))
    receipts = acked(send_all(cluster.b, poll, tokens, voters), cluster.shards)

    cluster.b.pause()
    took = wait_all_held_by(cluster, cluster.a, cluster.a_id)
    print(f"zombie: A took every shard {took:.1f} s after B was paused")
    cluster.b.resume()
    wait_until(lambda: "lease lost" in cluster.b.log_text(), LEASE_LOST_WAIT_S,
               "the resumed B to log that its leases were lost")
    # Alive again, B is its shards' preferred owner: A hands them back through the fence.
    half = cluster.shards // 2
    static = {shard: cluster.a_id if shard < half else cluster.b_id for shard in range(cluster.shards)}
    wait_until(lambda: cluster.holders() == static, LEASE_TTL_S + TAKEOVER_SLACK_S,
               f"the leases back on the static map {static}")
    cluster.a.wait_ready(TAKEOVER_SLACK_S)
    cluster.b.wait_ready(TAKEOVER_SLACK_S)
    print(f"zombie: shards back on the static map {time.monotonic() - started:.1f} s into the test")

    assert_repeats(send_all(cluster.b, poll, tokens, voters), receipts)
    new_voters = list(range(VOTERS + 1, VOTERS + 2 * cluster.shards + 1))
    acked(send_all(cluster.b, poll, tokens, new_voters), cluster.shards)
    assert_counts(cluster.a, poll, voters + new_voters)
    print(f"zombie test: {time.monotonic() - started:.1f} s")
