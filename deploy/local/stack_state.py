"""Where a stack keeps its state, and its state file `stack.json`.

Each stack (one base port) owns one state directory, by default
~/.cache/votes-stack/run-<base port> ($VOTES_STACK_CACHE moves ~/.cache/votes-stack). Its
`stack.json` holds the endpoints an `up` produced; it is replaced atomically, so a reader
(another process asking for `endpoints` or `engine-config`) never sees half a file. An
earlier `up`'s partition count is read back from it, so a later `up` without --partitions
keeps the WAL topic's shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_FILE_NAME = "stack.json"


def cache_root() -> Path:
    return Path(os.environ.get("VOTES_STACK_CACHE", "~/.cache/votes-stack")).expanduser()


def default_state_dir(base_port: int) -> Path:
    return cache_root() / f"run-{base_port}"


def lock_file_of(state_dir: Path) -> Path:
    """The lock `up` and `down` hold: beside the state dir, so `down --wipe` keeps it."""
    return state_dir.parent / f".{state_dir.name}.lock"


def read_state(state_dir: Path) -> dict[str, Any] | None:
    """What the last `up` wrote, or None if there is no readable state file."""
    try:
        state = json.loads((state_dir / STATE_FILE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def write_state(state_dir: Path, endpoints: dict[str, Any]) -> None:
    path = state_dir / STATE_FILE_NAME
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(endpoints, indent=2) + "\n")
    temporary.replace(path)


def recorded_partitions(state_dir: Path) -> int | None:
    """The WAL topic's partition count in the state file, if it records one."""
    state = read_state(state_dir)
    try:
        return int(state["kafka"]["partitions"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None


def engine_config_toml(endpoints: dict[str, Any]) -> str:
    """The engine's config for this stack: Kafka WAL, S3 snapshots, shards = partitions."""
    kafka, s3 = endpoints["kafka"], endpoints["s3"]
    values = {
        "shards": kafka["partitions"],
        "kafka_bootstrap_servers": kafka["bootstrap_servers"],
        "wal_topic": kafka["wal_topic"],
        "s3_endpoint_url": s3["endpoint_url"],
        "s3_bucket": s3["bucket"],
        "s3_region": s3["region"],
        "s3_access_key_id": s3["access_key_id"],
        "s3_secret_access_key": s3["secret_access_key"],
    }
    # json.dumps of a str or int is also a valid TOML value.
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
