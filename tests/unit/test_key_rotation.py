"""Proves rotation and retirement of the token key sets: a rotation signs new tokens with a
new key while old tokens keep verifying, a retirement makes the old key's tokens invalid,
the current key cannot be retired, concurrent rotations never lose a key, receipts keys are
untouched, and a running process sees the change through TokenKeyWatch."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from engine.keys import (
    ADMIN_TOKEN_FILE,
    KEYS_PER_SET_MAX,
    VOTER_TOKEN_FILE,
    KeyRotationRefused,
    TokenKeyWatch,
    ensure_keys,
    key_set_view,
    keys_dir,
    load_keys,
    reload_token_keys,
    retire_key,
    rotate_key_set,
)
from engine.tokens import (
    TokenInvalid,
    issue_admin_token,
    issue_voter_token,
    verify_admin_token,
    verify_voter_token,
)

NOW_S = 1_700_000_000
TTL_S = 3600
ROTATIONS_CONCURRENT = 8


def test_rotate_keeps_old_tokens_and_signs_new_ones_with_the_new_key(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    before = load_keys(tmp_path)
    old_token = issue_voter_token(before, 7, ttl_s=TTL_S, now_s=NOW_S)
    view = rotate_key_set(tmp_path, "voter")
    after = load_keys(tmp_path)
    assert view.current == after.voter_key_current != before.voter_key_current
    assert set(view.key_ids) == {before.voter_key_current, after.voter_key_current}
    new_token = issue_voter_token(after, 8, ttl_s=TTL_S, now_s=NOW_S)
    assert new_token.split(".")[1] == view.current
    assert verify_voter_token(after, old_token, NOW_S, "p").voter == 7
    assert verify_voter_token(after, new_token, NOW_S, "p").voter == 8
    # The admin set is a separate scope: rotating the voter set leaves it alone.
    assert after.admin_keys == before.admin_keys
    assert after.receipt_key_id == before.receipt_key_id


def test_retire_makes_the_old_keys_tokens_invalid(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    before = load_keys(tmp_path)
    old_voter = issue_voter_token(before, 1, ttl_s=TTL_S, now_s=NOW_S)
    old_admin = issue_admin_token(before, ttl_s=TTL_S, now_s=NOW_S)
    rotate_key_set(tmp_path, "voter")
    rotate_key_set(tmp_path, "admin")
    retire_key(tmp_path, "voter", before.voter_key_current)
    retire_key(tmp_path, "admin", before.admin_key_current)
    after = load_keys(tmp_path)
    with pytest.raises(TokenInvalid, match="key id is unknown"):
        verify_voter_token(after, old_voter, NOW_S, "p")
    with pytest.raises(TokenInvalid, match="key id is unknown"):
        verify_admin_token(after, old_admin, NOW_S)
    assert verify_admin_token(after, issue_admin_token(after, ttl_s=TTL_S, now_s=NOW_S),
                              NOW_S).sub == "admin"


def test_the_current_key_and_unknown_keys_cannot_be_retired(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    current = load_keys(tmp_path).voter_key_current
    with pytest.raises(KeyRotationRefused, match="rotate first"):
        retire_key(tmp_path, "voter", current)
    with pytest.raises(KeyRotationRefused, match="no key"):
        retire_key(tmp_path, "voter", "vnothere")
    with pytest.raises(KeyRotationRefused, match="unknown key set"):
        rotate_key_set(tmp_path, "receipt")
    assert key_set_view(tmp_path, "voter").key_ids == (current,)


def test_rotation_stops_at_the_key_set_bound(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    for _ in range(KEYS_PER_SET_MAX - 1):
        rotate_key_set(tmp_path, "admin")
    with pytest.raises(KeyRotationRefused, match="retire old ones first"):
        rotate_key_set(tmp_path, "admin")
    assert len(load_keys(tmp_path).admin_keys) == KEYS_PER_SET_MAX


def _rotate_once(data_dir: str) -> str:
    return rotate_key_set(Path(data_dir), "voter").current


def test_concurrent_rotations_lose_no_key(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    first = load_keys(tmp_path).voter_key_current
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        added = pool.map(_rotate_once, [str(tmp_path)] * ROTATIONS_CONCURRENT)
    keyring = load_keys(tmp_path)
    assert set(keyring.voter_keys) == {first, *added}
    assert len(set(added)) == ROTATIONS_CONCURRENT
    assert keyring.voter_key_current in added


def test_rotated_file_is_private_and_loads(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    rotate_key_set(tmp_path, "voter")
    path = keys_dir(tmp_path) / VOTER_TOKEN_FILE
    assert os.stat(path).st_mode & 0o777 == 0o600
    document = json.loads(path.read_text())
    assert document["current"] in document["keys"] and len(document["keys"]) == 2
    assert not [name for name in os.listdir(path.parent) if name.endswith(".tmp")]


def test_watch_sees_rotation_and_reload_swaps_only_token_keys(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    keyring = load_keys(tmp_path)
    watch = TokenKeyWatch(tmp_path)
    assert not watch.changed()
    rotate_key_set(tmp_path, "admin")
    assert watch.changed()
    assert not watch.changed()  # one change is reported once
    reloaded = reload_token_keys(tmp_path, keyring)
    assert reloaded.admin_key_current != keyring.admin_key_current
    assert reloaded.voter_keys == keyring.voter_keys
    assert reloaded.receipt_signing_key is keyring.receipt_signing_key
    assert reloaded.voter_hash_secret == keyring.voter_hash_secret
    (keys_dir(tmp_path) / ADMIN_TOKEN_FILE).unlink()
    assert watch.changed()  # a vanished file is a change too; reloading it then fails loudly
