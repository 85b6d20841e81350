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
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from serverproc import ServerProcess, votes_cli

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

ACKED = "acked"
UNKNOWN = "unknown"
NOT_COUNTED = "not-counted"  # wal-unavailable, not-ready, connection refused
UNEXPECTED = "unexpected"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def problem_type(response: httpx.Response) -> str:
    try:
        return str(response.json().get("type", ""))
    except ValueError:
        return ""


@dataclass
class Answer:
    kind: str
    option: str
    detail: str
    receipt: str | None = None


class RequestProgress:
    """An httpcore trace hook: `sent` once the whole request was written to the socket."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False

    async def __call__(self, event: str, info: dict) -> None:
        if event == "http11.send_request_body.complete":
            self.sent = True


@dataclass
class Campaign:
    server: ServerProcess
    tokens: list[str]
    rng: random.Random
    answers: dict[int, Answer] = field(default_factory=dict)
    in_flight: set[RequestProgress] = field(default_factory=set)
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
        progress = RequestProgress()
        self.in_flight.add(progress)
        try:
            response = await client.post(f"/v1/polls/{POLL}/votes", json={"option": option},
                                         headers=bearer(self.tokens[voter - FIRST_VOTER]),
                                         extensions={"trace": progress})
        except httpx.ConnectError as error:
            # connect() failed: not one byte of the request reached the server.
            return Answer(NOT_COUNTED, option, f"refused: {type(error).__name__}")
        except httpx.TransportError as error:
            return Answer(UNKNOWN, option, f"transport: {type(error).__name__}")
        finally:
            self.in_flight.discard(progress)
        return classify(response, option)

    def on_the_wire(self) -> int:
        return sum(progress.sent for progress in self.in_flight)

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
        async with httpx.AsyncClient(base_url=self.server.base_url, limits=limits,
                                     timeout=REQUEST_TIMEOUT_S) as client, \
                httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as probe:
            senders = [asyncio.create_task(self.sender(client)) for _ in range(SENDERS)]
            try:
                for _ in range(KILLS):
                    await self.wait_for_acks(ACKS_BEFORE_KILL)
                    await asyncio.sleep(self.rng.uniform(*KILL_DELAY_S))
                    await self.kill_with_requests_on_the_wire()
                    self.server.start()
                    self.ready_after_kill_s.append(await self.server.wait_ready_async(probe))
                # The recovered server keeps taking votes before the checks.
                await self.wait_for_acks(ACKS_BEFORE_KILL)
            finally:
                self.stopping = True
                await asyncio.gather(*senders)


def classify(response: httpx.Response, option: str) -> Answer:
    kind_of_problem = problem_type(response)
    detail = f"{response.status_code} {kind_of_problem}".strip()
    if response.status_code == 201:
        return Answer(ACKED, option, detail, receipt=response.json()["receipt"])
    if response.status_code == 503 and kind_of_problem in ("/problems/wal-unavailable",
                                                           "/problems/not-ready"):
        return Answer(NOT_COUNTED, option, detail)
    if response.status_code == 503 and kind_of_problem == "/problems/outcome-unknown":
        return Answer(UNKNOWN, option, detail)
    return Answer(UNEXPECTED, option, f"{detail} {response.text[:300]}")


async def resend_all(base_url: str, tokens: list[str],
                     votes: dict[int, str]) -> dict[int, httpx.Response]:
    """Send each voter's vote once more (same option), SENDERS at a time."""
    slots = asyncio.Semaphore(SENDERS)
    responses: dict[int, httpx.Response] = {}
    limits = httpx.Limits(max_connections=SENDERS, max_keepalive_connections=SENDERS)
    async with httpx.AsyncClient(base_url=base_url, limits=limits,
                                 timeout=REQUEST_TIMEOUT_S) as client:

        async def resend(voter: int, option: str) -> None:
            async with slots:
                responses[voter] = await client.post(
                    f"/v1/polls/{POLL}/votes", json={"option": option},
                    headers=bearer(tokens[voter - FIRST_VOTER]))

        await asyncio.gather(*(resend(voter, option) for voter, option in votes.items()))
    return responses


@pytest.mark.parametrize("workers", [1, 2])
def test_acknowledged_votes_survive_sigkill_and_none_counts_twice(tmp_path: Path,
                                                                  workers: int) -> None:
    seed = int(os.environ.get("VOTES_TEST_SEED", random.randrange(2**32)))
    print(f"\n[crash-recovery workers={workers}] seed={seed} (set VOTES_TEST_SEED to repeat)")
    rng = random.Random(seed)
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log", workers=workers)
    try:
        server.start()
        server.wait_ready()
        admin = votes_cli("admin-token", "--data-dir", str(server.data_dir)).strip()
        created = httpx.post(server.base_url + "/v1/polls", headers=bearer(admin),
                             json={"id": POLL, "options": OPTIONS}, timeout=REQUEST_TIMEOUT_S)
        assert created.status_code == 201, created.text
        tokens = votes_cli("token", "--data-dir", str(server.data_dir), "--voter", str(FIRST_VOTER),
                           "--count", str(VOTERS)).split()
        assert len(tokens) == VOTERS

        campaign = Campaign(server, tokens, rng)
        started = time.monotonic()
        asyncio.run(asyncio.wait_for(campaign.run(), CAMPAIGN_S_MAX))
        campaign_s = time.monotonic() - started
        server.wait_ready()
        check_outcomes(server, tokens, campaign, workers, campaign_s)
        assert "Traceback" not in server.log_text(), server.log_tail()
    finally:
        server.kill()


def check_outcomes(server: ServerProcess, tokens: list[str], campaign: Campaign, workers: int,
                   campaign_s: float) -> None:
    label = f"[crash-recovery workers={workers}]"
    by_kind: dict[str, dict[int, Answer]] = {kind: {} for kind in
                                             (ACKED, UNKNOWN, NOT_COUNTED, UNEXPECTED)}
    for voter, answer in campaign.answers.items():
        by_kind[answer.kind][voter] = answer
    acked, unknown, not_counted = by_kind[ACKED], by_kind[UNKNOWN], by_kind[NOT_COUNTED]
    print(f"{label} {campaign_s:.1f} s, kills={len(campaign.in_flight_at_kill)}, in flight at "
          f"each kill={campaign.in_flight_at_kill} (written to the socket: "
          f"{campaign.on_the_wire_at_kill}), ready after kill (s)="
          f"{[round(s, 2) for s in campaign.ready_after_kill_s]}, sent={len(campaign.answers)}, "
          f"acked={len(acked)}, unknown={len(unknown)}, not counted={len(not_counted)}; "
          f"answers: {dict(Counter(answer.detail for answer in campaign.answers.values()))}")
    assert not by_kind[UNEXPECTED], f"unexpected answers: {list(by_kind[UNEXPECTED].items())[:10]}"
    assert len(campaign.in_flight_at_kill) >= 3
    assert all(count > 0 for count in campaign.on_the_wire_at_kill), campaign.on_the_wire_at_kill

    def results() -> dict:
        answer = httpx.get(f"{server.base_url}/v1/polls/{POLL}/results", timeout=REQUEST_TIMEOUT_S)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def resend(answers: dict[int, Answer]) -> dict[int, httpx.Response]:
        votes = {voter: answer.option for voter, answer in answers.items()}
        return asyncio.run(resend_all(server.base_url, tokens, votes))

    before = results()

    # Each acknowledged vote is in the log once: a repeat gets the original receipt back.
    wrong = {voter: (response.status_code, response.text[:300])
             for voter, response in resend(acked).items()
             if response.status_code != 409
             or problem_type(response) != "/problems/already-voted"
             or response.json()["receipt"]["receipt"] != acked[voter].receipt}
    assert not wrong, (f"{len(wrong)} acknowledged voters did not answer 409 with their "
                       f"original receipt: {list(wrong.items())[:5]}")

    # The log has decided every unknown outcome: a repeat says which way.
    unknown_again = resend(unknown)
    held = {voter for voter, response in unknown_again.items() if response.status_code == 409}
    undecided = {voter: (response.status_code, response.text[:300])
                 for voter, response in unknown_again.items()
                 if response.status_code not in (201, 409)}
    assert not undecided, f"unknown outcomes still undecided: {list(undecided.items())[:5]}"
    print(f"{label} results total={before['total']}: acked {len(acked)} + {len(held)} of "
          f"{len(unknown)} unknown held by the log")
    assert 0 <= len(held) <= len(unknown)
    assert before["total"] == len(acked) + len(held)
    expected = Counter(answer.option for answer in acked.values())
    expected.update(unknown[voter].option for voter in held)
    assert before["counts"] == {option: expected[option] for option in OPTIONS}

    # Voters told that nothing was counted really were not: their repeat is a new vote.
    counted_anyway = {voter: (response.status_code, response.text[:200], not_counted[voter].detail)
                      for voter, response in resend(not_counted).items()
                      if response.status_code != 201}
    assert not counted_anyway, (f"{len(counted_anyway)} voters told 'not counted' were counted: "
                                f"{list(counted_anyway.items())[:5]}")

    accepted_now = len(not_counted) + len(unknown) - len(held)
    assert results()["total"] == before["total"] + accepted_now
