"""The chaos load client: sends votes while faults fire and writes down what each answer said.

Every request ends in exactly one outcome, which is all the checker may rely on:
- ACKNOWLEDGED: 201 with a receipt: the vote is durable and must be counted, once;
- DUPLICATE: 409 `already-voted` with the original receipt: the log holds a vote of this
  voter, which must be counted;
- REJECTED: a 4xx this load can legitimately get besides the 409 (EXPECTED_REJECTIONS, by
  status and problem type): refused before the log, never counted by this request;
- FAILED: 503 `wal-unavailable`, `not-ready` or `overloaded`, or a refused connection (not
  one byte reached the engine): nothing was counted by this request;
- UNKNOWN: 503 `outcome-unknown`, a timeout, or a connection broken after it was made: the
  vote may or may not be in the log, and is counted at most once;
- UNEXPECTED: a defect in itself: a 5xx the contract does not allow (500, 502...), any 4xx
  not listed above (a 404 `poll-not-found`, a 401, a 422, a 400... during a fault), or a
  response that breaks the OpenAPI document (engine/openapi.yaml; every response is
  validated by tests/support/http_client.ValidatingAsyncClient).

4xx are classified by the problem type (the `type` of the problem+json body, engine/errors.py),
not by status alone: a 409 `poll-exists` is not a duplicate vote.

Receipts are kept: `Request.receipt` is the 201 body (VoteReceipt) or the `receipt` of a 409
(the original receipt), so the checker can verify each offline and hold each 409's against
its voter's 201.

The client keeps `concurrency` requests open (closed loop), optionally paced to `rate_per_s`.
Each request picks, in this order of chance: a repeat of an acknowledged voter
(`repeat_share`, expects 409), a retry of a voter whose last answer was FAILED or UNKNOWN
(`retry_share`, as a real voter's app would retry), or the next fresh voter. A voter always
sends the same option, and never has two requests open at once except repeats after its
acknowledgement. `in_flight` is the number of requests sent and not yet answered; the fault
log reads it when a fault fires.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from tests.support.http_client import ValidatingAsyncClient

ACKNOWLEDGED = "acknowledged"
DUPLICATE = "duplicate"
REJECTED = "rejected"
FAILED = "failed"
UNKNOWN = "unknown"
UNEXPECTED = "unexpected"
OUTCOMES = (ACKNOWLEDGED, DUPLICATE, REJECTED, FAILED, UNKNOWN, UNEXPECTED)

NOTHING_STORED_PROBLEMS = frozenset({"/problems/wal-unavailable", "/problems/not-ready",
                                     "/problems/overloaded"})
OUTCOME_UNKNOWN_PROBLEM = "/problems/outcome-unknown"
ALREADY_VOTED_PROBLEM = "/problems/already-voted"
# The 4xx (status, problem type) a vote of this load may legitimately get, other than the 409
# `already-voted` of a repeat or of a retry after an unknown outcome: none. Every vote carries
# a valid, unexpired token bound to the run's poll (minted for an hour, runs last minutes),
# names one of the poll's options in a well-formed body, and the poll is open and never
# closed during a run; rate limits (429) and proof-of-work challenges (428) are reserved in
# the contract and not enforced by the engine. So a 404, 401, 403, 422, 400... is a defect.
EXPECTED_REJECTIONS: frozenset[tuple[int, str]] = frozenset()
CONTRACT_DETAIL_CHARS_MAX = 600
# Bounded: a stalled engine must not stall the client beyond this per request.
REQUEST_TIMEOUT_S = 8.0
CONNECT_TIMEOUT_S = 2.0
# How long `stop` waits for open requests (each is bounded by REQUEST_TIMEOUT_S anyway).
DRAIN_WAIT_S = REQUEST_TIMEOUT_S + 4.0


@dataclass(slots=True)
class Request:
    voter: int
    option: str
    target: str
    started_s: float  # monotonic
    ended_s: float = 0.0
    outcome: str = UNKNOWN
    status: int | None = None
    problem: str = ""  # the problem+json `type` of a 4xx/5xx answer
    detail: str = ""
    # The 201 body, or the `receipt` (the original 201 body) of a 409; None otherwise.
    receipt: dict | None = None


def classify(status: int, problem: str) -> str:
    if status == 201:
        return ACKNOWLEDGED
    if status == 409 and problem == ALREADY_VOTED_PROBLEM:
        return DUPLICATE
    if status == 503 and problem in NOTHING_STORED_PROBLEMS:
        return FAILED
    if status == 503 and problem == OUTCOME_UNKNOWN_PROBLEM:
        return UNKNOWN
    if (status, problem) in EXPECTED_REJECTIONS:
        return REJECTED
    return UNEXPECTED


def _body_of(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def record_answer(request: Request, status: int, body: dict) -> None:
    """Fill `request` from an answer that passed the contract check."""
    problem = str(body.get("type", "")) if status != 201 else ""
    request.status = status
    request.problem = problem
    request.outcome = classify(status, problem)
    request.detail = f"{status} {problem}".strip()
    if request.outcome == ACKNOWLEDGED:
        request.receipt = body
    elif request.outcome == DUPLICATE:
        receipt = body.get("receipt")
        request.receipt = receipt if isinstance(receipt, dict) else None
    elif request.outcome == UNEXPECTED:
        request.detail += f" {str(body)[:200]}"


@dataclass
class Ledger:
    """Every request the client made, in the order they ended."""

    requests: list[Request] = field(default_factory=list)

    def outcome_counts(self) -> Counter:
        return Counter(request.outcome for request in self.requests)

    def by_voter(self) -> dict[int, list[Request]]:
        voters: dict[int, list[Request]] = {}
        for request in self.requests:
            voters.setdefault(request.voter, []).append(request)
        return voters

    def acknowledged_between(self, start_s: float, end_s: float) -> list[Request]:
        """201s for requests that started in [start_s, end_s) (monotonic clock)."""
        return [request for request in self.requests if request.outcome == ACKNOWLEDGED
                and start_s <= request.started_s < end_s]


class LoadClient:
    def __init__(self, targets: Sequence[str], poll: str, options: Sequence[str],
                 tokens: dict[int, str], *, concurrency: int = 16,
                 rate_per_s: float | None = None, repeat_share: float = 0.05,
                 retry_share: float = 0.3, rng: random.Random | None = None,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        if not targets or not tokens:
            raise ValueError("the load client needs at least one target and one token")
        self.targets = list(targets)
        self.poll = poll
        self.options = list(options)
        self.tokens = tokens
        self.concurrency = concurrency
        self.rate_per_s = rate_per_s
        self.repeat_share = repeat_share
        self.retry_share = retry_share
        self.rng = rng or random.Random()
        self.request_timeout_s = request_timeout_s
        self.ledger = Ledger()
        self.in_flight = 0
        self._fresh = iter(sorted(tokens))
        self._acknowledged: list[int] = []
        self._retryable: dict[int, None] = {}  # insertion-ordered set
        self._last_outcome: dict[int, str] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._client: ValidatingAsyncClient | None = None
        self._next_send_s = 0.0
        self.exhausted = False

    def option_of(self, voter: int) -> str:
        return self.options[voter % len(self.options)]

    # Life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * len(self.targets),
                              max_keepalive_connections=self.concurrency * len(self.targets))
        timeout = httpx.Timeout(self.request_timeout_s, connect=CONNECT_TIMEOUT_S)
        self._client = ValidatingAsyncClient(limits=limits, timeout=timeout)
        self._next_send_s = time.monotonic()
        self._tasks = [asyncio.create_task(self._worker(), name=f"load-{index}")
                       for index in range(self.concurrency)]

    async def stop(self) -> None:
        """Stop sending, wait (bounded) for every open request to end, close the client."""
        self._stop.set()
        done, pending = await asyncio.wait(self._tasks, timeout=DRAIN_WAIT_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                raise task.exception()
        if self._client is not None:
            await self._client.aclose()
        if pending:
            raise RuntimeError(f"{len(pending)} load workers did not finish within "
                               f"{DRAIN_WAIT_S} s after stop")

    async def wait_for_in_flight(self, timeout_s: float) -> int:
        """Wait until at least one request is open (bounded); return how many are."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        return self.in_flight

    async def wait_for_requests(self, count: int, timeout_s: float) -> bool:
        """Wait until `count` more requests have ended (bounded); True if they did."""
        target = len(self.ledger.requests) + count
        deadline = time.monotonic() + timeout_s
        while len(self.ledger.requests) < target and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return len(self.ledger.requests) >= target

    # Sending -------------------------------------------------------------------------------

    def _pick_voter(self) -> int | None:
        draw = self.rng.random()
        if draw < self.repeat_share and self._acknowledged:
            return self.rng.choice(self._acknowledged)
        if draw < self.repeat_share + self.retry_share and self._retryable:
            voter = next(iter(self._retryable))
            del self._retryable[voter]
            return voter
        voter = next(self._fresh, None)
        if voter is None:
            self.exhausted = True
        return voter

    async def _pace(self) -> None:
        if not self.rate_per_s:
            return
        now = time.monotonic()
        send_at = max(self._next_send_s, now)
        self._next_send_s = send_at + 1.0 / self.rate_per_s
        if send_at > now:
            await asyncio.sleep(send_at - now)

    async def _worker(self) -> None:
        while not self._stop.is_set():
            await self._pace()
            if self._stop.is_set():
                return
            voter = self._pick_voter()
            if voter is None:
                return
            await self._send(voter)

    async def _send(self, voter: int) -> None:
        option = self.option_of(voter)
        target = self.rng.choice(self.targets)
        request = Request(voter, option, target, time.monotonic())
        self.in_flight += 1
        try:
            response = await self._client.post(
                f"{target}/v1/polls/{self.poll}/votes", json={"option": option},
                headers={"Authorization": f"Bearer {self.tokens[voter]}"})
        except httpx.ConnectError as error:
            request.outcome, request.detail = FAILED, f"refused: {type(error).__name__}"
        except httpx.TransportError as error:
            request.outcome, request.detail = UNKNOWN, f"transport: {type(error).__name__}"
        except AssertionError as error:
            # ValidatingAsyncClient: the answer breaks engine/openapi.yaml. A defect of the
            # run (the checker fails on UNEXPECTED), not a crash of this worker.
            request.outcome = UNEXPECTED
            request.detail = f"contract violation: {error}"[:CONTRACT_DETAIL_CHARS_MAX]
        else:
            record_answer(request, response.status_code, _body_of(response))
        finally:
            self.in_flight -= 1
        request.ended_s = time.monotonic()
        self.ledger.requests.append(request)
        self._remember(voter, request.outcome)

    def _remember(self, voter: int, outcome: str) -> None:
        previous = self._last_outcome.get(voter)
        self._last_outcome[voter] = outcome
        if outcome in (ACKNOWLEDGED, DUPLICATE):
            if previous not in (ACKNOWLEDGED, DUPLICATE):
                self._acknowledged.append(voter)
            self._retryable.pop(voter, None)
        elif outcome in (FAILED, UNKNOWN) and previous not in (ACKNOWLEDGED, DUPLICATE):
            self._retryable[voter] = None
