"""The engine on the Kafka WAL (`votes serve` subprocesses on the real 3-broker stack).

Every check of counts is made by a FRESH engine (new data dir, same keys), which takes every
group's fence and replays the partitions from Kafka, so it sees only what the log holds:
- broker kill under load: ~32 senders vote (distinct voters) while the broker leading the
  most WAL partitions is SIGKILLed with requests on the wire; sending goes on for at least
  5 s and until votes are acknowledged again on the two brokers left; then the broker
  comes back. Every voter that got 201 is counted once (re-send: 409 with the
  identical receipt string), voters told wal-unavailable / not-ready are not counted
  (re-send: 201), and the total is acked + the unknown outcomes the log kept;
- Kafka down: with two of three brokers killed no vote gets 201 (503 wal-unavailable or
  outcome-unknown); after they return votes get 201 again from the same engine process;
  counts are exact;
- fencing: engine A (4 shards per fencing group) is SIGSTOPped with votes in flight, engine
  B starts and fences every group; A's acknowledged votes are 409 at B with A's receipts; after SIGCONT A acknowledges
  nothing new; each pending vote of A is counted at B exactly when A answered 201;
- `votes serve` refuses to start on a WAL topic with replication factor 1, naming it.
The WAL topic and the transactional ids `wal-g<group>` are shared by every test, so each test
uses a fresh poll id, and at most one engine owns the groups at a time. Seeds are printed.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.support import http_client, vote_client
from tests.support.engine_process import KAFKA_READINESS, EngineProcess, kafka_env
from tests.support.http_client import ValidatingAsyncClient
from tests.support.vote_client import (
    ACKED,
    NOT_COUNTED,
    UNEXPECTED,
    UNKNOWN,
    Answer,
    RequestProgress,
    check_resent_votes,
    held_by_the_log,
    on_the_wire,
    post_vote,
    resend_all,
    seeded_rng,
    wrong_receipts,
)

from .test_kafka_wal import create_topic, delete_topics

pytestmark = pytest.mark.integration

OPTIONS = ["red", "green", "blue"]
SENDERS = 32
FOLLOWERS_PAUSED_S = 1.5
SENDING_AFTER_KILL_S = 5.0
ACKS_AFTER_KILL = 50
REQUEST_TIMEOUT_S = 20.0
BACKOFF_S = 0.05
SHARDS_PER_GROUP_FENCED = 4
# A 503 with one of these problem types stored nothing (a refused connection neither).
NOT_COUNTED_PROBLEMS = ("/problems/wal-unavailable", "/problems/not-ready", "/problems/overloaded")


@dataclass
class Campaign:
    """Senders that each vote with the next unused voter, one request at a time."""

    base_url: str
    poll: str
    tokens: list[str]
    rng: random.Random
    answers: dict[int, Answer] = field(default_factory=dict)
    in_flight: dict[int, RequestProgress] = field(default_factory=dict)
    next_voter: int = 1
    stopping: bool = False
    # Vote only for voters of these shards (None: all), given the shard count.
    shards_voting: set[int] | None = None
    shards: int = 1

    def take_voter(self) -> int | None:
        while self.next_voter <= len(self.tokens):
            self.next_voter += 1
            voter = self.next_voter - 1
            if self.shards_voting is None or voter % self.shards in self.shards_voting:
                return voter
        return None

    def acked(self) -> int:
        return sum(answer.kind == ACKED for answer in self.answers.values())

    def on_the_wire(self) -> int:
        return on_the_wire(self.in_flight)

    async def send(self, client: httpx.AsyncClient, voter: int, option: str) -> Answer:
        return await post_vote(client, f"{self.base_url}/v1/polls/{self.poll}/votes",
                               self.tokens[voter - 1], option, voter=voter,
                               in_flight=self.in_flight, not_counted_problems=NOT_COUNTED_PROBLEMS)

    async def sender(self, client: httpx.AsyncClient) -> None:
        while not self.stopping and (voter := self.take_voter()) is not None:
            option = self.rng.choice(OPTIONS)
            answer = await self.send(client, voter, option)
            self.answers[voter] = answer
            if answer.kind != ACKED:
                await asyncio.sleep(BACKOFF_S)

    async def run_until(self, done, senders: int = SENDERS, timeout_s: float = 60.0) -> None:
        """Send with `senders` tasks until `await done()` returns, then let them finish."""
        self.stopping = False
        limits = httpx.Limits(max_connections=senders, max_keepalive_connections=senders)
        async with ValidatingAsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
            tasks = [asyncio.create_task(self.sender(client)) for _ in range(senders)]
            try:
                await asyncio.wait_for(done(), timeout_s)
            finally:
                self.stopping = True
                await asyncio.gather(*tasks)

    async def wait_for_acks(self, count: int) -> None:
        target = self.acked() + count
        while self.acked() < target:
            if self.next_voter > len(self.tokens):
                pytest.fail(f"ran out of the {len(self.tokens)} voter tokens")
            await asyncio.sleep(0.01)

    async def wait_on_the_wire(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.on_the_wire() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)

    def by_kind(self, voters=None) -> dict[str, dict[int, Answer]]:
        return vote_client.by_kind(self.answers, voters)

    def summary(self) -> dict[str, int]:
        return dict(Counter(answer.detail for answer in self.answers.values()))


async def resend_votes(base_url: str, poll: str, tokens: list[str],
                       votes: dict[int, str]) -> dict[int, httpx.Response]:
    """Send each voter's vote once more (same option), SENDERS at a time."""
    return await resend_all(base_url, poll, tokens, votes, first_voter=1, concurrency=SENDERS,
                            timeout_s=REQUEST_TIMEOUT_S)


def resend(engine: EngineProcess, campaign: Campaign,
           answers: dict[int, Answer]) -> dict[int, httpx.Response]:
    votes = {voter: answer.option for voter, answer in answers.items()}
    return asyncio.run(resend_votes(engine.base_url, campaign.poll, campaign.tokens, votes))


def results(engine: EngineProcess, poll: str) -> dict:
    answer = http_client.get(f"{engine.base_url}/v1/polls/{poll}/results",
                             timeout=REQUEST_TIMEOUT_S)
    assert answer.status_code == 200, answer.text
    return answer.json()


def check_counts_at_fresh_engine(first: EngineProcess, tmp_path: Path, env: dict[str, str],
                                 campaign: Campaign, label: str) -> None:
    """SIGKILL `first` and start a fresh engine on its keys (new data dir: it takes every
    shard's fence and replays the log). The fresh engine counts every acked voter once, no
    voter told 'not counted', and between 0 and all of the unknown outcomes; neither engine
    logged a traceback."""
    first.kill()
    fresh = start_engine(tmp_path, "b", env, keys_from=first.data_dir)
    try:
        kinds = campaign.by_kind()
        assert not kinds[UNEXPECTED], f"unexpected answers: {list(kinds[UNEXPECTED].items())[:10]}"
        before = results(fresh, campaign.poll)
        check_resent_votes(before, kinds, lambda answers: resend(fresh, campaign, answers),
                           OPTIONS, f"{label} fresh engine:")
        assert_no_traceback(first, fresh)
    finally:
        fresh.kill()


def start_engine(tmp_path: Path, name: str, env: dict[str, str],
                 keys_from: Path | None = None) -> EngineProcess:
    engine = EngineProcess(tmp_path / name, tmp_path / f"{name}.log", env, keys_from=keys_from,
                           **KAFKA_READINESS)
    engine.start()
    try:
        took = engine.wait_ready()
    except BaseException:
        engine.kill()  # a caller that never got the engine cannot stop it
        raise
    print(f"engine {name} ready in {took:.1f} s (port {engine.port})")
    return engine


def open_poll(engine: EngineProcess, voters: int) -> tuple[str, list[str]]:
    """A fresh poll (the topic is shared by every test) and tokens for voters 1..voters."""
    poll = f"kafka-{uuid.uuid4().hex[:12]}"
    return poll, vote_client.open_poll(engine, poll, OPTIONS, first_voter=1, voters=voters,
                                       timeout_s=REQUEST_TIMEOUT_S)


async def leaders_of_wal(local_stack) -> tuple[Counter, dict[int, set[int]]]:
    """How many WAL partitions each broker leads, and which."""
    admin = AIOKafkaAdminClient(bootstrap_servers=local_stack.bootstrap_servers,
                                request_timeout_ms=10000)
    await admin.start()
    try:
        (description,) = await admin.describe_topics([local_stack.wal_topic])
    finally:
        await admin.close()
    led_by: dict[int, set[int]] = {}
    for partition in description["partitions"]:
        led_by.setdefault(partition["leader"], set()).add(partition["partition"])
    return Counter({leader: len(led) for leader, led in led_by.items()}), led_by


def restart_brokers(local_stack, nodes) -> None:
    """Start the brokers `nodes` again; if any, wait until every partition is fully replicated."""
    for node in nodes:
        local_stack.start_broker(node)
    if nodes:
        local_stack.wait_fully_replicated(None, 90)


def assert_no_traceback(*engines: EngineProcess) -> None:
    for engine in engines:
        assert "Traceback" not in engine.log_text(), engine.log_tail()


# Tests --------------------------------------------------------------------------------------


def test_broker_kill_under_load_loses_no_acknowledged_vote(local_stack, tmp_path):
    """On one machine a follower is ~1 ms behind its leader, so a plain kill rarely catches a
    write acknowledged by the leader alone (acks=1) before it was copied. As a GC pause or a
    network stall would, the two other brokers are paused for FOLLOWERS_PAUSED_S just before
    the kill: with acks=all nothing is acknowledged meanwhile; with acks=1 the leader goes on
    acknowledging writes that die with it. The votes go to the victim's shards only: a group
    commit waits for all its shards, so a shard led by a paused broker would hold up the
    victim's shards too, and the pause would show nothing."""
    label = "[broker-kill]"
    rng = seeded_rng(label)
    env = kafka_env(local_stack)
    first = start_engine(tmp_path, "a", env)
    victim = None
    paused: dict[int, int] = {}
    try:
        readiness = http_client.get(first.base_url + "/readyz", timeout=5).json()
        assert readiness["durability"] == "kafka-acks-all", readiness
        poll, tokens = open_poll(first, 40_000)
        leaders, led_by = asyncio.run(leaders_of_wal(local_stack))
        victim = leaders.most_common(1)[0][0]
        campaign = Campaign(first.base_url, poll, tokens, rng, shards_voting=led_by[victim],
                            shards=local_stack.partitions)
        followers = [node for node in (1, 2, 3) if node != victim]
        stats: dict = {}

        async def kill_mid_batch() -> None:
            await campaign.wait_for_acks(300)
            await asyncio.sleep(rng.uniform(0.05, 0.5))
            for node in followers:
                paused[node] = local_stack.broker_pid(node)
                os.kill(paused[node], signal.SIGSTOP)
            acked_at_pause = campaign.acked()
            await asyncio.sleep(FOLLOWERS_PAUSED_S)
            await campaign.wait_on_the_wire()
            # No await between counting and the kill: the counts are exact at the kill.
            stats.update(in_flight=len(campaign.in_flight), on_the_wire=campaign.on_the_wire(),
                         acked=campaign.acked(), started=time.monotonic(),
                         acked_while_paused=campaign.acked() - acked_at_pause)
            local_stack.kill_broker(victim)
            resume_brokers(paused)
            # Two of three brokers take acks=all writes: votes must be acknowledged again.
            await campaign.wait_for_acks(ACKS_AFTER_KILL)
            stats["acks_again_s"] = time.monotonic() - stats["started"]
            await asyncio.sleep(max(0.0, SENDING_AFTER_KILL_S - stats["acks_again_s"]))

        try:
            asyncio.run(campaign.run_until(kill_mid_batch))
        finally:
            resume_brokers(paused)
        sent_s = time.monotonic() - stats["started"]
        kinds = campaign.by_kind()
        print(f"{label} killed broker {victim} (led partitions {sorted(led_by[victim])} of "
              f"{sum(leaders.values())}, the shards voted on) with {stats['in_flight']} requests in "
              f"flight ({stats['on_the_wire']} on the wire) after pausing brokers {followers} "
              f"for {FOLLOWERS_PAUSED_S} s ({stats['acked_while_paused']} acked meanwhile); "
              f"{stats['acked']} acked before the kill, {campaign.acked() - stats['acked']} in "
              f"the {sent_s:.1f} s after ({ACKS_AFTER_KILL} acked again "
              f"{stats['acks_again_s']:.1f} s after the kill); sent={len(campaign.answers)}; "
              f"answers: "
              f"{campaign.summary()}")
        assert stats["in_flight"] > 0 and stats["on_the_wire"] > 0, stats
        assert not kinds[UNEXPECTED], list(kinds[UNEXPECTED].items())[:10]
        restart_brokers(local_stack, [victim])
        victim = None
        check_counts_at_fresh_engine(first, tmp_path, env, campaign, label)
    finally:
        first.kill()
        resume_brokers(paused)
        if victim is not None:
            restart_brokers(local_stack, [victim])


def resume_brokers(paused: dict[int, int]) -> None:
    """SIGCONT every paused broker process (node -> pid)."""
    for pid in paused.values():
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    paused.clear()


def test_kafka_down_refuses_votes_then_recovers_without_restart(local_stack, tmp_path):
    label = "[kafka-down]"
    rng = seeded_rng(label)
    env = kafka_env(local_stack)
    shards = local_stack.partitions
    first = start_engine(tmp_path, "a", env)
    victims = [2, 3]
    down = []
    try:
        poll, tokens = open_poll(first, 20_000)
        campaign = Campaign(first.base_url, poll, tokens, rng)
        asyncio.run(campaign.run_until(lambda: campaign.wait_for_acks(200), senders=16))
        down_from = campaign.next_voter
        for victim in victims:
            local_stack.kill_broker(victim)
            down.append(victim)
        asyncio.run(campaign.run_until(lambda: asyncio.sleep(6.0), senders=16))
        while_down = campaign.by_kind(range(down_from, campaign.next_voter))
        print(f"{label} with brokers {victims} down: "
              f"{ {kind: len(answers) for kind, answers in while_down.items()} }; answers: "
              f"{Counter(a.detail for v, a in campaign.answers.items() if v >= down_from)}")
        assert not while_down[ACKED], f"acknowledged while Kafka could not take writes: " \
                                      f"{list(while_down[ACKED].items())[:5]}"
        assert while_down[NOT_COUNTED] or while_down[UNKNOWN]
        for victim in victims:
            local_stack.start_broker(victim)
        down.clear()
        back_at = time.monotonic()
        back_from = campaign.next_voter

        async def every_shard_acks_again() -> None:
            while True:
                acked = {voter % shards for voter, answer in campaign.answers.items()
                         if voter >= back_from and answer.kind == ACKED}
                if len(acked) == shards:
                    return
                await asyncio.sleep(0.05)

        asyncio.run(campaign.run_until(every_shard_acks_again, senders=16, timeout_s=90))
        print(f"{label} every shard acknowledged votes again {time.monotonic() - back_at:.1f} s "
              f"after the brokers were restarted, same engine process (pid "
              f"{first.process.pid}); answers since: "
              f"{Counter(a.detail for v, a in campaign.answers.items() if v >= back_from)}")
        assert first.alive()
        local_stack.wait_fully_replicated(None, 90)
        check_counts_at_fresh_engine(first, tmp_path, env, campaign, label)
    finally:
        first.kill()
        restart_brokers(local_stack, down)


def test_paused_owner_is_fenced_by_the_next_one(local_stack, tmp_path):
    label = "[fencing]"
    rng = seeded_rng(label)
    # Several shards per fencing group, as production runs: the fence is the group's. The
    # layout differs from the shared topic's (its group logs' headers say 1 shard per group),
    # so this test writes a topic of its own.
    shards = SHARDS_PER_GROUP_FENCED * local_stack.partitions
    topic = f"wal-fencing-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topic(local_stack.bootstrap_servers, topic,
                             partitions=local_stack.partitions))
    env = kafka_env(local_stack, VOTES_SHARDS=str(shards), VOTES_WAL_TOPIC=topic)
    zombie = successor = None
    try:
        zombie = start_engine(tmp_path, "a", env)
        poll, tokens = open_poll(zombie, 20_000)
        campaign = Campaign(zombie.base_url, poll, tokens, rng)
        snapshot: dict = {}

        async def pause_mid_batch() -> None:
            await campaign.wait_for_acks(200)
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            await campaign.wait_on_the_wire()
            snapshot.update(acked=dict(campaign.by_kind()[ACKED]),
                            pending=set(campaign.in_flight), on_the_wire=campaign.on_the_wire())
            zombie.pause()
            campaign.stopping = True  # what is in flight stays in flight until SIGCONT

        async def fence_then_resume() -> None:
            # The senders' requests to the paused engine stay open meanwhile.
            await pause_mid_batch()
            nonlocal successor
            successor = await asyncio.to_thread(start_engine, tmp_path, "b", env, zombie.data_dir)
            acked_before = snapshot["acked"]
            wrong = wrong_receipts(await resend_votes(
                successor.base_url, poll, tokens,
                {voter: answer.option for voter, answer in acked_before.items()}), acked_before)
            assert not wrong, (f"{len(wrong)} of {len(acked_before)} votes acknowledged by A "
                               f"are not 409 with A's receipt at B: {list(wrong.items())[:5]}")
            zombie.resume()

        started = time.monotonic()
        asyncio.run(campaign.run_until(fence_then_resume, timeout_s=120))
        acked_before, pending = snapshot["acked"], snapshot["pending"]
        pending_kinds = campaign.by_kind(pending)
        print(f"{label} paused A with {len(pending)} requests in flight "
              f"({snapshot['on_the_wire']} on the wire) after {len(acked_before)} acks; B ready "
              f"and checked, A resumed; {time.monotonic() - started:.1f} s; A's answers to them: "
              f"{Counter(campaign.answers[voter].detail for voter in pending)}")
        assert pending and snapshot["on_the_wire"] > 0

        # After SIGCONT the zombie acknowledges nothing new: every group is fenced.
        after_from = campaign.next_voter
        late = Campaign(zombie.base_url, poll, tokens, rng, next_voter=after_from)
        late_voters = range(after_from, after_from + 2 * shards)  # each shard twice

        async def one_round() -> None:
            while late.next_voter < late_voters.stop:
                await asyncio.sleep(0.05)

        asyncio.run(late.run_until(one_round, senders=8))
        late_kinds = late.by_kind()
        print(f"{label} votes sent to A after SIGCONT: {late.summary()}")
        assert not late_kinds[ACKED] and not late_kinds[UNEXPECTED], late.summary()
        readiness = http_client.get(zombie.base_url + "/readyz", timeout=5)
        assert readiness.status_code == 503, readiness.text
        print(f"{label} A's /readyz after fencing: {readiness.text[:300]}")

        # Each pending vote is counted at B exactly when A answered 201 (unknown: either).
        before = results(successor, poll)
        pending_acked = pending_kinds[ACKED]
        assert not pending_kinds[UNEXPECTED], pending_kinds[UNEXPECTED]
        wrong = wrong_receipts(resend(successor, campaign, pending_acked), pending_acked)
        assert not wrong, f"A acknowledged after SIGCONT but B disagrees: {wrong}"
        unknown_again = resend(successor, campaign, pending_kinds[UNKNOWN])
        held = held_by_the_log(unknown_again)
        # A's refusals, and everything sent to A after SIGCONT, are not in the log.
        not_counted = {**pending_kinds[NOT_COUNTED], **late.answers}
        counted_anyway = {voter: response.status_code for voter, response in
                          resend(successor, campaign, not_counted).items()
                          if response.status_code != 201}
        print(f"{label} B's total={before['total']}: acked by A before the pause "
              f"{len(acked_before)} + pending acked by A {len(pending_acked)} + pending unknown "
              f"kept {len(held)} of {len(pending_kinds[UNKNOWN])}; pending not counted "
              f"{len(pending_kinds[NOT_COUNTED])}")
        assert not counted_anyway, f"votes A refused are counted at B: {counted_anyway}"
        assert before["total"] == len(acked_before) + len(pending_acked) + len(held)
        assert_no_traceback(zombie, successor)
    finally:
        for engine in (zombie, successor):
            if engine is not None:
                engine.kill()
        asyncio.run(delete_topics(local_stack.bootstrap_servers, [topic]))


def test_serve_refuses_a_wal_topic_without_replication(local_stack, tmp_path):
    topic = f"wal-rf1-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topic(local_stack.bootstrap_servers, topic,
                             partitions=local_stack.partitions, replication=1,
                             configs={"min.insync.replicas": "1"}))
    try:
        engine = EngineProcess(tmp_path / "data", tmp_path / "serve.log",
                               {**kafka_env(local_stack), "VOTES_WAL_TOPIC": topic})
        engine.start()
        try:
            code = engine.wait_exit(60)
        finally:
            engine.kill()
        output = engine.log_text()
        print(f"votes serve exited {code}: {output.strip().splitlines()[-1]}")
        assert code != 0
        assert f"WAL topic '{topic}'" in output and "replication factor is 1" in output, output
        assert "min.insync.replicas is 1" in output, output
    finally:
        asyncio.run(delete_topics(local_stack.bootstrap_servers, [topic]))
