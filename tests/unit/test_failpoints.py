"""Failpoints parse only what they document, and an unarmed point costs nothing."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine import failpoints
from engine.errors import ConfigError


def test_parse_reads_named_pauses() -> None:
    assert failpoints.parse("") == {}
    assert failpoints.parse(" s3-snapshot-before-manifest=pause:2.5 ") == {
        "s3-snapshot-before-manifest": 2.5}


@pytest.mark.parametrize("text", ["nope=pause:1", "s3-snapshot-before-manifest=crash:1",
                                  "s3-snapshot-before-manifest=pause:x",
                                  "s3-snapshot-before-manifest=pause:-1",
                                  "s3-snapshot-before-manifest=pause:1000"])
def test_parse_refuses_anything_else(text: str) -> None:
    with pytest.raises(ConfigError):
        failpoints.parse(text)


def test_unarmed_point_does_nothing_and_armed_point_logs_and_pauses(monkeypatch, caplog) -> None:
    caplog.set_level("WARNING", logger="votes.failpoints")
    asyncio.run(failpoints.pause("s3-snapshot-before-manifest"))
    assert not caplog.records
    monkeypatch.setattr(failpoints, "_armed", {"s3-snapshot-before-manifest": 0.2})
    started = time.monotonic()
    asyncio.run(failpoints.pause("s3-snapshot-before-manifest"))
    assert time.monotonic() - started >= 0.2
    assert [record.getMessage() for record in caplog.records] == [
        "failpoint reached: s3-snapshot-before-manifest (pausing 0.2 s)"]
