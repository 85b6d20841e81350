"""The `votes keys` commands and `votes issuer` (both registered by engine/cli.py).

`keys rotate|retire|list` change the voter and admin token key sets on disk; running servers
reload them within `token_keys_check_s` (docs/tokens.md has the procedure). `votes issuer`
runs the issuer role (engine/issuer_app.py). Errors a user can cause end with a one-line
message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

import os

import click

from engine.errors import VotesError

KEY_SET_NAMES = ("voter", "admin")


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc))


def _echo_view(view) -> None:
    click.echo(f"{view.name}: current {view.current}; keys {' '.join(view.key_ids)}")


@click.group("keys")
def keys_commands() -> None:
    """Rotate and retire the keys that sign voter and admin tokens."""


_DATA_DIR = click.option("--data-dir", required=True, type=click.Path(file_okay=False),
                         help="The data dir whose keys/ holds the key sets.")
_KEY_SET = click.argument("key_set", type=click.Choice(KEY_SET_NAMES))


@keys_commands.command("list")
@_DATA_DIR
@_KEY_SET
def keys_list(data_dir, key_set) -> None:
    """Print the key ids of KEY_SET and which one signs new tokens."""
    from engine.keys import key_set_view

    try:
        _echo_view(key_set_view(Path(data_dir), key_set))
    except VotesError as exc:
        _fail(exc)


@keys_commands.command("rotate")
@_DATA_DIR
@_KEY_SET
def keys_rotate(data_dir, key_set) -> None:
    """Add a new key to KEY_SET and sign new tokens with it; old keys still verify."""
    from engine.keys import rotate_key_set

    try:
        _echo_view(rotate_key_set(Path(data_dir), key_set))
    except VotesError as exc:
        _fail(exc)


@keys_commands.command("retire")
@_DATA_DIR
@_KEY_SET
@click.argument("key_id")
def keys_retire(data_dir, key_set, key_id) -> None:
    """Remove KEY_ID from KEY_SET: tokens it signed stop verifying (never the current key)."""
    from engine.keys import retire_key

    try:
        _echo_view(retire_key(Path(data_dir), key_set, key_id))
    except VotesError as exc:
        _fail(exc)


ISSUER_REQUIRED = ("issuer_oidc_url", "issuer_oidc_audience", "issuer_database_url")


@click.command("issuer")
@click.option("--port", type=int)
@click.option("--host")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="The data dir whose keys/ sign the voter tokens (the engine's keys).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file.")
def issuer_command(port, host, data_dir, config_file) -> None:
    """Run the issuer role: POST /v1/voter-tokens exchanges an OIDC ID token for a voter
    token (needs issuer_oidc_url, issuer_oidc_audience, issuer_database_url)."""
    from engine.config import CONFIG_ENV, config_for_workers, load_config
    from engine.keys import ensure_keys

    try:
        config = load_config(config_file, port=port, host=host, data_dir=data_dir)
        missing = [name for name in ISSUER_REQUIRED if not getattr(config, name)]
        if missing:
            raise click.ClickException(f"the issuer role needs {', '.join(missing)} "
                                       "(config file or VOTES_<NAME>)")
        config.data_path.mkdir(parents=True, exist_ok=True)
        ensure_keys(config.data_path)
    except (VotesError, OSError) as exc:
        _fail(exc)
    os.environ[CONFIG_ENV] = config_for_workers(config)
    from granian import Granian
    from granian.constants import Interfaces, Loops

    Granian("engine.issuer_app:app", address=config.host, port=config.port,
            interface=Interfaces.RSGI, workers=1, loop=Loops.uvloop, log_access=False,
            backlog=config.requests_in_flight_max,
            backpressure=config.requests_in_flight_max).serve()
