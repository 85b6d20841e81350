"""Fault schedules under load on the real stack (3-broker Kafka WAL, SeaweedFS S3, Redis
leases), each judged by the chaos checker against the state recovered after the faults.

Every schedule runs the load client (tests/chaos/load.py) while it injects its faults with
requests in flight, heals them, and ends the same way: the engine(s) are SIGKILLed and started
again on the same data dirs (so what is checked was recovered from Kafka and S3, not memory),
then the restarted engine's results, the replay tool's recount of the raw topic and
`votes replay verify` must agree with every answer the client got: each 201 and 409 counted
once with its option, nothing told FAILED counted, no 5xx outside the contract and no 4xx but
409 `already-voted` (every answer validated against engine/openapi.yaml), every receipt
verified offline with the data dir's public key and naming the poll and option sent, every
409's receipt equal to its voter's 201 receipt (tests/chaos/checker.py).

- broker-restart: each round SIGKILLs one broker (rotating), waits (bounded) until votes sent
  after the kill are acknowledged by the two left, then restarts it and waits until every
  partition is fully replicated again before the next round;
- two-brokers-down: with two brokers SIGKILLed no vote sent afterwards is acknowledged (the
  topic has min.insync.replicas=2 and the controller quorum is lost), some are answered
  FAILED/UNKNOWN; after both restart, every shard acknowledges votes again (bounded wait);
- zombie-owner: two nodes with Redis leases split the shards; one node is SIGSTOPped until
  the other holds and serves all shards (fenced through Kafka), then SIGCONTed with requests
  on the wire: it finds its leases lost, the shards go back to their preferred owner, and
  nothing it acknowledged is missing from the log (the zombie alternates between the nodes);
- s3-before-manifest: snapshots every fraction of a second, with the failpoint holding each
  save between the object upload and the manifest swap; each round S3 is SIGKILLed while a
  save waits there, so the swap fails (the engine logs the failed MANIFEST.json call) while
  votes are still acknowledged (the WAL is Kafka); S3 restarts; the final restart recovers
  from the older snapshots plus the log.

Each test uses a fresh poll (the WAL topic is shared by the session and the recount is
filtered by poll), fresh node ids, its own S3 prefix, and clears the lease keys in Redis.
The profile (short in CI, long with VOTES_CHAOS_PROFILE=long) sets rounds, pauses and load;
the seed is printed (VOTES_TEST_SEED repeats it).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from functools import partial
from pathlib import Path

import pytest

from engine.config import Config
from tests.chaos import kafka_cluster as cluster
from tests.chaos.harness import (
    ChaosRun,
    Profile,
    engine_config,
    profile_from_environment,
    results_of,
    seeded_random,
)
from tests.chaos.load import FAILED, REQUEST_TIMEOUT_S, UNKNOWN
from tests.support.engine_process import EngineProcess, free_port

PROFILE = profile_from_environment()
pytestmark = [pytest.mark.integration,
              pytest.mark.timeout(300 if PROFILE.name == "short" else 1800)]

BROKERS = (1, 2, 3)
# Snapshots often enough that the final recovery is "snapshot + log tail", not a full replay.
SNAPSHOTS = {"VOTES_SNAPSHOT_INTERVAL_S": "2", "VOTES_SNAPSHOT_VOTES_MIN": "2000"}
# Votes acknowledged again after a fault that must not stop them: one broker of three
# (once the dead one left the ISR, 3 s here), or S3.
ACKS_AGAIN_S = 45.0
ACKS_AFTER_HEAL_S = 90.0
# Brokers down for longer than the client waits for one answer: every sender starts at
# least one request while they are down.
TWO_DOWN_S_MIN = REQUEST_TIMEOUT_S + 1.0
LEASE_TTL_S = 3.0
TAKEOVER_S = LEASE_TTL_S + 20.0  # lease expiry, then fence and replay of the other half
FAILPOINT = "s3-snapshot-before-manifest"
FAILPOINT_PAUSE_S = 2.0
FAILPOINT_LINE = re.compile(re.escape(f"failpoint reached: {FAILPOINT}"))
# The manifest step is the only S3 call after the upload, so a failure naming MANIFEST.json
# is a snapshot that was uploaded and then not swapped in.
MANIFEST_FAILURE = re.compile(r"snapshot of shard \d+ failed: \w+ \S+/MANIFEST\.json")
FAILPOINT_WAIT_S = 30.0
# Upload, failpoint pause and manifest of every shard once S3 is back (and the engine's
# retries of calls that began while it was down).
SNAPSHOTS_AGAIN_S = 45.0
LEASE_LOST = re.compile(r"lease lost")
# Longer than a vote takes, shorter than a pause (lease expiry + takeover).
ZOMBIE_REQUEST_TIMEOUT_S = 2.5


def rounds_of(profile: Profile, short_rounds: int | None = None) -> int:
    return short_rounds if short_rounds is not None and profile.name == "short" else profile.rounds


# 1. broker-restart ------------------------------------------------------------------------------


def test_broker_restart(local_stack, tmp_path: Path) -> None:
    schedule_name = "broker-restart"
    rng = seeded_random(schedule_name)
    cluster.heal_stack(local_stack)  # one broker down before the faults would make it two
    env = cluster.stack_env(local_stack, cluster.fresh_s3_prefix(schedule_name), **SNAPSHOTS)
    engine = cluster.new_engine(tmp_path, "engine", env, cluster.shared_keys(tmp_path))
    first_victim = rng.choice(BROKERS)
    try:
        run = cluster.started_run([engine], schedule_name, PROFILE, rng)

        async def schedule(run: ChaosRun) -> None:
            for round_index in range(PROFILE.rounds):
                victim = BROKERS[(BROKERS.index(first_victim) + round_index) % len(BROKERS)]
                await run.faults.fire("kill-broker", partial(local_stack.kill_broker, victim),
                                      f"broker {victim}", blocking=True)
                killed_s = time.monotonic()
                took = await cluster.wait_for_acknowledged(
                    run.load, killed_s, ACKS_AGAIN_S,
                    what=f"broker {victim} killed")
                run.faults.note(f"votes sent after the kill acknowledged {took:.1f} s after it")
                await run.between_faults()
                starting_s = time.monotonic()
                await asyncio.to_thread(local_stack.start_broker, victim)
                started_s = time.monotonic()
                await asyncio.to_thread(local_stack.wait_fully_replicated, None,
                                        cluster.HEAL_WAIT_S)
                run.faults.note(f"broker {victim} back in {started_s - starting_s:.1f} s, every "
                                f"partition in sync {time.monotonic() - started_s:.1f} s later")
                await run.between_faults()

        asyncio.run(run.run(schedule))
        verdict = cluster.check_recovered(run, [engine], env)
        assert verdict.ok, verdict.problems
        cluster.assert_no_traceback([engine])
        cluster.cleanup_s3(env, engine.data_dir)
    finally:
        engine.kill()
        cluster.heal_stack(local_stack)


# 2. two-brokers-down ------------------------------------------------------------------------------


def test_two_brokers_down(local_stack, tmp_path: Path) -> None:
    schedule_name = "two-brokers-down"
    rng = seeded_random(schedule_name)
    cluster.heal_stack(local_stack)  # one broker down before the faults would make it two
    env = cluster.stack_env(local_stack, cluster.fresh_s3_prefix(schedule_name), **SNAPSHOTS)
    engine = cluster.new_engine(tmp_path, "engine", env, cluster.shared_keys(tmp_path))
    shards = local_stack.partitions
    down_s = max(TWO_DOWN_S_MIN, 4 * PROFILE.load_s_between_faults)
    windows: list[tuple[float, float]] = []
    try:
        run = cluster.started_run([engine], schedule_name, PROFILE, rng)

        async def schedule(run: ChaosRun) -> None:
            for _ in range(rounds_of(PROFILE, short_rounds=1)):
                victims = sorted(rng.sample(BROKERS, 2))

                await run.faults.fire("kill-two-brokers",
                                      partial(kill_brokers, local_stack, victims),
                                      f"brokers {victims}", blocking=True)
                dead_s = time.monotonic()  # both processes are gone
                await asyncio.sleep(down_s)
                healing_s = time.monotonic()
                windows.append((dead_s, healing_s))
                await asyncio.gather(*(asyncio.to_thread(local_stack.start_broker, victim)
                                       for victim in victims))
                took = await cluster.wait_for_acknowledged(
                    run.load, healing_s, ACKS_AFTER_HEAL_S, shards=shards,
                    what=f"brokers {victims} restarted")
                run.faults.note(f"brokers {victims} restarted; every shard acknowledged votes "
                                f"sent since {took:.1f} s after the restart began")
                await asyncio.to_thread(local_stack.wait_fully_replicated, None,
                                        cluster.HEAL_WAIT_S)
                await run.between_faults()

        asyncio.run(run.run(schedule))
        for dead_s, healing_s in windows:
            check_nothing_acknowledged_while_down(run, dead_s, healing_s)
        verdict = cluster.check_recovered(run, [engine], env)
        assert verdict.ok, verdict.problems
        cluster.assert_no_traceback([engine])
        cluster.cleanup_s3(env, engine.data_dir)
    finally:
        engine.kill()
        cluster.heal_stack(local_stack)


def kill_brokers(local_stack, victims: list[int]) -> None:
    for victim in victims:
        local_stack.kill_broker(victim)


def check_nothing_acknowledged_while_down(run: ChaosRun, dead_s: float, healing_s: float) -> None:
    """No request sent after both brokers died got a 201 before they were started again, and
    some of them were refused (FAILED or UNKNOWN). A 201 that came after the restart began may
    be genuine (the vote waited in the engine until Kafka took it); those are printed."""
    sent = [request for request in run.load.ledger.requests
            if dead_s <= request.started_s < healing_s]
    acknowledged = run.load.ledger.acknowledged_between(dead_s, healing_s)
    while_down = [request for request in acknowledged if request.ended_s < healing_s]
    refused = [request for request in sent if request.outcome in (FAILED, UNKNOWN)]
    run.faults.note(f"two brokers down {healing_s - dead_s:.1f} s: {len(sent)} requests sent, "
                    f"{len(refused)} FAILED/UNKNOWN, {len(acknowledged)} acknowledged "
                    f"({len(while_down)} before the restart began)")
    assert not while_down, (f"{len(while_down)} votes acknowledged while two of three brokers "
                            f"were dead: {while_down[:5]}")
    assert refused, f"no request was refused while two brokers were dead: {sent[:5]}"


# 3. zombie-owner ----------------------------------------------------------------------------------


class TwoNodes:
    """Two engines with Redis leases: node A prefers the first half of the shards, B the rest."""

    def __init__(self, local_stack, tmp_path: Path, schedule_name: str) -> None:
        self.shards = local_stack.partitions
        suffix = uuid.uuid4().hex[:8]
        self.ids = {"a": f"chaos-a-{suffix}", "b": f"chaos-b-{suffix}"}
        half = self.shards // 2
        self.static = {shard: self.ids["a"] if shard < half else self.ids["b"]
                       for shard in range(self.shards)}
        group_map = f"{self.ids['a']}=0-{half - 1},{self.ids['b']}={half}-{self.shards - 1}"
        s3_prefix = cluster.fresh_s3_prefix(schedule_name)
        keys = cluster.shared_keys(tmp_path)
        self.envs: dict[str, dict[str, str]] = {}
        self.engines: dict[str, EngineProcess] = {}
        for name in ("a", "b"):
            port = free_port()
            self.envs[name] = cluster.stack_env(
                local_stack, s3_prefix, **SNAPSHOTS, VOTES_REDIS_URL=local_stack.redis_url,
                VOTES_GROUP_MAP=group_map, VOTES_NODE_ID=self.ids[name],
                VOTES_ADVERTISE_URL=f"http://127.0.0.1:{port}", VOTES_LEASE_TTL_S=str(LEASE_TTL_S))
            self.engines[name] = cluster.new_engine(tmp_path, name, self.envs[name], keys, port)
        self.leases = cluster.LeaseKeys(local_stack)

    def both(self) -> list[EngineProcess]:
        return [self.engines["a"], self.engines["b"]]

    async def wait_held(self, wanted: dict[int, str], ready: list[EngineProcess],
                        timeout_s: float, what: str) -> float:
        """Wait until the leases are `wanted` and each of `ready` answers /readyz 200 holding
        exactly the shards the leases give it."""
        started = time.monotonic()
        while True:
            holders = self.leases.holders()
            if holders == wanted:
                answers = [await cluster.readiness(engine) for engine in ready]
                if all(answer is not None and answer["shards_held"] ==
                       sum(holder == answer["node_id"] for holder in wanted.values())
                       for answer in answers):
                    return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"{what}: leases {holders} not {wanted} with every node "
                                     f"ready within {timeout_s:.0f} s")
            await asyncio.sleep(0.1)


def test_zombie_owner(local_stack, tmp_path: Path) -> None:
    schedule_name = "zombie-owner"
    rng = seeded_random(schedule_name)
    cluster.heal_stack(local_stack)  # one broker down before the faults would make it two
    nodes = TwoNodes(local_stack, tmp_path, schedule_name)
    nodes.leases.clear()
    try:
        run = cluster.started_run(nodes.both(), schedule_name, PROFILE, rng)
        # Requests to the paused node stay open; with the default timeout every sender would
        # soon wait on it and the live node would get no load while it takes over.
        run.load.request_timeout_s = ZOMBIE_REQUEST_TIMEOUT_S

        async def schedule(run: ChaosRun) -> None:
            for round_index in range(PROFILE.rounds):
                zombie_name, survivor_name = ("b", "a") if round_index % 2 == 0 else ("a", "b")
                await zombie_round(run, nodes, zombie_name, survivor_name)
                await run.between_faults()

        asyncio.run(run.run(schedule))
        verdict = cluster.check_recovered(run, nodes.both(), nodes.envs["a"])
        assert verdict.ok, verdict.problems
        cluster.assert_no_traceback(nodes.both())
        at_a, at_b = (results_of(engine.base_url, run.poll) for engine in nodes.both())
        assert (at_a["counts"], at_a["total"]) == (at_b["counts"], at_b["total"]), (at_a, at_b)
        cluster.cleanup_s3(nodes.envs["a"], nodes.engines["a"].data_dir)
    finally:
        for engine in nodes.both():
            engine.kill()
        nodes.leases.clear()
        nodes.leases.close()


async def zombie_round(run: ChaosRun, nodes: TwoNodes, zombie_name: str, survivor_name: str
                       ) -> None:
    """SIGSTOP the zombie until the survivor holds and serves every shard, SIGCONT it with
    requests on the wire, then wait until the shards are back on the static map."""
    zombie, survivor = nodes.engines[zombie_name], nodes.engines[survivor_name]
    lost_before = cluster.log_count(zombie, LEASE_LOST)
    await run.faults.fire("pause-owner", zombie.pause, f"SIGSTOP node {zombie_name.upper()}")
    took = await nodes.wait_held({shard: nodes.ids[survivor_name] for shard in range(nodes.shards)},
                                 [survivor], TAKEOVER_S, f"node {zombie_name.upper()} paused")
    run.faults.note(f"node {survivor_name.upper()} holds and serves every shard {took:.1f} s "
                    f"after the pause")
    await run.faults.fire("resume-zombie", zombie.resume, f"SIGCONT node {zombie_name.upper()}")
    resumed_s = time.monotonic()
    await cluster.wait_for_log(zombie, LEASE_LOST, lost_before, TAKEOVER_S,
                               f"node {zombie_name.upper()} resumed: 'lease lost'")
    took = await nodes.wait_held(nodes.static, nodes.both(), TAKEOVER_S,
                                 f"node {zombie_name.upper()} resumed")
    run.faults.note(f"shards back on the static map {took:.1f} s after the resume")
    await run.load.wait_for_requests(run.profile.concurrency, ZOMBIE_REQUEST_TIMEOUT_S * 2)
    open_at_resume = Counter(request.outcome for request in run.load.ledger.requests
                             if request.target == zombie.base_url
                             and request.started_s < resumed_s <= request.ended_s)
    run.faults.note(f"answers to the requests open at node {zombie_name.upper()} when it "
                    f"resumed: {dict(open_at_resume)}")


# 4. s3-before-manifest ----------------------------------------------------------------------------


def test_s3_before_manifest(local_stack, tmp_path: Path) -> None:
    schedule_name = "s3-before-manifest"
    rng = seeded_random(schedule_name)
    cluster.heal_stack(local_stack)  # one broker down before the faults would make it two
    env = cluster.stack_env(local_stack, cluster.fresh_s3_prefix(schedule_name),
                            VOTES_SNAPSHOT_INTERVAL_S="0.5", VOTES_SNAPSHOT_VOTES_MIN="100",
                            VOTES_FAILPOINTS=f"{FAILPOINT}=pause:{FAILPOINT_PAUSE_S}")
    engine = cluster.new_engine(tmp_path, "engine", env, cluster.shared_keys(tmp_path))
    s3_down_s = FAILPOINT_PAUSE_S + PROFILE.load_s_between_faults
    config = engine_config(engine.data_dir, env)
    try:
        run = cluster.started_run([engine], schedule_name, PROFILE, rng)

        async def schedule(run: ChaosRun) -> None:
            for _ in range(PROFILE.rounds):
                await s3_round(run, local_stack, engine, config, s3_down_s)
                await run.between_faults()

        asyncio.run(run.run(schedule))
        verdict = cluster.check_recovered(run, [engine], env)
        assert verdict.ok, verdict.problems
        cluster.assert_no_traceback([engine])
        check_recovered_from_snapshots(run, engine, env)
        cluster.cleanup_s3(env, engine.data_dir)
    finally:
        engine.kill()
        cluster.heal_stack(local_stack)


def check_recovered_from_snapshots(run: ChaosRun, engine: EngineProcess, env: dict[str, str]
                                   ) -> None:
    """The restarted engine started its shards from the snapshots the manifests name (it takes
    none without new votes, so they are still the ones it loaded) and replayed the log after
    them: every shard had a snapshot, at least one older than the end of its log."""
    config = engine_config(engine.data_dir, env)
    snapshot_offsets = cluster.newest_snapshots(config)
    ready_offsets = cluster.ready_offsets(engine, config)
    recovered = {shard: (offset, ready_offsets.get(shard))
                 for shard, offset in sorted(snapshot_offsets.items())}
    run.faults.note(f"final recovery (shard: snapshot offset, log offset when ready): "
                    f"{recovered}")
    assert len(ready_offsets) == len(snapshot_offsets), f"shards ready: {ready_offsets}"
    assert all(offset > 0 for offset in snapshot_offsets.values()), \
        f"shards without a snapshot: {recovered}"
    assert any(offset < ready_offsets[shard] for shard, offset in snapshot_offsets.items()), \
        f"no shard replayed the log after its snapshot: {recovered}"


async def s3_round(run: ChaosRun, local_stack, engine: EngineProcess, config: Config,
                   s3_down_s: float) -> None:
    """Wait until a save holds between upload and manifest, kill S3 then, keep voting, check
    that a manifest swap failed and votes were acknowledged meanwhile, start S3 again and
    wait until every shard saved a snapshot again (so the next round's failure leaves a
    previous snapshot in use, not none)."""
    reached = cluster.log_count(engine, FAILPOINT_LINE)
    failed = cluster.log_count(engine, MANIFEST_FAILURE)
    await cluster.wait_for_log(engine, FAILPOINT_LINE, reached, FAILPOINT_WAIT_S,
                               f"failpoint {FAILPOINT}")
    await run.faults.fire("kill-s3", lambda: local_stack.kill_service("s3"),
                          "while a snapshot waits before its manifest", blocking=True)
    killed_s = time.monotonic()
    took = await cluster.wait_for_acknowledged(run.load, killed_s, ACKS_AGAIN_S,
                                               what="S3 killed")
    run.faults.note(f"votes sent after the kill acknowledged {took:.1f} s after it")
    await cluster.wait_for_log(engine, MANIFEST_FAILURE, failed, FAILPOINT_WAIT_S,
                               "a snapshot failing at its manifest")
    run.faults.note(f"a manifest swap failed {time.monotonic() - killed_s:.1f} s after the kill")
    await asyncio.sleep(max(0.0, s3_down_s - (time.monotonic() - killed_s)))
    await asyncio.to_thread(local_stack.start_service, "s3")
    run.faults.note(f"S3 back after {time.monotonic() - killed_s:.1f} s")
    took = await asyncio.to_thread(cluster.wait_snapshots_advance, config, SNAPSHOTS_AGAIN_S)
    run.faults.note(f"every shard saved a snapshot again within {took:.1f} s")
