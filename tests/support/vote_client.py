"""Sending votes to a running engine and sorting each answer by what it tells about the count.

Every vote a client sends ends in one of these kinds:
- ACKED: 201, the vote is counted and its receipt is kept;
- NOT_COUNTED: a 503 whose problem type says nothing was stored (which types those are is the
  caller's: `classify(..., not_counted_problems)`), or a refused connection (not one byte of
  the request reached the engine);
- UNKNOWN: 503 `outcome-unknown`, or a connection broken after connecting / a timeout;
- UNEXPECTED: any other answer (a test fails on it).
A later re-send of the same vote tells which way an unknown outcome went (409: the log holds
it, 201: it did not).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

from tests.support.cli import admin_token, voter_tokens
from tests.support.http_client import ValidatingAsyncClient, post

ACKED = "acked"
UNKNOWN = "unknown"
NOT_COUNTED = "not-counted"
UNEXPECTED = "unexpected"
KINDS = (ACKED, UNKNOWN, NOT_COUNTED, UNEXPECTED)
OUTCOME_UNKNOWN = "/problems/outcome-unknown"
ALREADY_VOTED = "/problems/already-voted"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def problem_type(response: httpx.Response) -> str:
    """The problem type of an answer, or "" when it has none (or is not JSON)."""
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


def classify(response: httpx.Response, option: str,
             not_counted_problems: Iterable[str]) -> Answer:
    problem = problem_type(response)
    detail = f"{response.status_code} {problem}".strip()
    if response.status_code == 201:
        return Answer(ACKED, option, detail, receipt=response.json()["receipt"])
    if response.status_code == 503 and problem in not_counted_problems:
        return Answer(NOT_COUNTED, option, detail)
    if response.status_code == 503 and problem == OUTCOME_UNKNOWN:
        return Answer(UNKNOWN, option, detail)
    return Answer(UNEXPECTED, option, f"{detail} {response.text[:300]}")


class RequestProgress:
    """An httpcore trace hook: `sent` once the whole request was written to the socket."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False

    async def __call__(self, event: str, info: dict) -> None:
        if event == "http11.send_request_body.complete":
            self.sent = True


async def post_vote(client: httpx.AsyncClient, url: str, token: str, option: str, *,
                    voter: int, in_flight: dict[int, RequestProgress],
                    not_counted_problems: Iterable[str]) -> Answer:
    """POST one vote to `url` (its /v1/polls/{poll}/votes) and classify what comes back.
    While the request is open, `in_flight[voter]` tracks how far it got."""
    progress = RequestProgress()
    in_flight[voter] = progress
    try:
        response = await client.post(url, json={"option": option}, headers=bearer(token),
                                     extensions={"trace": progress})
    except httpx.ConnectError as error:
        # connect() failed: not one byte of the request reached the engine.
        return Answer(NOT_COUNTED, option, f"refused: {type(error).__name__}")
    except httpx.TransportError as error:
        return Answer(UNKNOWN, option, f"transport: {type(error).__name__}")
    finally:
        del in_flight[voter]
    return classify(response, option, not_counted_problems)


def on_the_wire(in_flight: dict[int, RequestProgress]) -> int:
    """How many of the open requests were written to the socket whole."""
    return sum(progress.sent for progress in in_flight.values())


def by_kind(answers: dict[int, Answer],
            voters: Iterable[int] | None = None) -> dict[str, dict[int, Answer]]:
    """The answers (of `voters` only, if given) sorted by kind: kind -> voter -> answer."""
    chosen = None if voters is None else set(voters)
    kinds: dict[str, dict[int, Answer]] = {kind: {} for kind in KINDS}
    for voter, answer in answers.items():
        if chosen is None or voter in chosen:
            kinds[answer.kind][voter] = answer
    return kinds


async def resend_all(base_url: str, poll: str, tokens: list[str], votes: dict[int, str], *,
                     first_voter: int, concurrency: int,
                     timeout_s: float) -> dict[int, httpx.Response]:
    """Send each voter's vote once more (same option), `concurrency` at a time; `tokens`
    holds the token of voter `first_voter + i` at index i."""
    slots = asyncio.Semaphore(concurrency)
    responses: dict[int, httpx.Response] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with ValidatingAsyncClient(limits=limits, timeout=timeout_s) as client:

        async def resend(voter: int, option: str) -> None:
            async with slots:
                responses[voter] = await client.post(
                    f"{base_url}/v1/polls/{poll}/votes", json={"option": option},
                    headers=bearer(tokens[voter - first_voter]))

        await asyncio.gather(*(resend(voter, option) for voter, option in votes.items()))
    return responses


def wrong_receipts(responses: dict[int, httpx.Response], acked: dict[int, Answer]) -> dict:
    """Re-sent acknowledged votes that did not answer 409 `already-voted` with the receipt
    string of the original 201: voter -> (status, start of the body)."""
    return {voter: (response.status_code, response.text[:300])
            for voter, response in responses.items()
            if response.status_code != 409
            or problem_type(response) != ALREADY_VOTED
            or response.json()["receipt"]["receipt"] != acked[voter].receipt}


def held_by_the_log(responses: dict[int, httpx.Response]) -> set[int]:
    """Voters whose re-sent vote answered 409: the log already held their vote."""
    return {voter for voter, response in responses.items() if response.status_code == 409}


def check_resent_votes(before: dict, kinds: dict[str, dict[int, Answer]],
                       resend: Callable[[dict[int, Answer]], dict[int, httpx.Response]],
                       options: list[str], label: str) -> set[int]:
    """Check a poll's results `before` (read before any re-send) against what the senders
    were told (`kinds`, from `by_kind`), re-sending votes with `resend`:
    - every acknowledged vote is in the log exactly once: its re-send answers 409
      `already-voted` with the receipt string of the original 201;
    - the log has decided every unknown outcome: its re-send answers 409 (held) or 201;
    - the total and the counts per option are the acknowledged votes + the unknown ones held;
    - no voter told that nothing was counted is counted: its re-send answers 201.
    Returns the unknown voters the log held."""
    acked, unknown, not_counted = kinds[ACKED], kinds[UNKNOWN], kinds[NOT_COUNTED]
    wrong = wrong_receipts(resend(acked), acked)
    assert not wrong, (f"{len(wrong)} of {len(acked)} acknowledged voters did not answer 409 "
                       f"with their original receipt: {list(wrong.items())[:5]}")
    unknown_again = resend(unknown)
    held = held_by_the_log(unknown_again)
    undecided = {voter: (response.status_code, response.text[:300])
                 for voter, response in unknown_again.items()
                 if response.status_code not in (201, 409)}
    assert not undecided, f"unknown outcomes still undecided: {list(undecided.items())[:5]}"
    print(f"{label} results total={before['total']}: acked {len(acked)} + {len(held)} of "
          f"{len(unknown)} unknown held by the log; not counted: {len(not_counted)}")
    assert 0 <= len(held) <= len(unknown)
    assert before["total"] == len(acked) + len(held)
    expected = Counter(answer.option for answer in acked.values())
    expected.update(unknown[voter].option for voter in held)
    assert before["counts"] == {option: expected[option] for option in options}
    counted_anyway = {voter: (response.status_code, response.text[:200], not_counted[voter].detail)
                      for voter, response in resend(not_counted).items()
                      if response.status_code != 201}
    assert not counted_anyway, (f"{len(counted_anyway)} voters told 'not counted' were counted: "
                                f"{list(counted_anyway.items())[:5]}")
    return held


def seeded_rng(label: str) -> random.Random:
    """A random.Random seeded from VOTES_TEST_SEED, or freshly; the seed is printed."""
    seed = int(os.environ.get("VOTES_TEST_SEED", random.randrange(2**32)))
    print(f"\n{label} seed={seed} (set VOTES_TEST_SEED to repeat)")
    return random.Random(seed)


def open_poll(engine, poll: str, options: list[str], *, first_voter: int, voters: int,
              timeout_s: float) -> list[str]:
    """Create `poll` at a running engine (an `EngineProcess`) with an admin token of its data
    dir, and return the tokens of voters first_voter..first_voter+voters-1, in that order."""
    admin = admin_token(engine.data_dir)
    created = post(engine.base_url + "/v1/polls", headers=bearer(admin),
                   json={"id": poll, "options": options}, timeout_s=timeout_s)
    assert created.status_code == 201, created.text
    return voter_tokens(engine.data_dir, first_voter, voters)
