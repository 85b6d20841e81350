"""Acknowledged votes survive SIGKILL of the whole server, and nobody is counted twice.

About 32 concurrent senders cast votes, each voter id used once, while the server's whole
process group is SIGKILLed several times with requests in flight and restarted on the same
data dir and port. Each answer is kept per voter: 201 (acknowledged, receipt kept),
503 `wal-unavailable` / `not-ready` or a refused connection (nothing counted), 503
`outcome-unknown` or a broken connection / timeout (unknown). After the last restart:
- every acknowledged voter is in the log exactly once: re-sending its vote answers 409
  `already-voted` with the very receipt string of the original 201;
- re-sending each unknown voter's vote tells whether the log holds it (409) or not (201),
  and the results total before those re-sends equals acknowledged + unknown-but-held,
  option by option;
- voters that were told nothing was counted are not counted: re-sending answers 201.
Runs with one worker and with two (votes forwarded between workers). The seed is printed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support import http_client
from tests.support.engine_process import EngineProcess
from tests.support.http_client import ValidatingAsyncClient
from tests.support.vote_client import (
    ACKED,
    NOT_COUNTED,
    UNEXPECTED,
    UNKNOWN,
    Answer,
    RequestProgress,
    by_kind,
    check_resent_votes,
    on_the_wire,
    open_poll,
    post_vote,
    resend_all,
    seeded_rng,
)

POLL = "crash"
OPTIONS = ["red", "green", "blue"]
SENDERS = 32
KILLS = 4
VOTERS = 8_000
FIRST_VOTER = 1
# Before each kill the restarted server must have acknowledged this many new votes, then a
# random pause in this range picks the moment.
ACKS_BEFORE_KILL = 100
KILL_DELAY_S = (0.05, 0.6)
ACKS_WAIT_S = 15.0
REQUEST_TIMEOUT_S = 10.0
# After an answer that says nothing was stored, a sender pauses so a down server does not
# burn through the voter ids.
BACKOFF_S = 0.05
REFUSED_BACKOFF_S = 0.2
# How long to wait, at a chosen kill moment, for a request that is on the wire.
ON_THE_WIRE_WAIT_S = 5.0
CAMPAIGN_S_MAX = 90.0

# A 503 with one of these problem types stored nothing (a refused connection neither).
NOT_COUNTED_PROBLEMS = ("/problems/wal-unavailable", "/problems/not-ready")


@dataclass
class Campaign:
    server: EngineProcess
    tokens: list[str]
    rng: random.Random
    answers: dict[int, Answer] = field(default_factory=dict)
    in_flight: dict[int, RequestProgress] = field(default_factory=dict)
    acked_total: int = 0
    stopping: bool = False
    next_index: int = 0
    in_flight_at_kill: list[int] = field(default_factory=list)
    on_the_wire_at_kill: list[int] = field(default_factory=list)
    ready_after_kill_s: list[float] = field(default_factory=list)

    def next_voter(self) -> int | None:
        if self.next_index >= len(self.tokens):
            return None
        self.next_index += 1
        return FIRST_VOTER + self.next_index - 1

    async def sender(self, client: httpx.AsyncClient) -> None:
        while not self.stopping:
            voter = self.next_voter()
            if voter is None:
                return
            option = self.rng.choice(OPTIONS)
            answer = await self.send(client, voter, option)
            self.answers[voter] = answer
            if answer.kind == ACKED:
                self.acked_total += 1
            elif answer.detail.startswith("refused"):
                await asyncio.sleep(REFUSED_BACKOFF_S)
            else:
                await asyncio.sleep(BACKOFF_S)

    async def send(self, client: httpx.AsyncClient, voter: int, option: str) -> Answer:
        return await post_vote(client, f"/v1/polls/{POLL}/votes",
                               self.tokens[voter - FIRST_VOTER], option, voter=voter,
                               in_flight=self.in_flight, not_counted_problems=NOT_COUNTED_PROBLEMS)

    def on_the_wire(self) -> int:
        return on_the_wire(self.in_flight)

    async def kill_with_requests_on_the_wire(self) -> None:
        deadline = time.monotonic() + ON_THE_WIRE_WAIT_S
        while not self.on_the_wire() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        # No await between counting and the kill: the counts are exact at the kill.
        self.in_flight_at_kill.append(len(self.in_flight))
        self.on_the_wire_at_kill.append(self.on_the_wire())
        self.server.kill()

    async def wait_for_acks(self, count: int) -> None:
        target = self.acked_total + count
        deadline = time.monotonic() + ACKS_WAIT_S
        while self.acked_total < target:
            if time.monotonic() > deadline:
                pytest.fail(f"only {self.acked_total} of {target} acks within {ACKS_WAIT_S} s; "
                            f"answers so far: {Counter(a.detail for a in self.answers.values())}; "
                            f"log:\n{self.server.log_tail()}")
            if self.next_index >= len(self.tokens):
                pytest.fail(f"ran out of the {len(self.tokens)} voter tokens before the kills")
            await asyncio.sleep(0.01)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=SENDERS, max_keepalive_connections=SENDERS)
        async with ValidatingAsyncClient(base_url=self.server.base_url, limits=limits,
                                         timeout=REQUEST_TIMEOUT_S) as client:
            senders = [asyncio.create_task(self.sender(client)) for _ in range(SENDERS)]
            try:
                for _ in range(KILLS):
                    await self.wait_for_acks(ACKS_BEFORE_KILL)
                    await asyncio.sleep(self.rng.uniform(*KILL_DELAY_S))
                    await self.kill_with_requests_on_the_wire()
                    self.server.start()
                    self.ready_after_kill_s.append(await self.server.wait_ready_async())
                # The recovered server keeps taking votes before the checks.
                await self.wait_for_acks(ACKS_BEFORE_KILL)
            finally:
                self.stopping = True
                await asyncio.gather(*senders)


@pytest.mark.parametrize("workers", [1, 2])
def test_acknowledged_votes_survive_sigkill_and_none_counts_twice(tmp_path: Path,
                                                                  workers: int) -> None:
    rng = seeded_rng(f"[crash-recovery workers={workers}]")
    server = EngineProcess(tmp_path / "data", tmp_path / "server.log", workers=workers)
    try:
        server.start()
        server.wait_ready()
        tokens = open_poll(server, POLL, OPTIONS, first_voter=FIRST_VOTER, voters=VOTERS,
                           timeout_s=REQUEST_TIMEOUT_S)

        campaign = Campaign(server, tokens, rng)
        started = time.monotonic()
        asyncio.run(asyncio.wait_for(campaign.run(), CAMPAIGN_S_MAX))
        campaign_s = time.monotonic() - started
        server.wait_ready()
        check_outcomes(server, tokens, campaign, workers, campaign_s)
        assert "Traceback" not in server.log_text(), server.log_tail()
    finally:
        server.kill()


def check_outcomes(server: EngineProcess, tokens: list[str], campaign: Campaign, workers: int,
                   campaign_s: float) -> None:
    label = f"[crash-recovery workers={workers}]"
    kinds = by_kind(campaign.answers)
    acked, unknown, not_counted = kinds[ACKED], kinds[UNKNOWN], kinds[NOT_COUNTED]
    print(f"{label} {campaign_s:.1f} s, kills={len(campaign.in_flight_at_kill)}, in flight at "
          f"each kill={campaign.in_flight_at_kill} (written to the socket: "
          f"{campaign.on_the_wire_at_kill}), ready after kill (s)="
          f"{[round(s, 2) for s in campaign.ready_after_kill_s]}, sent={len(campaign.answers)}, "
          f"acked={len(acked)}, unknown={len(unknown)}, not counted={len(not_counted)}; "
          f"answers: {dict(Counter(answer.detail for answer in campaign.answers.values()))}")
    assert not kinds[UNEXPECTED], f"unexpected answers: {list(kinds[UNEXPECTED].items())[:10]}"
    assert len(campaign.in_flight_at_kill) >= 3
    assert all(count > 0 for count in campaign.on_the_wire_at_kill), campaign.on_the_wire_at_kill

    def results() -> dict:
        answer = http_client.get(f"{server.base_url}/v1/polls/{POLL}/results",
                                 timeout=REQUEST_TIMEOUT_S)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def resend(answers: dict[int, Answer]) -> dict[int, httpx.Response]:
        votes = {voter: answer.option for voter, answer in answers.items()}
        return asyncio.run(resend_all(server.base_url, POLL, tokens, votes,
                                      first_voter=FIRST_VOTER, concurrency=SENDERS,
                                      timeout_s=REQUEST_TIMEOUT_S))

    before = results()
    held = check_resent_votes(before, kinds, resend, OPTIONS, label)

    accepted_now = len(not_counted) + len(unknown) - len(held)
    assert results()["total"] == before["total"] + accepted_now
