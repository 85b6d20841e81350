"""`votes replay` against a real engine on the embedded log (`votes serve` subprocess).

One engine takes ~100 votes from concurrent senders in poll `fn` (plus a refused repeat
vote) and a few in poll `done`, which is then closed. Tests run in file order: first against
the running engine, then after it is stopped. They prove that:
- verify exits 0 and prints a table whose wal and live columns equal the results endpoint;
  a copy of the data dir with a crafted valid frame of extra votes appended makes it exit 1
  naming the poll and option that differ from the live results;
- inspect lists the log's records (poll creation, vote batches of the group with their vote
  counts per shard and poll, their batch_seq rising in the group's log) and the snapshot
  manifest; a shard's listing holds the batches with its votes;
- export writes JSON and CSV whose counts, final flag, rejections and per-shard chains match
  the log and the live results, `--check` passes on them and fails on tampered copies;
- prove says COUNTED (exit 0) for a real receipt, prints the option only when asked, fails
  (exit 1) for a receipt whose option was changed, for one whose offset (a locator outside
  the signature) was moved off its record, and for a properly signed duplicate vote
  appended to a copy of the log (NOT COUNTED: duplicate), and exits 2 with one line for a
  malformed receipt and for a receipt of the release before (prefix "r1.");
- rebuild refuses (exit 2, naming the lock) while the engine runs and writes nothing; with
  the engine stopped it writes a snapshot per shard whose counts sum to the live results,
  and verify then agrees; a snapshot with wrong counts makes verify exit 1 naming shard,
  poll, option and the voters bitmap; a rebuild stopped by --records-max (exit 3) resumes
  from its checkpoint, refuses to resume with other options, and ends with the same state.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import pytest

from engine.config import Config
from engine.keys import load_keys
from engine.receipts import decode_receipt, encode_receipt
from engine.signing import VoterHasher, sign_commit, vote_runs
from replay.recount import recount
from shards.backends import group_directory, shard_directory
from shards.records import VoteBatch, VoteGroup, frame_record
from shards.snapshots import DirectorySnapshotStore, freeze, thaw
from tests.support import http_client
from tests.support.cli import run_cli
from tests.support.engine_process import EngineProcess
from tests.support.http_client import ValidatingAsyncClient
from tests.support.vote_client import bearer, open_poll

POLL = "fn"
OPTIONS = ["red", "green", "blue"]
CLOSED_POLL = "done"
SHARDS = 32  # `votes serve` defaults: 32 shards in 4 fencing groups
GROUPS = 4
VOTERS = 96
CLOSED_VOTERS = 6
SENDERS = 12
TIMEOUT_S = 15.0


@dataclass
class Cast:
    engine: EngineProcess
    data_dir: Path
    options: dict[int, str]  # voter -> option, every voter that got 201
    receipts: dict[int, str]
    live: dict  # results of POLL while the engine ran
    live_closed: dict


def replay(*args: str) -> tuple[int, str, str]:
    completed = run_cli("replay", *args, check=False)
    assert "Traceback" not in completed.stderr, completed.stderr
    return completed.returncode, completed.stdout, completed.stderr


async def send_votes(base_url: str, tokens: list[str], poll: str, first_voter: int
                     ) -> dict[int, httpx.Response]:
    slots = asyncio.Semaphore(SENDERS)
    async with ValidatingAsyncClient(base_url=base_url, timeout=TIMEOUT_S) as client:
        async def vote(voter: int) -> tuple[int, httpx.Response]:
            async with slots:
                return voter, await client.post(
                    f"/v1/polls/{poll}/votes", headers=bearer(tokens[voter - first_voter]),
                    json={"option": OPTIONS[voter % len(OPTIONS)]})

        return dict(await asyncio.gather(*(vote(first_voter + index)
                                           for index in range(len(tokens)))))


@pytest.fixture(scope="module")
def cast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cast]:
    root = tmp_path_factory.mktemp("replay")
    engine = EngineProcess(root / "data", root / "engine.log")
    engine.start()
    try:
        engine.wait_ready()
        tokens = open_poll(engine, POLL, OPTIONS, first_voter=1, voters=VOTERS, timeout_s=TIMEOUT_S)
        answers = asyncio.run(send_votes(engine.base_url, tokens, POLL, 1))
        assert {answer.status_code for answer in answers.values()} == {201}
        repeat = http_client.post(f"{engine.base_url}/v1/polls/{POLL}/votes",
                                  headers=bearer(tokens[0]), json={"option": "blue"},
                                  timeout=TIMEOUT_S)
        assert repeat.status_code == 409
        closed_tokens = open_poll(engine, CLOSED_POLL, OPTIONS, first_voter=500,
                                  voters=CLOSED_VOTERS, timeout_s=TIMEOUT_S)
        closed_answers = asyncio.run(send_votes(engine.base_url, closed_tokens, CLOSED_POLL, 500))
        assert {answer.status_code for answer in closed_answers.values()} == {201}
        admin = run_cli("admin-token", "--data-dir", str(engine.data_dir)).stdout.strip()
        closing = http_client.post(f"{engine.base_url}/v1/polls/{CLOSED_POLL}/close",
                                   headers=bearer(admin), timeout=TIMEOUT_S)
        assert closing.status_code == 200
        live = http_client.get(f"{engine.base_url}/v1/polls/{POLL}/results",
                               timeout=TIMEOUT_S).json()
        live_closed = http_client.get(f"{engine.base_url}/v1/polls/{CLOSED_POLL}/results",
                                      timeout=TIMEOUT_S).json()
        yield Cast(engine, engine.data_dir,
                   {voter: OPTIONS[voter % len(OPTIONS)] for voter in answers},
                   {voter: answer.json()["receipt"] for voter, answer in answers.items()},
                   live, live_closed)
    finally:
        engine.stop()
    assert "Traceback" not in engine.log_text(), engine.log_tail()


def expected_counts(cast: Cast, shards: set[int] | None = None) -> dict[str, int]:
    counts = Counter(option for voter, option in cast.options.items()
                     if shards is None or voter % SHARDS in shards)
    return {option: counts[option] for option in OPTIONS}


def copy_data_dir(cast: Cast, destination: Path) -> Path:
    shutil.copytree(cast.data_dir, destination, ignore=shutil.ignore_patterns("LOCK", "run"))
    return destination


def last_segment(data_dir: Path, shard: int) -> Path:
    """The last segment of the log of the shard's fencing group."""
    return max((group_directory(data_dir, shard % GROUPS) / "wal").glob("*.log"))


def append_record(data_dir: Path, shard: int, record) -> int:
    """Append one framed record to the shard's group's last segment; return its offset."""
    segment = last_segment(data_dir, shard)
    offset = int(segment.name[:-4]) + segment.stat().st_size
    with open(segment, "ab") as handle:
        handle.write(frame_record(record))
    return offset


def busiest_shard(data_dir: Path) -> tuple[int, int]:
    config = Config(data_dir=str(data_dir), shards=SHARDS, groups=GROUPS).validate()
    results = asyncio.run(recount(config, chain=False))
    shard = max(results, key=lambda number: results[number].records)
    return shard, results[shard].records


# With the engine running -----------------------------------------------------------------------


def test_live_results_match_what_the_voters_were_told(cast):
    assert json.loads((cast.data_dir / "cluster.json").read_text()) == {
        "format": 3, "shards": SHARDS, "groups": GROUPS}
    assert cast.live["counts"] == expected_counts(cast)
    assert cast.live["rejected"]["duplicate"] == 1
    assert cast.live_closed["final"] is True


def test_verify_agrees_with_the_live_results(cast):
    code, out, err = replay("verify", "--data-dir", str(cast.data_dir), "--url",
                            cast.engine.base_url)
    assert code == 0, out + err
    for option in OPTIONS:
        count = cast.live["counts"][option]
        assert f"{POLL:<20} {option:<20} {count:>10,}" in out
        assert out.split(f"{POLL:<20} {option:<20}")[1].split("\n")[0].split()[-1] == str(count)
    assert "OK: the log, the snapshots and the live results agree" in out
    code, out, _ = replay("verify", "--data-dir", str(cast.data_dir), "--url",
                          cast.engine.base_url, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["differences"] == []
    assert report["polls"][POLL]["wal"] == report["polls"][POLL]["live"] == cast.live["counts"]
    assert report["polls"][CLOSED_POLL]["closed_shards"] == SHARDS
    assert sum(shard["votes_seen"] for shard in report["shards"]) == VOTERS + CLOSED_VOTERS


def test_verify_finds_votes_appended_to_the_log(cast, tmp_path):
    copy = copy_data_dir(cast, tmp_path / "data")
    shard = 3
    extra = VoteBatch(group=shard % GROUPS, batch_seq=10_000, time_ms=int(time.time() * 1000),
                      groups=[VoteGroup(shard=shard, poll=POLL,
                                        voters=array.array("I", [900, 901]).tobytes(),
                                        options=array.array("H", [0, 0]).tobytes())],
                      batch_position=0, batch_nodes=[bytes(32)], signature=bytes(64), key_id="x")
    append_record(copy, shard, extra)
    code, out, _ = replay("verify", "--data-dir", str(copy), "--url", cast.engine.base_url)
    assert code == 1, out
    red = cast.live["counts"]["red"]
    assert f"live: poll {POLL!r} option 'red': live results say {red}, the log {red + 2}" in out
    assert "option 'green'" not in out.split("DIFFERENCES")[1]


def test_inspect_lists_the_records_and_snapshots(cast):
    shard = 5
    group = shard % GROUPS
    code, out, _ = replay("inspect", "wal", "--data-dir", str(cast.data_dir), "--shard",
                          str(shard), "--json")
    assert code == 0
    listing = json.loads(out)
    kinds = [record["kind"] for record in listing["records"]]
    assert kinds[:2] == ["log-header", "poll-created"] and "poll-closed" in kinds
    batches = [record for record in listing["records"] if record["kind"] == "vote-batch"]
    assert batches and all(record["group"] == group and shard in record["shards"]
                           for record in batches)
    votes = sum(vote_group["votes"] for record in batches for vote_group in record["groups"]
                if vote_group["poll"] == POLL and vote_group["shard"] == shard)
    assert votes == sum(1 for voter in cast.options if voter % SHARDS == shard)
    code, out, _ = replay("inspect", "wal", "--data-dir", str(cast.data_dir), "--group",
                          str(group), "--json")
    assert code == 0
    whole = json.loads(out)
    header = whole["records"][0]
    assert (header["kind"], header["offset"], header["shards"], header["groups"],
            header["group"]) == ("log-header", 0, SHARDS, GROUPS, group)
    group_batches = [record for record in whole["records"] if record["kind"] == "vote-batch"]
    assert {number for record in group_batches for number in record["shards"]} \
        <= set(range(group, SHARDS, GROUPS))
    assert all(record["shards"] == list(dict.fromkeys(vote_group["shard"] for vote_group
                                                      in record["groups"]))
               for record in group_batches)
    # One sequence per group: batch_seq rises along the group's log, whatever the shards.
    sequence = [record["batch_seq"] for record in group_batches]
    assert sequence == sorted(set(sequence))
    assert [record for record in group_batches if shard in record["shards"]] == batches
    offsets = [(record["offset"], record["next_offset"]) for record in whole["records"]]
    assert all(left[1] == right[0] for left, right in itertools.pairwise(offsets))
    assert whole["end_offset"] == offsets[-1][1] == listing["end_offset"]
    first_batch = kinds.index("vote-batch")
    at = listing["records"][first_batch]
    code, out, _ = replay("inspect", "wal", "--data-dir", str(cast.data_dir), "--shard",
                          str(shard), "--from", str(at["offset"]), "--limit", "1")
    assert code == 0
    assert out.splitlines()[0].split()[:4] == [str(at["offset"]), "->", str(at["next_offset"]),
                                               "vote-batch"]
    assert "more records after these 1" in out
    code, out, _ = replay("inspect", "wal", "--data-dir", str(cast.data_dir))
    assert code == 2
    code, out, _ = replay("inspect", "snapshots", "--data-dir", str(cast.data_dir), "--shard",
                          str(shard))
    assert code == 0 and f"shard {shard}:" in out


def test_export_writes_results_and_check_catches_tampering(cast, tmp_path):
    out_dir = tmp_path / "export"
    code, out, err = replay("export", "--data-dir", str(cast.data_dir), "--poll", POLL,
                            "--out-dir", str(out_dir), "--url", cast.engine.base_url)
    assert code == 0, out + err
    document = json.loads((out_dir / f"{POLL}.json").read_text())
    assert document["counts"] == cast.live["counts"] and document["total"] == VOTERS
    assert document["final"] is False and document["closed_shards"] == 0
    assert document["rejected_in_log"] == {"duplicate": 0, "poll-not-open": 0,
                                           "option-invalid": 0}
    assert document["engine_rejected_in_memory"]["counts"]["duplicate"] == 1
    assert [entry["chained_votes"] for entry in document["shards"]] == [
        sum(1 for voter in cast.options if voter % SHARDS == shard) for shard in range(SHARDS)]
    csv_text = (out_dir / f"{POLL}.csv").read_text()
    assert f"count,,red,{cast.live['counts']['red']}" in csv_text
    assert "engine_rejected_in_memory,,duplicate,1" in csv_text
    for path in (out_dir / f"{POLL}.json", out_dir / f"{POLL}.csv"):
        code, out, err = replay("export", "--data-dir", str(cast.data_dir), "--check", str(path))
        assert code == 0 and "OK:" in out, out + err

    tampered = dict(document, counts=dict(document["counts"], red=document["counts"]["red"] + 1))
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    code, out, _ = replay("export", "--data-dir", str(cast.data_dir), "--check",
                          str(tmp_path / "tampered.json"))
    assert code == 1 and "counts: the export says" in out
    digest = document["shards"][2]["chain_digest"]
    (tmp_path / "tampered.csv").write_text(csv_text.replace(digest, "00" * 32))
    code, out, _ = replay("export", "--data-dir", str(cast.data_dir), "--check",
                          str(tmp_path / "tampered.csv"))
    assert code == 1 and "shard 2 chain_digest" in out

    code, out, _ = replay("export", "--data-dir", str(cast.data_dir), "--poll", CLOSED_POLL,
                          "--out-dir", str(out_dir))
    assert code == 0
    closed = json.loads((out_dir / f"{CLOSED_POLL}.json").read_text())
    assert closed["final"] is True and closed["counts"] == cast.live_closed["counts"]
    code, _, err = replay("export", "--data-dir", str(cast.data_dir), "--poll", "nope",
                          "--out-dir", str(out_dir))
    assert code == 2 and err.strip() == "error: unknown poll 'nope': no group's log creates it"


def test_prove_a_real_receipt(cast, tmp_path):
    voter = 17
    receipt = cast.receipts[voter]
    code, out, _ = replay("prove", "--data-dir", str(cast.data_dir), receipt)
    assert code == 0, out
    assert "VERDICT: COUNTED" in out and "option:" not in out
    decoded = decode_receipt(receipt)
    assert decoded.group == decoded.shard % GROUPS
    assert f"batch {decoded.batch_seq} of group {decoded.group}" in out.splitlines()[0]
    assert (f"[ok] shard {decoded.shard} is in the receipt's fencing group {decoded.group}"
            in out and f"[ok] vote {decoded.index} of the record is of shard {decoded.shard}"
            in out), out
    code, out, _ = replay("prove", "--data-dir", str(cast.data_dir), receipt, "--show-option")
    assert code == 0 and f"option: {cast.options[voter]}" in out
    out_dir = tmp_path / "export"
    assert replay("export", "--data-dir", str(cast.data_dir), "--poll", POLL, "--out-dir",
                  str(out_dir))[0] == 0
    code, out, _ = replay("prove", "--data-dir", str(cast.data_dir), receipt, "--export",
                          str(out_dir / f"{POLL}.json"))
    assert code == 0 and "the export includes this vote" in out


def test_prove_rejects_changed_and_malformed_receipts(cast):
    decoded = decode_receipt(cast.receipts[17])
    other = next(option for option in OPTIONS if option != decoded.option)
    changed = encode_receipt(msgspec.structs.replace(decoded, option=other))
    code, out, _ = replay("prove", "--data-dir", str(cast.data_dir), changed)
    assert code == 1
    assert "[FAILED] signature" in out and "VERDICT: NOT COUNTED" in out
    # The offset is a locator, outside the signature: moved, the signature still verifies,
    # but the log holds no such batch there.
    moved = encode_receipt(msgspec.structs.replace(decoded, offset=decoded.offset + 3))
    code, out, _ = replay("prove", "--data-dir", str(cast.data_dir), moved)
    assert code == 1
    assert "[ok] signature" in out and f"holds a record at offset {decoded.offset + 3}: no" in out
    code, out, err = replay("prove", "--data-dir", str(cast.data_dir), "r2.not-a-receipt")
    assert code == 2 and out == "" and err.startswith("error: receipt is malformed")
    assert len(err.strip().splitlines()) == 1
    # A receipt of the release before bound its batch to a shard: refused by its prefix.
    code, out, err = replay("prove", "--data-dir", str(cast.data_dir),
                            "r1." + cast.receipts[17][len("r2."):])
    assert code == 2 and out == "" and "does not start with 'r2.'" in err


def test_prove_a_signed_duplicate_vote_is_not_counted(cast, tmp_path):
    copy = copy_data_dir(cast, tmp_path / "data")
    voter = 21
    shard = voter % SHARDS
    group = shard % GROUPS
    keyring = load_keys(copy)
    time_ms = int(time.time() * 1000)
    (signed,) = sign_commit(keyring, VoterHasher(keyring.voter_hash_secret), time_ms,
                            [(group, 50_000, vote_runs(shard, [(POLL, voter, "green")]))])
    batch = VoteBatch(group=group, batch_seq=50_000, time_ms=time_ms, groups=[VoteGroup(
        shard=shard, poll=POLL, voters=array.array("I", [voter // SHARDS]).tobytes(),
        options=array.array("H", [OPTIONS.index("green")]).tobytes())],
        batch_position=signed.batch_position, batch_nodes=signed.batch_nodes,
        signature=signed.signature, key_id=signed.key_id)
    offset = append_record(copy, shard, batch)
    receipt = encode_receipt(signed.receipt(0, offset))
    code, out, _ = replay("prove", "--data-dir", str(copy), receipt)
    assert code == 1, out
    assert "[ok] signature" in out and "[ok] vote 0 of the record is this voter's vote" in out
    assert "counted by the recount of shard" in out and "no (duplicate)" in out
    assert "VERDICT: NOT COUNTED" in out


def test_rebuild_refuses_while_the_engine_runs(cast):
    manifests = sorted(cast.data_dir.glob("shards/*/snapshots/MANIFEST.json"))
    before = {path: path.read_bytes() for path in manifests}
    code, _, err = replay("rebuild", "--data-dir", str(cast.data_dir), "--quiet")
    assert code == 2
    assert "an engine holds the log's lock" in err and "stop it before rebuilding" in err
    assert not (cast.data_dir / "replay").exists()
    assert {path: path.read_bytes() for path in manifests} == before
    assert sorted(cast.data_dir.glob("shards/*/snapshots/MANIFEST.json")) == manifests


# With the engine stopped -------------------------------------------------------------------------


def test_rebuild_with_the_engine_stopped_matches_the_live_results(cast):
    assert cast.engine.stop() is not None
    code, out, err = replay("rebuild", "--data-dir", str(cast.data_dir), "--from-wal")
    assert code == 0, out + err
    assert out.count("snapshot snapshot-") == SHARDS and "votes/s" in out
    totals: Counter = Counter()
    for shard in range(SHARDS):
        store = DirectorySnapshotStore(shard_directory(cast.data_dir, shard) / "snapshots",
                                       shard, 3)
        state = store.load_newest()
        assert state is not None and state.polls[POLL].counts() == expected_counts(cast, {shard})
        totals.update(state.polls[POLL].counts())
    assert dict(totals) == cast.live["counts"]
    code, out, _ = replay("verify", "--data-dir", str(cast.data_dir))
    assert code == 0 and "OK: the log and the snapshots agree" in out


def test_rebuild_of_a_group_rebuilds_each_of_its_shards(cast):
    group = 2
    members = range(group, SHARDS, GROUPS)
    code, out, err = replay("rebuild", "--data-dir", str(cast.data_dir), "--group", str(group),
                            "--from-wal", "--quiet")
    assert code == 0, out + err
    assert out.count("snapshot snapshot-") == len(members)
    assert f"rebuilt {len(members)} shards of 1 groups" in out
    for shard in members:
        assert f"shard {shard} (group {group}):" in out
        store = DirectorySnapshotStore(shard_directory(cast.data_dir, shard) / "snapshots",
                                       shard, 3)
        assert store.load_newest().polls[POLL].counts() == expected_counts(cast, {shard})
    code, out, err = replay("verify", "--data-dir", str(cast.data_dir), "--group", str(group),
                            "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert [line["shard"] for line in report["shards"]] == list(members)
    assert report["polls"][POLL]["wal"] == expected_counts(cast, set(members))


def test_verify_finds_a_snapshot_with_wrong_counts(cast, tmp_path):
    copy = copy_data_dir(cast, tmp_path / "data")
    shard = 6
    store = DirectorySnapshotStore(shard_directory(copy, shard) / "snapshots", shard, 3)
    state = store.load_newest()
    assert state is not None
    state.polls[POLL].tallies[0] += 1
    state.polls[POLL].voters.add(777_777)
    store.write(freeze(state), state.wal_offset_next)
    code, out, _ = replay("verify", "--data-dir", str(copy))
    assert code == 1, out
    differences = out.split("DIFFERENCES")[1]
    assert f"snapshot: shard {shard} poll {POLL!r} option 'red': snapshot" in differences
    assert "voters bitmap differs" in differences and "[777777]" in differences


def test_interrupted_rebuild_resumes_from_its_checkpoint(cast):
    shard, records = busiest_shard(cast.data_dir)
    assert records >= 5
    base = ("rebuild", "--data-dir", str(cast.data_dir), "--shard", str(shard), "--quiet")
    code, _, err = replay(*base, "--from-wal", "--restart", "--checkpoint-records", "1",
                          "--records-max", "3")
    assert code == 3, err
    checkpoint = cast.data_dir / "replay" / f"rebuild-shard-{shard:04d}.checkpoint"
    assert checkpoint.exists() and "run again to resume" in err
    code, _, err = replay(*base)
    assert code == 2 and "run with the same options, or with --restart" in err
    code, out, err = replay(*base, "--from-wal")
    assert code == 0, err
    assert "started from checkpoint at offset" in out and "(+3 records in earlier runs)" in out
    assert f"{records - 3:,} records" in out
    assert not checkpoint.exists()
    store = DirectorySnapshotStore(shard_directory(cast.data_dir, shard) / "snapshots", shard, 3)
    assert store.load_newest().polls[POLL].counts() == expected_counts(cast, {shard})
    resumed = freeze(store.load_newest())
    assert replay(*base, "--from-wal", "--restart")[0] == 0
    assert thaw(resumed).polls[POLL].counts() == store.load_newest().polls[POLL].counts()
