"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from engine.keys import KeyRing, ensure_keys, load_keys


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> KeyRing:
    """A fresh key directory's keys (voter, admin, receipt signing, voter hash secret)."""
    data_dir = tmp_path_factory.mktemp("keys")
    ensure_keys(data_dir)
    return load_keys(data_dir)
