"""Two regions on one machine, "eu" and "us": nobody is counted twice, and both converge.

Each region: its own Redis (deploy/local/redis_server.py, on the Redis port of stack base
ports 20100 and 20300), one `votes serve` with `region` eu/us and `region_urls` naming both,
publishing results to its own Redis, and a `votes results` role reading that Redis. eu's
engine writes its WAL to the session's real 3-broker Kafka stack (a topic of its own, one
fencing group per partition, transactional producers); us's to the embedded durable log,
so one run covers both WALs (two full Kafka stacks at once are more than CI's 2 cores
need: the forwarding and the replication do not depend on the WAL). `make two-regions`
(VOTES_TWO_REGIONS_FULL_STACKS=1) runs the same test with us on a second full local stack
of its own (deploy/local/stack.py at base port 20300: 3 Kafka brokers, S3, its Redis).
Two replicators ship eu -> us and us -> eu. Both engines share token keys, as regions
would through the secrets store.

The voters of both home regions vote in both regions, each voter's vote sent to both
regions at once. Every answer is 201, 409 or 503 outcome-unknown; no voter gets two 201s;
after a bounded wait both regions' results roles show the same totals, equal to the voters
acknowledged, and per region the voters of that home region. The eu -> us replicator is
killed (SIGKILL) mid-way: us's view of eu stops moving while it is down, and after its
restart everything converges exactly as if it had never stopped.

A second test merges one region's shipments into a real Redis with the publisher's Lua
script in every order, with a duplicate: the hash ends the same every time.
With forwarding disabled (RegionForwarder.home_url returning None) the first test fails:
the same voter is acknowledged (and counted) in both regions.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import subprocess
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio

from deploy.local.ports import Ports
from deploy.local.processes import Service, terminate
from deploy.local.redis_server import start_redis, wait_redis
from deploy.local.stack import LocalStack
from engine import crdt
from engine.keys import load_keys
from engine.replicator import region_fields
from engine.results_publisher import MERGE_SCRIPT, channel, merge_poll_fields, merged_key
from engine.tokens import issue_admin_token, issue_voter_token
from tests.integration.test_kafka_wal import create_topic, delete_topics
from tests.integration.test_results_role import results_role
from tests.support import http_client
from tests.support.cli import cli_command
from tests.support.engine_process import KAFKA_READINESS, EngineProcess, free_port, kafka_env
from tests.support.waiting import wait_until

REGIONS = {"eu": 20100, "us": 20300}  # region -> its stack base port (its Redis port)
SHARDS = 4
OPTIONS = ["a", "b", "c"]
CONVERGE_S = 20.0
REPLICATOR_INTERVAL_MS = 100
LAG_BOUND_S = 5.0
# us on a full stack of its own too (make two-regions): outside CI, minutes more per run.
FULL_STACKS = os.environ.get("VOTES_TWO_REGIONS_FULL_STACKS") == "1"


def home_of(voter: int) -> str:
    return "eu" if voter % 2 else "us"


def option_of(voter: int) -> str:
    return OPTIONS[voter % len(OPTIONS)]


@contextmanager
def region_redis(tmp_path: Path, region: str):
    """A redis-server of the project's scripts on the Redis port of the region's base port."""
    port = Ports(REGIONS[region]).redis
    service = Service(name=f"redis-{region}", port=port,
                      pid_file=tmp_path / region / "redis.pid",
                      log_file=tmp_path / region / "redis.log")
    start_redis(service, tmp_path / region / "redis")
    try:
        wait_redis(service)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        terminate([service.pid()])


class ReplicatorProcess:
    def __init__(self, region: str, from_redis: str, to_redis: str, log_path: Path) -> None:
        self.arguments = ["replicator", "--region", region, "--from-redis", from_redis,
                          "--to-redis", to_redis, "--interval-ms", str(REPLICATOR_INTERVAL_MS)]
        self.log_path = log_path
        self.metrics_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                cli_command(*self.arguments, "--metrics-port", str(self.metrics_port)),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def lag_s(self) -> float | None:
        try:
            text = http_client.get(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                   timeout_s=1.0).text
        except httpx.TransportError:
            return None
        found = re.search(r"^vote_replication_lag_seconds (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else None


@contextmanager
def kafka_topic(stack):
    """A WAL topic of the region's own on `stack`'s Kafka, deleted afterwards."""
    topic = f"wal-region-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topic(stack.bootstrap_servers, topic, partitions=stack.partitions))
    try:
        yield topic
    finally:
        asyncio.run(delete_topics(stack.bootstrap_servers, [topic]))


@contextmanager
def region_services(tmp_path: Path, region: str, local_stack):
    """Yields the region's (Redis URL, WAL environment of its engine)."""
    if region == "eu":
        with region_redis(tmp_path, region) as url, kafka_topic(local_stack) as topic:
            yield url, kafka_env(local_stack, VOTES_WAL_TOPIC=topic)
    elif FULL_STACKS:  # its Redis is the stack's own, on the same port region_redis takes
        stack = LocalStack(base_port=REGIONS[region], partitions=local_stack.partitions)
        stack.up(fresh=True)
        try:
            with kafka_topic(stack) as topic:
                yield (f"redis://127.0.0.1:{stack.ports.redis}/0",
                       kafka_env(stack, VOTES_WAL_TOPIC=topic))
        finally:
            stack.down(wipe=True)
    else:
        with region_redis(tmp_path, region) as url:
            yield url, {"VOTES_SHARDS": str(SHARDS)}


@contextmanager
def two_regions(tmp_path: Path, local_stack):
    """Yields (engines, results URLs, replicators, Redis URLs), each keyed by region."""
    with region_services(tmp_path, "eu", local_stack) as (eu_redis, eu_wal), \
            region_services(tmp_path, "us", local_stack) as (us_redis, us_wal):
        redis_urls = {"eu": eu_redis, "us": us_redis}
        ports = {region: free_port() for region in REGIONS}
        region_urls = ",".join(f"{region}=http://127.0.0.1:{port}" for region, port in ports.items())
        wal = {"eu": eu_wal, "us": us_wal}
        engines = {}
        for region in REGIONS:
            environment = {"VOTES_REGION": region, "VOTES_REGION_URLS": region_urls,
                           "VOTES_REDIS_URL": redis_urls[region],
                           "VOTES_RESULTS_PUBLISH_MS": "50", **wal[region]}
            engines[region] = EngineProcess(
                tmp_path / region / "data", tmp_path / region / "engine.log", environment,
                port=ports[region], keys_from=engines["eu"].data_dir if engines else None,
                **KAFKA_READINESS)
            engines[region].start()
            engines[region].wait_ready()  # eu first: its keys are copied to us
        replicators = {
            "eu": ReplicatorProcess("eu", eu_redis, us_redis, tmp_path / "replicator-eu.log"),
            "us": ReplicatorProcess("us", us_redis, eu_redis, tmp_path / "replicator-us.log")}
        for replicator in replicators.values():
            replicator.start()
        try:
            with results_role(eu_redis, tmp_path / "results-eu.log") as eu_results, \
                    results_role(us_redis, tmp_path / "results-us.log") as us_results:
                yield engines, {"eu": eu_results, "us": us_results}, replicators, redis_urls
        finally:
            for replicator in replicators.values():
                replicator.kill()
            for engine in engines.values():
                engine.stop()


class Voters:
    """Sends votes and keeps every answer, per voter."""

    def __init__(self, engines: dict[str, EngineProcess], poll: str) -> None:
        self.keyring = load_keys(engines["eu"].data_dir)
        self.urls = {region: engine.base_url for region, engine in engines.items()}
        self.poll = poll
        self.answers: dict[int, list[tuple[str, int, str]]] = {}  # voter -> (region, status, type)

    def create_poll(self) -> None:
        admin = {"authorization": f"Bearer {issue_admin_token(self.keyring, ttl_s=600)}"}
        for url in self.urls.values():
            answer = http_client.post(url + "/v1/polls", headers=admin,
                                      json={"id": self.poll, "options": OPTIONS})
            assert answer.status_code == 201, answer.text

    async def _vote(self, client: httpx.AsyncClient, voter: int, region: str) -> None:
        token = issue_voter_token(self.keyring, voter, region=home_of(voter), ttl_s=600)
        answer = await client.post(f"{self.urls[region]}/v1/polls/{self.poll}/votes",
                                   json={"option": option_of(voter)},
                                   headers={"authorization": f"Bearer {token}"})
        kind = answer.json().get("type", "") if answer.status_code != 201 else ""
        self.answers.setdefault(voter, []).append((region, answer.status_code, kind))

    def send(self, sends: list[tuple[int, str]]) -> None:
        """Every (voter, region) at once: a voter listed twice is sent to both concurrently."""
        async def run() -> None:
            async with http_client.async_client_for(timeout_s=10.0) as client:
                await asyncio.gather(*(self._vote(client, voter, region)
                                       for voter, region in sends))
        asyncio.run(run())
        self.check()

    def check(self) -> None:
        """At most one 201 per voter; every answer 201, 409 or 503 outcome-unknown."""
        for voter, answers in self.answers.items():
            statuses = [status for _, status, _ in answers]
            assert statuses.count(201) <= 1, f"voter {voter} acknowledged twice: {answers}"
            for _, status, kind in answers:
                assert status in (201, 409) or (status == 503 and kind.endswith(
                    "/outcome-unknown")), f"voter {voter}: {answers}"

    def counted(self) -> set[int]:
        """The voters acknowledged, after settling outcome-unknown answers by asking the
        home region again (201: counted now; 409: counted before)."""
        unsettled = [voter for voter, answers in self.answers.items()
                     if not any(status == 201 for _, status, _ in answers)]
        self.send([(voter, home_of(voter)) for voter in unsettled])
        return set(self.answers)  # every voter is counted now, exactly once

    def expected(self, voters: set[int]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        counts = {option: 0 for option in OPTIONS}
        regions = {region: {option: 0 for option in OPTIONS} for region in REGIONS}
        for voter in voters:
            counts[option_of(voter)] += 1
            regions[home_of(voter)][option_of(voter)] += 1
        return counts, {region: c for region, c in regions.items() if sum(c.values())}


def results_of(url: str, poll: str) -> dict:
    answer = http_client.get(f"{url}/v1/polls/{poll}/results")
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_converged(results_urls: dict[str, str], poll: str, counts: dict, regions: dict) -> None:
    def converged() -> list[dict] | None:
        documents = [results_of(url, poll) for url in results_urls.values()]
        matching = all(document["counts"] == counts and document["regions"] == regions
                       for document in documents)
        return documents if matching else None
    documents = wait_until(converged, CONVERGE_S, f"both regions to show {counts} / {regions}")
    assert all(document["total"] == sum(counts.values()) for document in documents)


@pytest.mark.timeout(240)
def test_two_regions_count_each_voter_once_and_converge(tmp_path: Path, local_stack) -> None:
    poll = f"regions-{uuid.uuid4().hex[:8]}"
    with two_regions(tmp_path, local_stack) as (engines, results_urls, replicators, redis_urls):
        voters = Voters(engines, poll)
        voters.create_poll()
        # Phase 1: voters 1-40 (both home regions), each sent to both regions at once.
        voters.send([(voter, region) for voter in range(1, 41) for region in REGIONS])
        counts, regions = voters.expected({voter for voter, answers in voters.answers.items()
                                           if any(status == 201 for _, status, _ in answers)})
        wait_converged(results_urls, poll, counts, regions)
        eu_seen_by_us = results_of(results_urls["us"], poll)["regions"]["eu"]

        # Phase 2, with the eu -> us replicator dead: new voters 41-80 to one region each
        # (half of them the wrong one), voters of phase 1 again to both.
        replicators["eu"].kill()
        voters.send([(voter, "eu" if voter % 4 < 2 else "us") for voter in range(41, 81)]
                    + [(voter, region) for voter in range(1, 11) for region in REGIONS])
        _, regions = voters.expected({voter for voter, answers in voters.answers.items()
                                      if any(status == 201 for _, status, _ in answers)})
        for region in REGIONS:  # each region's own results show its own voters of phase 2
            wait_until(lambda region=region: results_of(results_urls[region], poll)[
                "regions"][region] == regions[region], CONVERGE_S, f"{region}'s own voters")
        assert regions["eu"] != eu_seen_by_us
        assert results_of(results_urls["us"], poll)["regions"]["eu"] == eu_seen_by_us

        # What us's results role listens to (its SSE streams wake on it): us's own voters
        # are all published already, so a message now is the replicator's merge of eu.
        us_redis = redis.Redis.from_url(redis_urls["us"])
        changes = us_redis.pubsub()
        changes.subscribe(channel(poll))
        replicators["eu"].start()
        counts, regions = voters.expected(voters.counted())
        assert sum(counts.values()) == 80
        wait_converged(results_urls, poll, counts, regions)
        notified = [message for _ in range(10)
                    if (message := changes.get_message(timeout=0.5)) is not None
                    and message["type"] == "message"]
        assert notified, "the replicator's merge into us announced nothing"
        changes.close()
        us_redis.close()
        for replicator in replicators.values():
            lag_s = wait_until(replicator.lag_s, 10.0, "the replicator's lag gauge")
            assert 0 <= lag_s < LAG_BOUND_S


def test_shipments_in_any_order_merge_to_the_same_hash(tmp_path: Path) -> None:
    """The replicator's two steps (region_fields, then the publisher's Lua merge) applied to
    three successive states of eu, in all 6 orders plus a duplicate of the oldest."""
    snapshots = [crdt.Counters({("eu", 0, "p", "a"): 1, ("eu", 1, "p", "b"): 0}),
                 crdt.Counters({("eu", 0, "p", "a"): 4, ("eu", 1, "p", "b"): 2},
                               {("eu", "r1", "p", "duplicate"): 1}),
                 crdt.Counters({("eu", 0, "p", "a"): 5, ("eu", 1, "p", "b"): 2},
                               {("eu", "r1", "p", "duplicate"): 3}, {("eu", 0, "p")})]
    shipments = [region_fields("p", {name: str(value) for name, value in
                                     crdt.poll_fields(snapshot, "p").items()}, "eu")
                 for snapshot in snapshots]
    newest = {name: str(value) for name, value in shipments[-1]}

    async def merge_in(url: str, poll: str, order: list[int]) -> None:
        client = redis.asyncio.Redis.from_url(url, decode_responses=True)
        script = client.register_script(MERGE_SCRIPT)
        for index in order:
            await merge_poll_fields(script, poll, '{"options":["a","b"],"embargo":false,'
                                    '"shards":2}', shipments[index])
        await client.aclose()

    with region_redis(tmp_path, "eu") as url:
        reader = redis.Redis.from_url(url, decode_responses=True)
        for number, order in enumerate(itertools.permutations(range(3))):
            poll = f"order-{number}-{uuid.uuid4().hex[:6]}"
            asyncio.run(merge_in(url, poll, [*order, 0]))
            assert reader.hgetall(merged_key(poll)) == newest, order
        reader.close()
