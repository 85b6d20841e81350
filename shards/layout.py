"""The data dir's layout record (cluster.json) and the check that refuses another layout.

`votes serve` writes cluster.json once, before any worker starts: {"format": 3, "shards": S,
"groups": G}. Both the engine (engine/cli.py) and the replay tool read a data dir only when
it is of this layout: format 1 (one log per shard, before fencing groups) would be misread
under format 3's paths and offsets, and format 2's vote batches (one per shard per cycle,
shards/records.py) under format 3's record schema, so both are refused with a message
saying what to do.
"""

from __future__ import annotations

from pathlib import Path

from engine.config import Config
from engine.errors import VotesError

CLUSTER_FILE = "cluster.json"
# 1: one log per shard; 2: one log per fencing group, one vote batch per shard per cycle;
# 3: one vote batch per fencing group per cycle (the records' LOG_FORMAT).
LAYOUT_FORMAT = 3
_FORMATS_BEFORE = {1: "one log per shard, written before fencing groups",
                   2: "one vote batch per shard per commit cycle, before group batches"}


def check_format(data_dir: Path, recorded: dict[str, object]) -> None:
    """Refuse a data dir of another layout format: never misread it."""
    found = recorded.get("format")
    if found != LAYOUT_FORMAT:
        described = _FORMATS_BEFORE.get(found) if isinstance(found, int) else None
        raise VotesError(
            f"{data_dir} holds layout format {found!r} ({described or 'unknown to this release'}); "
            f"this engine reads format {LAYOUT_FORMAT} only. "
            f"Export its results with `votes replay export --data-dir {data_dir}` using the "
            f"release that wrote it, then start this one on a new data dir."
        )


def check_layout(data_dir: Path, recorded: dict[str, object], config: Config) -> None:
    """Refuse a data dir of another layout, shard count or group count: never misread it."""
    check_format(data_dir, recorded)
    if recorded.get("shards") != config.shards:
        raise VotesError(
            f"{data_dir} was created with {recorded.get('shards')} shards; this start asks for "
            f"{config.shards}. The shard count is fixed per deployment."
        )
    if recorded.get("groups") != config.groups:
        raise VotesError(
            f"{data_dir} was created with {recorded.get('groups')} fencing groups; this start "
            f"asks for {config.groups}. The group count is fixed per deployment (set groups = "
            f"{recorded.get('groups')})."
        )
