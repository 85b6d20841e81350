"""Engines on the real stack for the chaos schedules: Kafka WAL, S3 snapshots, Redis leases.

What the schedules in test_chaos_kafka.py share:
- `stack_env`: the VOTES_* environment of an engine on the stack's WAL topic and bucket, with
  an S3 prefix of the run's own (the topic is shared by every test of the session, so each
  run also opens a poll of its own and the recount is filtered by it);
- starting, and at the end SIGKILLing and restarting, every engine of a run, so the state that
  is checked is the one recovered from Kafka and S3, never memory;
- `check_recovered`: results from the restarted engines, the replay tool's recount of the
  raw topic and `votes replay verify`, judged by the checker;
- `heal_stack`: whatever a schedule left dead (a broker, S3) is started again, bounded, so a
  failing test does not hand a broken stack to the next one;
- lease keys in Redis, cleared before and after a cluster run (as tests/integration does).
Every wait here has a bound; a bound that runs out fails the test with what it last saw.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import httpx
import msgspec
import redis
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from engine.config import Config
from engine.keys import ensure_keys
from shards.s3_snapshots import S3SnapshotStore
from shards.snapshots import Manifest
from tests.chaos.checker import Verdict
from tests.chaos.harness import (
    ChaosRun,
    Profile,
    engine_config,
    receipt_keys,
    recounted_voters,
    replay_verify,
    results_of,
)
from tests.chaos.load import ACKNOWLEDGED, DUPLICATE, LoadClient
from tests.support import http_client
from tests.support.cli import admin_token, voter_tokens
from tests.support.engine_process import KAFKA_READINESS, EngineProcess, free_port, kafka_env

OPTIONS = ("red", "green", "blue")
POLL_TIMEOUT_S = 20.0
# A restarted broker or S3, and full replication after it, within this.
HEAL_WAIT_S = 90.0
LOG_POLL_S = 0.1
PROBE_TIMEOUT_S = 2.0


def stack_env(local_stack, s3_prefix: str, **extra: str) -> dict[str, str]:
    """`votes serve` on the stack's WAL topic, with snapshots under `s3_prefix` in its bucket."""
    s3 = local_stack.endpoints()["s3"]
    return kafka_env(local_stack, VOTES_S3_ENDPOINT_URL=s3["endpoint_url"],
                     VOTES_S3_BUCKET=s3["bucket"], VOTES_S3_REGION=s3["region"],
                     VOTES_S3_ACCESS_KEY_ID=s3["access_key_id"],
                     VOTES_S3_SECRET_ACCESS_KEY=s3["secret_access_key"],
                     VOTES_S3_PREFIX=s3_prefix, **extra)


def fresh_s3_prefix(schedule: str) -> str:
    return f"chaos-kafka/{schedule}-{uuid.uuid4().hex[:12]}"


def shared_keys(tmp_path: Path) -> Path:
    """A keys template that every engine of a run copies (as hosts share a secrets store)."""
    template = tmp_path / "keys-template"
    ensure_keys(template)
    return template


def new_engine(tmp_path: Path, name: str, env: dict[str, str], keys_from: Path,
               port: int | None = None) -> EngineProcess:
    return EngineProcess(tmp_path / name, tmp_path / f"{name}.log", env, keys_from=keys_from,
                         port=port or free_port(), **KAFKA_READINESS)


def start_all(engines: Sequence[EngineProcess], label: str) -> None:
    """Start every engine, then wait (bounded) until each is ready."""
    for engine in engines:
        engine.start()
    for engine in engines:
        took = engine.wait_ready()
        print(f"[chaos] {label}: engine {engine.data_dir.name} ready in {took:.1f} s "
              f"(port {engine.port}, start {engine.starts})", flush=True)


def restart_all(engines: Sequence[EngineProcess], label: str) -> None:
    """SIGKILL every engine (whole process groups), then start them on the same data dirs."""
    for engine in engines:
        engine.kill()
    start_all(engines, label)


def open_poll(engine: EngineProcess, schedule: str) -> str:
    poll = f"chaos-{schedule}-{uuid.uuid4().hex[:10]}"
    token = admin_token(engine.data_dir)
    created = http_client.post(f"{engine.base_url}/v1/polls",
                               json={"id": poll, "options": list(OPTIONS)},
                               headers={"Authorization": f"Bearer {token}"}, timeout_s=POLL_TIMEOUT_S)
    assert created.status_code == 201, f"creating {poll}: {created.status_code} {created.text}"
    return poll


def started_run(engines: Sequence[EngineProcess], schedule: str, profile: Profile,
                rng: random.Random) -> ChaosRun:
    """Start the engines, open a fresh poll on the first, mint its voters' tokens and return
    the run with load aimed at every engine."""
    start_all(engines, schedule)
    poll = open_poll(engines[0], schedule)
    return ChaosRun(schedule, profile, [engine.base_url for engine in engines], poll, OPTIONS,
                    tokens_for(engines[0], poll, profile.voters), rng)


def tokens_for(engine: EngineProcess, poll: str, voters: int) -> dict[int, str]:
    """Voter id -> token for voters 1..voters, bound to `poll`."""
    return dict(enumerate(voter_tokens(engine.data_dir, 1, voters, poll=poll), start=1))


# Waiting on the load and on logs ---------------------------------------------------------------


async def wait_for_acknowledged(load: LoadClient, since_s: float, timeout_s: float,
                                shards: int | None = None, what: str = "") -> float:
    """Wait until requests started at or after `since_s` got 201s (with `shards`: on every
    shard, voter mod shards); return the seconds since `since_s`. Fails when the bound runs out."""
    deadline = time.monotonic() + timeout_s
    seen: set[int] = set()
    scanned = 0
    while True:
        requests = load.ledger.requests
        for request in requests[scanned:]:
            if request.outcome == ACKNOWLEDGED and request.started_s >= since_s:
                seen.add(request.voter % shards if shards else 0)
        scanned = len(requests)
        if seen and (shards is None or len(seen) == shards):
            return time.monotonic() - since_s
        if time.monotonic() > deadline:
            recent = load.ledger.requests[-5:]
            raise AssertionError(
                f"{what}: no 201 within {timeout_s:.0f} s for requests sent since then"
                f"{f' on shards {sorted(set(range(shards)) - seen)}' if shards else ''}; "
                f"last answers: {[request.detail for request in recent]}")
        await asyncio.sleep(LOG_POLL_S)


def log_count(engine: EngineProcess, pattern: re.Pattern[str]) -> int:
    return len(pattern.findall(engine.log_text()))


async def wait_for_log(engine: EngineProcess, pattern: re.Pattern[str], more_than: int,
                       timeout_s: float, what: str) -> int:
    """Wait until the engine's log holds more than `more_than` matches; return how many."""
    deadline = time.monotonic() + timeout_s
    while (count := log_count(engine, pattern)) <= more_than:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not in the log of {engine.data_dir.name} within "
                                 f"{timeout_s:.0f} s; tail:\n{engine.log_tail()}")
        await asyncio.sleep(LOG_POLL_S)
    return count


READY_LINE = re.compile(r"group (\d+) ready: \d+ shards \(log offset (\d+)\)")


def ready_offsets(engine: EngineProcess, config: Config) -> dict[int, int]:
    """Shard -> the offset its group's log had reached when the group became ready, in the
    engine's latest start (EngineProcess marks each start in the log)."""
    latest = engine.log_text().rsplit("\n=== start ", 1)[-1]
    groups = {int(group): int(offset) for group, offset in READY_LINE.findall(latest)}
    return {shard: groups[config.group_of(shard)] for shard in range(config.shards)
            if config.group_of(shard) in groups}


# The stack ---------------------------------------------------------------------------------------


def heal_stack(local_stack) -> None:
    """Start every broker and S3 again if dead, then wait until every partition is in sync
    (quick when the stack is whole)."""
    if not local_stack.s3_service().alive():
        local_stack.start_service("s3")
    dead = [node for node in (1, 2, 3) if not local_stack.broker_alive(node)]
    for node in dead:
        local_stack.start_broker(node)
    local_stack.wait_fully_replicated(None, HEAL_WAIT_S)


class LeaseKeys:
    """This topic's ownership keys in Redis (engine/ownership.py)."""

    def __init__(self, local_stack) -> None:
        self.prefix = f"votes:{local_stack.wal_topic}:"
        self.shards = local_stack.partitions
        self.client = redis.Redis.from_url(local_stack.redis_url, decode_responses=True,
                                           socket_timeout=PROBE_TIMEOUT_S)

    def clear(self) -> None:
        keys = list(self.client.scan_iter(f"{self.prefix}*"))
        if keys:
            self.client.delete(*keys)

    def holders(self) -> dict[int, str | None]:
        values = self.client.mget([f"{self.prefix}lease:{shard}" for shard in range(self.shards)])
        return {shard: value.split(" ")[0] if value else None for shard, value in enumerate(values)}

    def close(self) -> None:
        self.client.close()


async def readiness(engine: EngineProcess) -> dict | None:
    """The engine's /readyz body when it answers 200, else None."""
    try:
        async with http_client.async_client_for(timeout_s=PROBE_TIMEOUT_S) as client:
            answer = await client.get(f"{engine.base_url}/readyz")
    except httpx.TransportError:
        return None
    return answer.json() if answer.status_code == 200 else None


# S3 ----------------------------------------------------------------------------------------------


def s3_client(config: Config):
    return get_session().create_client(
        "s3", endpoint_url=config.s3_endpoint_url, region_name=config.s3_region,
        aws_access_key_id=config.s3_access_key_id,
        aws_secret_access_key=config.s3_secret_access_key,
        config=AioConfig(s3={"addressing_style": "path"}, connect_timeout=PROBE_TIMEOUT_S,
                         read_timeout=PROBE_TIMEOUT_S * 5, retries={"max_attempts": 2}),
    )


async def _newest_snapshots(config: Config, client) -> dict[int, int]:
    """Shard -> log offset of the newest snapshot its manifest lists (-1: no snapshot yet)."""
    newest = {}
    for shard in range(config.shards):
        key = S3SnapshotStore(config, shard).manifest_key  # the engine's own layout
        try:
            answer = await client.get_object(Bucket=config.s3_bucket, Key=key)
        except client.exceptions.NoSuchKey:
            newest[shard] = -1
            continue
        async with answer["Body"] as stream:
            manifest = msgspec.json.decode(await stream.read(), type=Manifest)
        newest[shard] = manifest.snapshots[0].wal_offset_next if manifest.snapshots else -1
    return newest


def newest_snapshots(config: Config) -> dict[int, int]:
    """`_newest_snapshots` with a client of its own: call it from a thread, or with no loop
    running (creating an S3 client is slow enough to stall the load client's loop)."""
    async def read() -> dict[int, int]:
        async with s3_client(config) as client:
            return await _newest_snapshots(config, client)

    return asyncio.run(read())


def wait_snapshots_advance(config: Config, timeout_s: float) -> float:
    """Wait until every shard's manifest names a newer snapshot than when this was called
    (every shard saved one since); return the seconds it took. Blocking: run it in a thread."""
    async def wait() -> float:
        started = time.monotonic()
        async def newest(client) -> dict[int, int]:
            # S3 just restarted may answer InternalError for a moment: retry until the
            # deadline, then let the error show.
            while True:
                try:
                    return await _newest_snapshots(config, client)
                except (ClientError, BotoCoreError, OSError):
                    if time.monotonic() - started > timeout_s:
                        raise
                    await asyncio.sleep(LOG_POLL_S * 3)

        async with s3_client(config) as client:
            before = await newest(client)
            while True:
                now = await newest(client)
                behind = sorted(shard for shard, offset in now.items() if offset <= before[shard])
                if not behind:
                    return time.monotonic() - started
                if time.monotonic() - started > timeout_s:
                    raise AssertionError(f"shards {behind} saved no snapshot within "
                                         f"{timeout_s:.0f} s (newest offsets {now})")
                await asyncio.sleep(LOG_POLL_S * 3)

    return asyncio.run(wait())


async def delete_s3_prefix(config: Config) -> int:
    """Delete every object under the run's prefix; return how many."""
    deleted = 0
    async with s3_client(config) as client:
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=config.s3_bucket,
                                             Prefix=config.s3_prefix.strip("/") + "/"):
            for item in page.get("Contents", []):
                await client.delete_object(Bucket=config.s3_bucket, Key=item["Key"])
                deleted += 1
    return deleted


# The end of every run -----------------------------------------------------------------------------


def check_recovered(run: ChaosRun, engines: Sequence[EngineProcess], env: dict[str, str]
                    ) -> Verdict:
    """SIGKILL and restart `engines`, then judge the ledger against what they recovered: the
    results of the first engine, the recount of the topic and `votes replay verify` (both read
    with the first engine's data dir and environment)."""
    label = run.schedule
    refusals = Counter(request.detail for request in run.load.ledger.requests
                       if request.outcome not in (ACKNOWLEDGED, DUPLICATE))
    run.faults.note(f"answers other than 201 and 409: {dict(refusals.most_common())}")
    restarted = time.monotonic()
    restart_all(engines, f"{label} (final restart)")
    run.faults.note(f"engines SIGKILLed and restarted: ready in "
                    f"{time.monotonic() - restarted:.1f} s")
    first = engines[0]
    results = results_of(first.base_url, run.poll)
    config = engine_config(first.data_dir, env)
    recounting_s = time.monotonic()
    counted = asyncio.run(recounted_voters(config, run.poll))
    verifying_s = time.monotonic()
    verify = replay_verify(["--data-dir", str(first.data_dir), "--url", first.base_url,
                            "--poll", run.poll], env)
    run.faults.note(f"recount {verifying_s - recounting_s:.1f} s, verify "
                    f"{time.monotonic() - verifying_s:.1f} s")
    return run.finish(results, counted, verify, receipt_keys(config))


# Tracebacks that libraries print for races they have under these faults and that lose
# nothing (the checker judges every vote): each is cut out of the log, counted and printed;
# any other traceback (and every exception the engine itself logs) fails the run.
_HEADER = r"Traceback \(most recent call last\):\n"
_FRAMES = _HEADER + r"(?:[ \t].*\n)*"
_CAUSE = r"\nThe above exception was the direct cause of the following exception:\n\n"
KNOWN_LIBRARY_TRACEBACKS = {
    # aiokafka: closing a producer fails its pending batches (and forgets them) while a
    # produce request to a dead broker waits to re-enqueue one of them; that request's task
    # then dies with a KeyError nobody awaits. The engine closes producers to fence again.
    "aiokafka: a closed producer's produce request re-enqueues a failed batch": re.compile(
        r"Task exception was never retrieved\nfuture: <Task finished name='Task-\d+' "
        r"coro=<Sender\._send_produce_req\(\).*\n" + _FRAMES
        + r"KeyError: <aiokafka\.producer\.message_accumulator\.MessageBatch object at \w+>"),
    # aiokafka: its sender task dies ("Unexpected error in sender routine", logged with the
    # cause chain) when the transaction coordinator's connection closes during
    # AddPartitionsToTxn; the producer turns fatal and the engine replaces it.
    "aiokafka: the sender dies when the coordinator's connection closes": re.compile(
        r"Unexpected error in sender routine\n(?:" + _FRAMES + r".*\n" + _CAUSE + r")*"
        + _HEADER + r"(?:[ \t].*\n)*?[ \t]+File .*, in _find_coordinator\n(?:[ \t].*\n)*"
        r"aiokafka\.errors\.KafkaError: KafkaError: KafkaConnectionError\(.*\)"),
    # aiohttp (under aiobotocore's S3 client): when S3 is killed while a request body is
    # being written, the task writing it fails on the closed transport and nobody awaits it;
    # the request itself fails, the snapshot store retries or keeps the previous snapshot.
    "aiohttp: a request body written to S3's closed connection": re.compile(
        r"Task exception was never retrieved\nfuture: <Task finished name='Task-\d+' "
        r"coro=<.*aiohttp.*\n" + _FRAMES
        + r"(?:aiohttp\.client_exceptions\.ClientConnectionResetError|ConnectionResetError): "
        r"Cannot write to closing transport"),
}


def unknown_tracebacks(log_text: str) -> tuple[list[str], Counter]:
    """The tracebacks in an engine log that are not known library races (with a little of
    what precedes each), and how many of each known race were cut out."""
    known: Counter = Counter()
    for name, pattern in KNOWN_LIBRARY_TRACEBACKS.items():
        log_text, count = pattern.subn("", log_text)
        if count:
            known[name] = count
    unknown = []
    position = log_text.find("Traceback")
    while position >= 0:
        unknown.append(log_text[max(0, position - 500):position + 3000])
        position = log_text.find("Traceback", position + 3000)
    return unknown, known


def assert_no_traceback(engines: Sequence[EngineProcess]) -> None:
    """Faults are expected failures: the engines handle and log them, never crash on them."""
    for engine in engines:
        unknown, known = unknown_tracebacks(engine.log_text())
        if known:
            print(f"[chaos] {engine.log_path.name}: known library races {dict(known)}", flush=True)
        assert not unknown, (f"{len(unknown)} tracebacks in {engine.log_path}, the first:\n"
                             f"{unknown[0][-4000:]}")
        # A group handed over or stopped closes its S3 clients (GroupOwner.stop).
        leaks = engine.log_text().count("Unclosed client session")
        assert not leaks, f"{leaks} unclosed S3 client sessions in {engine.log_path}"


def cleanup_s3(env: dict[str, str], data_dir: Path) -> None:
    """Best effort: a run that passed leaves no snapshots behind (a failed one keeps them)."""
    try:
        deleted = asyncio.run(delete_s3_prefix(engine_config(data_dir, env)))
    except Exception as error:  # noqa: BLE001 - cleaning up must not hide the verdict
        print(f"[chaos] could not delete {env['VOTES_S3_PREFIX']}: {error!r}", flush=True)
    else:
        print(f"[chaos] deleted {deleted} objects under {env['VOTES_S3_PREFIX']}", flush=True)
