"""Facade over the hot loops: the compiled module when it is built, else the Python twin.

Set VOTES_REQUIRE_CYTHON=1 (CI does) to make a missing or broken build an import error,
so a test run can never silently exercise the Python twin twice.

Production code imports the hot loops from here only. The compiled module's interface is
engine/_fastpath.pyi, checked against the built extension by `make lint` (mypy.stubtest).
Two things come from the Python twin whichever implementation runs: the token status codes
(the compiled token_payload returns the same numbers, tests/unit/test_fastpath_crypto_parity.py
compares them) and MerkleTree, the commit tree over a cycle's few batch nodes, which is not
a hot loop.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # mypy types the facade by the compiled module's stub (engine/_fastpath.pyi), the one
    # interface of both implementations; the parity tests hold the twin to it.
    from engine import _fastpath as _implementation

    IMPLEMENTATION: str
else:
    try:
        from engine import _fastpath as _implementation

        IMPLEMENTATION = "cython"
    except ImportError:
        if os.environ.get("VOTES_REQUIRE_CYTHON") == "1":
            raise
        from engine import fastpath_py as _implementation

        IMPLEMENTATION = "python"

from engine.fastpath_py import (  # shared by both implementations, see above
    TOKEN_KEY_UNKNOWN,
    TOKEN_MALFORMED,
    TOKEN_MISSING,
    TOKEN_NOT_ASCII,
    TOKEN_NOT_TEXT,
    TOKEN_PAYLOAD_NOT_BASE64URL,
    TOKEN_SIGNATURE_WRONG,
    TOKEN_TOO_LONG,
    MerkleTree,
)

BatchTree = _implementation.BatchTree
HmacSha256 = _implementation.HmacSha256
Locator = _implementation.Locator
apply_group = _implementation.apply_group
batch_tree = _implementation.batch_tree
sort_run = _implementation.sort_run
token_payload = _implementation.token_payload

__all__ = [
    "IMPLEMENTATION",
    "TOKEN_KEY_UNKNOWN",
    "TOKEN_MALFORMED",
    "TOKEN_MISSING",
    "TOKEN_NOT_ASCII",
    "TOKEN_NOT_TEXT",
    "TOKEN_PAYLOAD_NOT_BASE64URL",
    "TOKEN_SIGNATURE_WRONG",
    "TOKEN_TOO_LONG",
    "BatchTree",
    "HmacSha256",
    "Locator",
    "MerkleTree",
    "apply_group",
    "batch_tree",
    "sort_run",
    "token_payload",
]
