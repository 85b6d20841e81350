"""The `votes` command: serve the engine, issue tokens, verify receipts, run a demo.

Errors a user can cause (bad flags, a data dir made with another shard count, a malformed
receipt) end with a one-line message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import click

from engine.ban_cli import ban_commands
from engine.config import CONFIG_ENV, Config, config_for_workers, load_config
from engine.errors import VotesError

# The layout record and its check live in shards/layout.py, so the replay tool (below this
# layer) refuses what `votes serve` refuses; the names stay importable from here.
from shards.layout import CLUSTER_FILE, LAYOUT_FORMAT, check_layout


def prepare_data_dir(config: Config) -> None:
    """Create keys and fix the shard and group counts once, before any worker starts."""
    from engine.keys import ensure_keys, publish_once

    data_dir = config.data_path
    data_dir.mkdir(parents=True, exist_ok=True)
    ensure_keys(data_dir)
    cluster_path = data_dir / CLUSTER_FILE
    if not cluster_path.exists():
        # Durable before any worker starts: after a power cut an empty or missing cluster.json
        # would stop the engine from starting on its own data.
        content = json.dumps({"format": LAYOUT_FORMAT, "shards": config.shards,
                              "groups": config.groups}) + "\n"
        publish_once(cluster_path, content.encode(), mode=0o644)
    check_layout(data_dir, json.loads(cluster_path.read_text()), config)


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc))


@click.group()
def main() -> None:
    """Realtime vote-ingest engine."""


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where logs, snapshots and keys live.")
@click.option("--port", type=int)
@click.option("--host")
@click.option("--workers", type=int, help="Worker processes (default 1).")
@click.option("--shards", type=int, help="Shard count, fixed when the data dir is created.")
@click.option("--groups", type=int,
              help="Fencing groups (divides --shards), fixed when the data dir is created.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file.")
def serve(data_dir, port, host, workers, shards, groups, config_file) -> None:
    """Run the engine (Granian RSGI + uvloop): on the embedded durable log, or on Kafka when
    kafka_bootstrap_servers is configured."""
    try:
        config = load_config(config_file, data_dir=data_dir, port=port, host=host,
                             workers=workers, shards=shards, groups=groups)
        prepare_data_dir(config)
    except (VotesError, OSError) as exc:
        _fail(exc)
    from engine.forwarding import runtime_directory

    metrics_dir = runtime_directory(config.data_path) / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    os.environ[CONFIG_ENV] = config_for_workers(config)
    if config.uses_kafka:  # refuse to start on a WAL topic without the durability settings
        import asyncio

        from engine.errors import ConfigError
        from shards.kafka_topic import validate_wal_topic

        try:
            asyncio.run(validate_wal_topic(config))
        except ConfigError as exc:
            _fail(exc)
        except VotesError as exc:  # Kafka unreachable: every shard checks again before serving
            click.echo(f"warning: {exc}", err=True)

    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.http import HTTP1Settings

    server = Granian(
        "engine.app:app",
        address=config.host,
        port=config.port,
        interface=Interfaces.RSGI,
        workers=config.workers,
        loop=Loops.uvloop,
        log_access=False,
        respawn_failed_workers=True,
        respawn_interval=0.5,
        backlog=config.requests_in_flight_max,
        backpressure=config.requests_in_flight_max,
        http1_settings=HTTP1Settings(header_read_timeout=config.header_read_timeout_ms,
                                     max_buffer_size=config.request_head_bytes_max),
    )
    server.serve()


@main.command()
@click.option("--port", type=int)
@click.option("--host")
@click.option("--redis-url", help="The Redis the ingest workers publish results to.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file.")
def results(port, host, redis_url, config_file) -> None:
    """Run the results role: merged results and their live stream from Redis, no shards."""
    try:
        config = load_config(config_file, port=port, host=host, redis_url=redis_url)
    except VotesError as exc:
        _fail(exc)
    if not config.redis_url:
        raise click.ClickException("the results role needs --redis-url (or redis_url)")
    if config.results_ingest_url:  # receipts are checked with these before the ingest is asked
        from engine.keys import load_public_key_document
        from engine.results_receipts import public_keys_file

        try:
            load_public_key_document(public_keys_file(config))
        except VotesError as exc:
            raise click.ClickException(f"results_ingest_url is set, so receipt lookups need "
                                       f"the public receipt keys: {exc}") from None
    os.environ[CONFIG_ENV] = config_for_workers(config)
    from granian import Granian
    from granian.constants import Interfaces, Loops

    Granian("engine.results_app:app", address=config.host, port=config.port,
            interface=Interfaces.RSGI, workers=1, loop=Loops.uvloop, log_access=False,
            backlog=config.requests_in_flight_max,
            backpressure=config.results_subscribers_max + config.requests_in_flight_max,
            ).serve()


@main.command()
@click.option("--region", required=True, help="The region whose tallies are shipped.")
# The Redis URLs may carry passwords: the environment keeps them out of the process list
# (the replicator role's unit passes them through an EnvironmentFile).
@click.option("--from-redis", "from_redis", required=True, envvar="VOTES_REPLICATOR_FROM_REDIS",
              help="That region's Redis (or VOTES_REPLICATOR_FROM_REDIS).")
@click.option("--to-redis", "to_redis", required=True, envvar="VOTES_REPLICATOR_TO_REDIS",
              help="The other region's Redis (or VOTES_REPLICATOR_TO_REDIS).")
@click.option("--interval-ms", default=200, type=click.IntRange(10, 60_000))
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None)
def replicator(region, from_redis, to_redis, interval_ms, metrics_port) -> None:
    """Run the replicator role: ship REGION's tally state into another region's Redis."""
    from engine.logs import configure_logging
    from engine.replicator import run_replicator

    configure_logging()
    run_replicator(region, from_redis, to_redis, interval_ms / 1000, metrics_port)


@main.command()
@click.option("--data-dir", required=True, type=click.Path(file_okay=False))
@click.option("--voter", required=True, type=click.IntRange(0, 2**32 - 1), help="First voter id.")
@click.option("--count", default=1, type=click.IntRange(1, 100_000_000))
@click.option("--poll", default=None, help="Bind the tokens to this poll.")
@click.option("--ttl-s", default=3600, type=click.IntRange(1, 366 * 86400))
@click.option("--region", default="local")
@click.option("--country", default="ZZ")
def token(data_dir, voter, count, poll, ttl_s, region, country) -> None:
    """Print signed voter tokens for voters VOTER..VOTER+COUNT-1, one per line."""
    from engine.keys import load_keys
    from engine.tokens import issue_voter_tokens

    if voter + count > 2**32:
        _fail(ValueError("voter ids must stay below 2**32"))
    try:
        keyring = load_keys(Path(data_dir))
    except VotesError as exc:
        _fail(exc)
    write = sys.stdout.write
    lines = []
    try:  # a region, country or poll it cannot sign: a message, not a traceback
        issued_tokens = issue_voter_tokens(keyring, voter, count, region=region,
                                           country=country, ttl_s=ttl_s, poll=poll)
    except ValueError as exc:
        _fail(exc)
    for issued in issued_tokens:
        lines.append(issued)
        if len(lines) >= 10_000:
            write("\n".join(lines) + "\n")
            lines.clear()
    if lines:
        write("\n".join(lines) + "\n")


@main.command("admin-token")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False))
@click.option("--ttl-s", default=3600, type=click.IntRange(1, 366 * 86400))
def admin_token(data_dir, ttl_s) -> None:
    """Print an admin token."""
    from engine.keys import load_keys
    from engine.tokens import issue_admin_token

    try:
        click.echo(issue_admin_token(load_keys(Path(data_dir)), ttl_s=ttl_s))
    except VotesError as exc:
        _fail(exc)


@main.group()
def receipt() -> None:
    """Work with vote receipts."""


@receipt.command("verify")
@click.argument("receipt_text")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False),
              help="Where keys/receipt-public.json lives.")
def receipt_verify(receipt_text, data_dir) -> None:
    """Check a receipt offline against the engine's public key."""
    from engine.keys import RECEIPT_PUBLIC_FILE, keys_dir, load_public_key_document
    from engine.receipts import decode_receipt, receipt_json, verify_receipt

    try:
        # The public document alone: an auditor holds no private key file.
        public_keys = load_public_key_document(keys_dir(Path(data_dir)) / RECEIPT_PUBLIC_FILE)
        decoded = decode_receipt(receipt_text.strip())
    except VotesError as exc:
        _fail(exc)
    public_key = public_keys.get(decoded.key_id)
    if public_key is None or not verify_receipt(decoded, public_key):
        click.echo("invalid: the receipt does not verify under this engine's public key", err=True)
        sys.exit(1)
    document = receipt_json(decoded)
    click.echo(f"valid: poll={document['poll']} shard={document['shard']} "
               f"group={document['group']} batch_seq={document['batch_seq']} "
               f"index={document['index']} "
               f"offset={document['offset']}")


@main.group("group")
def group_commands() -> None:
    """Fencing-group ownership across hosts (Kafka WAL + Redis leases)."""


@main.group()
def shard() -> None:
    """Shards: a shard moves with its fencing group (`votes group move`)."""


def _cluster_config(config_file: str | None) -> Config:
    try:
        config = load_config(config_file)
    except VotesError as exc:
        _fail(exc)
    if not config.redis_url:
        raise click.ClickException("no redis_url configured (set it in --config or VOTES_REDIS_URL)")
    return config


def _redis(config: Config):
    import redis

    return redis.Redis.from_url(config.redis_url, socket_timeout=5, socket_connect_timeout=5,
                                decode_responses=True)


@group_commands.command("status")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file.")
def group_status(config_file) -> None:
    """Print each group's lease holder, pending move and pin."""
    from redis.exceptions import RedisError

    from engine.config import parse_group_map
    from engine.ownership import lease_key, move_key, parse_lease, pin_key

    config = _cluster_config(config_file)
    groups = range(config.groups)
    try:
        client = _redis(config)
        leases = client.mget([lease_key(config, group) for group in groups])
        moves = client.mget([move_key(config, group) for group in groups])
        pins = client.mget([pin_key(config, group) for group in groups])
    except RedisError as exc:
        raise click.ClickException(f"cannot read the leases from {config.redis_url}: {exc}") from None
    preferred = parse_group_map(config.group_map, config.groups)
    click.echo(f"{'group':>5}  {'holder':<20} {'url':<28} {'preferred':<12} {'pin':<12} move")
    for group_number, lease, move, pin in zip(groups, leases, moves, pins, strict=True):
        holder = parse_lease(lease) or ("-", "-")
        click.echo(f"{group_number:>5}  {holder[0]:<20} {holder[1]:<28} "
                   f"{preferred.get(group_number, '-'):<12} {pin or '-':<12} {move or '-'}")


_MOVE_OPTIONS = [
    click.option("--to", "target", required=True, help="Node id that should own the group."),
    click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file."),
    click.option("--timeout-s", default=30.0, type=click.FloatRange(1, 3600), show_default=True),
]


def _with_move_options(command):
    for option in reversed(_MOVE_OPTIONS):
        command = option(command)
    return command


@group_commands.command("move")
@click.argument("group_number", metavar="GROUP", type=int)
@_with_move_options
def group_move(group_number, target, config_file, timeout_s) -> None:
    """Hand GROUP (all its shards) to node --to through the fence; wait until it serves there."""
    config = _cluster_config(config_file)
    if not 0 <= group_number < config.groups:
        raise click.ClickException(f"unknown group {group_number}: groups are 0..{config.groups - 1}")
    _move_group(config, group_number, target, timeout_s)


@shard.command("move")
@click.argument("shard_number", metavar="SHARD", type=int)
@_with_move_options
def shard_move(shard_number, target, config_file, timeout_s) -> None:
    """Move the fencing group that holds SHARD (a shard never moves alone)."""
    config = _cluster_config(config_file)
    if not 0 <= shard_number < config.shards:
        raise click.ClickException(f"unknown shard {shard_number}: shards are 0..{config.shards - 1}")
    group_number = config.group_of(shard_number)
    click.echo(f"shard {shard_number} is in group {group_number}: moving the whole group "
               f"({config.shards // config.groups} shards)")
    _move_group(config, group_number, target, timeout_s)


def _move_group(config: Config, group_number: int, target: str, timeout_s: float) -> None:
    from redis.exceptions import RedisError

    from engine.ownership import lease_key, move_key, node_key, parse_lease

    started = time.monotonic()
    try:
        client = _redis(config)
        if client.get(node_key(config, target)) is None:
            raise click.ClickException(f"node {target!r} is not alive (no live node key in Redis)")
        before = parse_lease(client.get(lease_key(config, group_number)))
        client.set(move_key(config, group_number), target, px=int(timeout_s * 1000))
        holder = before
        while time.monotonic() - started < timeout_s:
            holder = parse_lease(client.get(lease_key(config, group_number)))
            moved = client.get(move_key(config, group_number)) is None
            if holder is not None and holder[0] == target and moved and _ready(holder[1]):
                click.echo(f"group {group_number}: {before[0] if before else 'nobody'} -> {target} "
                           f"({holder[1]}), serving after {time.monotonic() - started:.1f} s")
                return
            time.sleep(0.1)
    except RedisError as exc:
        raise click.ClickException(f"Redis at {config.redis_url}: {exc}") from None
    raise click.ClickException(
        f"group {group_number} did not move to {target} within {timeout_s} s "
        f"(holder now: {holder[0] if holder else 'nobody'}); the move request expires by itself")


def _ready(base_url: str) -> bool:
    try:
        return _http("GET", base_url + "/readyz")[0] == 200
    except (OSError, ValueError):
        return False


def _http(method: str, url: str, token: str | None = None, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


@main.command()
@click.option("--data-dir", default=".data", type=click.Path(file_okay=False))
@click.option("--port", default=8000, type=int)
@click.option("--workers", default=1, type=int)
def demo(data_dir, port, workers) -> None:
    """Start the engine, create a demo poll, cast a few votes, print curl lines; Ctrl-C stops."""
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--data-dir", data_dir,
                               "--port", str(port), "--workers", str(workers)])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _http("GET", base + "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise click.ClickException("the engine did not become ready; see its log above")
            time.sleep(0.2)
        from engine.keys import load_keys
        from engine.tokens import issue_admin_token, issue_voter_token

        keyring = load_keys(Path(data_dir))
        admin = issue_admin_token(keyring, ttl_s=86400)
        status, _ = _http("POST", base + "/v1/polls", admin, {"id": "demo", "options": ["red", "green", "blue"]})
        click.echo(f"create poll 'demo': HTTP {status}")
        for voter, option in ((1, "red"), (2, "green"), (3, "red")):
            status, body = _http("POST", base + "/v1/polls/demo/votes",
                                 issue_voter_token(keyring, voter, ttl_s=86400), {"option": option})
            click.echo(f"voter {voter} votes {option}: HTTP {status}")
        click.echo(f"results: {json.dumps(_http('GET', base + '/v1/polls/demo/results')[1])}")
        voter_token = issue_voter_token(keyring, 4, ttl_s=86400)
        click.echo("\nTry it:\n"
                   f"  curl -s -X POST {base}/v1/polls/demo/votes -H 'authorization: Bearer {voter_token}' "
                   "-H 'content-type: application/json' -d '{\"option\":\"blue\"}'\n"
                   f"  curl -s {base}/v1/polls/demo/results\n"
                   f"  more voter tokens: {Path(sys.executable).parent / 'votes'} token "
                   f"--data-dir {data_dir} --voter 5 --count 3\n"
                   "Serving until Ctrl-C.")
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()


def _add_replay() -> None:
    # Imported last: replay.cli imports from engine, and keeps its heavy imports in its verbs.
    from replay.cli import main as replay_main

    main.add_command(replay_main, "replay")


_add_replay()


def _add_issuer() -> None:
    from engine.issuer_cli import issuer_command, keys_commands
    from engine.snapshot_cli import snapshot_commands

    main.add_command(keys_commands)
    main.add_command(issuer_command)
    main.add_command(snapshot_commands)


_add_issuer()
main.add_command(ban_commands)  # `votes ban` (engine/ban_cli.py)


if __name__ == "__main__":
    main()
