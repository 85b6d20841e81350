"""`votes snapshot now` (registered by engine/cli.py): make the running workers of a data dir
snapshot their fencing groups now and wait, bounded, until each requested group's snapshot
store holds a snapshot newer than the request (engine/snapshot_requests.py says how).

Errors a user can cause (no engine data in the directory, a group out of range, the wait
running out) end with a one-line message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio

import click

from engine.config import Config
from engine.errors import VotesError

WAIT_S_DEFAULT = 60.0


@click.group("snapshot")
def snapshot_commands() -> None:
    """Take snapshots on demand."""


@snapshot_commands.command("now")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="The engine's data dir (else data_dir of --config).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--group", "groups", type=click.IntRange(min=0), multiple=True,
              help="A fencing group to snapshot (repeatable); default: every group this "
                   "node owns.")
@click.option("--wait-s", default=WAIT_S_DEFAULT, type=click.FloatRange(1, 3600),
              show_default=True, help="How long to wait for the snapshots.")
def snapshot_now(data_dir, config_file, groups, wait_s) -> None:
    """Snapshot the groups now, on every worker that owns one; exit 1 if any requested group
    has no snapshot newer than the request within --wait-s."""
    from engine.snapshot_requests import wait_for_snapshots, write_request

    from replay.context import load_replay_config

    try:
        # The shard and group counts come from the data dir's cluster.json, as for the
        # replay tool: the layout `votes serve` recorded there is the one that holds.
        config = load_replay_config(config_file, data_dir)
    except VotesError as exc:  # ReplayError is one
        raise click.ClickException(str(exc)) from None
    for group in groups:
        if group >= config.groups:
            raise click.BadParameter(f"group {group} does not exist: the layout has groups "
                                     f"0..{config.groups - 1}", param_hint="--group")
    wanted = sorted(set(groups)) if groups else _default_groups(config)
    if not wanted:
        click.echo(f"node {config.node_name} owns no fencing group: nothing to snapshot")
        return
    try:
        request = write_request(config.data_path, wanted if groups else None, wait_s)
        missing = asyncio.run(wait_for_snapshots(config, wanted, request, wait_s))
    except (VotesError, OSError) as exc:
        raise click.ClickException(f"snapshot now failed: {exc}") from None
    if missing:
        listed = "; ".join(f"group {group} (shards {', '.join(map(str, shards))})"
                           for group, shards in missing.items())
        raise click.ClickException(
            f"no snapshot newer than request {request.id} after {wait_s:g} s for {listed}: is "
            f"`votes serve` running on {config.data_path} and owning them (`votes group "
            f"status`)? A failed write is in its log and vote_snapshot_failures_total")
    click.echo(f"request {request.id}: groups {' '.join(map(str, wanted))} snapshotted "
               f"({sum(len(config.shards_of_group(g)) for g in wanted)} shards)")


def _default_groups(config: Config) -> list[int]:
    """Every group on one host; in cluster mode the groups whose lease this node holds."""
    if not config.uses_cluster:
        return list(range(config.groups))
    from redis.exceptions import RedisError

    from engine.ownership import lease_holders, redis_client

    async def holders() -> dict[int, tuple[str, str]]:
        client = redis_client(config)
        try:
            return await lease_holders(config, client)
        finally:
            await client.aclose()

    try:
        held = asyncio.run(holders())
    except RedisError as exc:
        raise click.ClickException(f"cannot read the leases from {config.redis_url}: {exc}") from None
    return sorted(group for group, (node_id, _) in held.items() if node_id == config.node_name)
