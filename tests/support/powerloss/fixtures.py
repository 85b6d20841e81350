"""The `power_loss` fixture: a power-loss filesystem in the test's tmp dir, unmounted at
teardown. Import it into a test module: `from tests.support.powerloss.fixtures import power_loss`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.powerloss import PowerLossError, PowerLossFilesystem, mounted


@pytest.fixture
def power_loss(tmp_path: Path) -> Iterator[PowerLossFilesystem]:
    try:
        context = mounted(tmp_path / "powerloss")
        disk = context.__enter__()
    except PowerLossError as error:
        pytest.fail(str(error))
    try:
        yield disk
    finally:
        context.__exit__(None, None, None)
