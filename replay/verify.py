"""`verify`: recount the raw WAL from its start and compare it with the snapshots and, when
given the engine's URL, with the live results. Each fencing group's log is read once for all
the chosen shards of the group; a snapshot's offset is an offset in its group's log.

- Snapshots: for each shard, the newest snapshot that checks out is compared with the
  recount's state at that snapshot's `wal_offset_next`: the polls it holds, each option's
  count, whether each poll is closed, and the bitmap of voters that counted.
- Live: GET /v1/polls/{poll}/results of every poll the log creates (or the polls asked
  for), compared with the recount's counts summed over the shards, and `final` with "closed
  in every shard". An open poll's results move while the log is read, so the results are
  fetched before and after a read of the log, and the read resumes where it stopped, until
  two fetches agree (at most `live_attempts` times); results that never settle are reported
  as moving, not compared. An embargoed open poll hides its counts: not compared. Live is
  compared only when every shard is recounted (the endpoint sums them all).
- CRDT (`crdt_url`, a Redis URL): each poll's merged CRDT counters against the recount,
  per shard, option and country (replay/crdt_check.py); a shard closed in the log must agree
  exactly, an open one may lag but never exceed the log.
- Countries: a poll with the country breakdown is also compared per country and option
  with the snapshots and the live results.
- Signatures: the Ed25519 signature of every vote batch holding votes of a shard asked for,
  with the public keys from the data dir's keys, over the votes the batch holds, of all its
  shards (replay/signatures.py); a batch is checked once, however many of its shards are
  asked for. A batch that fails is a difference naming the group, the record's offset and
  the shards with votes in it (at most SIGNATURE_FINDINGS_MAX listed per group, then a
  count); a data dir without the public key document is one difference. With polls asked
  for, only the batches holding their votes are checked (a note counts the others).
Every difference names the shard, the poll and the option (a signature one: the group, the
offset and the batch's shards).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field

import httpx

from engine.config import Config
from replay import crdt_check
from replay.context import by_group, snapshot_description, wal_description
from replay.errors import BadInput
from replay.live import fetch_results, live_view
from replay.rawlog import Batch, Frame
from replay.recount import (
    RECOUNT_CONCURRENCY,
    REJECTION_REASONS,
    GroupRecounter,
    PollRecount,
    Recounter,
    ShardRecount,
    gather_all,
)
from replay.signatures import BatchSignatures
from replay.snapshot_view import ShardSnapshot, newest_snapshots
from shards.state import PollState
from replay.sources import GroupLog, ReadEnd

LIVE_ATTEMPTS_DEFAULT = 5
LIVE_ATTEMPTS_MAX = 100
VOTERS_LISTED_MAX = 5
# A log signed with another key fails on every batch: list a few, count the rest.
SIGNATURE_FINDINGS_MAX = 20


@dataclass
class Difference:
    kind: str  # "snapshot", "live", "crdt" or "signature"
    shard: int | None
    poll: str | None
    option: str | None
    detail: str
    # A signature difference: the fencing group whose log holds the batch (a batch is the
    # group's, holding votes of any of its shards).
    group: int | None = None

    def __str__(self) -> str:
        where = [f"group {self.group}" if self.group is not None else "",
                 f"shard {self.shard}" if self.shard is not None else "",
                 f"poll {self.poll!r}" if self.poll is not None else "",
                 f"option {self.option!r}" if self.option is not None else ""]
        return f"{self.kind}: " + " ".join(part for part in where if part) + f": {self.detail}"


@dataclass
class PollRow:
    options: list[str]
    wal: dict[str, int]
    wal_at_snapshots: dict[str, int]
    snapshots: dict[str, int]
    live: dict[str, int] | None
    closed_shards: int
    rejected: dict[str, int]
    live_status: str
    countries: dict[str, dict[str, int]] = field(default_factory=dict)  # the log's, summed


@dataclass
class VerifyReport:
    wal: str
    snapshot_store: str
    live_url: str | None
    shards: list[dict]
    polls: dict[str, PollRow]
    differences: list[Difference]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    def as_json(self) -> dict:
        return {"ok": self.ok, "wal": self.wal, "snapshot_store": self.snapshot_store,
                "live_url": self.live_url, "shards": self.shards,
                "polls": {name: asdict(row) for name, row in self.polls.items()},
                "differences": [asdict(difference) for difference in self.differences],
                "notes": self.notes}


class _GroupReading:
    """The recount of the chosen shards of one group, from one read of the group's log, fed
    incrementally (each read resumes where the last stopped)."""

    def __init__(self, config: Config, group: int, snapshots: list[ShardSnapshot],
                 signatures: BatchSignatures | None, polls: list[str] | None = None) -> None:
        self.group = group
        self.snapshots = {snapshot.shard: snapshot for snapshot in snapshots}
        self.recounters = {
            snapshot.shard: Recounter(snapshot.shard, config.shards, chain=False,
                                      capture_at=[] if snapshot.offset is None
                                      else [snapshot.offset])
            for snapshot in snapshots}
        self.feeder = GroupRecounter(config, group, self.recounters)
        self.log = GroupLog(config, group)
        self.end = ReadEnd(0, None)
        self.signatures = signatures
        self.bad_signatures: list[Difference] = []
        self.bad_signatures_total = 0
        # With polls asked for, only the batches that hold their votes are checked: a topic
        # may be shared with other deployments' polls, signed with their keys.
        self.signed_polls = set(polls) if polls else None
        self.batches_not_asked = 0

    async def read(self) -> None:
        self.end = await self.log.read(self._feed, from_offset=self.end.end_offset)

    def _feed(self, frame: Frame) -> None:
        """Check a vote batch's signature before the recount applies it (the poll's options
        are the ones the log created before this record); batches without votes of a shard
        asked for are only passed by."""
        record = self.feeder.decode(frame)
        if isinstance(record, Batch) and self.signatures is not None:
            self._check_signature(frame.offset, record, self.signatures)
        self.feeder.apply(frame.offset, frame.next_offset, record)

    def _check_signature(self, offset: int, batch: Batch, signatures: BatchSignatures) -> None:
        """Check the batch's signature once if it holds votes of a shard asked for, whatever
        the number of them: one record, one signature over all its shards' votes."""
        shards = batch.shards
        recounter = next((self.recounters[shard] for shard in shards
                          if shard in self.recounters), None)
        if recounter is None:
            return
        if not self._asked(batch):
            self.batches_not_asked += 1
            return
        # A poll is created for every shard of the group alike: any recounter of the group
        # knows its options at this point of the log.
        problem = signatures.problem_of(batch, self.group, self._options_of(recounter))
        if problem is None:
            return
        self.bad_signatures_total += 1
        if len(self.bad_signatures) < SIGNATURE_FINDINGS_MAX:
            self.bad_signatures.append(Difference(
                "signature", None, None, None,
                f"offset {offset}: vote batch {batch.batch_seq} (votes of shards "
                f"{', '.join(map(str, shards))}): {problem}", group=self.group))

    def _asked(self, batch: Batch) -> bool:
        return self.signed_polls is None or \
            any(group.poll in self.signed_polls for group in batch.groups)

    @staticmethod
    def _options_of(recounter: Recounter):
        def options_of(poll: str) -> list[str] | None:
            tally = recounter.polls.get(poll)
            return None if tally is None else tally.options

        return options_of

    def signature_differences(self) -> list[Difference]:
        unlisted = self.bad_signatures_total - len(self.bad_signatures)
        if unlisted <= 0:
            return list(self.bad_signatures)
        return self.bad_signatures + [Difference(
            "signature", None, None, None,
            f"{unlisted} more vote batches whose signature does not hold (not listed)",
            group=self.group)]

    def results(self) -> dict[int, ShardRecount]:
        return {shard: recounter.result(self.end.end_offset, self.end.torn_tail)
                for shard, recounter in self.recounters.items()}


def _results(readings: list[_GroupReading]) -> dict[int, ShardRecount]:
    recounts: dict[int, ShardRecount] = {}
    for reading in readings:
        recounts.update(reading.results())
    return dict(sorted(recounts.items()))


async def _read_all(readings: list[_GroupReading]) -> None:
    slots = asyncio.Semaphore(RECOUNT_CONCURRENCY)

    async def one(reading: _GroupReading) -> None:
        async with slots:
            await reading.read()

    await gather_all(one(reading) for reading in readings)


async def verify(config: Config, shards: list[int], *, check_signatures: bool = True,
                 **options) -> VerifyReport:
    """See the module docstring; `options` are polls, url and live_attempts.
    `check_signatures=False` skips the signature check (for logs written without keys, such
    as benchmarks' made-up batches); the report then says so in a note."""
    snapshots = await newest_snapshots(config, shards)
    signatures = (BatchSignatures.from_data_dir(config.data_path, config.shards)
                  if check_signatures else None)
    of_shard = dict(zip(shards, snapshots, strict=True))
    readings = [_GroupReading(config, group, [of_shard[shard] for shard in group_shards],
                              None if signatures is None else signatures.for_group(),
                              options.get("polls"))
                for group, group_shards in by_group(config, shards).items()]
    try:
        report = await _verify(config, shards, readings, snapshots, **options)
    finally:
        for reading in readings:
            await reading.log.close()
    if signatures is None:
        report.notes.append("batch signatures not checked (check_signatures=False)")
        return report
    report.notes += signatures.notes(sum(reading.signatures.nodes_not_rebuilt
                                         for reading in readings
                                         if reading.signatures is not None))
    not_asked = sum(reading.batches_not_asked for reading in readings)
    if not_asked:
        report.notes.append(f"{not_asked} vote batches hold no vote of the polls asked for: "
                            "their signatures were not checked")
    if signatures.keys_problem is not None:
        report.differences.append(Difference("signature", None, None, None,
                                             signatures.keys_problem))
    for reading in readings:
        report.differences += reading.signature_differences()
    return report


async def _verify(config: Config, shards: list[int], readings: list[_GroupReading],
                  snapshots: list[ShardSnapshot], *, polls: list[str] | None = None,
                  url: str | None = None,
                  live_attempts: int = LIVE_ATTEMPTS_DEFAULT,
                  crdt_url: str | None = None) -> VerifyReport:
    await _read_all(readings)
    recounts = _results(readings)
    names = sorted({name for recount in recounts.values() for name in recount.polls})
    if polls:
        missing = [poll for poll in polls if poll not in names]
        if missing:
            raise BadInput(f"no poll {missing[0]!r} in the log of shards {shards}")
        names = sorted(set(polls))
    notes = [snapshot.note for snapshot in snapshots if snapshot.note]
    notes += [recount.torn_tail for recount in recounts.values() if recount.torn_tail]
    live: dict[str, dict | None] = {}
    live_status = dict.fromkeys(names, "not asked")
    if url is not None and shards != list(range(config.shards)):
        notes.append("live results not compared: they sum every shard, and only some were "
                     "recounted")
    elif url is not None:
        live, live_status = await _read_with_live(readings, names, url, live_attempts)
        recounts = _results(readings)
    differences = []
    for snapshot in snapshots:
        differences += _snapshot_differences(snapshot, recounts[snapshot.shard], names)
    rows = {name: _row(name, recounts, snapshots, live.get(name), live_status[name],
                       config.shards) for name in names}
    for name, row in rows.items():
        differences += _live_differences(name, row, live.get(name), config.shards)
    if crdt_url is not None:
        differences += await _crdt_differences(config, crdt_url, names, recounts, notes)
    for shard, recount in recounts.items():
        for poll, votes in sorted(recount.unknown_polls.items()):
            notes.append(f"shard {shard}: {votes} votes for poll {poll!r}, which its group's "
                         "log never creates (not counted)")
    return VerifyReport(
        wal=wal_description(config), snapshot_store=snapshot_description(config),
        live_url=url, shards=[_shard_line(recounts[snapshot.shard], snapshot)
                              for snapshot in snapshots],
        polls=rows, differences=differences, notes=notes)


async def _read_with_live(readings: list[_GroupReading], names: list[str], url: str,
                          attempts: int) -> tuple[dict, dict]:
    """Fetch, read on, fetch again, until two fetches agree (at most `attempts` rounds)."""
    with httpx.Client() as client:
        def fetch_all() -> dict[str, dict | None]:
            return {name: fetch_results(client, url, name) for name in names}

        for attempt in range(1, attempts + 1):
            before = await asyncio.to_thread(fetch_all)
            await _read_all(readings)
            after = await asyncio.to_thread(fetch_all)
            moving = [name for name in names if live_view(before[name]) != live_view(after[name])]
            if not moving:
                return after, dict.fromkeys(names, f"stable (attempt {attempt})")
        status = {name: (f"moving: changed during each of {attempts} reads, not compared"
                         if name in moving else f"stable (attempt {attempts})") for name in names}
        return {name: document for name, document in after.items() if name not in moving}, status


async def _crdt_differences(config: Config, crdt_url: str, names: list[str],
                            recounts: dict[int, ShardRecount], notes: list[str]) -> list[Difference]:
    differences = []
    for name, state in (await crdt_check.read_merged(crdt_url, names)).items():
        if state is None:
            notes.append(f"poll {name!r}: no merged CRDT counters in Redis, not compared")
            continue
        differences += [Difference("crdt", item.shard, name, item.option,
                                   f"{'' if item.country is None else f'country {item.country!r}: '}"
                                   f"the merged CRDT counts {item.crdt}, the log {item.log}")
                        for item in crdt_check.disagreements(state, config.region, name, recounts)]
    return differences


def _shard_line(recount: ShardRecount, snapshot: ShardSnapshot) -> dict:
    return {"shard": recount.shard, "records": recount.records, "votes_seen": recount.votes_seen,
            "end_offset": recount.end_offset, "torn_tail": recount.torn_tail,
            "snapshot_offset": snapshot.offset, "snapshot_name": snapshot.name}


def _row(name: str, recounts: dict[int, ShardRecount], snapshots: list[ShardSnapshot],
         live: dict | None, live_status: str, shards_total: int) -> PollRow:
    options: list[str] = []
    wal: dict[str, int] = {}
    at_snapshots: dict[str, int] = {}
    in_snapshots: dict[str, int] = {}
    rejected = dict.fromkeys(REJECTION_REASONS, 0)
    closed_shards = 0
    countries: dict[str, dict[str, int]] = {}
    for snapshot in snapshots:
        recount = recounts[snapshot.shard]
        poll = recount.polls.get(name)
        if poll is not None:
            options += [option for option in poll.options if option not in options]
            _add(wal, poll.counts)
            for country, counts in poll.countries.items():
                _add(countries.setdefault(country, {}), counts)
            for reason, count in poll.rejected.items():
                rejected[reason] += count
            closed_shards += poll.closed
        capture = recount.captures.get(snapshot.offset) if snapshot.offset is not None else None
        if capture is not None and capture.polls is not None and name in capture.polls:
            _add(at_snapshots, capture.polls[name].counts)
        if snapshot.state is not None and name in snapshot.state.polls:
            _add(in_snapshots, snapshot.state.polls[name].counts())
    live_counts = None
    if live is not None and not (live.get("embargoed") and not live.get("final")):
        live_counts = dict(live["counts"])
    elif live is not None:
        live_status = "embargoed: counts hidden until the poll closes, not compared"
    elif live_status.startswith("stable"):
        live_status = "unknown at the engine (404)"
    return PollRow(options, wal, at_snapshots, in_snapshots, live_counts, closed_shards,
                   rejected, live_status, {country: countries[country] for country in sorted(countries)})


def _add(total: dict[str, int], counts: dict[str, int]) -> None:
    for option, count in counts.items():
        total[option] = total.get(option, 0) + count


def _snapshot_differences(snapshot: ShardSnapshot, recount: ShardRecount,
                          names: list[str]) -> list[Difference]:
    if snapshot.state is None:
        return []
    shard, offset = snapshot.shard, snapshot.state.wal_offset_next  # snapshot.offset
    capture = recount.captures[offset]
    if capture.polls is None:
        return [Difference("snapshot", shard, None, None,
                           f"snapshot {snapshot.name} cannot be matched with the log: "
                           f"{capture.problem}")]
    differences = []
    snapshot_polls = snapshot.state.polls
    for name in sorted(set(snapshot_polls) | set(capture.polls)):
        if name not in names:
            continue
        at = f"at offset {offset}"
        if name not in capture.polls:
            differences.append(Difference("snapshot", shard, name, None,
                                          f"the snapshot holds the poll, the log does not create "
                                          f"it before offset {offset}"))
            continue
        if name not in snapshot_polls:
            differences.append(Difference("snapshot", shard, name, None,
                                          f"the log creates the poll before offset {offset}, "
                                          "the snapshot does not hold it"))
            continue
        ours, theirs = capture.polls[name], snapshot_polls[name]
        counts = theirs.counts()
        for option in sorted(set(counts) | set(ours.counts)):
            if counts.get(option, 0) != ours.counts.get(option, 0):
                differences.append(Difference(
                    "snapshot", shard, name, option,
                    f"snapshot {snapshot.name} counts {counts.get(option, 0)}, the log "
                    f"{ours.counts.get(option, 0)} {at}"))
        differences += _country_differences(shard, name, theirs, ours, f"snapshot {snapshot.name}",
                                            at)
        if theirs.closed != ours.closed:
            differences.append(Difference(
                "snapshot", shard, name, None,
                f"snapshot says {'closed' if theirs.closed else 'open'}, the log says "
                f"{'closed' if ours.closed else 'open'} {at}"))
        if theirs.voters != ours.voters:
            only_snapshot = theirs.voters - ours.voters
            only_log = ours.voters - theirs.voters
            differences.append(Difference(
                "snapshot", shard, name, None,
                f"voters bitmap differs {at}: {len(only_snapshot)} voter indexes only in the "
                f"snapshot {list(only_snapshot)[:VOTERS_LISTED_MAX]}, {len(only_log)} only in "
                f"the log {list(only_log)[:VOTERS_LISTED_MAX]}"))
    return differences


def _country_differences(shard: int, name: str, theirs: PollState, ours: PollRecount,
                         what: str, at: str) -> list[Difference]:
    options = theirs.definition.options
    counts = {country: dict(zip(options, tallies, strict=True))
              for country, tallies in theirs.country_counts().items()}
    return [Difference("snapshot", shard, name, option,
                       f"country {country!r}: {what} counts "
                       f"{counts.get(country, {}).get(option, 0)}, the log "
                       f"{ours.countries.get(country, {}).get(option, 0)} {at}")
            for country in sorted(set(counts) | set(ours.countries)) for option in options
            if counts.get(country, {}).get(option, 0)
            != ours.countries.get(country, {}).get(option, 0)]


def _live_differences(name: str, row: PollRow, live: dict | None,
                      shards_total: int) -> list[Difference]:
    if row.live_status.startswith("unknown"):
        return [Difference("live", None, name, None,
                           "the log creates the poll, the engine answers 404")]
    if row.live is None:
        return []
    differences = [
        Difference("live", None, name, option,
                   f"live results say {row.live.get(option, 0)}, the log {row.wal.get(option, 0)}")
        for option in sorted(set(row.live) | set(row.wal))
        if row.live.get(option, 0) != row.wal.get(option, 0)
    ]
    live_countries = {} if live is None else live.get("countries", {})
    differences += [
        Difference("live", None, name, option,
                   f"country {country!r}: live results say "
                   f"{live_countries.get(country, {}).get(option, 0)}, the log "
                   f"{row.countries.get(country, {}).get(option, 0)}")
        for country in sorted(set(live_countries) | set(row.countries)) for option in row.options
        if live is not None and "countries" in live
        and live_countries.get(country, {}).get(option, 0)
        != row.countries.get(country, {}).get(option, 0)]
    final_in_log = row.closed_shards == shards_total
    if live is not None and bool(live.get("final")) != final_in_log:
        differences.append(Difference(
            "live", None, name, None,
            f"live results say final={live.get('final')}, the log closes the poll in "
            f"{row.closed_shards} of {shards_total} shards"))
    return differences


# The text report -----------------------------------------------------------------------------


def render(report: VerifyReport) -> str:
    lines = [f"wal: {report.wal}", f"snapshots: {report.snapshot_store}",
             f"live: {report.live_url or 'not asked (--url)'}", ""]
    lines.append(f"{'shard':>5} {'records':>9} {'votes':>11} {'end offset':>14} "
                 f"{'snapshot offset':>16}")
    for shard in report.shards:
        snapshot_offset = "-" if shard["snapshot_offset"] is None else shard["snapshot_offset"]
        lines.append(f"{shard['shard']:>5} {shard['records']:>9,} {shard['votes_seen']:>11,} "
                     f"{shard['end_offset']:>14,} {snapshot_offset:>16}")
    lines.append("")
    header = (f"{'poll':<20} {'option':<20} {'wal':>10} {'wal@snap':>10} {'snapshot':>10} "
              f"{'live':>10}")
    lines += [header, "-" * len(header)]
    for name, row in report.polls.items():
        for option in row.options:
            live = "-" if row.live is None else f"{row.live.get(option, 0):,}"
            lines.append(f"{name:<20} {option:<20} {row.wal.get(option, 0):>10,} "
                         f"{row.wal_at_snapshots.get(option, 0):>10,} "
                         f"{row.snapshots.get(option, 0):>10,} {live:>10}")
        total_live = "-" if row.live is None else f"{sum(row.live.values()):,}"
        lines.append(f"{name:<20} {'(total)':<20} {sum(row.wal.values()):>10,} "
                     f"{sum(row.wal_at_snapshots.values()):>10,} "
                     f"{sum(row.snapshots.values()):>10,} {total_live:>10}")
        for country, counts in row.countries.items():
            lines.append(f"{name:<20} country {country}: " + ", ".join(
                f"{option} {counts.get(option, 0):,}" for option in row.options))
        rejected = ", ".join(f"{reason} {count}" for reason, count in row.rejected.items())
        shards_total = len(report.shards)
        lines.append(f"{'':<20} closed in {row.closed_shards}/{shards_total} shards; "
                     f"rejected in the log: {rejected}; live: {row.live_status}")
    lines.append("")
    lines += [f"note: {note}" for note in report.notes]
    if report.ok:
        lines.append("OK: the log, the snapshots and the live results agree" if report.live_url
                     else "OK: the log and the snapshots agree")
    else:
        lines.append(f"DIFFERENCES ({len(report.differences)}):")
        lines += [f"  {difference}" for difference in report.differences]
    return "\n".join(lines)
