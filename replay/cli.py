"""`votes replay` (also installed as `votes-replay`): rebuild, verify, export, inspect, prove.

Every verb takes `--data-dir` and `--config` exactly like `votes serve`; the shard and group
counts come from the data dir's cluster.json (a data dir of layout format 1 is refused),
`--shard S` names a shard and `--group G` all the shards of a fencing group (each group's
one log is read once for all its shards asked for), and Kafka / S3 are used when the config names them. A user
error ends with one line on stderr and a non-zero exit, never a traceback; the exit codes
are listed in replay/errors.py. Heavy imports stay inside the verbs, so `votes serve` does
not pay for them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import click

from engine.errors import VotesError
from replay.errors import EXIT_CANNOT, EXIT_FINDING, EXIT_OK, exit_code_of

RECEIPT_STDIN_BYTES_MAX = 64 * 1024
BAR_COLUMNS_DEFAULT = 100
BAR_LINES_DEFAULT = 24


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _run(work: Callable[[], object]):
    """Run `work` and turn every expected failure into one line and its exit code."""
    import msgspec

    try:
        return work()
    except VotesError as exc:
        _fail(str(exc), exit_code_of(exc))
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        _fail(f"a record or file does not decode: {exc}", EXIT_FINDING)
    except OSError as exc:
        _fail(str(exc), EXIT_CANNOT)
    except KeyboardInterrupt:
        _fail("interrupted (a rebuild resumes from its last checkpoint)", 130)


def _config(data_dir: str | None, config_file: str | None):
    from replay.context import load_replay_config

    return load_replay_config(config_file, data_dir)


def common_options(function):
    function = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            help="TOML config file, as for `votes serve`.")(function)
    return click.option("--data-dir", type=click.Path(file_okay=False),
                        help="The engine's data dir (keys, cluster.json, embedded logs).")(function)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Recovery and audit tool: rebuild shards, verify and export results, prove receipts."""
    # The engine's modules warn (e.g. a snapshot skipped for a bad checksum): one line each.
    # aiokafka logs every failed connection attempt; the verb reports the outcome itself.
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


# rebuild ---------------------------------------------------------------------------------------


@main.command()
@common_options
@click.option("--shard", "shards", type=click.IntRange(0, 4095), multiple=True,
              help="Shard to rebuild (repeatable; default: all).")
@click.option("--group", "groups", type=click.IntRange(0, 4095), multiple=True,
              help="Fencing group: all its shards, from one read of its log (repeatable).")
@click.option("--from-wal", is_flag=True, help="Ignore snapshots: replay the WAL from offset 0.")
@click.option("--restart", is_flag=True, help="Ignore (and drop) an interrupted run's checkpoint.")
@click.option("--checkpoint-records", type=click.IntRange(1, 10**9), default=200_000,
              show_default=True, help="Write a checkpoint after this many records.")
@click.option("--checkpoint-interval-s", type=click.FloatRange(0.1, 86400), default=30.0,
              show_default=True, help="... or after this many seconds.")
@click.option("--records-max", type=click.IntRange(1, 10**12), default=None,
              help="Stop after this many records (checkpoint kept, exit 3); run again to resume.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def rebuild(data_dir, config_file, shards, groups, from_wal, restart, checkpoint_records,
            checkpoint_interval_s, records_max, quiet) -> None:
    """Rebuild shards from snapshot + their group's WAL and write a fresh snapshot for each."""
    from tqdm import tqdm

    from replay.context import chosen_by_shard_or_group, snapshot_description, wal_description
    from replay.rebuild import RebuildOptions, RebuildResult
    from replay.rebuild import rebuild as run_rebuild

    config = _run(lambda: _config(data_dir, config_file))
    chosen = _run(lambda: chosen_by_shard_or_group(config, shards, groups))
    options = RebuildOptions(from_wal=from_wal, restart=restart,
                             checkpoint_records=checkpoint_records,
                             checkpoint_interval_s=checkpoint_interval_s, records_max=records_max)
    bars_disabled = quiet or not sys.stderr.isatty()
    bars: dict[int, tqdm] = {}
    click.echo(f"rebuilding shards {_ranges(chosen)} from the {wal_description(config)} into "
               f"{snapshot_description(config)}")

    def progress_for(shard: int):
        # A terminal that reports no size (some ptys) would get no bar at all from tqdm.
        size = shutil.get_terminal_size((BAR_COLUMNS_DEFAULT, BAR_LINES_DEFAULT))
        bars[shard] = tqdm(desc=f"shard {shard}", unit=" votes", unit_scale=True, file=sys.stderr,
                           disable=bars_disabled, leave=False, mininterval=0.5,
                           ncols=size.columns, nrows=size.lines)
        return bars[shard].update

    def report(result: RebuildResult) -> None:
        bars.pop(result.shard).close()
        earlier = (f" (+{result.records_earlier:,} records in earlier runs)"
                   if result.records_earlier else "")
        click.echo(f"shard {result.shard} (group {result.group}): {result.records:,} "
                   f"records{earlier}, {result.votes:,} votes ({result.votes_counted:,} counted) "
                   f"in the group's read of {result.seconds:.3f} s; started from "
                   f"{result.started_from}; snapshot {result.snapshot_name} written (wal offset "
                   f"{result.end_offset:,}, {result.snapshot_bytes:,} bytes)")

    try:
        results = _run(lambda: asyncio.run(run_rebuild(config, chosen, options, progress_for,
                                                       report)))
    finally:
        for bar in bars.values():
            bar.close()
    votes = sum(result.votes for result in results)
    # The shards of a group share one read of its log: count each group's time once.
    seconds = sum({result.group: result.seconds for result in results}.values())
    click.echo(f"rebuilt {len(results)} shards of {len({result.group for result in results})} "
               f"groups: {votes:,} votes in {seconds:.3f} s = "
               f"{votes / seconds if seconds > 0 else 0:,.0f} votes/s")


def _ranges(shards: list[int]) -> str:
    if len(shards) > 1 and shards == list(range(shards[0], shards[-1] + 1)):
        return f"{shards[0]}-{shards[-1]}"
    return ",".join(map(str, shards))


# verify ----------------------------------------------------------------------------------------


@main.command()
@common_options
@click.option("--shard", "shards", type=click.IntRange(0, 4095), multiple=True,
              help="Shard to verify (repeatable; default: all).")
@click.option("--group", "groups", type=click.IntRange(0, 4095), multiple=True,
              help="Fencing group: all its shards, from one read of its log (repeatable).")
@click.option("--poll", "polls", multiple=True, help="Poll to report (repeatable; default: all).")
@click.option("--url", default=None, help="The engine's base URL, to compare live results.")
@click.option("--live-attempts", type=click.IntRange(1, 100), default=5, show_default=True,
              help="Reads of the log between two live fetches before giving up on stability.")
@click.option("--crdt-redis-url", default=None,
              help="A Redis URL holding the merged results (the engine's redis_url): compare "
                   "this region's CRDT counters with the recount, per shard, option and country.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
def verify(data_dir, config_file, shards, groups, polls, url, live_attempts, crdt_redis_url,
           as_json) -> None:
    """Recount the raw WAL and compare it with the snapshots, the live results and the
    merged CRDT counters."""
    from replay.context import chosen_by_shard_or_group
    from replay.live import check_base_url
    from replay.verify import render
    from replay.verify import verify as run_verify

    config = _run(lambda: _config(data_dir, config_file))
    chosen = _run(lambda: chosen_by_shard_or_group(config, shards, groups))
    base_url = None if url is None else _run(lambda: check_base_url(url))
    report = _run(lambda: asyncio.run(run_verify(config, chosen, polls=list(polls),
                                                 url=base_url, live_attempts=live_attempts,
                                                 crdt_url=crdt_redis_url)))
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        click.echo(render(report))
    sys.exit(EXIT_OK if report.ok else EXIT_FINDING)


# export ----------------------------------------------------------------------------------------


@main.command()
@common_options
@click.option("--poll", default=None, help="The poll to export.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Where <poll>.json and <poll>.csv are written.")
@click.option("--url", default=None,
              help="The engine's base URL, to add its in-memory rejection counts (labelled).")
@click.option("--check", "check_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Recompute this export (.json or .csv) from the log and compare.")
def export(data_dir, config_file, poll, out_dir, url, check_file) -> None:
    """Final results of a poll as JSON and CSV, with a hash chain digest per shard."""
    from replay.export import build_export, check_export, write_export
    from replay.live import check_base_url

    config = _run(lambda: _config(data_dir, config_file))
    if check_file is not None:
        claimed, differences = _run(lambda: asyncio.run(check_export(config, Path(check_file))))
        if differences:
            click.echo(f"MISMATCH: {check_file} does not match the log:")
            for difference in differences:
                click.echo(f"  {difference}")
            sys.exit(EXIT_FINDING)
        click.echo(f"OK: {check_file} matches the log (poll {claimed['poll']!r}, "
                   f"{claimed['total']:,} votes, {len(claimed['shards'])} shard digests)")
        return
    if poll is None:
        _fail("give --poll P to export, or --check FILE to check an export", EXIT_CANNOT)
    live = None
    base_url = None if url is None else _run(lambda: check_base_url(url))
    if base_url is not None:
        live = _run(lambda: _live_results(base_url, poll))
    document = _run(lambda: asyncio.run(build_export(config, poll, live=live, live_url=base_url)))
    json_path, csv_path = _run(lambda: write_export(document, Path(out_dir)))
    counts = ", ".join(f"{option} {count:,}" for option, count in document["counts"].items())
    click.echo(f"poll {poll}: {counts}; total {document['total']:,}; "
               f"{'final' if document['final'] else 'NOT final'} (closed in "
               f"{document['closed_shards']}/{document['shards_total']} shards)")
    click.echo(f"wrote {json_path} and {csv_path}")


def _live_results(base_url: str, poll: str) -> dict:
    import httpx

    from replay.errors import BadInput
    from replay.live import fetch_results

    with httpx.Client() as client:
        document = fetch_results(client, base_url, poll)
    if document is None:
        raise BadInput(f"the engine at {base_url} does not know poll {poll!r}")
    return document


# inspect ---------------------------------------------------------------------------------------


@main.group("inspect")
def inspect_group() -> None:
    """Show a group's or a shard's WAL records, or a shard's snapshots."""


@inspect_group.command("wal")
@common_options
@click.option("--shard", type=click.IntRange(0, 4095), default=None,
              help="The shard's records of its group's log (header, polls, the batches "
                   "holding its votes).")
@click.option("--group", type=click.IntRange(0, 4095), default=None,
              help="Every record of the group's log.")
@click.option("--from", "from_offset", type=click.IntRange(0), default=0, show_default=True,
              help="Offset of the first record (a record boundary).")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def inspect_wal(data_dir, config_file, shard, group, from_offset, limit, as_json) -> None:
    """List WAL records: offset, next offset, kind, poll; a vote batch's group, batch_seq,
    time and votes per shard and poll."""
    from replay.context import chosen_by_shard_or_group
    from replay.inspection import render_record, wal_records

    if (shard is None) == (group is None):
        _fail("give exactly one of --shard S or --group G", EXIT_CANNOT)
    config = _run(lambda: _config(data_dir, config_file))
    _run(lambda: chosen_by_shard_or_group(config, [] if shard is None else [shard],
                                          [] if group is None else [group]))
    log_group = group if shard is None else config.group_of(shard)
    entries, tail = _run(lambda: asyncio.run(wal_records(config, log_group, from_offset, limit,
                                                         shard)))
    if as_json:
        click.echo(json.dumps({"group": log_group, "shard": shard, "records": entries, **tail},
                              indent=2))
        return
    for entry in entries:
        click.echo(render_record(entry))
    if tail["more"]:
        click.echo(f"... more records after these {len(entries)} (--from "
                   f"{entries[-1]['next_offset']} to go on)")
    else:
        click.echo(f"end of log at offset {tail['end_offset']:,} ({len(entries)} records listed)")
    if tail["torn_tail"]:
        click.echo(f"note: {tail['torn_tail']}")


@inspect_group.command("snapshots")
@common_options
@click.option("--shard", type=click.IntRange(0, 4095), default=None)
@click.option("--group", type=click.IntRange(0, 4095), default=None,
              help="Every shard of the group, one after the other.")
@click.option("--json", "as_json", is_flag=True)
def inspect_snapshots(data_dir, config_file, shard, group, as_json) -> None:
    """The shard's snapshot manifest and a summary of the newest valid snapshot."""
    from replay.context import chosen_by_shard_or_group
    from replay.inspection import render_snapshots, snapshot_summary

    if (shard is None) == (group is None):
        _fail("give exactly one of --shard S or --group G", EXIT_CANNOT)
    config = _run(lambda: _config(data_dir, config_file))
    chosen = _run(lambda: chosen_by_shard_or_group(config, [] if shard is None else [shard],
                                                   [] if group is None else [group]))
    async def summaries_of() -> list[dict]:
        return [await snapshot_summary(config, number) for number in chosen]

    summaries = _run(lambda: asyncio.run(summaries_of()))
    if as_json:
        click.echo(json.dumps(summaries[0] if shard is not None else summaries, indent=2))
    else:
        click.echo("\n".join(render_snapshots(summary) for summary in summaries))


# prove -----------------------------------------------------------------------------------------


@main.command()
@common_options
@click.argument("receipt_text", metavar="RECEIPT")
@click.option("--export", "export_file", type=click.Path(dir_okay=False, exists=True),
              default=None, help="An export (.json or .csv) that must include this vote.")
@click.option("--show-option", is_flag=True, help="Print the option the vote was for.")
def prove(data_dir, config_file, receipt_text, export_file, show_option) -> None:
    """Was this vote counted? RECEIPT is the "r2...." text of a 201 or 409 body ("-": stdin).

    Exit 0: counted; 1: not counted or a check failed; 2: bad input."""
    from replay.prove import prove as run_prove

    if receipt_text == "-":
        receipt_text = sys.stdin.read(RECEIPT_STDIN_BYTES_MAX)
    config = _run(lambda: _config(data_dir, config_file))
    proof = _run(lambda: asyncio.run(run_prove(
        config, receipt_text, export_path=None if export_file is None else Path(export_file))))
    receipt = proof.receipt
    click.echo(f"receipt: poll {receipt.poll!r}, shard {receipt.shard}, offset {receipt.offset}, "
               f"batch {receipt.batch_seq} of group {receipt.group}, vote {receipt.index} of "
               f"{receipt.leaf_count}")
    for ok, text in proof.checks:
        click.echo(f"  [{'ok' if ok else 'FAILED'}] {text}")
    if show_option and proof.option is not None:
        click.echo(f"  option: {proof.option}")
    if proof.counted and not proof.failed:
        click.echo("VERDICT: COUNTED")
        sys.exit(EXIT_OK)
    click.echo("VERDICT: NOT COUNTED" if not proof.counted else "VERDICT: MISMATCH")
    sys.exit(EXIT_FINDING)


if __name__ == "__main__":
    main()
