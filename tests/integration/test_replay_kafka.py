"""`votes replay` against an engine on the real stack: the Kafka WAL (3 brokers, a topic of
this test's own) and S3 snapshots (SeaweedFS, a prefix of this test's own).

An engine takes ~80 votes from concurrent senders, snapshotting to S3 after every commit
cycle. With the engine still running, the test proves that:
- the topic has one partition per fencing group (GROUPS groups of the stack's shards), each
  starting with its LogHeader;
- verify reads every partition once for all its shards (read_committed, owner markers
  skipped), matches each shard's
  newest S3 snapshot at its offset and the live results, and exits 0;
- inspect lists a partition's records at Kafka offsets (next offset = offset + 1), a shard's
  (its batches only) or the whole group's, and the S3 manifest;
- export writes counts equal to the live results and `--check` recomputes it from Kafka;
- prove says COUNTED for a real receipt, also against the export;
- rebuild (allowed beside a running engine on Kafka: it only reads the log) writes snapshots
  to S3 at the partitions' ends, with the expected counts, and verify still agrees;
- with Kafka unreachable, verify ends (a bounded wait) with one line and exit code 2.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.support import http_client
from tests.support.cli import run_cli
from tests.support.engine_process import KAFKA_READINESS, EngineProcess, kafka_env
from tests.support.http_client import ValidatingAsyncClient
from tests.support.vote_client import bearer, open_poll
from tests.support.waiting import wait_until

from .test_kafka_wal import create_topic, delete_topics
from .test_s3_snapshots import load_bench

pytestmark = pytest.mark.integration

POLL = "kafka-replay"
OPTIONS = ["red", "green", "blue"]
VOTERS = 80
SENDERS = 16
TIMEOUT_S = 20.0
SNAPSHOTS_WAIT_S = 60.0
# The stack's shard count in this many fencing groups: several shards share each group's
# partition (the topic has one partition per group).
GROUPS = 2


def replay(*args: str) -> tuple[int, str, str]:
    completed = run_cli("replay", *args, check=False)
    assert "Traceback" not in completed.stderr, completed.stderr
    return completed.returncode, completed.stdout, completed.stderr


def write_config(path: Path, local_stack, topic: str, prefix: str, **extra) -> Path:
    s3 = local_stack.endpoints()["s3"]
    values = {"shards": local_stack.partitions, "groups": GROUPS,
              "kafka_bootstrap_servers": local_stack.bootstrap_servers, "wal_topic": topic,
              "s3_endpoint_url": s3["endpoint_url"], "s3_bucket": s3["bucket"],
              "s3_region": s3["region"], "s3_access_key_id": s3["access_key_id"],
              "s3_secret_access_key": s3["secret_access_key"], "s3_prefix": prefix, **extra}
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return path


async def cast_votes(base_url: str, tokens: list[str]) -> dict[int, httpx.Response]:
    slots = asyncio.Semaphore(SENDERS)
    async with ValidatingAsyncClient(base_url=base_url, timeout=TIMEOUT_S) as client:
        async def vote(voter: int):
            async with slots:
                return voter, await client.post(
                    f"/v1/polls/{POLL}/votes", headers=bearer(tokens[voter - 1]),
                    json={"option": OPTIONS[voter % len(OPTIONS)]})

        return dict(await asyncio.gather(*(vote(voter) for voter in range(1, VOTERS + 1))))


def every_shard_has_a_snapshot(common: tuple[str, ...], shards: int) -> bool:
    """Whether `votes replay inspect snapshots` finds a newest valid snapshot for each shard."""
    for shard in range(shards):
        code, out, _ = replay("inspect", "snapshots", *common, "--shard", str(shard), "--json")
        if code != 0 or not json.loads(out).get("newest_valid"):
            return False
    return True


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_replay_on_kafka_and_s3(local_stack, tmp_path):
    run_id = uuid.uuid4().hex[:8]
    topic, prefix = f"test-replay-{run_id}", f"test-replay/{run_id}"
    shards = local_stack.partitions
    asyncio.run(create_topic(local_stack.bootstrap_servers, topic, partitions=GROUPS))
    s3 = local_stack.endpoints()["s3"]
    env = kafka_env(local_stack, VOTES_WAL_TOPIC=topic, VOTES_GROUPS=str(GROUPS), VOTES_S3_ENDPOINT_URL=s3["endpoint_url"],
                    VOTES_S3_BUCKET=s3["bucket"], VOTES_S3_REGION=s3["region"],
                    VOTES_S3_ACCESS_KEY_ID=s3["access_key_id"],
                    VOTES_S3_SECRET_ACCESS_KEY=s3["secret_access_key"], VOTES_S3_PREFIX=prefix,
                    VOTES_SNAPSHOT_VOTES_MIN="1", VOTES_SNAPSHOT_INTERVAL_S="0.5")
    engine = EngineProcess(tmp_path / "data", tmp_path / "engine.log", env, **KAFKA_READINESS)
    config = write_config(tmp_path / "replay.toml", local_stack, topic, prefix)
    common = ("--data-dir", str(engine.data_dir), "--config", str(config))
    try:
        engine.start()
        engine.wait_ready()
        tokens = open_poll(engine, POLL, OPTIONS, first_voter=1, voters=VOTERS, timeout_s=TIMEOUT_S)
        answers = asyncio.run(cast_votes(engine.base_url, tokens))
        assert {answer.status_code for answer in answers.values()} == {201}
        expected = Counter(OPTIONS[voter % len(OPTIONS)] for voter in answers)
        live = http_client.get(f"{engine.base_url}/v1/polls/{POLL}/results",
                               timeout=TIMEOUT_S).json()
        assert live["counts"] == {option: expected[option] for option in OPTIONS}
        # Not a sleep for "the snapshots reach S3": wait until every shard has a valid one.
        wait_until(lambda: every_shard_has_a_snapshot(common, shards), SNAPSHOTS_WAIT_S,
                   f"a valid S3 snapshot of each of the {shards} shards", poll_s=0.5)

        code, out, err = replay("verify", *common, "--url", engine.base_url, "--json")
        assert code == 0, out + err
        report = json.loads(out)
        assert report["polls"][POLL]["wal"] == report["polls"][POLL]["live"] == live["counts"]
        assert report["wal"].startswith(f"Kafka topic {topic!r}")
        with_snapshot = [shard for shard in report["shards"] if shard["snapshot_offset"]]
        assert with_snapshot, report["shards"]
        assert sum(report["polls"][POLL]["wal_at_snapshots"].values()) > 0

        code, out, _ = replay("inspect", "wal", *common, "--shard", "1", "--json")
        assert code == 0
        records = json.loads(out)["records"]
        assert [record["kind"] for record in records[:2]] == ["log-header", "poll-created"]
        assert all(record["next_offset"] == record["offset"] + 1 for record in records)
        # A vote batch is the group's (log format 3): the shard's part of it is its vote groups.
        assert sum(vote_group["votes"] for record in records if record["kind"] == "vote-batch"
                   for vote_group in record["groups"] if vote_group["shard"] == 1) == sum(
            1 for voter in answers if voter % shards == 1)
        code, out, _ = replay("inspect", "wal", *common, "--group", str(1 % GROUPS), "--json")
        assert code == 0
        whole = json.loads(out)["records"]
        assert (whole[0]["kind"], whole[0]["shards"], whole[0]["groups"], whole[0]["group"]) == (
            "log-header", shards, GROUPS, 1 % GROUPS)
        assert {shard for record in whole if record["kind"] == "vote-batch"
                for shard in record["shards"]} == {
            voter % shards for voter in answers if voter % shards % GROUPS == 1 % GROUPS}
        code, out, _ = replay("inspect", "snapshots", *common, "--shard", "1")
        assert code == 0 and "newest valid: snapshot-" in out

        out_dir = tmp_path / "export"
        code, out, err = replay("export", *common, "--poll", POLL, "--out-dir", str(out_dir))
        assert code == 0, out + err
        document = json.loads((out_dir / f"{POLL}.json").read_text())
        assert document["counts"] == live["counts"] and document["shards_total"] == shards
        code, out, err = replay("export", *common, "--check", str(out_dir / f"{POLL}.json"))
        assert code == 0, out + err

        code, out, err = replay("prove", *common, answers[7].json()["receipt"], "--export",
                                str(out_dir / f"{POLL}.json"))
        assert code == 0 and "VERDICT: COUNTED" in out, out + err

        code, out, err = replay("rebuild", *common, "--shard", "0", "--shard", "1", "--from-wal",
                                "--quiet")
        assert code == 0, out + err
        assert out.count("snapshot snapshot-") == 2
        code, out, _ = replay("inspect", "snapshots", *common, "--shard", "0", "--json")
        newest = json.loads(out)["newest_valid"]
        assert newest["polls"][POLL]["counts"] == dict(Counter(
            OPTIONS[voter % len(OPTIONS)] for voter in answers if voter % shards == 0)) | {
            option: 0 for option in OPTIONS if not any(
                voter % shards == 0 and OPTIONS[voter % len(OPTIONS)] == option
                for voter in answers)}
        code, out, err = replay("verify", *common, "--url", engine.base_url)
        assert code == 0, out + err

        unreachable = write_config(tmp_path / "unreachable.toml", local_stack, topic, prefix,
                                   kafka_bootstrap_servers=f"127.0.0.1:{closed_port()}",
                                   kafka_request_timeout_s=3.0)
        started = time.monotonic()
        # run_cli bounds the command (tests/support/cli.py); its time is printed, not asserted.
        code, out, err = replay("verify", "--data-dir", str(engine.data_dir), "--config",
                                str(unreachable))
        print(f"verify with Kafka unreachable exited {code} after "
              f"{time.monotonic() - started:.1f} s")
        assert code == 2
        assert err.startswith("error: Kafka at 127.0.0.1:") and len(err.strip().splitlines()) == 1
    finally:
        engine.stop()
        asyncio.run(delete_topics(local_stack.bootstrap_servers, [topic]))
        bench = load_bench()
        asyncio.run(bench.delete_prefix(bench.stack_config(local_stack, tmp_path, "embedded",
                                                           prefix)))
    assert "Traceback" not in engine.log_text(), engine.log_tail()
