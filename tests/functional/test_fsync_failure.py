"""A failing fsync of the embedded log under load: votes are refused, never lost, and the
server recovers by itself once the disk is healthy.

The engine's data dir is on the power-loss filesystem (tests/support/powerloss), which fails
exactly the calls it is told to, on the shards' log segments only (`/wal/`):
- EIO on one fsync: the append is rolled back (shards/segment_log.py truncates to the durable
  end and fsyncs that) and the vote answers 503 `wal-unavailable`;
- EIO on one fsync and on the truncate that follows: 503 `outcome-unknown`;
- a burst of EIO on fsync while concurrent senders vote: every answer is 201, 503
  `wal-unavailable` or 503 `outcome-unknown`;
- after each fault, with the disk healthy, votes answer 201 again without a restart.
Every answer goes through the validating client (the OpenAPI document). Then, with the
engine stopped, an offline recount of the logs (replay/recount.py) holds every acknowledged
vote with its receipt's option, no vote answered `wal-unavailable`, and only votes that were
answered at all; and after a restart acknowledged votes re-sent answer 409 with their
receipt while `wal-unavailable` ones are accepted as new votes (201).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx

from engine.receipts import decode_receipt
from tests.support.disk_count import counted_on_disk
from tests.support.engine_process import EngineProcess
from tests.support.http_client import ValidatingAsyncClient, ValidatingClient
from tests.support.powerloss import PowerLossFilesystem, mounted
from tests.support.vote_client import (
    ACKED,
    ALREADY_VOTED,
    NOT_COUNTED,
    UNKNOWN,
    Answer,
    bearer,
    by_kind,
    classify,
    open_poll,
    post_vote,
    problem_type,
)

POLL = "fsync"
OPTIONS = ["yes", "no"]
VOTERS = 1_200
FIRST_VOTER = 1
SENDERS = 12
LOAD_VOTES = 600
FSYNC_FAILURES_UNDER_LOAD = 12
HEALTHY_VOTES = 40
REQUEST_TIMEOUT_S = 10.0
WAL_UNAVAILABLE = "/problems/wal-unavailable"
OUTCOME_UNKNOWN = "/problems/outcome-unknown"
SEGMENTS = "/wal/"


class Voting:
    """Hands out voter ids once each and keeps every answer."""

    def __init__(self, engine: EngineProcess, tokens: list[str]) -> None:
        self.engine = engine
        self.tokens = tokens
        self.answers: dict[int, Answer] = {}
        self.next_voter = FIRST_VOTER
        self.client = ValidatingClient(base_url=engine.base_url, timeout=REQUEST_TIMEOUT_S)

    def take(self) -> int:
        voter = self.next_voter
        self.next_voter += 1
        return voter

    def vote(self) -> Answer:
        voter = self.take()
        option = OPTIONS[voter % len(OPTIONS)]
        response = self.client.post(f"/v1/polls/{POLL}/votes", json={"option": option},
                                    headers=bearer(self.tokens[voter - FIRST_VOTER]))
        self.answers[voter] = classify(response, option, (WAL_UNAVAILABLE,))
        return self.answers[voter]

    def healthy_votes(self, count: int) -> None:
        details = [self.vote().detail for _ in range(count)]
        assert details == ["201"] * count, Counter(details)

    async def load(self, disk: PowerLossFilesystem) -> None:
        limits = httpx.Limits(max_connections=SENDERS, max_keepalive_connections=SENDERS)
        last = self.next_voter + LOAD_VOTES
        async with ValidatingAsyncClient(base_url=self.engine.base_url, limits=limits,
                                         timeout=REQUEST_TIMEOUT_S) as client:

            async def sender() -> None:
                while self.next_voter < last:
                    voter = self.take()
                    option = OPTIONS[voter % len(OPTIONS)]
                    self.answers[voter] = await post_vote(
                        client, f"/v1/polls/{POLL}/votes", self.tokens[voter - FIRST_VOTER],
                        option, voter=voter, in_flight={}, not_counted_problems=(WAL_UNAVAILABLE,))
                    if voter == last - LOAD_VOTES * 2 // 3:
                        disk.fail_fsync(FSYNC_FAILURES_UNDER_LOAD, path_contains=SEGMENTS)

            await asyncio.gather(*(sender() for _ in range(SENDERS)))


def test_fsync_failures_refuse_votes_lose_none_and_heal_without_a_restart(tmp_path: Path) -> None:
    with mounted(tmp_path / "powerloss") as disk:
        engine = EngineProcess(disk.mount_point / "data", tmp_path / "server.log", workers=1)
        try:
            engine.start()
            engine.wait_ready()
            tokens = open_poll(engine, POLL, OPTIONS, first_voter=FIRST_VOTER, voters=VOTERS,
                               timeout_s=REQUEST_TIMEOUT_S)
            voting = Voting(engine, tokens)
            voting.healthy_votes(HEALTHY_VOTES)

            disk.fail_fsync(1, path_contains=SEGMENTS)
            assert voting.vote().detail == f"503 {WAL_UNAVAILABLE}"
            voting.healthy_votes(HEALTHY_VOTES)

            disk.fail_fsync(1, path_contains=SEGMENTS)
            disk.fail_truncate(1, path_contains=SEGMENTS)
            assert voting.vote().detail == f"503 {OUTCOME_UNKNOWN}"
            voting.healthy_votes(HEALTHY_VOTES)  # the next append truncates first, then goes on

            asyncio.run(voting.load(disk))
            disk.heal()
            load_answers = Counter(answer.detail for answer in list(voting.answers.values())[
                -LOAD_VOTES:])
            print(f"[fsync-failure] answers under load: {dict(load_answers)}; disk {disk.stats()}")
            assert set(load_answers) <= {"201", f"503 {WAL_UNAVAILABLE}", f"503 {OUTCOME_UNKNOWN}"}
            refused = (load_answers[f"503 {WAL_UNAVAILABLE}"]
                       + load_answers[f"503 {OUTCOME_UNKNOWN}"])
            assert refused > 0, load_answers
            voting.healthy_votes(HEALTHY_VOTES)
            assert disk.stats()["fsyncs_failed"] >= 2 + FSYNC_FAILURES_UNDER_LOAD
            check_nothing_acknowledged_is_lost(engine, voting)
        finally:
            engine.kill()


def check_nothing_acknowledged_is_lost(engine: EngineProcess, voting: Voting) -> None:
    kinds = by_kind(voting.answers)
    acked, unknown, refused = kinds[ACKED], kinds[UNKNOWN], kinds[NOT_COUNTED]
    live = voting.client.get(f"/v1/polls/{POLL}/results").json()
    voting.client.close()
    assert engine.stop() is not None
    counted = asyncio.run(counted_on_disk(engine.data_dir, POLL))
    for voter, answer in acked.items():
        assert counted.get(voter) == decode_receipt(answer.receipt).option, voter
    assert not set(counted) & set(refused), "votes answered wal-unavailable were counted"
    assert set(counted) <= set(acked) | set(unknown)
    assert live["total"] == len(counted)
    print(f"[fsync-failure] acked={len(acked)} wal-unavailable={len(refused)} unknown="
          f"{len(unknown)} (held by the log: {len(set(counted) & set(unknown))})")

    engine.start()
    engine.wait_ready()
    with ValidatingClient(base_url=engine.base_url, timeout=REQUEST_TIMEOUT_S) as client:
        for voter, answer in list(acked.items())[:HEALTHY_VOTES]:
            again = client.post(f"/v1/polls/{POLL}/votes", json={"option": answer.option},
                                headers=bearer(voting.tokens[voter - FIRST_VOTER]))
            assert again.status_code == 409 and problem_type(again) == ALREADY_VOTED
            assert again.json()["receipt"]["receipt"] == answer.receipt
        for voter, answer in refused.items():
            again = client.post(f"/v1/polls/{POLL}/votes", json={"option": answer.option},
                                headers=bearer(voting.tokens[voter - FIRST_VOTER]))
            assert again.status_code == 201, (voter, again.text)
    assert "Traceback" not in engine.log_text(), engine.log_tail()
