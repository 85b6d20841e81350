"""`export`: a poll's results recounted from the log, as JSON and CSV, with a hash chain
digest per shard (replay/chain.py), and `check`, which recomputes an export from the log.

The JSON document (format "votes-export/v1"):
    poll, options, counts {option: n}, total, final (closed in every shard), closed_shards,
    shards_total, rejected_in_log {duplicate, poll-not-open, option-invalid},
    engine_rejected_in_memory (only with --url: the engine's own counters since it started,
    from its results endpoint, NOT from the log), chain {algorithm, definition},
    shards [{shard, group, created, closed, end_offset, counts, chain_digest, chained_votes}],
    wal, generated_at.
The CSV holds the same facts one per row, `section,shard,key,value`.

A shard's `end_offset` is an offset in its fencing group's log (one log holds all the shards
of a group, and is read once for them; a vote batch holds votes of any of them, and a shard's
counts and chain take only its own vote groups, replay/recount.py). A check recounts every
shard only up to the export's `end_offset` of that shard, so an export of a poll that was
still open checks out later too, as long as the log still holds what it held.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from pathlib import Path

from engine.config import Config
from replay.chain import CHAIN_ALGORITHM
from replay.context import wal_description
from replay.errors import BadInput, DataDamaged
from replay.recount import REJECTION_REASONS, PollRecount, ShardRecount, recount_group

EXPORT_FORMAT = "votes-export/v1"
EXPORT_BYTES_MAX = 64 * 1024 * 1024
CSV_FIELDS = ["section", "shard", "key", "value"]


async def build_export(config: Config, poll: str, *, live: dict | None = None,
                       live_url: str | None = None,
                       until_offsets: dict[int, int] | None = None) -> dict:
    """The export document of `poll` over every shard (each up to `until_offsets[shard]`
    when given)."""
    shards: list[dict[str, object]] = []
    created: list[PollRecount] = []  # the poll in each shard whose group's log creates it
    for shard, recount in (await _recounts(config, poll, until_offsets)).items():
        tally = recount.polls.get(poll)
        if tally is not None:
            created.append(tally)
        shards.append({
            "shard": shard, "group": config.group_of(shard), "created": tally is not None,
            "closed": tally is not None and tally.closed, "end_offset": recount.end_offset,
            "counts": {} if tally is None else tally.counts,
            "chain_digest": "" if tally is None else tally.chain_digest.hex(),
            "chained_votes": 0 if tally is None else tally.chained_votes,
        })
    if not created:
        raise BadInput(f"unknown poll {poll!r}: no group's log creates it")
    options = created[0].options
    counts = {option: sum(tally.counts.get(option, 0) for tally in created) for option in options}
    rejected = {reason: sum(tally.rejected[reason] for tally in created)
                for reason in REJECTION_REASONS}
    closed_shards = sum(tally.closed for tally in created)
    document = {
        "format": EXPORT_FORMAT, "poll": poll, "options": options, "counts": counts,
        "total": sum(counts.values()), "final": closed_shards == config.shards,
        "closed_shards": closed_shards, "shards_total": config.shards,
        "rejected_in_log": rejected, "engine_rejected_in_memory": None,
        "chain": {"algorithm": CHAIN_ALGORITHM, "definition": "replay/chain.py"},
        "shards": shards, "wal": wal_description(config),
        "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if live is not None:
        document["engine_rejected_in_memory"] = {
            "source": live_url, "as_of": live.get("as_of"), "counts": live.get("rejected", {}),
            "note": "the engine's in-memory rejection counters since it started, from its "
                    "results endpoint; not recounted from the log"}
    return document


async def _recounts(config: Config, poll: str,
                    until_offsets: dict[int, int] | None) -> dict[int, ShardRecount]:
    """Every shard's recount of `poll`, each group's log read once for the shards that stop
    at the same offset of it (all of them, for an export this tool wrote)."""
    reads: dict[tuple[int, int | None], list[int]] = {}
    for shard in range(config.shards):
        until = None if until_offsets is None else until_offsets.get(shard)
        reads.setdefault((config.group_of(shard), until), []).append(shard)
    recounts: dict[int, ShardRecount] = {}
    for (group, until), shards in reads.items():
        recounts.update(await recount_group(config, group, shards, chain=[poll],
                                            until_offset=until))
    return dict(sorted(recounts.items()))


def export_csv(document: dict) -> str:
    rows = [("poll", "", "id", document["poll"]), ("poll", "", "final", _flag(document["final"])),
            ("poll", "", "closed_shards", document["closed_shards"]),
            ("poll", "", "shards_total", document["shards_total"])]
    rows += [("count", "", option, count) for option, count in document["counts"].items()]
    rows.append(("total", "", "", document["total"]))
    rows += [("rejected_in_log", "", reason, count)
             for reason, count in document["rejected_in_log"].items()]
    engine_rejected = document.get("engine_rejected_in_memory")
    if engine_rejected is not None:
        rows += [("engine_rejected_in_memory", "", reason, count)
                 for reason, count in engine_rejected["counts"].items()]
    for entry in document["shards"]:
        shard = entry["shard"]
        rows += [("shard", shard, "created", _flag(entry["created"])),
                 ("shard", shard, "closed", _flag(entry["closed"])),
                 ("shard", shard, "end_offset", entry["end_offset"]),
                 ("shard", shard, "chain_digest", entry["chain_digest"]),
                 ("shard", shard, "chained_votes", entry["chained_votes"])]
        rows += [("shard_count", shard, option, count) for option, count in entry["counts"].items()]
    output = io.StringIO()
    writer = csv.writer(output, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    writer.writerows(rows)
    return output.getvalue()


def _flag(value: bool) -> str:
    return "true" if value else "false"


def write_export(document: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{document['poll']}.json"
    csv_path = out_dir / f"{document['poll']}.csv"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    csv_path.write_text(export_csv(document))
    return json_path, csv_path


# Checking ------------------------------------------------------------------------------------


def checkable(document: dict) -> dict:
    """The facts a check compares, from a JSON export document."""
    try:
        return {
            "poll": document["poll"], "counts": dict(document["counts"]),
            "total": int(document["total"]), "final": bool(document["final"]),
            "closed_shards": int(document["closed_shards"]),
            "rejected_in_log": dict(document["rejected_in_log"]),
            "shards": {int(entry["shard"]): {
                "created": bool(entry["created"]), "closed": bool(entry["closed"]),
                "end_offset": int(entry["end_offset"]), "counts": dict(entry["counts"]),
                "chain_digest": str(entry["chain_digest"]),
                "chained_votes": int(entry["chained_votes"])} for entry in document["shards"]},
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataDamaged(f"the export lacks or garbles a field: {exc!r}") from None


def checkable_from_csv(text: str) -> dict:
    """The same facts from a CSV export."""
    facts: dict = {"counts": {}, "rejected_in_log": {}, "shards": {}}
    try:
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames != CSV_FIELDS:
            raise ValueError(f"the header is {reader.fieldnames}, not {CSV_FIELDS}")
        for row in reader:
            section, key, value = row["section"], row["key"], row["value"]
            if section == "poll":
                facts["poll" if key == "id" else key] = (
                    value if key == "id" else value == "true" if key == "final" else int(value))
            elif section == "count":
                facts["counts"][key] = int(value)
            elif section == "total":
                facts["total"] = int(value)
            elif section == "rejected_in_log":
                facts["rejected_in_log"][key] = int(value)
            elif section in ("shard", "shard_count"):
                entry = facts["shards"].setdefault(int(row["shard"]), {"counts": {}})
                if section == "shard_count":
                    entry["counts"][key] = int(value)
                elif key in ("created", "closed"):
                    entry[key] = value == "true"
                elif key == "chain_digest":
                    entry[key] = value
                else:
                    entry[key] = int(value)
        facts.pop("shards_total", None)
        for name in ("poll", "total", "final", "closed_shards"):
            if name not in facts:
                raise ValueError(f"no {name} row")
    except (ValueError, KeyError, TypeError, csv.Error) as exc:
        raise DataDamaged(f"the CSV export is malformed: {exc}") from None
    return facts


def read_export(path: Path) -> dict:
    """The checkable facts of an export file (.json or .csv)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(EXPORT_BYTES_MAX + 1)
    except OSError as exc:
        raise BadInput(f"cannot read export {path}: {exc}") from None
    if len(data) > EXPORT_BYTES_MAX:
        raise BadInput(f"export {path} is larger than {EXPORT_BYTES_MAX} bytes")
    if path.suffix == ".csv":
        return checkable_from_csv(data.decode("utf-8", "replace"))
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise DataDamaged(f"export {path} is not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise DataDamaged(f"export {path} is not a {EXPORT_FORMAT} document")
    return checkable(document)


async def check_export(config: Config, path: Path) -> tuple[dict, list[str]]:
    """Recompute the export from the log up to its end offsets; the differences, if any."""
    claimed = read_export(path)
    if len(claimed["shards"]) != config.shards:
        return claimed, [(f"the export covers {len(claimed['shards'])} shards, this deployment "
                          f"has {config.shards}")]
    until = {shard: entry["end_offset"] for shard, entry in claimed["shards"].items()}
    recomputed = checkable(await build_export(config, claimed["poll"], until_offsets=until))
    differences = []
    for name in ("counts", "total", "final", "closed_shards", "rejected_in_log"):
        if claimed[name] != recomputed[name]:
            differences.append(f"{name}: the export says {claimed[name]}, the log {recomputed[name]}")
    for shard, entry in recomputed["shards"].items():
        theirs = claimed["shards"][shard]
        if entry["end_offset"] < theirs["end_offset"]:
            differences.append(f"shard {shard}: the log ends at {entry['end_offset']}, before the "
                               f"export's end offset {theirs['end_offset']}")
        for name in ("created", "closed", "counts", "chain_digest", "chained_votes"):
            if theirs.get(name) != entry[name]:
                differences.append(f"shard {shard} {name}: the export says {theirs.get(name)}, "
                                   f"the log {entry[name]}")
    return claimed, differences
