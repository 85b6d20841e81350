"""Which write-ahead log a fencing group and which snapshot store a shard uses, chosen once.

The embedded default (segment log + snapshots in the data dir) needs no services; Kafka and
S3 are used when the config names them. `choose_backends` decides once, at start-up, and
gives the factories the serving layer then calls per group (the log: one per fencing group)
and per shard (snapshots: one store per shard); the callers see only the
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
    wal: Callable[[int], Wal]  # group -> its log
    snapshot_store: Callable[[int], SnapshotStore]  # shard -> its snapshots


def shard_directory(data_dir: Path, shard: int) -> Path:
    return data_dir / "shards" / f"shard-{shard:04d}"


def group_directory(data_dir: Path, group: int) -> Path:
    return data_dir / "groups" / f"group-{group:04d}"


def choose_backends(config: Config) -> Backends:
    """The log of every fencing group and the snapshot store of every shard, per the config."""
    return Backends(durability(config), lambda group: make_wal(config, group),
                    lambda shard: make_snapshot_store(config, shard))


def durability(config: Config) -> str:
    if config.uses_kafka:
        from shards.kafka_wal import KafkaWal

        return KafkaWal.durability
    return EmbeddedWal.durability


def make_wal(config: Config, group: int) -> Wal:
    if config.uses_kafka:
        from shards.kafka_wal import KafkaWal

        return KafkaWal(config, group)
    directory = group_directory(config.data_path, group)
    return EmbeddedWal(SegmentLog(directory / "wal", config.segment_bytes_max))


def make_snapshot_store(config: Config, shard: int) -> SnapshotStore:
    if config.uses_s3:
        from shards.s3_snapshots import S3SnapshotStore

        return S3SnapshotStore(config, shard)
    directory = shard_directory(config.data_path, shard)
    return DirectorySnapshotStore(directory / "snapshots", shard, config.snapshots_kept)
