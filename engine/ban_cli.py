"""`votes ban add|remove|list`: the ban lists in Redis (engine/bans.py), registered by
engine/cli.py. Running workers apply a change within `bans_refresh_ms`.

The store is `--redis-url`, else `bans_redis_url` of `--config` / VOTES_BANS_REDIS_URL.
Bad input, no store configured or a store that does not answer end with a one-line message
and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import time

import click

from engine.bans import BAN_TTL_S_MAX, KINDS, BanStore, BanValueInvalid, normalized, set_key
from engine.errors import VotesError

STORE_TIMEOUT_S = 2.0
LIST_ENTRIES_MAX = 100_000

_KIND = click.argument("kind", type=click.Choice(KINDS))
_STORE = [click.option("--redis-url", help="A node of the Redis Cluster holding the bans."),
          click.option("--config", "config_file", type=click.Path(dir_okay=False),
                       help="TOML config whose bans_redis_url names the store.")]


def _with_store(command):
    for option in reversed(_STORE):
        command = option(command)
    return command


def _client(redis_url: str | None, config_file: str | None):
    from redis.cluster import RedisCluster

    from engine.config import load_config

    try:
        url = redis_url or load_config(config_file).bans_redis_url
    except VotesError as exc:
        raise click.ClickException(str(exc)) from None
    if not url:
        raise click.ClickException("no ban store: give --redis-url or set bans_redis_url")
    try:
        return RedisCluster.from_url(url, socket_timeout=STORE_TIMEOUT_S,
                                     socket_connect_timeout=STORE_TIMEOUT_S,
                                     cluster_error_retry_attempts=1)
    except Exception as exc:  # redis-py raises several classes for an unreachable cluster
        raise click.ClickException(f"cannot reach the ban store at {url}: "
                                   f"{type(exc).__name__}: {exc}") from None


def _value(kind: str, value: str) -> str:
    try:
        return normalized(kind, value)
    except BanValueInvalid as exc:
        raise click.BadParameter(str(exc), param_hint="VALUE") from None


def _run(client, commands) -> list:
    try:
        return [client.execute_command(*command) for command in commands]
    except Exception as exc:  # any store failure: one line, non-zero exit
        raise click.ClickException(f"the ban store did not answer: "
                                   f"{type(exc).__name__}: {exc}") from None
    finally:
        client.close()


@click.group("ban")
def ban_commands() -> None:
    """Ban voters, addresses and /24 (IPv4) or /56 (IPv6) prefixes for a while."""


@ban_commands.command("add")
@_KIND
@click.argument("value")
@click.option("--ttl-s", type=click.IntRange(1, BAN_TTL_S_MAX), required=True,
              help="How long the ban lasts, in seconds (at most 30 days).")
@_with_store
def ban_add(kind, value, ttl_s, redis_url, config_file) -> None:
    """Ban VALUE (a voter id, an address, or a prefix like 10.1.2.0/24) for --ttl-s."""
    canonical = _value(kind, value)
    expires_ms = int(time.time() * 1000) + ttl_s * 1000
    _run(_client(redis_url, config_file), BanStore.add_commands(kind, canonical, expires_ms))
    click.echo(f"banned {kind} {canonical} for {ttl_s} s")


@ban_commands.command("remove")
@_KIND
@click.argument("value")
@_with_store
def ban_remove(kind, value, redis_url, config_file) -> None:
    """Lift the ban of VALUE."""
    canonical = _value(kind, value)
    removed, _ = _run(_client(redis_url, config_file), BanStore.remove_commands(kind, canonical))
    if not removed:
        raise click.ClickException(f"{kind} {canonical} is not banned")
    click.echo(f"removed the ban of {kind} {canonical}")


@ban_commands.command("list")
@click.argument("kind", type=click.Choice(KINDS), required=False)
@_with_store
def ban_list(kind, redis_url, config_file) -> None:
    """Print the bans in force (of KIND, or every kind): kind, value, seconds left."""
    now_ms = int(time.time() * 1000)
    kinds = [kind] if kind else list(KINDS)
    commands = [("ZRANGE", set_key(name), f"({now_ms}", "+inf", "BYSCORE", "LIMIT", 0,
                 LIST_ENTRIES_MAX, "WITHSCORES") for name in kinds]
    answers = _run(_client(redis_url, config_file), commands)
    for name, answer in zip(kinds, answers):
        for value, expires_ms in answer:
            text = value.decode() if isinstance(value, bytes) else value
            click.echo(f"{name} {text} {max(0, int((float(expires_ms) - now_ms) / 1000))}")
