"""The WAL topic's safety check: before a group takes its fence on Kafka, the topic must have
one partition per fencing group, replication factor 3, `min.insync.replicas=2` and unclean leader
election off (docs/design.md "Durability"): with anything less an acknowledged vote could
be lost when a broker fails. Every wrong setting is named at once (ConfigError); a Kafka
that does not answer within `kafka_request_timeout_s` is WalUnavailable.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from engine.config import Config
from engine.errors import ConfigError, WalUnavailable

REPLICATION_FACTOR = 3
MIN_INSYNC_REPLICAS = 2

KAFKA_ERROR_UNKNOWN_TOPIC_OR_PARTITION = 3
# How often, and how far apart, an unknown topic is asked about again before it counts as
# missing: metadata of a new topic reaches every broker within a second or two.
UNKNOWN_TOPIC_ASKS_MAX = 15
UNKNOWN_TOPIC_PAUSE_S = 0.2

# Topics found valid by this process: checked once per process, not once per group.
_topics_valid: set[tuple[str, str, int]] = set()


def topic_problems(description: dict[str, Any], settings: dict[str, str], groups: int) -> list[str]:
    """What is wrong with a WAL topic, from describe_topics / describe_configs answers."""
    if description.get("error_code", 0) != 0:
        return [f"the topic cannot be described (error code {description['error_code']}: "
                "does it exist?)"]
    problems = []
    partitions = description["partitions"]
    if len(partitions) != groups:
        problems.append(f"partitions is {len(partitions)}, must equal the fencing groups "
                        f"({groups}: one partition per group)")
    factors = sorted({len(partition["replicas"]) for partition in partitions})
    if factors != [REPLICATION_FACTOR]:
        problems.append(f"replication factor is {'/'.join(map(str, factors)) or 'unknown'}, "
                        f"must be {REPLICATION_FACTOR}")
    min_insync = settings.get("min.insync.replicas")
    if min_insync != str(MIN_INSYNC_REPLICAS):
        problems.append(f"min.insync.replicas is {min_insync}, must be {MIN_INSYNC_REPLICAS}")
    unclean = settings.get("unclean.leader.election.enable")
    if unclean != "false":
        problems.append(f"unclean.leader.election.enable is {unclean}, must be false")
    return problems


async def _describe_topic(admin: AIOKafkaAdminClient, topic: str) -> dict[str, Any]:
    """The topic's description. A broker that has not yet heard of a topic just created
    answers UNKNOWN_TOPIC_OR_PARTITION although another broker knows it, so that answer is
    asked again (the caller's timeout bounds it) before it stands as "does not exist"."""
    for _ in range(UNKNOWN_TOPIC_ASKS_MAX - 1):
        (description,) = await admin.describe_topics([topic])
        if description.get("error_code", 0) != KAFKA_ERROR_UNKNOWN_TOPIC_OR_PARTITION:
            return dict(description)
        await asyncio.sleep(UNKNOWN_TOPIC_PAUSE_S)
    (description,) = await admin.describe_topics([topic])
    return dict(description)


async def validate_wal_topic(config: Config) -> None:
    """Raise ConfigError naming every wrong setting of the WAL topic; WalUnavailable if
    Kafka cannot be asked within kafka_request_timeout_s. Checked once per process."""
    key = (config.kafka_bootstrap_servers, config.wal_topic, config.groups)
    if key in _topics_valid:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=config.kafka_bootstrap_servers,
                                client_id="votes-wal-check",
                                request_timeout_ms=int(config.kafka_request_timeout_s * 1000))
    resource = ConfigResource(ConfigResourceType.TOPIC, config.wal_topic)
    try:
        async with asyncio.timeout(config.kafka_request_timeout_s):
            await admin.start()
            description = await _describe_topic(admin, config.wal_topic)
            answers = await admin.describe_configs([resource])
    except (KafkaError, OSError, TimeoutError) as exc:
        raise WalUnavailable(f"cannot check WAL topic {config.wal_topic!r} at "
                             f"{config.kafka_bootstrap_servers}: {exc!r}") from exc
    finally:
        await admin.close()
    settings = {}
    unknown_to = []
    for answer in answers:
        for resource_answer in answer.to_object()["resources"]:
            if resource_answer["error_code"] != 0:
                unknown_to.append(resource_answer["error_code"])
            for entry in resource_answer["config_entries"]:
                settings[entry["config_names"]] = entry["config_value"]
    if unknown_to and description.get("error_code", 0) == 0:
        # The topic exists, but the broker asked does not know its configs yet (a topic
        # just created): not a wrong setting, so the fence waits and asks again.
        raise WalUnavailable(f"WAL topic {config.wal_topic!r}: configs not readable yet "
                             f"(error codes {unknown_to})")
    problems = topic_problems(description, settings, config.groups)
    if problems:
        raise ConfigError(f"WAL topic {config.wal_topic!r} is not safe to use: "
                          + "; ".join(problems))
    _topics_valid.add(key)
