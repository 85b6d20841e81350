"""The receipt locator of one poll in one shard, mostly on local disk.

A repeat vote (409) gets its original receipt back from the record that counted it; the
locator maps each voter index that counted to that record's log offset (+1). In RAM it keeps
only an open run (engine.fastpath.Locator: the newest `locator_run_entries` entries, 12
bytes each) and, per sealed run, a fence key every RUN_BLOCK_ENTRIES entries; the rest is in
immutable run files sorted by voter, one directory per poll under the shard's data dir
(shards/shard-<ssss>/locator/poll-<hash>/).

Invariants:
- Runs are derived data; the log is the truth. Each run covers the counted votes of every
  record in [offset_first, offset_next) of the group's log; the runs and the open run cover
  [0, applied) with no gap (the open run covers [open_from, applied)).
- A voter counts once per poll, so it is in at most one run, except after a recovery, when a
  run kept across the snapshot's open_from and the replayed open run may both hold it, with
  the same value (the same log replayed the same way). Lookups take the newest; merges keep
  the newest.
- A run file is written on a thread, fsynced and renamed into place before any snapshot
  that relies on it is published (`writes_pending` lets the snapshot wait for it); until
  then its entries stay in RAM and answer lookups.
- A snapshot also carries the entries of the runs it relies on (`snapshot_sources`, read
  off the loop by the snapshot writer), so a host without the run files (a group moved or
  taken over, files lost) recovers from the snapshot alone: `attach` writes them out when
  the directory does not cover the snapshot.
- A damaged run file raises LogCorrupt naming the file; a missing answer is never made up.
- At most RUNS_MAX runs per poll once merges catch up: a lookup costs at most one bisect of
  the fences and one pread of a block per run.
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import logging
import os
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import LogCorrupt
from engine.fastpath import Locator, sort_run
from shards.run_files import (
    load_runs,
    read_all,
    read_all_fd,
    read_block,
    release_free_heap,
    remove_runs,
    write_run,
)

log = logging.getLogger("votes.locator")

RUNS_MAX = 16  # more durable runs than this in a poll: merge some
MERGE_FAN_IN = 8  # how many adjacent runs one merge joins
RUN_ENTRIES_DEFAULT = 4096  # engine.config's locator_run_entries default
# Sealed runs of a poll waiting for their file (12 bytes per entry in RAM each): at the
# bound, sealing waits for the oldest write, so a disk that cannot keep up slows the apply
# down instead of growing RAM.
RUN_WRITES_PENDING_MAX = 2


# One thread writes sealed runs, another merges: a long merge never holds a write back.
# Both are shared by every poll of the process; their queues are bounded by the polls'
# own bounds (one merge in flight per poll, writes as runs are sealed).
RunWrite = Future[tuple[Path, "array.array[int]"]]

_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="locator-write")
_merger = ThreadPoolExecutor(max_workers=1, thread_name_prefix="locator-merge")


def poll_directory(locator_directory: Path, poll_id: str) -> Path:
    """A poll's runs: the name hashes the poll id (any string) into a safe file name."""
    return locator_directory / f"poll-{hashlib.sha256(poll_id.encode()).hexdigest()[:32]}"


@dataclass(eq=False)
class Run:
    """One sealed run: in RAM (voters, values) until its file is durable, then its fences."""

    seq: int
    offset_first: int
    offset_next: int
    entries: int
    path: Path | None = None  # set once the file is durable
    fences: array.array[int] = field(default_factory=lambda: array.array("I"))
    # The sorted entries while the file is not durable: views of the bytes the writer
    # thread is given, so a run waiting for its file is held once, not twice.
    voters: memoryview | None = None
    values: memoryview | None = None
    writing: RunWrite | None = None

    def get(self, voter: int) -> int:
        if self.voters is not None and self.values is not None:
            position = bisect_left(self.voters, voter)
            if position < len(self.voters) and self.voters[position] == voter:
                return self.values[position]
            return 0
        block = bisect_right(self.fences, voter) - 1
        if block < 0 or self.path is None:
            return 0
        voters, values = read_block(self.path, self.entries, len(self.fences), block)
        position = bisect_left(voters, voter)
        return values[position] if position < len(voters) and voters[position] == voter else 0

    def read_all(self) -> tuple[bytes, bytes]:
        if self.voters is not None and self.values is not None:
            return self.voters.tobytes(), self.values.tobytes()
        if self.path is None:
            raise LogCorrupt(f"locator run {self.seq} has neither entries nor a file")
        return read_all(self.path, self.entries, len(self.fences))


class PollLocator:
    """The receipt locator of one poll in one shard (see the module docstring).

    Without a directory (replay tools, tests) sealed runs stay in RAM and snapshots carry
    every entry. `open_from` > 0 without a directory means runs on disk are relied on but
    not attached yet: a lookup that misses the open run then raises instead of answering."""

    def __init__(self, run_entries: int = RUN_ENTRIES_DEFAULT, open_from: int = 0,
                 open_run: Locator | None = None, runs: list[Run] | None = None) -> None:
        self.run_entries = run_entries
        self.open_run = open_run if open_run is not None else Locator()
        self.open_from = open_from
        self.directory: Path | None = None
        # Oldest first. A thawed snapshot's runs start here in RAM (their entries travel
        # with the snapshot) until `attach` finds them on disk or writes them out.
        self.runs: list[Run] = list(runs) if runs is not None else []
        self._seq_next = max((run.seq for run in self.runs), default=-1) + 1
        self._merging: Future[Run] | None = None
        self._merge_inputs: list[Run] = []

    # Attaching a directory ------------------------------------------------------------------

    def attach_fresh(self, directory: Path) -> None:
        """Use `directory` for this poll's runs, removing any left there: nothing relies on
        them (a new poll, or a shard rebuilt from the log)."""
        remove_runs(directory)
        self.directory = directory

    def attach(self, directory: Path) -> bool:
        """Take the durable runs in `directory` that cover [0, open_from) (what the thawed
        snapshot relies on); if they do not, write out the runs the snapshot carried (a new
        host). False if neither covers it (a snapshot of a release that did not carry its
        runs): the caller rebuilds from the log. Blocking file I/O: call it off the loop."""
        if self._attach_local(directory):
            return True
        return self._attach_carried(directory)

    def _attach_local(self, directory: Path) -> bool:
        loaded = [Run(file.seq, file.offset_first, file.offset_next, file.entries, path=file.path,
                      fences=file.fences) for file in load_runs(directory)]
        # Runs from open_from on are rebuilt by the replay after the snapshot; a run contained
        # in another was merged and its removal did not happen before a crash.
        runs = [run for run in loaded if run.offset_first < self.open_from]
        runs = [run for run in runs if not any(
            other is not run and other.offset_first <= run.offset_first
            and run.offset_next <= other.offset_next
            and (other.offset_first, other.offset_next) != (run.offset_first, run.offset_next)
            for other in runs)]
        kept = _gapless(runs)
        if _covered_next(kept) < self.open_from:
            return False
        for run in loaded:
            if run not in kept and run.path is not None:
                run.path.unlink(missing_ok=True)
        self.directory = directory
        self.runs = sorted(kept, key=lambda item: item.seq)
        self._seq_next = max((run.seq for run in loaded), default=-1) + 1
        return True

    def _attach_carried(self, directory: Path) -> bool:
        """Write the runs the snapshot carried into `directory` (emptied first: what it held
        does not cover the snapshot), each durable before this returns."""
        carried = [run for run in self.runs if run.voters is not None and run.values is not None]
        if self.open_from > 0 and _covered_next(carried) < self.open_from:
            return False
        remove_runs(directory)
        for run in carried:
            assert run.voters is not None and run.values is not None
            run.path, run.fences = write_run(directory, run.seq, run.offset_first, run.offset_next,
                                              run.voters.cast("B"), run.values.cast("B"))
            run.voters = run.values = None
        self.directory = directory
        self.runs = carried
        log.info("locator runs of %s restored from the snapshot: %d runs, %d entries",
                 directory, len(carried), sum(run.entries for run in carried))
        return True

    # The live path --------------------------------------------------------------------------

    def after_apply(self, applied_next: int) -> None:
        """Records up to `applied_next` are applied: seal the open run once it is full."""
        if self.open_run.entries >= self.run_entries:
            self.seal(applied_next)

    def seal(self, applied_next: int) -> None:
        """Turn the open run into a sealed run covering [open_from, applied_next)."""
        self._collect()
        writing = [run.writing for run in self.runs if run.writing is not None]
        if len(writing) >= RUN_WRITES_PENDING_MAX:
            try:
                writing[0].result()
            except OSError:
                pass  # _collect logs it; the run stays in RAM
            self._collect()
        voters_bytes, values_bytes = self.open_run.take_sorted()
        voters, values = memoryview(voters_bytes).cast("I"), memoryview(values_bytes).cast("Q")
        run = Run(self._seq_next, self.open_from, applied_next, len(voters),
                  voters=voters, values=values)
        self._seq_next += 1
        self.open_from = applied_next
        self._retry_writes()
        self.runs.append(run)
        if self.directory is not None:
            run.writing = _writer.submit(write_run, self.directory, run.seq, run.offset_first,
                                         run.offset_next, voters_bytes, values_bytes)
        self._maybe_merge()

    def get(self, voter: int) -> int:
        """The entry of `voter` (record offset + 1), 0 if it has none."""
        value = self.open_run.get(voter)
        if value:
            return value
        self._collect()
        if self.directory is None and self.open_from > 0 and not self.runs:
            raise LogCorrupt(f"the receipt locator relies on runs up to offset {self.open_from} "
                             f"that are not attached")
        # A voter is in one run at most (or in several with one value, after a recovery), so
        # any order finds the same answer: runs in RAM first, then the largest, which holds
        # most voters, so a lookup costs about one pread.
        for run in sorted(self.runs, key=_lookup_order):
            value = run.get(voter)
            if value:
                return value
        return 0

    @property
    def covered_next(self) -> int:
        """The end of the log range the runs cover (the open run covers what follows)."""
        return max((run.offset_next for run in self.runs), default=self.open_from)

    def writes_pending(self) -> list[RunWrite]:
        """The writes a snapshot taken now must wait for (each raises OSError if it failed)."""
        self._collect()
        self._retry_writes()
        return [run.writing for run in self.runs if run.writing is not None]

    def snapshot_sources(self) -> list[RunSource]:
        """The runs a snapshot taken now relies on, to be read off the loop (RunSource.read):
        entries still in RAM are taken as they are (immutable bytes), a run file is opened
        now, so a merge that removes it meanwhile does not take it from the reader. Empty
        without a directory (snapshot_entries then carries every entry)."""
        if self.directory is None:
            return []
        self._collect()
        sources = []
        try:
            for run in self.runs:
                sources.append(RunSource.of(run))
        except BaseException:  # OSError, or LogCorrupt: release what was opened already
            for source in sources:
                source.close()
            raise
        return sources

    def snapshot_entries(self) -> tuple[int, bytes, bytes]:
        """(open_from, voters, values) a snapshot carries: the open run, or, without a
        directory, every entry (nothing else would hold them)."""
        if self.directory is not None:
            return (self.open_from, *self.open_run.entries_bytes())
        parts = [run.read_all() for run in self.runs] + [self.open_run.entries_bytes()]
        return 0, b"".join(part[0] for part in parts), b"".join(part[1] for part in parts)

    def count_set(self) -> int:
        """How many voters have an entry (reads every run: for tests and tools)."""
        voters: set[int] = set()
        for run in self.runs:
            voters.update(array.array("I", run.read_all()[0]))
        voters.update(array.array("I", self.open_run.entries_bytes()[0]))
        return len(voters)

    @property
    def nbytes_ram(self) -> int:
        """Bytes this locator holds in RAM: the open run, runs not yet durable, fences."""
        return self.open_run.nbytes + sum(
            12 * run.entries if run.voters is not None else 4 * len(run.fences)
            for run in self.runs)

    def wait_idle(self) -> None:
        """Block until no write or merge of this poll is in flight (an owner handing its
        group over, tests, benchmarks); a write that failed is not retried here."""
        while True:
            self._collect()
            waiting = [run.writing for run in self.runs if run.writing is not None]
            if self._merging is not None:
                waiting.append(self._merging)  # type: ignore[arg-type]
            if not waiting:
                return
            for future in waiting:
                try:
                    future.result()
                except OSError:
                    pass  # _collect logs it and keeps the run in RAM

    # Background work, installed on the caller's thread -------------------------------------

    def _collect(self) -> None:
        for run in self.runs:
            if run.writing is not None and run.writing.done():
                writing, run.writing = run.writing, None
                try:
                    run.path, run.fences = writing.result()
                except OSError as exc:
                    # Still correct from RAM; retried at the next seal, and snapshots fail
                    # until it is written (they must not rely on it).
                    log.warning("locator run %d of %s not written (%s); kept in RAM",
                                run.seq, self.directory, exc)
                    continue
                run.voters = run.values = None
        if self._merging is not None and self._merging.done():
            merging, self._merging = self._merging, None
            inputs, self._merge_inputs = self._merge_inputs, []
            try:
                merged = merging.result()
            except (OSError, LogCorrupt) as exc:
                log.warning("locator merge in %s failed (%s); runs kept as they are",
                            self.directory, exc)
                return
            first = self.runs.index(inputs[0])
            self.runs[first:first + len(inputs)] = [merged]
            for run in inputs:
                if run.path is not None:
                    run.path.unlink(missing_ok=True)
        self._maybe_merge()

    def _retry_writes(self) -> None:
        """Start again the writes that failed (disk full, I/O error)."""
        if self.directory is None:
            return
        for run in self.runs:
            if run.writing is None and run.path is None:
                run.writing = _writer.submit(write_run, self.directory, run.seq,
                                             run.offset_first, run.offset_next, *run.read_all())

    def _maybe_merge(self) -> None:
        if len(self.runs) <= RUNS_MAX or self._merging is not None:
            return
        window = _smallest_window(self.runs, MERGE_FAN_IN, durable=self.directory is not None)
        if window is None:
            return
        inputs = self.runs[window:window + MERGE_FAN_IN]
        seq = self._seq_next
        self._seq_next += 1
        if self.directory is None:
            voters, values = _merge_entries(inputs)
            merged = Run(seq, inputs[0].offset_first, inputs[-1].offset_next,
                         len(voters) // 4, voters=memoryview(voters).cast("I"),
                         values=memoryview(values).cast("Q"))
            self.runs[window:window + MERGE_FAN_IN] = [merged]
            return
        self._merge_inputs = inputs
        self._merging = _merger.submit(_merge_to_file, self.directory, seq, inputs)


class RunSource:
    """One run's entries as a snapshot captured them: views of bytes in RAM, or a file
    descriptor opened at the capture (closed by `read` or `close`)."""

    def __init__(self, run: Run, fd: int | None) -> None:
        self.seq, self.offset_first, self.offset_next = run.seq, run.offset_first, run.offset_next
        self.entries, self.blocks = run.entries, len(run.fences)
        self.path = run.path
        self.voters, self.values = run.voters, run.values
        self.fd = fd

    @classmethod
    def of(cls, run: Run) -> RunSource:
        if run.voters is not None and run.values is not None:
            return cls(run, None)
        if run.path is None:
            raise LogCorrupt(f"locator run {run.seq} has neither entries nor a file")
        return cls(run, os.open(run.path, os.O_RDONLY))

    def read(self) -> tuple[bytes, bytes]:
        """(voters, values) as packed bytes, each block's checksum checked; blocking."""
        try:
            if self.fd is None:
                assert self.voters is not None and self.values is not None
                return self.voters.tobytes(), self.values.tobytes()
            return read_all_fd(self.fd, self.path, self.entries, self.blocks)
        finally:
            self.close()

    def close(self) -> None:
        fd, self.fd = self.fd, None
        self.voters = self.values = None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:  # a snapshot abandoned before it was read
        self.close()


def restored_run(seq: int, offset_first: int, offset_next: int, voters_bytes: bytes,
                 values_bytes: bytes) -> Run:
    """A run a snapshot carried, in RAM until `PollLocator.attach` writes it out."""
    if len(voters_bytes) % 4 or len(values_bytes) != 2 * len(voters_bytes):
        raise ValueError(f"locator run {seq} in the snapshot has {len(voters_bytes)} voter "
                         f"bytes and {len(values_bytes)} value bytes")
    voters, values = memoryview(voters_bytes).cast("I"), memoryview(values_bytes).cast("Q")
    return Run(seq, offset_first, offset_next, len(voters), voters=voters, values=values)


def _gapless(runs: list[Run]) -> list[Run]:
    """The runs that cover [0, x) without a gap, from offset 0 on."""
    covered = 0
    kept: list[Run] = []
    for run in sorted(runs, key=lambda item: (item.offset_first, item.seq)):
        if run.offset_first > covered:
            break  # a gap: what lies beyond it cannot be trusted to be complete
        covered = max(covered, run.offset_next)
        kept.append(run)
    return kept


def _covered_next(runs: list[Run]) -> int:
    """Where the gapless cover of `runs` from offset 0 ends."""
    return max((run.offset_next for run in _gapless(runs)), default=0)


async def runs_durable(writes: Sequence[RunWrite]) -> None:
    """Wait for run writes a snapshot relies on: it is published only once they are durable
    (a failed write raises its OSError, and that snapshot is not published)."""
    for write in writes:
        await asyncio.wrap_future(write)


async def wait_idle(locators: list[PollLocator], timeout_s: float) -> None:
    """Wait, off the loop and at most `timeout_s`, until these locators write and merge no
    more (a group handed over: the next owner attaches the same runs)."""
    def wait_all() -> None:
        for locator in locators:
            locator.wait_idle()

    if locators:
        await asyncio.wait([asyncio.ensure_future(asyncio.to_thread(wait_all))], timeout=timeout_s)


def _lookup_order(run: Run) -> tuple[bool, int]:
    return run.voters is None, -run.entries


def _smallest_window(runs: list[Run], width: int, durable: bool) -> int | None:
    """Start of the `width` adjacent runs with the fewest entries (all on disk if `durable`):
    merging small runs first keeps each entry rewritten about log(runs) times."""
    best: tuple[int, int] | None = None
    for start in range(len(runs) - width + 1):
        window = runs[start:start + width]
        if durable and any(run.path is None or run.writing is not None for run in window):
            continue
        total = sum(run.entries for run in window)
        if best is None or total < best[0]:
            best = (total, start)
    return None if best is None else best[1]


def _merge_entries(runs: list[Run]) -> tuple[bytes, bytes]:
    """The runs' entries as one sorted run: oldest first, so sort_run keeps the newest."""
    parts = [run.read_all() for run in runs]
    return sort_run(b"".join(part[0] for part in parts), b"".join(part[1] for part in parts))


def _merge_to_file(directory: Path, seq: int, runs: list[Run]) -> Run:
    voters, values = _merge_entries(runs)
    offset_first, offset_next = runs[0].offset_first, runs[-1].offset_next
    entries = len(voters) // 4
    path, fences = write_run(directory, seq, offset_first, offset_next, voters, values)
    del voters, values
    release_free_heap()
    return Run(seq, offset_first, offset_next, entries, path=path, fences=fences)
