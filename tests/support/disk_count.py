"""What a shard's logs count, read offline with the audit tool (replay/recount.py), never
through the engine: the ground truth a durability test compares acknowledgements with."""

from __future__ import annotations

import json
from pathlib import Path

from engine.config import Config
from replay.recount import recount


def shards_of(data_dir: Path) -> int:
    return json.loads((Path(data_dir) / "cluster.json").read_text())["shards"]


def groups_of(data_dir: Path) -> int:
    return json.loads((Path(data_dir) / "cluster.json").read_text())["groups"]


async def counted_on_disk(data_dir: Path, poll: str) -> dict[int, str]:
    """voter id -> option of every vote of `poll` that the logs under `data_dir` count."""
    config = Config(data_dir=str(data_dir), shards=shards_of(data_dir),
                    groups=groups_of(data_dir)).validate()
    results = await recount(config, keep_voters=True, chain=False)
    counted: dict[int, str] = {}
    for shard in results.values():
        recounted = shard.polls.get(poll)
        if recounted is not None:
            counted.update(recounted.voter_options or {})
    return counted
