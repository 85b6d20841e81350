"""Proves that key files are created once, atomically, with safe modes, that concurrent
creators (threads and processes) all end up with the same keys, and that a missing or
malformed key file stops loading with an error naming the file."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
import threading
from pathlib import Path

import pytest

from engine.errors import VotesError
from engine.keys import (
    ADMIN_TOKEN_FILE,
    RECEIPT_PUBLIC_FILE,
    RECEIPT_SIGNING_FILE,
    VOTER_HASH_FILE,
    VOTER_TOKEN_FILE,
    KeyRing,
    KeysCorrupt,
    KeysMissing,
    ensure_keys,
    keys_dir,
    load_keys,
    load_public_key_document,
    public_key_document,
)

SECRET_FILES = (VOTER_TOKEN_FILE, ADMIN_TOKEN_FILE, RECEIPT_SIGNING_FILE, VOTER_HASH_FILE)


def keyring_fingerprint(keyring: KeyRing) -> str:
    """A digest of every secret in the ring, so processes can compare rings by value."""
    parts = [
        repr(sorted(keyring.voter_keys.items())), keyring.voter_key_current,
        repr(sorted(keyring.admin_keys.items())), keyring.admin_key_current,
        keyring.receipt_key_id, keyring.receipt_public_key_bytes.hex(),
        keyring.voter_hash_secret.hex(),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def ensure_and_fingerprint(data_dir: str, barrier: object, results: object) -> None:
    """Child process body: start together, create-or-load, report what was loaded."""
    barrier.wait()  # type: ignore[attr-defined]
    ensure_keys(Path(data_dir))
    results.put(keyring_fingerprint(load_keys(Path(data_dir))))  # type: ignore[attr-defined]


def test_ensure_keys_twice_keeps_the_same_keys(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    first = {name: (keys_dir(tmp_path) / name).read_bytes() for name in SECRET_FILES}
    fingerprint = keyring_fingerprint(load_keys(tmp_path))
    ensure_keys(tmp_path)
    second = {name: (keys_dir(tmp_path) / name).read_bytes() for name in SECRET_FILES}
    assert first == second
    assert keyring_fingerprint(load_keys(tmp_path)) == fingerprint


def test_keys_have_expected_shapes(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    keyring = load_keys(tmp_path)
    assert len(keyring.voter_keys[keyring.voter_key_current]) == 32
    assert len(keyring.admin_keys[keyring.admin_key_current]) == 32
    assert len(keyring.receipt_public_key_bytes) == 32
    assert len(keyring.voter_hash_secret) == 32
    assert keyring.voter_keys[keyring.voter_key_current] != keyring.admin_keys[
        keyring.admin_key_current]
    assert set(keyring.voter_keys).isdisjoint(keyring.admin_keys)
    signature = keyring.receipt_signing_key.sign(b"message")
    assert len(signature) == 64


def test_file_and_directory_modes(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # The modes must not depend on a permissive umask.
    try:
        ensure_keys(tmp_path)
    finally:
        os.umask(old_umask)
    directory = keys_dir(tmp_path)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in SECRET_FILES:
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((directory / RECEIPT_PUBLIC_FILE).stat().st_mode) == 0o644
    assert sorted(path.name for path in directory.iterdir()) == sorted(
        SECRET_FILES + (RECEIPT_PUBLIC_FILE,))


def test_concurrent_processes_all_load_identical_keys(tmp_path: Path) -> None:
    processes_count = 6
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes_count)
    results = context.Queue()
    processes = [
        context.Process(target=ensure_and_fingerprint, args=(str(tmp_path), barrier, results))
        for _ in range(processes_count)
    ]
    for process in processes:
        process.start()
    fingerprints = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    results.close()
    results.join_thread()
    assert len(set(fingerprints)) == 1
    assert fingerprints[0] == keyring_fingerprint(load_keys(tmp_path))
    leftovers = [path.name for path in keys_dir(tmp_path).iterdir() if path.name.startswith(".")]
    assert leftovers == []


def test_concurrent_threads_all_load_identical_keys(tmp_path: Path) -> None:
    threads_count = 16
    barrier = threading.Barrier(threads_count)
    fingerprints: list[str] = []

    def body() -> None:
        barrier.wait()
        ensure_keys(tmp_path)
        fingerprints.append(keyring_fingerprint(load_keys(tmp_path)))

    threads = [threading.Thread(target=body) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(fingerprints) == threads_count
    assert len(set(fingerprints)) == 1


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(KeysMissing, match=VOTER_TOKEN_FILE):
        load_keys(tmp_path)
    ensure_keys(tmp_path)
    (keys_dir(tmp_path) / ADMIN_TOKEN_FILE).unlink()
    with pytest.raises(KeysMissing, match=ADMIN_TOKEN_FILE) as raised:
        load_keys(tmp_path)
    assert isinstance(raised.value, VotesError)


def _rewrite(path: Path, change: object) -> None:
    document = json.loads(path.read_text())
    change(document)  # type: ignore[operator]
    path.write_text(json.dumps(document))


def _set_current(value: str):  # noqa: ANN202
    return lambda document: document.__setitem__("current", value)


def _set_key(value: str):  # noqa: ANN202
    return lambda document: document["keys"].__setitem__(document["current"], value)


def _rename_current(value: str):  # noqa: ANN202
    def change(document: dict) -> None:
        document["keys"][value] = document["keys"].pop(document["current"])
        document["current"] = value
    return change


@pytest.mark.parametrize("file_name", SECRET_FILES)
@pytest.mark.parametrize(
    "corruption",
    [
        pytest.param(lambda path: path.write_bytes(path.read_bytes()[:20]), id="truncated"),
        pytest.param(lambda path: path.write_bytes(b""), id="empty"),
        pytest.param(lambda path: path.write_bytes(b"\xff\xfe garbage"), id="binary"),
        pytest.param(lambda path: path.write_text("[]"), id="not-an-object"),
        pytest.param(lambda path: _rewrite(path, _set_current("nope")), id="current-unknown"),
        pytest.param(lambda path: _rewrite(path, _set_key("zz")), id="not-hex"),
        pytest.param(lambda path: _rewrite(path, _set_key("ab" * 8)), id="too-short"),
        pytest.param(lambda path: _rewrite(path, _rename_current("a.b")), id="dotted-key-id"),
        pytest.param(lambda path: _rewrite(path, lambda d: d.__setitem__("kind", "x")),
                     id="wrong-kind"),
        pytest.param(lambda path: _rewrite(path, lambda d: d.__setitem__("extra", 1)),
                     id="unknown-field"),
        pytest.param(lambda path: _rewrite(path, lambda d: d.__setitem__("keys", {})),
                     id="no-keys"),
    ],
)
def test_corrupt_file_gives_a_clear_error(tmp_path: Path, file_name: str, corruption) -> None:
    ensure_keys(tmp_path)
    corruption(keys_dir(tmp_path) / file_name)
    with pytest.raises(KeysCorrupt, match=file_name) as raised:
        load_keys(tmp_path)
    assert isinstance(raised.value, VotesError)


def test_swapped_voter_and_admin_files_are_refused(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    directory = keys_dir(tmp_path)
    (directory / VOTER_TOKEN_FILE).write_bytes((directory / ADMIN_TOKEN_FILE).read_bytes())
    with pytest.raises(KeysCorrupt, match="kind"):
        load_keys(tmp_path)


def test_public_key_document_matches_the_signing_key(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    keyring = load_keys(tmp_path)
    document = public_key_document(keyring)
    assert document["key_id"] == keyring.receipt_key_id
    assert bytes.fromhex(document["public_key"]) == keyring.receipt_public_key_bytes
    on_disk = json.loads((keys_dir(tmp_path) / RECEIPT_PUBLIC_FILE).read_text())
    assert on_disk == document
    public_keys = load_public_key_document(keys_dir(tmp_path) / RECEIPT_PUBLIC_FILE)
    assert public_keys == {keyring.receipt_key_id: keyring.receipt_public_key_bytes}


def test_public_key_document_is_rewritten_after_rotation(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    old = load_keys(tmp_path)
    signing_path = keys_dir(tmp_path) / RECEIPT_SIGNING_FILE
    document = json.loads(signing_path.read_text())
    document["keys"]["rnew"] = "11" * 32
    document["current"] = "rnew"
    signing_path.write_text(json.dumps(document))
    ensure_keys(tmp_path)
    new = load_keys(tmp_path)
    assert new.receipt_key_id == "rnew"
    public_keys = load_public_key_document(keys_dir(tmp_path) / RECEIPT_PUBLIC_FILE)
    assert public_keys[old.receipt_key_id] == old.receipt_public_key_bytes
    assert public_keys["rnew"] == new.receipt_public_key_bytes
    assert new.receipt_public_keys == public_keys


def test_keyring_repr_does_not_leak_secrets(tmp_path: Path) -> None:
    ensure_keys(tmp_path)
    keyring = load_keys(tmp_path)
    text = repr(keyring)
    for secret in (*keyring.voter_keys.values(), *keyring.admin_keys.values(),
                   keyring.voter_hash_secret):
        assert secret.hex() not in text
        assert repr(secret) not in text
