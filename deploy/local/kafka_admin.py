"""Kafka admin steps of the local stack, with aiokafka (the client the engine uses too).

Broker count, WAL topic creation, coordinator warm-up and replication checks. Every step
retries until its own deadline and then raises `StackError` with the last thing it saw;
each request inside it has a timeout shorter than that deadline, so a hung broker cannot
stretch a wait. aiokafka is imported lazily so that `stack.py` can tell a caller without it
which python to use instead of failing on import.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from deploy.local.kafka_brokers import MIN_INSYNC_REPLICAS, REPLICATION_FACTOR
from deploy.local.ports import BROKER_COUNT
from deploy.local.processes import StackError

# Kafka protocol error codes (the `errno` of aiokafka.errors' classes).
KAFKA_ERROR_NONE = 0
KAFKA_ERROR_TOPIC_ALREADY_EXISTS = 36
# A partition's leader field when it has none (no live replica in the ISR); any negative
# value means no leader.
KAFKA_NO_LEADER = -1
# FindCoordinator key types.
COORDINATOR_TYPE_GROUP = 0
COORDINATOR_TYPE_TRANSACTION = 1

BROKERS_TIMEOUT_S = 90.0  # until the admin client sees every broker
TOPIC_TIMEOUT_S = 60.0  # until a topic is created and fully replicated
REPLICATED_TIMEOUT_S = 60.0
BROKER_GONE_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_MS = 5000
TOPIC_REQUEST_TIMEOUT_MS = 10000
CALL_TIMEOUT_S = 6.0  # one admin call, a little over REQUEST_TIMEOUT_MS
TOPIC_CALL_TIMEOUT_S = 10.0
CREATE_TOPIC_CALL_TIMEOUT_S = 15.0
RETRY_PAUSE_S = 0.5
RECHECK_PAUSE_S = 0.2
BROKER_GONE_POLL_S = 0.25
HEALTHY_LOOKS_IN_A_ROW = 2  # two looks, possibly at two brokers' metadata caches
PROBLEMS_SHOWN_MAX = 20
INTERNAL_TOPICS = ["__consumer_offsets", "__transaction_state"]
WARMUP_KEY = "votes-stack-warmup"

# Set on the WAL topic itself, so it holds whatever a broker's defaults say: the engine's
# WAL check (shards/kafka_topic.py) requires the first and the fourth; the log is the
# engine's only copy of the votes until a snapshot, so nothing is ever deleted from it.
WAL_TOPIC_CONFIGS = {
    "min.insync.replicas": str(MIN_INSYNC_REPLICAS),
    "retention.ms": "-1",
    "retention.bytes": "-1",
    "unclean.leader.election.enable": "false",
    "cleanup.policy": "delete",
}


def replication_problems(metadata: dict[str, Any]) -> list[str]:
    """What keeps a metadata answer from "every partition fully replicated on live brokers";
    [] when healthy. `metadata` is aiokafka's MetadataResponse.to_object()."""
    live = {broker["node_id"] for broker in metadata["brokers"]}
    problems = []
    if len(live) < BROKER_COUNT:
        problems.append(f"brokers alive {sorted(live)} < {BROKER_COUNT}")
    for topic in metadata["topics"]:
        if topic["error_code"] != KAFKA_ERROR_NONE:
            problems.append(f"{topic['topic']}: error code {topic['error_code']}")
            continue
        if not topic["partitions"]:
            problems.append(f"{topic['topic']}: no partitions")
        for partition in topic["partitions"]:
            replicas, isr = sorted(partition["replicas"]), sorted(partition["isr"])
            if (partition["error_code"] != KAFKA_ERROR_NONE
                    or partition["leader"] <= KAFKA_NO_LEADER
                    or len(replicas) < REPLICATION_FACTOR
                    or replicas != isr
                    or not set(replicas) <= live):
                problems.append(
                    f"{topic['topic']}/{partition['partition']}: leader {partition['leader']} "
                    f"isr {isr} of replicas {replicas} (error {partition['error_code']})")
    return problems


def _topics_to_check(topic: str | list[str] | None, wal_topic: str) -> list[str]:
    if topic is None:
        return [wal_topic, *INTERNAL_TOPICS]
    return [topic] if isinstance(topic, str) else list(topic)


class KafkaAdmin:
    """The admin steps against one stack's brokers."""

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers

    def client(self, request_timeout_ms: int = REQUEST_TIMEOUT_MS):
        try:
            from aiokafka.admin import AIOKafkaAdminClient
        except ImportError as error:  # pragma: no cover - the venv has it
            raise StackError(
                "aiokafka is needed for the Kafka admin steps: "
                "pip install 'aiokafka>=0.12,<0.15' (use the repo's .venv/bin/python)"
            ) from error
        return AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers,
                                   request_timeout_ms=request_timeout_ms,
                                   client_id="votes-local-stack")

    async def metadata(self, topics: list[str] | None = None) -> dict[str, Any]:
        admin = self.client()
        try:
            await asyncio.wait_for(admin.start(), CALL_TIMEOUT_S)
            # aiokafka's admin client has no public call for the whole metadata answer
            # (brokers, leaders, ISRs); this one is what its describe_* calls use.
            answer = await asyncio.wait_for(admin._get_cluster_metadata(topics), CALL_TIMEOUT_S)
            return answer.to_object()
        finally:
            await admin.close()

    async def brokers_seen(self) -> list[int]:
        answer = await self.metadata([])
        return sorted(broker["node_id"] for broker in answer["brokers"])

    async def wait_brokers(self, expected: Iterable[int] | None = None,
                           timeout_s: float = BROKERS_TIMEOUT_S,
                           logs_of: Callable[[int], str] | None = None) -> list[int]:
        """Until every expected broker (default all) is in the metadata; `logs_of(node)`
        adds a missing node's log tail to the error."""
        wanted = sorted(expected) if expected is not None else list(range(1, BROKER_COUNT + 1))
        deadline = time.monotonic() + timeout_s
        seen: list[int] = []
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                seen = await self.brokers_seen()
                if all(node in seen for node in wanted):
                    return seen
            except Exception as error:  # noqa: BLE001 - retried until the deadline
                last_error = error
            await asyncio.sleep(RETRY_PAUSE_S)
        tails = "\n".join(logs_of(node) for node in wanted if node not in seen) if logs_of else ""
        raise StackError(f"Kafka: admin client saw brokers {seen}, expected {wanted} within "
                         f"{timeout_s:.0f}s (last error: {last_error!r})\n{tails}")

    async def _create_topic_once(self, name: str, partitions: int,
                                 configs: dict[str, str]) -> tuple[int | None, Any]:
        """(partition count, None) if the topic exists, else (None, what creating it said)."""
        from aiokafka.admin import NewTopic

        admin = self.client(TOPIC_REQUEST_TIMEOUT_MS)
        try:
            await asyncio.wait_for(admin.start(), TOPIC_CALL_TIMEOUT_S)
            described = await asyncio.wait_for(admin.describe_topics([name]),
                                               TOPIC_CALL_TIMEOUT_S)
            topic = described[0] if described else None
            if topic is not None and topic["error_code"] == KAFKA_ERROR_NONE \
                    and topic["partitions"]:
                return len(topic["partitions"]), None
            answer = await asyncio.wait_for(admin.create_topics(
                [NewTopic(name, partitions, REPLICATION_FACTOR, topic_configs=configs)],
                timeout_ms=TOPIC_REQUEST_TIMEOUT_MS), CREATE_TOPIC_CALL_TIMEOUT_S)
            return None, [(error[0], error[1], error[2] if len(error) > 2 else "")
                          for error in answer.topic_errors]
        finally:
            await admin.close()

    async def ensure_topic(self, name: str, partitions: int, configs: dict[str, str]) -> int:
        """Create topic `name` unless it exists; returns its partition count."""
        deadline = time.monotonic() + TOPIC_TIMEOUT_S
        last: Any = None
        while time.monotonic() < deadline:
            try:
                count, last = await self._create_topic_once(name, partitions, configs)
                if count is not None:
                    return count
                # Created (or created by a racing `up`): describe it again to see it.
                if all(code in (KAFKA_ERROR_NONE, KAFKA_ERROR_TOPIC_ALREADY_EXISTS)
                       for _, code, _ in last):
                    await asyncio.sleep(RECHECK_PAUSE_S)
                    continue
            except Exception as error:  # noqa: BLE001 - retried until the deadline
                last = error
            await asyncio.sleep(RETRY_PAUSE_S)
        raise StackError(f"Kafka: topic {name} not created within {TOPIC_TIMEOUT_S:.0f}s "
                         f"(last: {last!r})")

    async def warm_coordinators(self) -> None:
        """Create __consumer_offsets and __transaction_state now, not in the first test
        (whose first transaction would otherwise wait for them)."""
        deadline = time.monotonic() + TOPIC_TIMEOUT_S
        last: Any = None
        pending = {COORDINATOR_TYPE_GROUP, COORDINATOR_TYPE_TRANSACTION}
        while pending and time.monotonic() < deadline:
            admin = self.client(REQUEST_TIMEOUT_MS)
            try:
                await asyncio.wait_for(admin.start(), CALL_TIMEOUT_S)
                for coordinator_type in sorted(pending):
                    try:
                        await asyncio.wait_for(
                            admin.find_coordinator(WARMUP_KEY, coordinator_type), CALL_TIMEOUT_S)
                        pending.discard(coordinator_type)
                    except Exception as error:  # noqa: BLE001 - retried until the deadline
                        last = error
            except Exception as error:  # noqa: BLE001 - retried until the deadline
                last = error
            finally:
                await admin.close()
            if pending:
                await asyncio.sleep(RETRY_PAUSE_S)
        if pending:
            raise StackError("Kafka: group/transaction coordinators not available within "
                             f"{TOPIC_TIMEOUT_S:.0f}s (last: {last!r})")

    async def under_replicated(self, topics: list[str] | None = None) -> list[str]:
        """Problems ("topic/partition: isr [..] of replicas [..]"); [] = healthy."""
        return replication_problems(await self.metadata(topics))

    async def wait_fully_replicated(self, topic: str | list[str] | None, wal_topic: str,
                                    timeout_s: float = REPLICATED_TIMEOUT_S) -> None:
        """Until every partition of topic (None: the WAL topic and the internal topics) has
        all its replicas in sync and all brokers are alive."""
        topics = _topics_to_check(topic, wal_topic)
        deadline = time.monotonic() + timeout_s
        problems: list[str] = ["not checked yet"]
        healthy_looks = 0
        while time.monotonic() < deadline:
            try:
                problems = await self.under_replicated(topics)
            except Exception as error:  # noqa: BLE001 - retried until the deadline
                problems = [f"metadata request failed: {error!r}"]
            if problems:
                healthy_looks = 0
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            healthy_looks += 1
            if healthy_looks >= HEALTHY_LOOKS_IN_A_ROW:
                return
            await asyncio.sleep(RECHECK_PAUSE_S)
        raise StackError(f"Kafka: {topics} still under-replicated after {timeout_s:.0f}s: "
                         + "; ".join(problems[:PROBLEMS_SHOWN_MAX]))

    async def wait_broker_gone(self, node: int, timeout_s: float = BROKER_GONE_TIMEOUT_S) -> None:
        """Until the cluster metadata no longer lists broker `node` (it was fenced)."""
        deadline = time.monotonic() + timeout_s
        seen: Any = None
        while time.monotonic() < deadline:
            try:
                seen = await self.brokers_seen()
                if node not in seen:
                    return
            except Exception as error:  # noqa: BLE001 - retried until the deadline
                seen = error
            await asyncio.sleep(BROKER_GONE_POLL_S)
        raise StackError(f"Kafka: broker {node} still listed after {timeout_s:.0f}s "
                         f"(last: {seen!r})")
