"""Proves the results publisher (engine/results_publisher.py) against the local stack's real
Redis: its Lua max-merge never lowers a counter (a stale or reordered publish changes
nothing), two workers' counters add up, a merge that changed something raises the poll's
version and announces it on the poll's channel while one that changed nothing does not, and
`votes serve` with a Redis URL publishes its shards' tallies and rejections by itself, until
the merged hash holds exactly the votes acknowledged and, after the close, every shard closed.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import redis
import redis.asyncio

from engine import crdt
from engine.config import Config
from engine.keys import load_keys
from engine.results_publisher import (
    ResultsPublisher,
    ShardTallies,
    channel,
    merged_key,
    version_key,
)
from engine.tokens import issue_admin_token, issue_voter_token
from tests.support import http_client
from tests.support.engine_process import EngineProcess
from tests.support.waiting import wait_until

SHARDS = 4


def merged(client: redis.Redis, poll: str) -> crdt.Counters:
    fields = client.hgetall(merged_key(poll))
    return crdt.counters_from_fields(poll, [(name.decode(), int(value))
                                            for name, value in fields.items()])


def test_max_merge_never_lowers_and_announces_only_changes(stack_endpoints) -> None:
    url = stack_endpoints["redis"]["url"]
    poll = f"merge-{uuid.uuid4().hex[:8]}"
    state: dict[str, list[int]] = {"w1": [5, 2], "w2": [1, 0]}

    def source(worker: str, shard: int):
        return lambda: [ShardTallies(shard, poll, ["a", "b"], state[worker], False)]

    async def scenario() -> list[bytes]:
        client = redis.asyncio.Redis.from_url(url)
        pubsub = client.pubsub()
        await pubsub.subscribe(channel(poll))
        await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        config = Config(shards=SHARDS, region="eu").validate()
        first = ResultsPublisher(client, config, source("w1", 0), lambda: {poll: {"duplicate": 3}})
        second = ResultsPublisher(client, config, source("w2", 1), lambda: {})
        await first.publish_once()
        await second.publish_once()
        state["w1"] = [4, 1]  # a stale publish (an old owner, a reordered update)
        first.full_publish_at = 0.0
        await first.publish_once()
        state["w1"] = [4, 1]
        first.published.clear()
        version_before = int(await client.get(version_key(poll)))
        await first.publish_once()  # nothing larger: no version, no announcement
        version_after = int(await client.get(version_key(poll)))
        assert version_after == version_before
        announced = []
        while (message := await pubsub.get_message(timeout=0.2)) is not None:
            announced.append(message["data"])
        await pubsub.aclose()
        await client.aclose()
        return announced

    announced = asyncio.run(scenario())
    client = redis.Redis.from_url(url)
    state_now = merged(client, poll)
    assert crdt.totals(state_now, poll) == {"a": 6, "b": 2}
    assert crdt.region_totals(state_now, poll) == {"eu": {"a": 6, "b": 2}}
    assert crdt.rejected_totals(state_now, poll) == {"duplicate": 3}
    assert len(announced) == 2 and [int(v) for v in announced] == sorted(int(v) for v in announced)
    client.close()


def test_serve_publishes_its_tallies_to_redis(tmp_path: Path, stack_endpoints) -> None:
    url = stack_endpoints["redis"]["url"]
    poll = f"live-{uuid.uuid4().hex[:8]}"
    engine = EngineProcess(tmp_path / "data", tmp_path / "engine.log",
                           {"VOTES_REDIS_URL": url, "VOTES_SHARDS": str(SHARDS),
                            "VOTES_REGION": "eu"}, workers=2)
    engine.start()
    try:
        engine.wait_ready()
        keyring = load_keys(tmp_path / "data")
        admin = {"authorization": f"Bearer {issue_admin_token(keyring, ttl_s=600)}"}
        with http_client.client_for(engine.base_url) as client:
            assert client.post("/v1/polls", json={"id": poll, "options": ["a", "b"]},
                               headers=admin).status_code == 201
            votes = {voter: "a" if voter % 3 else "b" for voter in range(1, 21)}
            for voter, option in votes.items():
                token = issue_voter_token(keyring, voter, ttl_s=600)
                answer = client.post(f"/v1/polls/{poll}/votes", json={"option": option},
                                     headers={"authorization": f"Bearer {token}"})
                assert answer.status_code == 201
            repeat = issue_voter_token(keyring, 1, ttl_s=600)
            assert client.post(f"/v1/polls/{poll}/votes", json={"option": "a"},
                               headers={"authorization": f"Bearer {repeat}"}).status_code == 409
            expected = {"a": sum(o == "a" for o in votes.values()),
                        "b": sum(o == "b" for o in votes.values())}
            redis_client = redis.Redis.from_url(url)
            wait_until(lambda: crdt.totals(merged(redis_client, poll), poll) == expected
                       and crdt.rejected_totals(merged(redis_client, poll), poll)
                       == {"duplicate": 1}, 10.0, "the merged hash to hold every vote")
            assert client.post(f"/v1/polls/{poll}/close", headers=admin).status_code == 200
            wait_until(lambda: crdt.closed_shards(merged(redis_client, poll), poll)
                       == {"eu": set(range(SHARDS))}, 10.0, "every shard closed in Redis")
            assert crdt.totals(merged(redis_client, poll), poll) == expected
            redis_client.close()
    finally:
        engine.stop()
