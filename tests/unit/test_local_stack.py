"""The local stack's pieces that need no running service (deploy/local/).

Proves: the brokers' server.properties and the WAL topic's configs carry what the engine's
WAL check (shards/kafka_topic.py) requires, and that check rejects them when one is weakened;
two stacks on base ports STACK_PORT_SPAN apart share no port (and closer ones do, so the
check can fail); weed mini binds only ports of its stack's layout; the replication check
names every unhealthy partition; the state file round-trips into LocalStack and the engine
config; Kafka error codes match the protocol's; the installer refuses without root with a
message naming the package.
"""

from __future__ import annotations

import os
import pwd
import re
import select
import signal
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka.errors import NoError, TopicAlreadyExistsError

from deploy.local import kafka_admin, kafka_brokers, seaweedfs, stack_state
from deploy.local.installer import InstallError, ensure_debian_package
from deploy.local.ports import (
    BASE_PORT_MAX,
    BROKER_COUNT,
    STACK_PORT_SPAN,
    WEED_ADMIN_GRPC_DISTANCE,
    WEED_ADMIN_OFFSET,
    Ports,
)
from deploy.local.redis_server import redis_argv
from deploy.local.stack import LocalStack, StackError
from shards import kafka_topic

EPHEMERAL_PORT_MIN = 32768  # Linux's default ip_local_port_range starts here
BASE_PORT = 19300


def wal_topic_description(partitions: int, replicas_per_partition: int) -> dict:
    """describe_topics' answer for a topic of this shape."""
    return {"error_code": 0, "partitions": [
        {"partition": index, "replicas": list(range(1, replicas_per_partition + 1))}
        for index in range(partitions)]}


# Kafka settings ----------------------------------------------------------------------------


@pytest.mark.parametrize("node", range(1, BROKER_COUNT + 1))
def test_server_properties_have_the_durability_the_wal_check_requires(tmp_path: Path,
                                                                     node: int) -> None:
    text = kafka_brokers.server_properties(Ports(BASE_PORT), node, tmp_path / "data")
    settings = kafka_brokers.parse_properties(text)
    assert settings["default.replication.factor"] == str(kafka_topic.REPLICATION_FACTOR)
    assert settings["min.insync.replicas"] == str(kafka_topic.MIN_INSYNC_REPLICAS)
    assert settings["unclean.leader.election.enable"] == "false"
    assert settings["auto.create.topics.enable"] == "false"
    # The transaction log backs acks=all transactions: replicated like the WAL.
    assert settings["transaction.state.log.replication.factor"] == "3"
    assert settings["transaction.state.log.min.isr"] == "2"
    assert settings["offsets.topic.replication.factor"] == "3"
    assert settings["node.id"] == str(node)
    assert settings["log.dirs"] == str(tmp_path / "data")


def test_every_node_has_its_own_listeners_and_all_nodes_vote(tmp_path: Path) -> None:
    ports = Ports(BASE_PORT)
    listeners = set()
    for node in range(1, BROKER_COUNT + 1):
        settings = kafka_brokers.parse_properties(
            kafka_brokers.server_properties(ports, node, tmp_path))
        assert settings["controller.quorum.voters"] == (
            "1@127.0.0.1:19395,2@127.0.0.1:19396,3@127.0.0.1:19397")
        assert settings["listeners"] == settings["advertised.listeners"]
        listeners.add(settings["listeners"])
        assert f"PLAINTEXT://127.0.0.1:{ports.kafka(node)}" in settings["listeners"]
    assert len(listeners) == BROKER_COUNT


def test_the_wal_topic_configs_pass_the_engines_wal_check() -> None:
    shards = 8
    problems = kafka_topic.topic_problems(
        wal_topic_description(shards, kafka_brokers.REPLICATION_FACTOR),
        kafka_admin.WAL_TOPIC_CONFIGS, shards)
    assert problems == []
    assert kafka_admin.WAL_TOPIC_CONFIGS["retention.ms"] == "-1"  # the WAL is never trimmed


@pytest.mark.parametrize(("key", "weakened"), [("min.insync.replicas", "1"),
                                               ("unclean.leader.election.enable", "true")])
def test_the_wal_check_rejects_weakened_topic_configs(key: str, weakened: str) -> None:
    """The check above can fail: weaken one setting and the engine names it."""
    configs = {**kafka_admin.WAL_TOPIC_CONFIGS, key: weakened}
    problems = kafka_topic.topic_problems(wal_topic_description(8, 3), configs, 8)
    assert len(problems) == 1 and key in problems[0]


def test_kafka_error_codes_are_the_protocols() -> None:
    assert kafka_admin.KAFKA_ERROR_NONE == NoError.errno
    assert kafka_admin.KAFKA_ERROR_TOPIC_ALREADY_EXISTS == TopicAlreadyExistsError.errno


# Replication check -------------------------------------------------------------------------


def metadata(partitions: list[dict], brokers: tuple[int, ...] = (1, 2, 3)) -> dict:
    return {"brokers": [{"node_id": node} for node in brokers],
            "topics": [{"topic": "votes-wal", "error_code": 0, "partitions": partitions}]}


def partition(index: int, leader: int = 1, isr: tuple[int, ...] = (1, 2, 3)) -> dict:
    return {"partition": index, "error_code": 0, "leader": leader, "replicas": [1, 2, 3],
            "isr": list(isr)}


def test_replication_check_passes_a_healthy_topic_and_names_each_unhealthy_partition() -> None:
    assert kafka_admin.replication_problems(metadata([partition(0), partition(1)])) == []
    problems = kafka_admin.replication_problems(metadata(
        [partition(0), partition(1, isr=(1, 2)), partition(2, leader=kafka_admin.KAFKA_NO_LEADER)]))
    assert [problem.split(":")[0] for problem in problems] == ["votes-wal/1", "votes-wal/2"]
    problems = kafka_admin.replication_problems(metadata([partition(0)], brokers=(1, 2)))
    assert problems and "brokers alive [1, 2]" in problems[0]


# Ports -------------------------------------------------------------------------------------


def test_one_stack_binds_distinct_ports_within_its_span() -> None:
    ports = Ports(BASE_PORT)
    every_port = ports.all_ports()
    assert len(every_port) == len(set(every_port)) == 2 * BROKER_COUNT + 10 + 1
    admin_grpc = BASE_PORT + WEED_ADMIN_OFFSET + WEED_ADMIN_GRPC_DISTANCE
    assert all(BASE_PORT <= port < BASE_PORT + STACK_PORT_SPAN or port == admin_grpc
               for port in every_port)


@pytest.mark.parametrize(("first", "second"), [(19000, 19100), (19300, 19400), (19100, 19300)])
def test_two_stacks_a_span_apart_share_no_port(first: int, second: int) -> None:
    assert not set(Ports(first).all_ports()) & set(Ports(second).all_ports())


def test_two_stacks_closer_than_a_span_can_collide() -> None:
    """The layout test above can fail: bases 58 apart put broker 1 on the other's S3 port."""
    assert set(Ports(19000).all_ports()) & set(Ports(19058).all_ports())


def test_every_port_stays_below_the_ephemeral_range() -> None:
    assert max(Ports(BASE_PORT_MAX).all_ports()) < EPHEMERAL_PORT_MIN


@pytest.mark.parametrize("base_port", [80, BASE_PORT_MAX + 1])
def test_a_stack_refuses_a_base_port_out_of_range(base_port: int, tmp_path: Path) -> None:
    with pytest.raises(StackError, match="base port must be within"):
        LocalStack(base_port=base_port, state_dir=tmp_path)


def test_weed_mini_binds_only_ports_of_its_layout(tmp_path: Path) -> None:
    ports = Ports(BASE_PORT)
    argv = seaweedfs.weed_argv("weed", ports, tmp_path)
    bound = [int(value) for value in re.findall(r"^-[\w.]*port[\w.]*=(\d+)$", "\n".join(argv),
                                                re.MULTILINE)]
    assert sorted(port for port in bound if port) == sorted(ports.weed_all())


def test_redis_keeps_nothing_on_disk(tmp_path: Path) -> None:
    argv = redis_argv("redis-server", 19379, tmp_path)
    assert argv[argv.index("--save") + 1] == ""
    assert argv[argv.index("--appendonly") + 1] == "no"
    assert argv[argv.index("--bind") + 1] == "127.0.0.1"


# State file --------------------------------------------------------------------------------


def test_the_state_file_sets_partitions_and_the_engine_config(tmp_path: Path) -> None:
    first = LocalStack(base_port=BASE_PORT, state_dir=tmp_path, partitions=4)
    stack_state.write_state(tmp_path, first.endpoints())
    again = LocalStack(base_port=BASE_PORT, state_dir=tmp_path)
    assert again.partitions == 4
    config = tomllib.loads(stack_state.engine_config_toml(stack_state.read_state(tmp_path)))
    assert config["shards"] == 4
    assert config["kafka_bootstrap_servers"] == "127.0.0.1:19392,127.0.0.1:19393,127.0.0.1:19394"
    assert config["s3_endpoint_url"] == "http://127.0.0.1:19333"
    assert config["wal_topic"] == "votes-wal"


def test_without_a_state_file_the_default_partitions_apply(tmp_path: Path) -> None:
    assert stack_state.read_state(tmp_path) is None
    assert LocalStack(base_port=BASE_PORT, state_dir=tmp_path).partitions == 8


# Installer ---------------------------------------------------------------------------------

CHILD_TIMEOUT_S = 30.0


def refusal_text() -> str:
    try:
        ensure_debian_package("votes-no-such-command", "votes-example-package")
    except InstallError as error:
        return str(error)
    return "no refusal"


def call_as_non_root(function: Callable[[], str]) -> str:
    """`function()`, called without root: in a forked child that became `nobody` when we
    are root (a fork, so the child needs no access to this interpreter's files)."""
    if os.geteuid() != 0:
        return function()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root for good, answer through the pipe, exit
        try:
            os.close(read_end)
            nobody = pwd.getpwnam("nobody")
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            answer = function() if os.geteuid() != 0 else "still root"
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            answer = f"{type(error).__name__}: {error}"
        os.write(write_end, answer.encode())
        os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], CHILD_TIMEOUT_S)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the non-root child did not answer within {CHILD_TIMEOUT_S}s")
        with os.fdopen(read_end, closefd=False) as reader:
            return reader.read()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


def test_the_installer_refuses_without_root_naming_the_package() -> None:
    output = call_as_non_root(refusal_text)
    assert "votes-no-such-command is not installed and this is not root" in output
    assert "apt-get install -y votes-example-package" in output


def test_the_installer_returns_a_command_that_is_there_without_installing() -> None:
    # log=pytest.fail: any attempt to install fails the test.
    assert Path(ensure_debian_package("sh", "dash", log=pytest.fail)).name == "sh"


def test_every_reserved_offset_is_distinct() -> None:
    """Each service started at base + an offset (deploy/local/ports.py) has ports of its own:
    the issuer's test services once shared + 50 with the Redis Cluster."""
    from deploy.local import ports as layout

    spans = {"KAFKA_BROKER_OFFSET": range(1, BROKER_COUNT + 1),
             "KAFKA_CONTROLLER_OFFSET": range(1, BROKER_COUNT + 1),
             "REDIS_CLUSTER_OFFSET": range(2 * layout.REDIS_CLUSTER_MASTERS)}
    taken: dict[int, str] = {}
    for name in dir(layout):
        if not name.endswith("_OFFSET"):
            continue
        for extra in spans.get(name, range(1)):
            offset = getattr(layout, name) + extra
            assert offset not in taken, f"{name} + {extra} = {offset} is {taken.get(offset)}'s"
            assert 0 <= offset < STACK_PORT_SPAN, name
            taken[offset] = name
    assert {"OIDC_PROVIDER_OFFSET", "ISSUER_POSTGRES_OFFSET"} <= set(taken.values())
