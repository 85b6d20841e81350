"""The worker's log writer: appends of many shards, queued without waiting, come back in
order with the positions the log gave them; a failed round fails that log's appends only."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from engine.errors import WalUnavailable
from shards.log_writer import LogWriter
from shards.records import frame
from shards.segment_log import SegmentLog, scan_frames
from shards.wal import EmbeddedWal


def _log(directory: Path) -> SegmentLog:
    log = SegmentLog(directory, segment_bytes_max=1 << 20)
    assert log.try_lock()
    log.recover()
    return log


def _payloads(log_number: int, append_number: int) -> list[bytes]:
    return [f"log{log_number}-append{append_number}-record{record}".encode() * (record + 1)
            for record in range(append_number % 3 + 1)]


def test_queued_appends_of_many_logs_land_in_order(tmp_path: Path) -> None:
    writer = LogWriter(fsync_threads=4)
    logs = [_log(tmp_path / f"shard-{number}") for number in range(4)]

    async def run():
        loop = asyncio.get_running_loop()
        futures = {number: [] for number in range(len(logs))}
        for append_number in range(60):  # queued without awaiting: rounds batch them
            for number, log in enumerate(logs):
                frames = [frame(payload) for payload in _payloads(number, append_number)]
                futures[number].append(writer.append(log, frames, loop))
            if append_number % 7 == 0:
                await asyncio.sleep(0)
        return {number: await asyncio.gather(*pending) for number, pending in futures.items()}

    results = asyncio.run(run())
    for number, log in enumerate(logs):
        positions = [pair for append_positions in results[number] for pair in append_positions]
        expected = [payload for append_number in range(60)
                    for payload in _payloads(number, append_number)]
        # Contiguous positions from 0, one per record, in the order the appends were queued.
        assert positions[0][0] == 0
        assert all(left[1] == right[0] for left, right in itertools.pairwise(positions))
        assert positions[-1][1] == log.end_offset
        # The file holds exactly those records at exactly those positions.
        data = (tmp_path / f"shard-{number}" / "00000000000000000000.log").read_bytes()
        found = [(start, end, bytes(payload)) for start, end, payload in scan_frames(data)]
        assert [(start, end) for start, end, _ in found] == positions
        assert [payload for _, _, payload in found] == expected


def test_a_failed_log_fails_its_appends_only(tmp_path: Path, monkeypatch) -> None:
    writer = LogWriter(fsync_threads=2)
    good, bad = _log(tmp_path / "good"), _log(tmp_path / "bad")

    def refuse(data: bytes) -> int:
        raise WalUnavailable("append failed and was rolled back: test")

    monkeypatch.setattr(bad, "append", refuse)

    async def run():
        loop = asyncio.get_running_loop()
        pending = []
        for number in range(5):
            pending.append(writer.append(good, [frame(b"good-%d" % number)], loop))
            pending.append(writer.append(bad, [frame(b"bad-%d" % number)], loop))
        return await asyncio.gather(*pending, return_exceptions=True)

    outcomes = asyncio.run(run())
    good_outcomes, bad_outcomes = outcomes[0::2], outcomes[1::2]
    assert all(isinstance(outcome, WalUnavailable) for outcome in bad_outcomes)
    assert [len(outcome) for outcome in good_outcomes] == [1] * 5
    assert good.end_offset == good_outcomes[-1][0][1]


def test_close_runs_after_the_appends_queued_before_it(tmp_path: Path) -> None:
    wal = EmbeddedWal(SegmentLog(tmp_path / "wal", 1 << 20), LogWriter(fsync_threads=1))

    async def run():
        await wal.acquire()
        await wal.replay(0, lambda *_: None)
        appends = [wal.append([b"record-%d" % number]) for number in range(20)]
        await wal.close()  # queued behind the appends: they are all written first
        return await asyncio.gather(*appends)

    positions = asyncio.run(run())
    assert len(positions) == 20
    reopened = SegmentLog(tmp_path / "wal", 1 << 20)
    assert reopened.try_lock()
    assert reopened.recover() == positions[-1][0][1]
    assert [bytes(payload) for _, _, payload in reopened.read_from(0)] == \
        [b"record-%d" % number for number in range(20)]


@pytest.mark.parametrize("records", [1, 3])
def test_embedded_wal_append_gives_positions(tmp_path: Path, records: int) -> None:
    wal = EmbeddedWal(SegmentLog(tmp_path / "wal", 1 << 20), LogWriter(fsync_threads=1))

    async def run():
        await wal.acquire()
        await wal.replay(0, lambda *_: None)
        first = await wal.append([b"x" * (number + 1) for number in range(records)])
        second = await wal.append([b"y"])
        await wal.close()
        return first, second

    first, second = asyncio.run(run())
    assert len(first) == records
    assert second[0][0] == first[-1][1]
