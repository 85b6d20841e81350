"""`votes snapshot now` makes the running workers of a two-worker server snapshot every
fencing group now, and returns only once every shard's snapshot store holds a snapshot newer
than the request that covers the votes counted before it.

Automatic snapshots are pushed out of the way (an hour's interval, a million votes), so a
snapshot that appears can only come from the request; each worker owns half the groups, so
a request file seen by one worker only would leave the other half without one and the
command would time out. Also: --group snapshots that group only, a request nobody serves
times out with exit 1 and a message, a directory without engine data and a group out of
range are refused with a message.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.config import Config
from shards.backends import shard_directory
from shards.snapshots import DirectorySnapshotStore
from tests.support import cli
from tests.support.vote_client import bearer

WORKERS = 2
SHARDS = 8
GROUPS = 4
VOTERS = 40
NO_AUTOMATIC_SNAPSHOTS = {"VOTES_SHARDS": str(SHARDS), "VOTES_GROUPS": str(GROUPS),
                          "VOTES_SNAPSHOT_INTERVAL_S": "3600",
                          "VOTES_SNAPSHOT_VOTES_MIN": "1000000",
                          "VOTES_SNAPSHOT_REQUEST_CHECK_S": "0.1"}
WAIT_S = "20"


def store_of(data_dir: Path, shard: int) -> DirectorySnapshotStore:
    """The shard's snapshot store where the embedded default keeps it (shards/backends.py)."""
    return DirectorySnapshotStore(shard_directory(data_dir, shard) / "snapshots", shard, 3)


def newest(data_dir: Path, shard: int):
    manifest = store_of(data_dir, shard).read_manifest()
    return manifest.snapshots[0] if manifest.snapshots else None


@pytest.fixture(scope="module")
def engine(server_factory):
    running = server_factory(workers=WORKERS, env=NO_AUTOMATIC_SNAPSHOTS)
    client = running.client(headers={"Connection": "close"})  # votes reach both workers
    created = client.post("/v1/polls", headers=bearer(running.admin_token()),
                          json={"id": "snap", "options": ["a", "b"]})
    assert created.status_code == 201, created.text
    for token in running.voter_tokens(0, VOTERS, poll="snap"):
        answer = client.post("/v1/polls/snap/votes", headers=bearer(token), json={"option": "a"})
        assert answer.status_code == 201, answer.text
    return running


def test_snapshot_now_snapshots_every_group_on_every_worker(engine):
    assert all(newest(engine.data_dir, shard) is None for shard in range(SHARDS)), \
        "an automatic snapshot was written: this test could not tell the request's apart"
    requested_ms = time.time_ns() // 1_000_000
    completed = engine.run_cli("snapshot", "now", "--wait-s", WAIT_S)
    assert "groups 0 1 2 3 snapshotted" in completed.stdout, completed.stdout
    votes_in_snapshots = 0
    for shard in range(SHARDS):
        entry = newest(engine.data_dir, shard)
        assert entry is not None and entry.created_ms >= requested_ms, (shard, entry)
        state = store_of(engine.data_dir, shard).load_newest()
        assert state is not None
        votes_in_snapshots += state.votes_applied
    assert votes_in_snapshots == VOTERS


def test_snapshot_now_of_one_group_leaves_the_others_alone(engine):
    before = {shard: newest(engine.data_dir, shard) for shard in range(SHARDS)}
    engine.run_cli("snapshot", "now", "--group", "1", "--wait-s", WAIT_S)
    time.sleep(0.5)  # several request checks: another worker acting on it would have by now
    config = Config(shards=SHARDS, groups=GROUPS)
    for shard in range(SHARDS):
        after = newest(engine.data_dir, shard)
        if config.group_of(shard) == 1:
            assert after is not None and after.created_ms > before[shard].created_ms, shard
        else:
            assert after == before[shard], shard


def test_bad_requests_exit_with_a_message(engine, tmp_path):
    out_of_range = engine.run_cli("snapshot", "now", "--group", str(GROUPS), check=False)
    assert out_of_range.returncode == 2 and "group 4 does not exist" in out_of_range.stderr
    assert "Traceback" not in out_of_range.stderr
    empty = tmp_path / "not-an-engine"
    empty.mkdir()
    no_data = cli.run_cli("snapshot", "now", "--data-dir", str(empty), check=False)
    assert no_data.returncode == 1 and "not a votes data dir" in no_data.stderr, no_data.stderr


def test_a_request_nobody_serves_times_out(server_factory):
    stopped = server_factory(workers=1, env=NO_AUTOMATIC_SNAPSHOTS)
    stopped.stop()
    started_s = time.monotonic()
    completed = stopped.run_cli("snapshot", "now", "--wait-s", "1", check=False)
    assert completed.returncode == 1, completed
    assert "no snapshot newer than request" in completed.stderr, completed.stderr
    assert "group 0 (shards 0, 4)" in completed.stderr, completed.stderr
    assert time.monotonic() - started_s < 15  # bounded by --wait-s, plus the CLI's start
