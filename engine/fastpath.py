"""Facade over the hot loops: the compiled module when it is built, else the Python twin.

Set VOTES_REQUIRE_CYTHON=1 (CI does) to make a missing or broken build an import error,
so a test run can never silently exercise the Python twin twice.
"""

from __future__ import annotations

import os

try:
    from engine._fastpath import (
        BatchTree,
        HmacSha256,
        Locator,
        apply_group,
        batch_tree,
        token_payload,
    )

    IMPLEMENTATION = "cython"
except ImportError:
    if os.environ.get("VOTES_REQUIRE_CYTHON") == "1":
        raise
    from engine.fastpath_py import (
        BatchTree,
        HmacSha256,
        Locator,
        apply_group,
        batch_tree,
        token_payload,
    )

    IMPLEMENTATION = "python"

__all__ = ["IMPLEMENTATION", "BatchTree", "HmacSha256", "apply_group", "batch_tree", "Locator",
           "token_payload"]
