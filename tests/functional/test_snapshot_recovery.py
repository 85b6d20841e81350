"""Recovery from damaged snapshots, against the real server on the embedded log.

The durability rule (docs/durability.md, shards/snapshots.py): recovery is the newest
*valid* snapshot plus the log after it. So:
- a damaged snapshot manifest (`MANIFEST.json` not JSON, cut short, or naming a snapshot
  whose checksum does not match) is never used as it stands: the shard recovers from an
  older valid snapshot or from the log alone, and every acknowledged vote is still counted
  exactly once (a repeat answers 409 with its original receipt);
- a snapshot ahead of the log's end (the log lost its tail; the snapshot claims an offset
  beyond it) must not be served: the shard refuses to start, says which shard and which
  offsets, and the engine is not ready.

Each server runs one shard and snapshots after every vote batch, so the snapshot directory
of shard 0 holds several snapshots and a manifest once a few votes are in.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.functional.conftest import Server, finish_server, start_server
from tests.support.vote_client import bearer
from tests.support.waiting import wait_until

POLL = "snap"
OPTIONS = ["yes", "no", "maybe"]
ONE_SHARD_SNAPSHOTTING = {"VOTES_SHARDS": "1", "VOTES_SNAPSHOT_VOTES_MIN": "1",
                          "VOTES_SNAPSHOT_VOTES_SHARE": "0", "VOTES_SNAPSHOT_INTERVAL_S": "0.05"}
VOTERS = 30
SNAPSHOTS_MIN = 2
SNAPSHOT_WAIT_S = 30.0
FAILURE_WAIT_S = 30.0


def shard_dir(server: Server) -> Path:
    return server.data_dir / "shards" / "shard-0000"


def group_dir(server: Server) -> Path:
    """Where the one group's log lives (shards/backends.py group_directory)."""
    return server.data_dir / "groups" / "group-0000"


def manifest_path(server: Server) -> Path:
    return shard_dir(server) / "snapshots" / "MANIFEST.json"


def manifest(server: Server) -> dict | None:
    try:
        return json.loads(manifest_path(server).read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def option_of(voter: int) -> str:
    return OPTIONS[voter % len(OPTIONS)]


def cast(server: Server, tokens: dict[int, str], voters: range) -> dict[int, str]:
    """Vote one voter at a time (each its own commit, so snapshots follow one another);
    every vote must be acknowledged. Returns voter -> receipt."""
    client = server.client()
    receipts = {}
    for voter in voters:
        answer = client.post(f"/v1/polls/{POLL}/votes", json={"option": option_of(voter)},
                             headers=bearer(tokens[voter]))
        assert answer.status_code == 201, answer.text
        receipts[voter] = answer.json()["receipt"]
    return receipts


def voted_server(tmp_path: Path) -> tuple[Server, dict[int, str], dict[int, str]]:
    """A stopped one-shard server whose log holds VOTERS acknowledged votes and whose shard 0
    has at least SNAPSHOTS_MIN snapshots. Returns (server, tokens, receipts)."""
    server = start_server(tmp_path / "data", env=ONE_SHARD_SNAPSHOTTING)
    try:
        created = server.client().post("/v1/polls", headers=bearer(server.admin_token()),
                                       json={"id": POLL, "options": OPTIONS})
        assert created.status_code == 201, created.text
        tokens = dict(zip(range(1, VOTERS + 1), server.voter_tokens(1, VOTERS)))
        receipts = cast(server, tokens, range(1, VOTERS // 2 + 1))
        wait_until(lambda: len((manifest(server) or {}).get("snapshots", [])) >= SNAPSHOTS_MIN,
                   SNAPSHOT_WAIT_S, f"{SNAPSHOTS_MIN} snapshots in {manifest_path(server)}")
        receipts |= cast(server, tokens, range(VOTERS // 2 + 1, VOTERS + 1))
    finally:
        finish_server(server)
    return server, tokens, receipts


def restarted(server: Server) -> Server:
    """The same data dir served again (a new process, a new port)."""
    return start_server(server.data_dir, env=ONE_SHARD_SNAPSHOTTING)


def assert_every_vote_counted_once(server: Server, tokens: dict[int, str],
                                   receipts: dict[int, str]) -> None:
    client = server.client()
    results = client.get(f"/v1/polls/{POLL}/results").json()
    expected = Counter(option_of(voter) for voter in receipts)
    assert (results["total"], results["counts"]) == (
        len(receipts), {option: expected[option] for option in OPTIONS}), results
    for voter, receipt in receipts.items():
        repeat = client.post(f"/v1/polls/{POLL}/votes", json={"option": option_of(voter)},
                             headers=bearer(tokens[voter]))
        assert repeat.status_code == 409, (voter, repeat.text)
        assert repeat.json()["receipt"]["receipt"] == receipt, voter


def not_json(path: Path) -> None:
    path.write_bytes(b"\x00garbage{{{ not a manifest")


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def newest_checksum_wrong(path: Path) -> None:
    document = json.loads(path.read_bytes())
    newest = document["snapshots"][0]
    newest["sha256"] = ("0" if newest["sha256"][0] != "0" else "1") + newest["sha256"][1:]
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("damage", [not_json, cut_short, newest_checksum_wrong],
                         ids=["not-json", "cut-short", "newest-checksum-wrong"])
def test_damaged_manifest_recovers_every_acknowledged_vote(tmp_path: Path, damage) -> None:
    server, tokens, receipts = voted_server(tmp_path)
    damage(manifest_path(server))

    again = restarted(server)
    try:
        assert_every_vote_counted_once(again, tokens, receipts)
        # And the shard goes on: a new voter is counted.
        late = again.voter_tokens(VOTERS + 1, 1)[0]
        answer = again.client().post(f"/v1/polls/{POLL}/votes", json={"option": "yes"},
                                     headers=bearer(late))
        assert answer.status_code == 201, answer.text
    finally:
        finish_server(again)


def frame_ends(segment: Path) -> list[int]:
    """Byte positions in the segment at which a frame ends (shards/segment_log.py)."""
    from shards.segment_log import scan_frames

    return [next_position for _, next_position, _ in scan_frames(segment.read_bytes())]


@dataclass
class Refusal:
    """What a server said after its log was cut below its newest snapshot's offset."""

    segment: Path
    snapshot_name: str
    snapshot_offset: int
    log_end: int
    log_line: str
    alive: bool
    readiness: httpx.Response
    vote: httpx.Response


def start_after_losing_the_log_tail(tmp_path: Path) -> Refusal:
    server, tokens, _ = voted_server(tmp_path)
    newest = json.loads(manifest_path(server).read_bytes())["snapshots"][0]
    snapshot_offset = newest["wal_offset_next"]
    segments = sorted((group_dir(server) / "wal").glob("*.log"))
    assert len(segments) == 1, segments  # one small segment: offsets are its byte positions
    # The log loses its tail: cut it at a record boundary well before the snapshot's offset.
    cut_at = max(end for end in frame_ends(segments[0]) if end < snapshot_offset // 2)
    with segments[0].open("r+b") as handle:
        handle.truncate(cut_at)

    again = Server(server.data_dir, server.log_path, workers=1, env=ONE_SHARD_SNAPSHOTTING)
    again.start()
    try:
        line = wait_until(
            lambda: next((text for text in again.log_text().splitlines()
                          if "group 0 cannot start" in text), None),
            FAILURE_WAIT_S, "the log line saying group 0 cannot start")
        client = again.client()
        readiness = client.get("/readyz")
        vote = client.post(f"/v1/polls/{POLL}/votes", json={"option": "yes"},
                           headers=bearer(tokens[1]))
        print(f"\n[snapshot-ahead] {line}\n[snapshot-ahead] /readyz: {readiness.text}; "
              f"vote: {vote.text}")
        return Refusal(segments[0], newest["name"], snapshot_offset, cut_at, line,
                       again.alive(), readiness, vote)
    finally:
        again.stop()


def test_snapshot_ahead_of_the_log_end_is_refused(tmp_path: Path) -> None:
    refusal = start_after_losing_the_log_tail(tmp_path)
    # The shard names itself and both offsets, and the engine stays up, not ready.
    assert str(refusal.snapshot_offset) in refusal.log_line, refusal.log_line
    assert str(refusal.log_end) in refusal.log_line, refusal.log_line
    assert refusal.alive
    assert refusal.readiness.status_code == 503
    assert (refusal.readiness.json()["ready"], refusal.readiness.json()["shards_ready"]) == (
        False, 0)
    # The state the log does not hold is not served: the vote is refused, naming why.
    vote = refusal.vote
    assert (vote.status_code, vote.json()["type"]) == (503, "/problems/not-ready"), vote.text
    assert "shard 0" in vote.json()["detail"]
    assert str(refusal.snapshot_offset) in vote.json()["detail"]


def test_snapshot_ahead_refusal_names_the_files_and_readyz_says_why(tmp_path: Path) -> None:
    refusal = start_after_losing_the_log_tail(tmp_path)
    assert refusal.snapshot_name in refusal.log_line, refusal.log_line
    assert refusal.segment.name in refusal.log_line, refusal.log_line
    assert str(refusal.snapshot_offset) in refusal.readiness.text, refusal.readiness.text
