"""Smoke test of the real local stack with the clients the engine uses.

Kafka (the pinned broker version, see deploy/local/README.md) with aiokafka:
  (a) transactional produce (acks=all, idempotent) to a replication-factor-3 topic,
  (b) fencing of an older producer with the same transactional_id,
  (c) read_committed consume: committed records seen, aborted ones not.
Also (d) an S3 put/get roundtrip against SeaweedFS and (e) Redis PING/SET/GET, and the
fault-injection API (kill a broker, write on with acks=all, restart, wait until in sync).
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import InvalidProducerEpoch, KafkaError, ProducerFenced

pytestmark = pytest.mark.integration

# What aiokafka raises on the fenced (older) producer, as observed against the pinned
# broker; the test accepts either and prints which one it got.
FENCING_ERRORS = (ProducerFenced, InvalidProducerEpoch)

APPEND_DEADLINE_S = 30.0  # every append has a deadline (idempotent sends never time out)


def _uid() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


async def _create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        resp = await admin.create_topics(
            [NewTopic(name, partitions, 3, topic_configs={"min.insync.replicas": "2"})],
            timeout_ms=10000,
        )
        for topic, code, *rest in resp.topic_errors:
            assert code == 0, f"create_topics {topic}: error {code} {rest}"
        # wait until every partition has a leader and a full ISR
        for _ in range(100):
            desc = await admin.describe_topics([name])
            parts = desc[0]["partitions"] if desc and desc[0]["error_code"] == 0 else []
            if len(parts) == partitions and all(
                p["leader"] >= 0 and len(p["isr"]) == 3 for p in parts
            ):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"topic {name} not ready: {desc}")
    finally:
        await admin.close()


def _producer(
    bootstrap: str, txn_id: str | None = None, request_timeout_ms: int = 10000
) -> AIOKafkaProducer:
    # aiokafka also expires a batch that waited request_timeout_ms for a leader
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        transactional_id=txn_id,
        request_timeout_ms=request_timeout_ms,
    )


async def _send(
    producer: AIOKafkaProducer,
    topic: str,
    value: bytes,
    partition: int = 0,
    deadline_s: float = APPEND_DEADLINE_S,
):
    return await asyncio.wait_for(
        producer.send_and_wait(topic, value, partition=partition), deadline_s
    )


async def _read_committed(
    bootstrap: str, topic: str, expect: int, partition: int = 0, timeout_s: float = 30.0
) -> list[bytes]:
    """Values of topic/partition seen by a read_committed consumer, read until at least
    `expect` records arrived. (EndTxn returns before the coordinator has written the commit
    markers, so right after a commit the last stable offset may still lag: keep polling.)"""
    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        values: list[bytes] = []
        try:
            async with asyncio.timeout(timeout_s):
                while len(values) < expect:
                    batch = await consumer.getmany(tp, timeout_ms=500)
                    values.extend(m.value for m in batch.get(tp, []))
                # then drain whatever else is below the last stable offset
                end = (await consumer.end_offsets([tp]))[tp]
                while await consumer.position(tp) < end:
                    batch = await consumer.getmany(tp, timeout_ms=500)
                    values.extend(m.value for m in batch.get(tp, []))
        except TimeoutError:
            raise AssertionError(
                f"read_committed consumer got {values} from {tp} within {timeout_s}s, "
                f"expected at least {expect} records"
            ) from None
        return values
    finally:
        await consumer.stop()


def test_kafka_transactions_fencing_read_committed(local_stack):
    """(a) transactional produce, (b) fencing, (c) read_committed, on one RF-3 topic."""
    bootstrap = local_stack.bootstrap_servers
    uid = _uid()
    topic = f"smoke-txn-{uid}"
    txn_id = f"wal-smoke-{uid}"

    async def scenario() -> None:
        await _create_topic(bootstrap, topic)
        p1 = _producer(bootstrap, txn_id)
        p2 = _producer(bootstrap, txn_id)
        p3 = _producer(bootstrap, f"{txn_id}-b")
        await p1.start()
        try:
            # (a) a committed transaction
            async with p1.transaction():
                for i in range(3):
                    await _send(p1, topic, f"committed-1-{i}".encode())

            # (b) a second producer with the same transactional_id fences the first
            await asyncio.wait_for(p2.start(), APPEND_DEADLINE_S)
            fenced: BaseException | None = None
            step = "begin_transaction"
            try:
                await p1.begin_transaction()
                step = "send"
                await _send(p1, topic, b"zombie")
                step = "commit_transaction"
                await asyncio.wait_for(p1.commit_transaction(), APPEND_DEADLINE_S)
                step = "none"
            except FENCING_ERRORS as e:
                fenced = e
            assert fenced is not None, "the fenced producer's send/commit did not fail"
            print(f"fenced producer: {type(fenced).__module__}.{type(fenced).__qualname__} "
                  f"raised by {step}(): {fenced}")

            # the new producer works; an aborted transaction stays invisible
            async with p2.transaction():
                await _send(p2, topic, b"committed-2")
            await p2.begin_transaction()
            await _send(p2, topic, b"aborted-1")
            await _send(p2, topic, b"aborted-2")
            await asyncio.wait_for(p2.abort_transaction(), APPEND_DEADLINE_S)

            # another producer commits after the abort marker
            await p3.start()
            async with p3.transaction():
                await _send(p3, topic, b"committed-3")
        finally:
            for p in (p1, p2, p3):
                try:
                    await p.stop()
                except KafkaError:
                    pass  # the fenced producer may complain on stop; it is dead anyway

        # (c) read_committed
        values = await _read_committed(bootstrap, topic, expect=5)
        assert values == [
            b"committed-1-0",
            b"committed-1-1",
            b"committed-1-2",
            b"committed-2",
            b"committed-3",
        ], values

    asyncio.run(scenario())


def test_s3_roundtrip(local_stack):
    """(d) put/get/delete of an object in the snapshots bucket (SeaweedFS)."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    ep = local_stack.endpoints()["s3"]
    key = f"smoke/{_uid()}.bin"
    body = os.urandom(256 * 1024) + b"end"

    async def scenario() -> None:
        session = get_session()
        async with session.create_client(
            "s3",
            endpoint_url=ep["endpoint_url"],
            region_name=ep["region"],
            aws_access_key_id=ep["access_key_id"],
            aws_secret_access_key=ep["secret_access_key"],
            config=AioConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        ) as s3:
            buckets = await s3.list_buckets()
            assert ep["bucket"] in [b["Name"] for b in buckets["Buckets"]]
            await s3.put_object(Bucket=ep["bucket"], Key=key, Body=body)
            resp = await s3.get_object(Bucket=ep["bucket"], Key=key)
            async with resp["Body"] as stream:
                got = await stream.read()
            assert got == body
            await s3.delete_object(Bucket=ep["bucket"], Key=key)

    asyncio.run(scenario())


def test_redis_ping_set_get(local_stack):
    """(e) Redis PING / SET / GET with redis-py's asyncio client."""
    import redis.asyncio as aioredis

    async def scenario() -> None:
        r = aioredis.from_url(local_stack.redis_url)
        try:
            assert await r.ping()
            key = f"smoke:{_uid()}"
            assert await r.set(key, b"v1", ex=60)
            assert await r.get(key) == b"v1"
            await r.delete(key)
        finally:
            await r.aclose()

    asyncio.run(scenario())


def test_broker_kill_restart_keeps_acks_all_writes(local_stack):
    """The fault API: with one of three nodes killed, acks=all writes go on; after a restart
    the topic is fully replicated again."""
    bootstrap = local_stack.bootstrap_servers
    topic = f"smoke-fault-{_uid()}"
    asyncio.run(_create_topic(bootstrap, topic))
    victim = 3
    local_stack.kill_broker(victim)
    try:
        assert not local_stack.broker_alive(victim)

        async def write() -> None:
            # the victim may lead the partition: leave time for the session timeout, the
            # new leader's election and the ISR shrink on a busy 2-core machine
            p = _producer(bootstrap, request_timeout_ms=30000)
            await p.start()
            try:
                for i in range(5):
                    await _send(p, topic, f"during-fault-{i}".encode(), deadline_s=60)
            finally:
                await p.stop()

        asyncio.run(write())
        local_stack.wait_broker_gone(victim, timeout_s=30)  # fenced by the controller
    finally:
        local_stack.start_broker(victim)
    local_stack.wait_fully_replicated(topic, timeout_s=60)
    local_stack.wait_fully_replicated(timeout_s=60)  # WAL + internal topics too
    assert asyncio.run(_read_committed(bootstrap, topic, expect=5)) == [
        f"during-fault-{i}".encode() for i in range(5)
    ]
