"""Kafka KRaft nodes of the local stack: jars, server.properties, storage format, JVM command.

Each of the BROKER_COUNT nodes is a combined broker and controller. The broker jars come
from Maven Central (kafka/pom.xml), fetched once per version into the cache; `java` and
`mvn` come from Debian packages (through `install_debian_package`) when missing. Kafka 4.x
needs Java 17 or newer, which is Debian 12's default JRE.

Invariant: the settings the engine's WAL check requires (replication factor 3,
`min.insync.replicas=2`, unclean leader election off; shards/kafka_topic.py) are the brokers'
defaults here and are also set on the WAL topic itself, so neither a topic created without
configs nor a broker-level default can weaken them.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from deploy.local.ports import BROKER_COUNT, Ports
from deploy.local.processes import StackError, file_lock, install_debian_package, log
from deploy.local.stack_state import cache_root

HERE = Path(__file__).resolve().parent
KAFKA_DIR = HERE / "kafka"
KAFKA_POM = KAFKA_DIR / "pom.xml"
KAFKA_LOG4J2 = KAFKA_DIR / "log4j2.xml"

KAFKA_VERSION = os.environ.get("VOTES_KAFKA_VERSION", "4.1.2")
JAVA_PACKAGE = "default-jre-headless"  # OpenJDK 17 on Debian 12
MAVEN_PACKAGE = "maven"
REPLICATION_FACTOR = 3
MIN_INSYNC_REPLICAS = 2

MAVEN_TIMEOUT_S = 900.0  # the first fetch downloads ~100 MB from Maven Central
FORMAT_TIMEOUT_S = 120.0
MAVEN_OUTPUT_CHARS_MAX = 4000  # of mvn's output, into the error when the fetch fails

KAFKA_HEAP_OPTS = ["-Xms256m", "-Xmx512m"]
# The serial collector: three small heaps on two cores gain nothing from G1's concurrent
# threads, which cost CPU the brokers share with the engine. Measured with
# perf/bench_kafka_transactions.py: brokers' CPU per transaction 6.99 -> 5.58 ms (one
# producer), 4.23 -> 3.70 ms (eight), at the same or better transaction rates.
KAFKA_JVM_OPTS = [
    "-XX:+UseSerialGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]
# StorageTool runs once per node and exits: a small heap and the C1 compiler only start it
# faster than the broker's settings would.
STORAGE_TOOL_JVM_OPTS = ["-Xmx256m", "-XX:TieredStopAtLevel=1"]

# The durability the engine relies on (see the module docstring), and no topic the engine
# did not ask for.
DURABILITY_SETTINGS: dict[str, object] = {
    "num.partitions": 1,
    "default.replication.factor": REPLICATION_FACTOR,
    "min.insync.replicas": MIN_INSYNC_REPLICAS,
    "unclean.leader.election.enable": "false",
    "auto.create.topics.enable": "false",
}
# Internal topics replicated like the WAL; few partitions, as one machine has few clients.
INTERNAL_TOPIC_SETTINGS: dict[str, object] = {
    "offsets.topic.replication.factor": REPLICATION_FACTOR,
    "offsets.topic.num.partitions": 4,
    "transaction.state.log.replication.factor": REPLICATION_FACTOR,
    "transaction.state.log.min.isr": MIN_INSYNC_REPLICAS,
    "transaction.state.log.num.partitions": 4,
    "share.coordinator.state.topic.replication.factor": REPLICATION_FACTOR,
    "share.coordinator.state.topic.min.isr": MIN_INSYNC_REPLICAS,
    "share.coordinator.state.topic.num.partitions": 1,
    "transaction.max.timeout.ms": 300000,
    "transaction.abort.timed.out.transaction.cleanup.interval.ms": 5000,
    "group.initial.rebalance.delay.ms": 0,
}
# Three JVMs share two cores with the engine: one thread per pool.
SMALL_MACHINE_SETTINGS: dict[str, object] = {
    "num.network.threads": 1,
    "num.io.threads": 1,
    "num.replica.fetchers": 1,
    "num.recovery.threads.per.data.dir": 1,
    "background.threads": 2,
    "log.cleaner.threads": 1,
    "log.cleaner.dedupe.buffer.size": 8 * 1024 * 1024,
}
# Fault tests kill brokers: a dead node leaves the ISR and loses leadership in seconds.
FAST_FAILOVER_SETTINGS: dict[str, object] = {
    "broker.session.timeout.ms": 3000,
    "broker.heartbeat.interval.ms": 500,
    "replica.lag.time.max.ms": 3000,
    "controller.quorum.election.timeout.ms": 1000,
    "controller.quorum.fetch.timeout.ms": 2000,
    "leader.imbalance.check.interval.seconds": 10,
}


def ensure_java() -> str:
    return install_debian_package("java", JAVA_PACKAGE)


def ensure_maven() -> str:
    return install_debian_package("mvn", MAVEN_PACKAGE)


def node_dir(state_dir: Path, node: int) -> Path:
    return state_dir / f"kafka-{node}"


def server_properties(ports: Ports, node: int, data_dir: Path) -> str:
    """The server.properties text of Kafka node `node` (1..BROKER_COUNT)."""
    voters = ",".join(f"{other}@127.0.0.1:{ports.controller(other)}"
                      for other in range(1, BROKER_COUNT + 1))
    listeners = (f"PLAINTEXT://127.0.0.1:{ports.kafka(node)},"
                 f"CONTROLLER://127.0.0.1:{ports.controller(node)}")
    settings: dict[str, object] = {
        "process.roles": "broker,controller",
        "node.id": node,
        "broker.rack": f"az{node}",  # one rack per node, as one node per zone in production
        "controller.quorum.voters": voters,
        "listeners": listeners,
        "advertised.listeners": listeners,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data_dir),
        **DURABILITY_SETTINGS,
        **INTERNAL_TOPIC_SETTINGS,
        **SMALL_MACHINE_SETTINGS,
        **FAST_FAILOVER_SETTINGS,
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def parse_properties(text: str) -> dict[str, str]:
    """key=value lines into a dict (enough for the files `server_properties` writes)."""
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


# Jars ------------------------------------------------------------------------------------


def kafka_lib_dir(version: str = KAFKA_VERSION) -> Path:
    return cache_root() / f"kafka-{version}" / "lib"


def _jar_cache_stamp(version: str) -> str:
    # The cache is valid for this version and this POM: a changed POM refetches.
    return f"{version} {hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()}\n"


def _jar_cache_valid(lib: Path, stamp: str) -> bool:
    try:
        return (lib / ".complete").read_text() == stamp
    except OSError:
        return False


def _maven_fetch(version: str, output_dir: Path) -> None:
    argv = [
        ensure_maven(), "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
        f"-DoutputDirectory={output_dir}", "-DincludeScope=runtime",
        f"-Dkafka.version={version}",
    ]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=MAVEN_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as error:
        raise StackError(f"Maven fetch of Kafka {version} timed out after "
                         f"{MAVEN_TIMEOUT_S}s") from error
    if done.returncode != 0 or not any(output_dir.glob(f"kafka_2.13-{version}.jar")):
        raise StackError(
            f"Maven fetch of Kafka {version} failed (rc={done.returncode}):\n"
            f"{done.stdout[-MAVEN_OUTPUT_CHARS_MAX:]}\n{done.stderr[-MAVEN_OUTPUT_CHARS_MAX:]}")


def ensure_kafka_jars(version: str = KAFKA_VERSION) -> Path:
    """Fetch the Kafka broker jars (once) into ~/.cache/votes-stack/kafka-<v>/lib."""
    lib = kafka_lib_dir(version)
    stamp = _jar_cache_stamp(version)
    if _jar_cache_valid(lib, stamp):
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Two stacks starting at once on a fresh machine must not fetch into one directory.
    with file_lock(lib.parent / ".fetch.lock", MAVEN_TIMEOUT_S, "Kafka jar fetch"):
        if _jar_cache_valid(lib, stamp):
            return lib
        staging = lib.parent / "lib.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        log(f"fetching Kafka {version} jars from Maven Central into {lib} (first run only)")
        started = time.monotonic()
        _maven_fetch(version, staging)
        shutil.rmtree(lib, ignore_errors=True)
        staging.rename(lib)
        (lib / ".complete").write_text(stamp)
        log(f"Kafka jars ready in {time.monotonic() - started:.1f}s")
    return lib


# Processes -------------------------------------------------------------------------------


def cluster_id(state_dir: Path) -> str:
    """The stack's KRaft cluster id, created once and kept in <state_dir>/cluster-id."""
    path = state_dir / "cluster-id"
    if path.exists():
        return path.read_text().strip()
    while True:
        candidate = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not candidate.startswith("-"):  # StorageTool would read it as an option
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(candidate + "\n")
    return candidate


def _java_argv(state_dir: Path, node: int, lib: Path, jvm_options: list[str]) -> list[str]:
    logs = node_dir(state_dir, node) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return [
        ensure_java(),
        *jvm_options,
        f"-Dlog4j2.configurationFile={KAFKA_LOG4J2}",
        f"-Dkafka.logs.dir={logs}",
        "-cp",
        f"{lib}/*",
    ]


def broker_argv(state_dir: Path, node: int, lib: Path) -> list[str]:
    """The command line that runs Kafka node `node` from its server.properties."""
    properties = node_dir(state_dir, node) / "server.properties"
    return [*_java_argv(state_dir, node, lib, [*KAFKA_HEAP_OPTS, *KAFKA_JVM_OPTS]),
            "kafka.Kafka", str(properties)]


def write_node_properties(state_dir: Path, ports: Ports) -> list[int]:
    """Write every node's server.properties; returns the nodes whose storage is unformatted."""
    unformatted = []
    for node in range(1, BROKER_COUNT + 1):
        directory = node_dir(state_dir, node)
        (directory / "data").mkdir(parents=True, exist_ok=True)
        properties = directory / "server.properties"
        text = server_properties(ports, node, directory / "data")
        if not properties.exists() or properties.read_text() != text:
            properties.write_text(text)
        if not (directory / "data" / "meta.properties").exists():
            unformatted.append(node)
    return unformatted


def format_storage(state_dir: Path, nodes: list[int], lib: Path) -> None:
    """Format the KRaft storage of `nodes` (in parallel: each is a JVM start)."""
    cluster = cluster_id(state_dir)
    log(f"formatting Kafka storage of node(s) {nodes} (cluster id {cluster})")
    processes = {}
    for node in nodes:
        properties = node_dir(state_dir, node) / "server.properties"
        argv = [*_java_argv(state_dir, node, lib, STORAGE_TOOL_JVM_OPTS),
                "kafka.tools.StorageTool", "format", "--ignore-formatted",
                "-t", cluster, "-c", str(properties)]
        processes[node] = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True)
    errors = []
    for node, process in processes.items():
        try:
            output, _ = process.communicate(timeout=FORMAT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            errors.append(f"kafka-{node}: StorageTool format timed out after "
                          f"{FORMAT_TIMEOUT_S}s\n{output}")
            continue
        if process.returncode != 0:
            errors.append(f"kafka-{node}: StorageTool format failed "
                          f"(rc={process.returncode}):\n{output}")
    if errors:
        raise StackError("\n".join(errors))


def prepare_nodes(state_dir: Path, ports: Ports, lib: Path) -> None:
    """Write properties and format the storage of every node that is not formatted yet."""
    unformatted = write_node_properties(state_dir, ports)
    if unformatted:
        format_storage(state_dir, unformatted, lib)


def node_formatted(state_dir: Path, node: int) -> bool:
    return (node_dir(state_dir, node) / "data" / "meta.properties").exists()
