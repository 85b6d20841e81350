"""The mixed phase of the attack simulation: honest voters and every bot at once.

Each class runs as its own coroutines over its own keep-alive connections
(perf/attack_http.py) until its requests run out or the window ends; every answer goes
into the Ledger (perf/attack_bots.py) with the token it was for. Everything is on one
event loop in this process, bounded by the window plus one request timeout.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from perf.attack_bots import (FLOOD_PREFIX, FORGERY_KINDS, POW_PREFIX, REUSE_PREFIX, Ledger,
                              PowBot, honest_address, prefix_address, roaming_address)
from perf.attack_http import Answer, Connection

VOTE_BODY = b'{"option":"a"}'
# A connection of the reuse bot fires its share of one token's votes back to back while the
# others do the same: the race a double-count would need.
REUSE_CONNECTIONS = 8
# An honest client solves a challenge it is asked for (the results page's solver does):
# its budget is a person's patience, not a bot's compute.
HONEST_SOLVE_BUDGET_S = 2.0
# The PoW bots vote from one address, fast, so they pass its burst and are rate limited:
# the suspicion that makes the engine raise their difficulty (engine/defences.py).
POW_ADDRESS_HOST = 7


@dataclass(frozen=True)
class Shot:
    """One vote a class sends: its token, whether the token is valid, the address claimed."""

    bot: str
    token_key: str
    token_valid: bool
    token: str
    address: str


@dataclass
class Plan:
    """The tokens of every class (minted by perf/bench_attack.py) and the run's shape."""

    honest: list[tuple[int, str]]
    stolen: list[tuple[int, str]]
    reused: list[tuple[int, str]]
    flood: list[tuple[int, str]]
    pow_tokens: list[tuple[int, str]]
    forged: list[tuple[str, str]]  # (kind, token), expired ones included
    replays_per_token: int
    votes_per_reused_token: int
    honest_per_s: float
    window_s: float
    timeout_s: float
    pow_budget_s: float
    seed: int


@dataclass
class MixedResult:
    ledger: Ledger = field(default_factory=Ledger)
    elapsed_s: dict[str, float] = field(default_factory=dict)
    honest_send_lag_ms_max: float = 0.0
    challenge_endpoint_status: int | None = None
    pow: PowBot | None = None
    honest_pow: PowBot = field(default_factory=lambda: PowBot(HONEST_SOLVE_BUDGET_S))


async def _vote(connection: Connection, poll: str, shot: Shot,
                extra: dict[str, str] | None = None) -> Answer:
    headers = {"Authorization": f"Bearer {shot.token}", "Content-Type": "application/json",
               "X-Forwarded-For": shot.address, **(extra or {})}
    return await connection.request("POST", f"/v1/polls/{poll}/votes", headers, VOTE_BODY)


async def _vote_paying(connection: Connection, poll: str, shot: Shot,
                       solver: PowBot | None) -> Answer:
    """A vote; when it answers 428 and a solver is given, the challenge in the answer is
    solved (in a thread: the bots on this loop keep sending) and the vote sent again."""
    answer = await _vote(connection, poll, shot)
    if answer.status == 428 and solver is not None:
        headers = await asyncio.to_thread(solver.solve, _challenge_of(answer))
        if headers is not None:
            answer = await _vote(connection, poll, shot, headers)
    return answer


async def _drive(port: int, poll: str, shots: Iterator[Shot], connections: int,
                 result: MixedResult, deadline: float, timeout_s: float,
                 schedule: tuple[float, float] | None = None,
                 solver: PowBot | None = None) -> None:
    """Send ``shots`` over ``connections`` in turn until they or the window run out.
    ``schedule`` (start, rate): shot i is not sent before start + i / rate (paced);
    ``solver``: pay the proof-of-work a 428 asks for."""
    loop = asyncio.get_running_loop()
    counter = iter(range(1 << 62))

    async def one_connection() -> None:
        connection = Connection(port, timeout_s)
        try:
            for shot in shots:
                index = next(counter)
                if schedule is not None:
                    due = schedule[0] + index / schedule[1]
                    if due > loop.time():
                        await asyncio.sleep(due - loop.time())
                    lag_ms = (loop.time() - due) * 1000
                    result.honest_send_lag_ms_max = max(result.honest_send_lag_ms_max, lag_ms)
                if loop.time() > deadline:
                    return
                answer = await _vote_paying(connection, poll, shot, solver)
                result.ledger.record(shot.bot, shot.token_key, shot.token_valid, answer.status)
        finally:
            connection.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))


def _shots_honest(plan: Plan) -> Iterator[Shot]:
    for index, (voter, token) in enumerate(plan.honest):
        yield Shot("honest", str(voter), True, token, honest_address(index))


def _shots_replay(plan: Plan, rng: random.Random) -> Iterator[Shot]:
    for _ in range(plan.replays_per_token):
        for voter, token in plan.stolen:
            yield Shot("replay-stolen", str(voter), True, token, roaming_address(rng))


def _shots_forged(plan: Plan, rng: random.Random) -> Iterator[Shot]:
    for index, (kind, token) in enumerate(plan.forged):
        yield Shot(f"forged-{kind}", f"forged-{index}", False, token, roaming_address(rng))


def _shots_flood(plan: Plan) -> Iterator[Shot]:
    for index, (voter, token) in enumerate(plan.flood):
        yield Shot("flood-prefix", str(voter), True, token, prefix_address(FLOOD_PREFIX, index))


async def _timed(result: MixedResult, name: str, coroutine) -> None:
    started = time.monotonic()
    await coroutine
    result.elapsed_s[name] = round(time.monotonic() - started, 3)


async def _reuse(port: int, poll: str, plan: Plan, result: MixedResult, deadline: float) -> None:
    """Each reused token: all its votes at once over REUSE_CONNECTIONS connections."""
    loop = asyncio.get_running_loop()
    for index, (voter, token) in enumerate(plan.reused):
        if loop.time() > deadline:
            return
        shot = Shot("reuse-one-token", str(voter), True, token,
                    prefix_address(REUSE_PREFIX, index))
        share = max(1, plan.votes_per_reused_token // REUSE_CONNECTIONS)
        await asyncio.gather(*(_drive(port, poll, iter([shot] * share), 1, result, deadline,
                                      plan.timeout_s) for _ in range(REUSE_CONNECTIONS)))


async def _pow(port: int, poll: str, plan: Plan, result: MixedResult, deadline: float) -> None:
    """Fresh valid tokens from one address; pay the proof-of-work whenever a vote answers
    428, at most ``plan.pow_budget_s`` of compute per challenge. First asks
    `GET /v1/challenge`: 404 there and no 428 later is "PoW not built"."""
    bot = result.pow = PowBot(plan.pow_budget_s)
    connection = Connection(port, plan.timeout_s)
    first = plan.pow_tokens[0][1] if plan.pow_tokens else ""
    try:
        probe = await connection.request("GET", f"/v1/challenge?poll={poll}",
                                         {"Authorization": f"Bearer {first}"})
        result.challenge_endpoint_status = probe.status
    finally:
        connection.close()
    address = prefix_address(POW_PREFIX, POW_ADDRESS_HOST - 1)
    shots = (Shot("pow-solver", str(voter), True, token, address)
             for voter, token in plan.pow_tokens)
    await _drive(port, poll, shots, 1, result, deadline, plan.timeout_s, solver=bot)


def _challenge_of(answer: Answer) -> dict:
    try:
        challenge = json.loads(answer.body).get("challenge")
    except (ValueError, AttributeError):
        return {}
    return challenge if isinstance(challenge, dict) else {}


async def run_mixed(port: int, poll: str, plan: Plan) -> MixedResult:
    """Every class at once for at most ``plan.window_s`` (plus one request timeout)."""
    result = MixedResult()
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + plan.window_s
    rng = random.Random(plan.seed)
    timeout_s = plan.timeout_s
    await asyncio.gather(
        _timed(result, "honest", _drive(port, poll, _shots_honest(plan), 16, result, deadline,
                                        timeout_s, (started, plan.honest_per_s),
                                        result.honest_pow)),
        _timed(result, "replay-stolen", _drive(port, poll, _shots_replay(plan, rng), 4, result,
                                               deadline, timeout_s)),
        _timed(result, "forged", _drive(port, poll, _shots_forged(plan, rng), 4, result,
                                        deadline, timeout_s)),
        _timed(result, "flood-prefix", _drive(port, poll, _shots_flood(plan), 16, result,
                                              deadline, timeout_s)),
        _timed(result, "reuse-one-token", _reuse(port, poll, plan, result, deadline)),
        _timed(result, "pow-solver", _pow(port, poll, plan, result, deadline)))
    return result


def forged_tokens(valid: list[str], expired: list[str]) -> list[tuple[str, str]]:
    """Forgeries of ``valid`` tokens in turn over FORGERY_KINDS, and the expired ones."""
    from perf.attack_bots import forge

    kinds = [kind for kind in FORGERY_KINDS if kind != "expired"]
    forged = [(kinds[index % len(kinds)], forge(token, kinds[index % len(kinds)]))
              for index, token in enumerate(valid)]
    forged += [("expired", token) for token in expired]
    random.Random(len(forged)).shuffle(forged)
    return forged
