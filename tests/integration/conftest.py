"""Every test collected under tests/integration/ gets the `integration` marker; the
`local_stack` and `stack_endpoints` fixtures (the real Kafka, S3 and Redis of
deploy/local/stack.py, one per session) are in tests/conftest.py, shared with tests/chaos.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        try:
            p = Path(str(item.fspath)).resolve()
        except OSError:
            continue
        if here in p.parents:
            item.add_marker(pytest.mark.integration)
