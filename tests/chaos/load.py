"""The chaos load client: sends votes while faults fire and writes down what each answer said.

Every request ends in exactly one outcome, which is all the checker may rely on:
- ACKNOWLEDGED: 201 with a receipt: the vote is durable and must be counted, once;
- DUPLICATE: 409 `already-voted`: the log holds a vote of this voter, which must be counted;
- REJECTED: any other 4xx: refused before the log, never counted by this request;
- FAILED: 503 `wal-unavailable`, `not-ready` or `overloaded`, or a refused connection (not
  one byte reached the engine): nothing was counted by this request;
- UNKNOWN: 503 `outcome-unknown`, a timeout, or a connection broken after it was made: the
  vote may or may not be in the log, and is counted at most once;
- UNEXPECTED: a 5xx the contract does not allow (500, 502...): a defect in itself.

The client keeps `concurrency` requests open (closed loop), optionally paced to `rate_per_s`.
Each request picks, in this order of chance: a repeat of an acknowledged voter
(`repeat_share`, expects 409), a retry of a voter whose last answer was FAILED or UNKNOWN
(`retry_share`, as a real voter's app would retry), or the next fresh voter. A voter always
sends the same option. `in_flight` is the number of requests sent and not yet answered; the
fault log reads it when a fault fires.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

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
    detail: str = ""


def classify(status: int, problem: str) -> str:
    if status == 201:
        return ACKNOWLEDGED
    if status == 409 and problem == ALREADY_VOTED_PROBLEM:
        return DUPLICATE
    if status == 503 and problem in NOTHING_STORED_PROBLEMS:
        return FAILED
    if status == 503 and problem == OUTCOME_UNKNOWN_PROBLEM:
        return UNKNOWN
    if 400 <= status < 500:
        return REJECTED
    return UNEXPECTED


def _problem_of(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("type", "")) if isinstance(body, dict) else ""


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
        self._client: httpx.AsyncClient | None = None
        self._next_send_s = 0.0
        self.exhausted = False

    def option_of(self, voter: int) -> str:
        return self.options[voter % len(self.options)]

    # Life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * len(self.targets),
                              max_keepalive_connections=self.concurrency * len(self.targets))
        timeout = httpx.Timeout(self.request_timeout_s, connect=CONNECT_TIMEOUT_S)
        self._client = httpx.AsyncClient(limits=limits, timeout=timeout)
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
        else:
            problem = _problem_of(response)
            request.status = response.status_code
            request.outcome = classify(response.status_code, problem)
            request.detail = f"{response.status_code} {problem}".strip()
            if request.outcome == UNEXPECTED:
                request.detail += f" {response.text[:200]}"
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
