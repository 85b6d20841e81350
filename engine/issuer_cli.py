"""The `votes keys` commands (registered by engine/cli.py); the issuer role is not built yet.

`keys rotate|retire|list` change the voter and admin token key sets on disk; running servers
reload them within `token_keys_check_s` (docs/tokens.md has the procedure). Errors a user can
cause end with a one-line message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

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
