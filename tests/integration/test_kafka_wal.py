"""KafkaWal against the real 3-broker cluster: what the shard owner relies on.

Proves, each on a scratch WAL topic (RF 3, min.insync.replicas=2) so the engine's own
`votes-wal` stays decodable:
- append returns broker offsets (offset, offset + 1); replay and read_at give back exactly the
  committed payloads at those offsets, skipping owner markers;
- a second KafkaWal acquiring the same shard fences the first: the first's next append raises
  WalFenced (503 not-ready) and nothing it sends afterwards is visible to read_committed;
- an aborted append (a record the broker refuses) is invisible, and the next append works;
- a transaction the coordinator timed out looks like fencing to aiokafka, yet nobody else
  wrote: the WAL takes the fence again and goes on, without a restart;
- topic validation names each wrong setting (replication factor, min.insync.replicas,
  partition count, unclean leader election, missing topic);
- with two of three brokers down an append fails (WalUnavailable or OutcomeUnknown; a
  bounded wait, its time printed) and is never visible; after the brokers return the next append succeeds without a restart.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from engine.config import Config
from engine.errors import ConfigError, NotReady, OutcomeUnknown, WalUnavailable
from engine.problems import problem_of
from shards.kafka_topic import validate_wal_topic
from shards.kafka_wal import KafkaWal, WalFenced
from tests.support.waiting import wait_until_async

pytestmark = pytest.mark.integration

SHARDS = 2
GOOD_TOPIC_CONFIGS = {"min.insync.replicas": "2", "unclean.leader.election.enable": "false",
                      "retention.ms": "-1"}
READ_TIMEOUT_S = 30.0
BROKER_LIMIT_BYTES = 1048588  # the broker's default max.message.bytes
# Bounds on waits, not timings: the coordinator's abort sweep of a timed-out transaction
# (transaction.abort.timed.out.transaction.cleanup.interval.ms), and an append with two of
# three brokers down failing instead of hanging.
ABORT_SWEEP_WAIT_S = 60.0
APPEND_FAILS_WAIT_S = 60.0


def _uid() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


async def create_topic(bootstrap: str, name: str, partitions: int = SHARDS,
                       replication: int = 3, configs: dict | None = None) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        answer = await admin.create_topics(
            [NewTopic(name, partitions, replication,
                      topic_configs=GOOD_TOPIC_CONFIGS if configs is None else configs)],
            timeout_ms=10000)
        for topic, code, *rest in answer.topic_errors:
            assert code == 0, f"create_topics {topic}: error {code} {rest}"
        for _ in range(100):
            (description,) = await admin.describe_topics([name])
            parts = description["partitions"] if description["error_code"] == 0 else []
            if len(parts) == partitions and all(
                    p["leader"] >= 0 and len(p["isr"]) == replication for p in parts):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"topic {name} not ready: {description}")
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        await admin.delete_topics(names, timeout_ms=10000)
    finally:
        await admin.close()


async def read_committed(bootstrap: str, topic: str, partition: int, start: int, after: int,
                         timeout_s: float = READ_TIMEOUT_S) -> list[tuple[int, bytes]]:
    """(offset, value) of every committed record from `start` to the last stable offset, once
    that has passed offset `after`; owner markers included (their value is empty). Commit
    markers reach the partition a moment after commit_transaction returns."""
    partition_id = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, isolation_level="read_committed")
    await consumer.start()
    try:
        consumer.assign([partition_id])
        consumer.seek(partition_id, start)
        records = []
        async with asyncio.timeout(timeout_s):
            while (end := (await consumer.end_offsets([partition_id]))[partition_id]) <= after:
                await asyncio.sleep(0.05)
            while await consumer.position(partition_id) < end:
                fetched = await consumer.getmany(partition_id, timeout_ms=500)
                records += [(r.offset, r.value) for r in fetched.get(partition_id, [])]
        return records
    finally:
        await consumer.stop()


async def wait_stable_past(bootstrap: str, topic: str, partition: int, offset: int,
                           timeout_s: float) -> int:
    """Wait until the partition's last stable offset (a read_committed consumer's end) is
    past `offset`: the transaction that wrote it is decided. Returns that end."""
    partition_id = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, isolation_level="read_committed")
    await consumer.start()
    try:
        async def stable_end() -> int | None:
            end = (await consumer.end_offsets([partition_id]))[partition_id]
            return end if end > offset else None

        return await wait_until_async(stable_end, timeout_s,
                                      f"{topic}[{partition}]'s last stable offset past {offset}",
                                      poll_s=0.2)
    finally:
        await consumer.stop()


def payloads_of(records: list[tuple[int, bytes]]) -> list[bytes]:
    return [value for _, value in records if value]


@pytest.fixture(scope="module")
def wal_topic(local_stack):
    """A scratch WAL topic with the production settings, deleted at the end."""
    name = f"wal-test-{_uid()}"
    asyncio.run(create_topic(local_stack.bootstrap_servers, name))
    yield name
    asyncio.run(delete_topics(local_stack.bootstrap_servers, [name]))


def wal_config(local_stack, topic: str, **overrides) -> Config:
    values = dict(kafka_bootstrap_servers=local_stack.bootstrap_servers, wal_topic=topic,
                  shards=SHARDS, kafka_append_timeout_s=3.0, kafka_abort_timeout_s=1.0,
                  kafka_request_timeout_s=5.0, kafka_read_stall_s=15.0)
    values.update(overrides)
    return Config(**values).validate()


async def owned_wal(config: Config, shard: int) -> tuple[KafkaWal, list]:
    """A KafkaWal with the fence taken and the log replayed; the replayed records."""
    wal = KafkaWal(config, shard)
    replayed: list = []
    await asyncio.wait_for(wal.acquire(), 30)
    await wal.replay(0, lambda offset, next_offset, value: replayed.append((offset, bytes(value))))
    return wal, replayed


def test_append_replay_read_at_roundtrip(local_stack, wal_topic):
    config = wal_config(local_stack, wal_topic)
    tag = _uid().encode()
    batch_one = [b"one-" + tag, b"two-" + tag, b"three-" + tag]
    batch_two = [b"four-" + tag]

    async def scenario() -> None:
        wal, _ = await owned_wal(config, 0)
        try:
            start = wal._known_end
            first = await wal.append(batch_one)
            second = await wal.append(batch_two)
            assert [next_offset - offset for offset, next_offset in first + second] == [1] * 4
            offsets = [offset for offset, _ in first + second]
            assert offsets[:3] == list(range(offsets[0], offsets[0] + 3)), offsets
            assert offsets[0] >= start and offsets[3] > offsets[2]
            assert await wal.read_at(offsets[1]) == batch_one[1]
            wal._records_cached.clear()
            assert await wal.read_at(offsets[3]) == batch_two[0]
        finally:
            await wal.close()
        # A new owner replays exactly the committed payloads at the same offsets.
        again, replayed = await owned_wal(config, 0)
        await again.close()
        assert [entry for entry in replayed if entry[0] >= start] == list(
            zip(offsets, batch_one + batch_two))
        assert all(value for _, value in replayed), "an owner marker reached apply()"

    asyncio.run(scenario())


def test_read_at_cut_short_by_close_answers_wal_unavailable(local_stack, wal_topic):
    """A shard handed over while a repeat vote reads its receipt: close() stops the reader
    mid-read. The read must end as WalUnavailable (a 503 the contract allows), never as
    aiokafka's ConsumerStoppedError (which became a 500; found by the zombie-owner chaos
    schedule)."""
    config = wal_config(local_stack, wal_topic)

    async def scenario() -> None:
        wal, _ = await owned_wal(config, 1)
        try:
            # The first offset not written yet: the read keeps polling until it is stopped
            # (or its stall deadline, longer than this test waits). A commit's markers reach
            # the partition just after the commit returns: wait until the stable end is past
            # the record just appended, so `end` is not one of its offsets.
            [(_, appended_end)] = await wal.append([b"before-the-end"])
            reader = await wal._reader_started()
            deadline_s = asyncio.get_running_loop().time() + 10
            while (end := await wal._stable_end(reader)) < appended_end:
                assert asyncio.get_running_loop().time() < deadline_s, "stable end stuck"
                await asyncio.sleep(0.05)
            reading = asyncio.create_task(wal.read_at(end))
            await asyncio.sleep(1.5)
            assert not reading.done(), "read_at of an unwritten offset ended on its own"
        finally:
            await wal.close()
        with pytest.raises(WalUnavailable):
            await asyncio.wait_for(reading, 10)

    asyncio.run(scenario())


def test_second_owner_fences_the_first(local_stack, wal_topic):
    config = wal_config(local_stack, wal_topic)
    tag = _uid().encode()

    async def scenario() -> None:
        first, _ = await owned_wal(config, 1)
        second = None
        try:
            start = first._known_end
            await first.append([b"before-" + tag])
            second, _ = await owned_wal(config, 1)
            started = time.monotonic()
            with pytest.raises(WalFenced) as fenced:
                await first.append([b"zombie-" + tag])
            assert isinstance(fenced.value, NotReady)
            assert problem_of(fenced.value)[:2] == (503, "not-ready")
            print(f"fenced after {time.monotonic() - started:.2f} s: {fenced.value.detail}")
            with pytest.raises(WalFenced):
                await first.append([b"zombie-again-" + tag])
            (last,) = await second.append([b"after-" + tag])
        finally:
            await first.close()
            if second is not None:
                await second.close()
        values = payloads_of(await read_committed(config.kafka_bootstrap_servers, wal_topic, 1,
                                                  start, last[0]))
        assert values == [b"before-" + tag, b"after-" + tag], values

    asyncio.run(scenario())


def test_aborted_append_is_invisible_and_the_next_one_works(local_stack, wal_topic):
    config = wal_config(local_stack, wal_topic)
    tag = _uid().encode()
    too_large = b"x" * (BROKER_LIMIT_BYTES + 1024)

    async def scenario() -> None:
        wal, _ = await owned_wal(config, 0)
        try:
            start = wal._known_end
            # The small record goes out in its own batch and reaches the log; the large one is
            # refused by the broker, so the whole transaction is aborted.
            with pytest.raises(WalUnavailable) as failed:
                await wal.append([b"doomed-" + tag, too_large])
            assert "aborted" in failed.value.detail, failed.value.detail
            (position,) = await wal.append([b"kept-" + tag])
            assert await wal.read_at(position[0]) == b"kept-" + tag
        finally:
            await wal.close()
        values = payloads_of(await read_committed(config.kafka_bootstrap_servers, wal_topic, 0,
                                                  start, position[0]))
        assert values == [b"kept-" + tag], values

    asyncio.run(scenario())


def test_timed_out_transaction_is_not_taken_for_another_owner(local_stack, wal_topic):
    """The coordinator aborts a transaction open longer than its timeout and bumps the
    epoch; aiokafka then reports ProducerFenced. Nobody else wrote, so the WAL takes the
    fence again: one append answers wal-unavailable, the next one succeeds."""
    config = wal_config(local_stack, wal_topic, kafka_transaction_timeout_s=1.0)
    tag = _uid().encode()

    async def scenario() -> None:
        wal, _ = await owned_wal(config, 1)
        try:
            start = wal._known_end
            producer = wal._producer  # leave a transaction open past its timeout
            await producer.begin_transaction()
            stale = await (await producer.send(wal_topic, b"stale-" + tag, partition=1))
            # No sleep racing the coordinator's abort sweep: wait until it has aborted the
            # transaction, i.e. its abort marker moved the last stable offset past the record.
            await wait_stable_past(config.kafka_bootstrap_servers, wal_topic, 1, stale.offset,
                                   ABORT_SWEEP_WAIT_S)
            with pytest.raises(WalUnavailable):
                await wal.append([b"refused-" + tag])
            positions = None
            async with asyncio.timeout(30):
                while positions is None:
                    try:
                        positions = await wal.append([b"after-" + tag])
                    except WalUnavailable:
                        await asyncio.sleep(0.2)
            assert await wal.read_at(positions[0][0]) == b"after-" + tag
        finally:
            await wal.close()
        values = payloads_of(await read_committed(config.kafka_bootstrap_servers, wal_topic, 1,
                                                  start, positions[0][0]))
        assert values == [b"after-" + tag], values

    asyncio.run(scenario())


def test_topic_validation_names_each_wrong_setting(local_stack):
    bootstrap = local_stack.bootstrap_servers
    uid = _uid()
    cases = {
        f"wal-bad-rf-{uid}": (dict(replication=1), "replication factor is 1"),
        f"wal-bad-isr-{uid}": (dict(configs={**GOOD_TOPIC_CONFIGS, "min.insync.replicas": "1"}),
                               "min.insync.replicas is 1"),
        f"wal-bad-unclean-{uid}": (
            dict(configs={**GOOD_TOPIC_CONFIGS, "unclean.leader.election.enable": "true"}),
            "unclean.leader.election.enable is true"),
        f"wal-bad-count-{uid}": (dict(partitions=SHARDS + 1), "partitions is 3"),
    }

    async def scenario() -> None:
        for name, (options, _) in cases.items():
            await create_topic(bootstrap, name, **options)
        try:
            for name, (_, expected) in cases.items():
                with pytest.raises(ConfigError) as wrong:
                    await validate_wal_topic(wal_config(local_stack, name))
                assert expected in wrong.value.detail, wrong.value.detail
                print(wrong.value.detail)
            with pytest.raises(ConfigError) as missing:
                await validate_wal_topic(wal_config(local_stack, f"wal-missing-{uid}"))
            assert "does it exist" in missing.value.detail
            good = f"wal-good-{uid}"
            await create_topic(bootstrap, good)
            cases[good] = ({}, "")
            await validate_wal_topic(wal_config(local_stack, good))
        finally:
            await delete_topics(bootstrap, list(cases))

    asyncio.run(scenario())


def test_two_brokers_down_append_fails_then_recovers(local_stack, wal_topic):
    config = wal_config(local_stack, wal_topic)
    tag = _uid().encode()
    victims = (2, 3)
    deadline_s = config.kafka_append_timeout_s + config.kafka_abort_timeout_s + 2.0

    async def failing_append(wal: KafkaWal) -> float:
        started = time.monotonic()
        with pytest.raises((WalUnavailable, OutcomeUnknown)) as failed:
            await asyncio.wait_for(wal.append([b"while-down-" + tag]), APPEND_FAILS_WAIT_S)
        took = time.monotonic() - started
        print(f"append with brokers {victims} down: {problem_of(failed.value).slug} after {took:.2f} s "
              f"({failed.value.detail})")
        return took

    async def appended_after_restart(wal: KafkaWal) -> tuple[list, float]:
        started = time.monotonic()
        async with asyncio.timeout(60):
            while True:
                try:
                    return await wal.append([b"after-" + tag]), time.monotonic() - started
                except WalUnavailable:
                    await asyncio.sleep(0.2)

    async def scenario() -> None:
        wal, _ = await owned_wal(config, 0)
        start = wal._known_end
        try:
            for victim in victims:
                local_stack.kill_broker(victim)
            try:
                # Each append fails rather than hangs (failing_append bounds the wait); how
                # long one takes against its deadline is printed, not asserted (perf/'s job).
                took = await failing_append(wal)
                took_again = await failing_append(wal)  # the second one too
                print(f"appends failed after {took:.2f} s and {took_again:.2f} s (deadline "
                      f"{deadline_s:.1f} s)")
            finally:
                for victim in victims:
                    await asyncio.to_thread(local_stack.start_broker, victim)
            positions, took = await appended_after_restart(wal)
            print(f"first append after the restart succeeded {took:.2f} s after the brokers "
                  f"were back, at offset {positions[0][0]}")
        finally:
            await wal.close()
            await local_stack.wait_fully_replicated_async(None, 90)
        values = payloads_of(await read_committed(config.kafka_bootstrap_servers, wal_topic, 0,
                                                  start, positions[0][0]))
        assert values == [b"after-" + tag], values

    asyncio.run(scenario())
