"""Facade over the hot loops: the compiled module when it is built, else the Python twin.

Set VOTES_REQUIRE_CYTHON=1 (CI does) to make a missing or broken build an import error,
so a test run can never silently exercise the Python twin twice.
"""

from __future__ import annotations

import os

try:
    from engine import _fastpath as _implementation

    IMPLEMENTATION = "cython"
except ImportError:
    if os.environ.get("VOTES_REQUIRE_CYTHON") == "1":
        raise
    from engine import fastpath_py as _implementation

    IMPLEMENTATION = "python"

BatchTree = _implementation.BatchTree
HmacSha256 = _implementation.HmacSha256
Locator = _implementation.Locator
apply_group = _implementation.apply_group
batch_tree = _implementation.batch_tree
token_payload = _implementation.token_payload

__all__ = ["IMPLEMENTATION", "BatchTree", "HmacSha256", "Locator", "apply_group", "batch_tree",
           "token_payload"]
