"""Which write-ahead log and snapshot store a shard uses, chosen once from the config.

The embedded default (segment log + snapshots in the data dir) needs no services; Kafka and
S3 are used when the config names them. `choose_backends` decides once, at start-up, and
gives the factories the serving layer then calls per shard; the callers see only the
contracts (`shards.wal.Wal`, `shards.snapshots.SnapshotStore`). Imports of the client
libraries stay inside the branches, so the embedded default does not load them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from engine.config import Config
from shards.segment_log import SegmentLog
from shards.snapshots import DirectorySnapshotStore, SnapshotStore
from shards.wal import EmbeddedWal, Wal


class Backends(NamedTuple):
    durability: str
    wal: Callable[[int], Wal]
    snapshot_store: Callable[[int], SnapshotStore]


def shard_directory(data_dir: Path, shard: int) -> Path:
    return data_dir / "shards" / f"shard-{shard:04d}"


def choose_backends(config: Config) -> Backends:
    """The log and the snapshot store of every shard of this process, per the config."""
    return Backends(durability(config), lambda shard: make_wal(config, shard),
                    lambda shard: make_snapshot_store(config, shard))


def durability(config: Config) -> str:
    if config.uses_kafka:
        from shards.kafka_wal import KafkaWal

        return KafkaWal.durability
    return EmbeddedWal.durability


def make_wal(config: Config, shard: int) -> Wal:
    if config.uses_kafka:
        from shards.kafka_wal import KafkaWal

        return KafkaWal(config, shard)
    directory = shard_directory(config.data_path, shard)
    return EmbeddedWal(SegmentLog(directory / "wal", config.segment_bytes_max))


def make_snapshot_store(config: Config, shard: int) -> SnapshotStore:
    if config.uses_s3:
        from shards.s3_snapshots import S3SnapshotStore

        return S3SnapshotStore(config, shard)
    directory = shard_directory(config.data_path, shard)
    return DirectorySnapshotStore(directory / "snapshots", shard, config.snapshots_kept)
