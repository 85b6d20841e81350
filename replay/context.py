"""Resolve what every verb needs: the config, read exactly as `votes serve` reads it, with the
shard and fencing-group counts that the data dir recorded when it was created.

The data dir must exist and hold `cluster.json` (written by `votes serve` before any worker
starts) of the layout this release reads (shards/layout.py: a format-1 data dir, one log per
shard, is refused): the shard and group counts are fixed per deployment, and a tool that
guessed them would read the wrong log for every voter. Nothing here creates or changes a file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import msgspec

from engine.config import Config, load_config
from replay.errors import BadInput
from shards.layout import CLUSTER_FILE, check_format

CLUSTER_FILE_BYTES_MAX = 64 * 1024


def load_replay_config(config_file: str | None, data_dir: str | None) -> Config:
    """The engine's config (defaults < TOML < VOTES_* environment < --data-dir) with `shards`
    and `groups` taken from the data dir's cluster.json."""
    config = load_config(config_file, data_dir=data_dir)
    data_path = config.data_path
    if not data_path.is_dir():
        raise BadInput(f"data dir {data_path} does not exist")
    cluster_path = data_path / CLUSTER_FILE
    try:
        with open(cluster_path, "rb") as handle:
            raw = handle.read(CLUSTER_FILE_BYTES_MAX + 1)
    except FileNotFoundError:
        raise BadInput(f"{data_path} has no {CLUSTER_FILE}: not a votes data dir "
                       "(`votes serve` creates it on first start)") from None
    except OSError as exc:
        raise BadInput(f"cannot read {cluster_path}: {exc}") from None
    try:
        recorded = json.loads(raw[:CLUSTER_FILE_BYTES_MAX])
        check_format(data_path, recorded)
        shards, groups = recorded["shards"], recorded["groups"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BadInput(f"{cluster_path} is malformed") from None
    if not isinstance(shards, int) or not 1 <= shards <= 4096:
        raise BadInput(f"{cluster_path} records an invalid shard count {shards!r}")
    if not isinstance(groups, int) or not 1 <= groups <= shards or shards % groups:
        raise BadInput(f"{cluster_path} records an invalid group count {groups!r} for "
                       f"{shards} shards")
    return msgspec.structs.replace(config, shards=shards, groups=groups, workers=1).validate()


def chosen_shards(config: Config, shards: Iterable[int] | None) -> list[int]:
    """The shards asked for (all when none), each checked against the shard count."""
    if not shards:
        return list(range(config.shards))
    chosen = sorted(set(shards))
    for shard in chosen:
        if not 0 <= shard < config.shards:
            raise BadInput(f"unknown shard {shard}: this deployment has shards 0..{config.shards - 1}")
    return chosen


def chosen_by_shard_or_group(config: Config, shards: Iterable[int] | None,
                  groups: Iterable[int] | None) -> list[int]:
    """The shards asked for by `--shard` and `--group` (a group: all its shards), each checked;
    all shards when neither is given."""
    groups = sorted(set(groups or ()))
    for group in groups:
        if not 0 <= group < config.groups:
            raise BadInput(f"unknown group {group}: this deployment has groups 0..{config.groups - 1}")
    if not shards and not groups:
        return list(range(config.shards))
    chosen = set(chosen_shards(config, shards)) if shards else set()
    for group in groups:
        chosen.update(config.shards_of_group(group))
    return sorted(chosen)


def by_group(config: Config, shards: Iterable[int]) -> dict[int, list[int]]:
    """The shards grouped by their fencing group (whose one log holds them all), in order."""
    grouped: dict[int, list[int]] = {}
    for shard in sorted(set(shards)):
        grouped.setdefault(config.group_of(shard), []).append(shard)
    return dict(sorted(grouped.items()))


def wal_description(config: Config) -> str:
    if config.uses_kafka:
        return f"Kafka topic {config.wal_topic!r} at {config.kafka_bootstrap_servers}"
    return f"embedded log in {config.data_path}"


def snapshot_description(config: Config) -> str:
    if config.uses_s3:
        return f"s3://{config.s3_bucket}/{config.s3_prefix.strip('/')}"
    return f"snapshot directories in {config.data_path}"
