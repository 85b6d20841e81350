"""Failpoints parse only what they document, and an unarmed point costs nothing; the fsync
switch of the segment log really skips its fsyncs, and only when switched on."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import failpoints
from engine.errors import ConfigError


def test_parse_reads_named_pauses_and_switches() -> None:
    assert failpoints.parse("") == {}
    assert failpoints.parse(" s3-snapshot-before-manifest=pause:2.5 ") == {
        "s3-snapshot-before-manifest": 2.5}
    assert failpoints.parse("segment-log-skip-fsync=on,s3-snapshot-before-manifest=pause:1") == {
        "segment-log-skip-fsync": True, "s3-snapshot-before-manifest": 1.0}


@pytest.mark.parametrize("text", ["nope=pause:1", "s3-snapshot-before-manifest=crash:1",
                                  "s3-snapshot-before-manifest=pause:x",
                                  "s3-snapshot-before-manifest=pause:-1",
                                  "s3-snapshot-before-manifest=pause:1000",
                                  "s3-snapshot-before-manifest=on",
                                  "segment-log-skip-fsync=pause:1",
                                  "segment-log-skip-fsync=off", "segment-log-skip-fsync"])
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


def test_a_switch_binds_the_real_function_unless_it_is_on(monkeypatch, caplog) -> None:
    caplog.set_level("WARNING", logger="votes.failpoints")
    assert failpoints.skipped_if_on("segment-log-skip-fsync", os.fsync) is os.fsync
    assert not caplog.records
    with pytest.raises(ConfigError):
        failpoints.skipped_if_on("s3-snapshot-before-manifest", os.fsync)
    monkeypatch.setattr(failpoints, "_armed", {"segment-log-skip-fsync": True})
    calls = []
    skipped = failpoints.skipped_if_on("segment-log-skip-fsync", calls.append)
    assert skipped is not calls.append
    skipped(3)
    assert calls == []
    assert [record.getMessage() for record in caplog.records] == [
        "failpoint on: segment-log-skip-fsync (append is skipped)"]


# Counts the segment log's fsyncs in a fresh process (the environment is read at import):
# os.fsync is wrapped before the log module binds it.
COUNT_FSYNCS = """
import os, sys
from pathlib import Path
calls = []
real_fsync = os.fsync
os.fsync = lambda descriptor: (calls.append(descriptor), real_fsync(descriptor))[1]
from shards import segment_log
log = segment_log.SegmentLog(Path(sys.argv[1]), 1 << 20)
assert log.try_lock()
log.recover()
log.append(b"x" * 100)
print(len(calls), segment_log._fsync_segment is os.fsync)
"""


# Unset: the new segment's file and directory fsyncs, then the append's. Switched on: only
# the directory fsync is left (the switch covers the segments' file fsyncs).
@pytest.mark.parametrize("setting, expected", [("", "3 True"),
                                               ("segment-log-skip-fsync=on", "1 False")])
def test_the_segment_log_skips_its_fsyncs_only_when_switched(tmp_path: Path, setting: str,
                                                             expected: str) -> None:
    env = {**os.environ, failpoints.FAILPOINTS_ENV: setting}
    done = subprocess.run([sys.executable, "-c", COUNT_FSYNCS, str(tmp_path / "wal")], env=env,
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == expected.split()
