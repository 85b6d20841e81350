"""What every peer in perf/peers shares: the engine's own tokens, the contract's shapes.

Each peer is a small, honest implementation of the engine's HTTP contract for votes:

- ``POST /v1/polls`` (admin token) body ``{"id", "options"}`` → 201, 409 if it exists;
- ``POST /v1/polls/{poll}/votes`` (voter token) body ``{"option"}`` → 201 ``{"receipt"}``
  on a voter's first vote, 409 on a repeat, 401/403 on a bad token, 404 unknown poll,
  422 unknown option;
- ``GET /v1/polls/{poll}/results`` → ``{"poll", "counts", "total", "final", "rejected"}``;
- ``GET /readyz`` → 200 once the peer can take votes.

Tokens are the engine's (engine/tokens.py), verified with the keys of the data directory
named by ``VOTES_PEER_KEYS_DIR`` (the harness mints every token with ``votes token`` from
that directory), so each peer pays for exactly the verification the engine pays for.
Configuration comes from the environment, so Granian and uvicorn workers see it.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from engine import tokens
from engine.keys import load_keys

KEYS_DIR_ENV = "VOTES_PEER_KEYS_DIR"
DSN_ENV = "VOTES_PEER_DSN"
REDIS_URL_ENV = "VOTES_PEER_REDIS_URL"
POOL_SIZE_ENV = "VOTES_PEER_POOL_SIZE"
TALLY_ENV = "VOTES_PEER_TALLY"
POOL_SIZE_DEFAULT = 32
IDENTIFIER = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
OPTIONS_MAX = 64
BODY_BYTES_MAX = 4096

# The PostgreSQL peers' schema. One row per vote; the primary key (poll, voter) is the
# unique constraint that makes a repeat vote a conflict (409). `tallies` is used only when
# VOTES_PEER_TALLY=counter: then the vote and its counter move in one transaction.
PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS polls (
    id text PRIMARY KEY,
    options text[] NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS votes (
    id bigint GENERATED ALWAYS AS IDENTITY,
    poll text NOT NULL,
    voter bigint NOT NULL,
    option text NOT NULL,
    cast_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (poll, voter)
);
CREATE TABLE IF NOT EXISTS tallies (
    poll text NOT NULL,
    option text NOT NULL,
    n bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (poll, option)
);
"""
# One statement, so autocommit makes it one transaction: a synchronous commit per vote.
PG_INSERT_VOTE = (
    "INSERT INTO votes (poll, voter, option) VALUES ($1, $2, $3) "
    "ON CONFLICT DO NOTHING RETURNING id"
)
PG_INSERT_VOTE_COUNTER = (
    "WITH cast_vote AS (INSERT INTO votes (poll, voter, option) VALUES ($1, $2, $3) "
    "ON CONFLICT DO NOTHING RETURNING id) "
    "UPDATE tallies SET n = n + 1 FROM cast_vote "
    "WHERE tallies.poll = $1 AND tallies.option = $3 RETURNING cast_vote.id"
)
PG_COUNTS = "SELECT option, count(*) FROM votes WHERE poll = $1 GROUP BY option"
PG_COUNTS_COUNTER = "SELECT option, n FROM tallies WHERE poll = $1"


class PeerError(Exception):
    """An answer other than success: status, problem slug and detail."""

    def __init__(self, status: int, problem: str, detail: str = ""):
        super().__init__(detail or problem)
        self.status = status
        self.problem = problem
        self.detail = detail


def keyring():
    path = os.environ.get(KEYS_DIR_ENV)
    if not path:
        raise RuntimeError(f"set {KEYS_DIR_ENV} to a data dir holding keys/")
    return load_keys(Path(path))


def pool_size() -> int:
    return int(os.environ.get(POOL_SIZE_ENV, POOL_SIZE_DEFAULT))


def tally_mode() -> str:
    mode = os.environ.get(TALLY_ENV, "count")
    if mode not in ("count", "counter"):
        raise RuntimeError(f"{TALLY_ENV} must be count or counter, not {mode!r}")
    return mode


def voter_of(ring, authorization, poll: str) -> int:
    """The voter id of a valid voter token for ``poll``; PeerError (401/403) otherwise."""
    try:
        return tokens.verify_voter_token(ring, authorization, int(time.time()), poll).voter
    except tokens.TokenError as error:
        raise PeerError(error.status, error.problem, str(error)) from None


def check_admin(ring, authorization) -> None:
    try:
        tokens.verify_admin_token(ring, authorization, int(time.time()))
    except tokens.TokenError as error:
        raise PeerError(error.status, error.problem, str(error)) from None


def check_poll_body(poll_id: object, options: object) -> tuple[str, list[str]]:
    if not isinstance(poll_id, str) or not IDENTIFIER.match(poll_id):
        raise PeerError(400, "bad-request", "id must be 1-64 characters of A-Z a-z 0-9 _ -")
    if (not isinstance(options, list) or not 1 <= len(options) <= OPTIONS_MAX
            or len(set(options)) != len(options)
            or not all(isinstance(o, str) and IDENTIFIER.match(o) for o in options)):
        raise PeerError(400, "bad-request", "options must be 1-64 unique identifiers")
    return poll_id, options


def results_document(poll: str, counts: dict[str, int], options: list[str]) -> dict:
    full = {option: int(counts.get(option, 0)) for option in options}
    return {"poll": poll, "counts": full, "total": sum(full.values()), "final": False,
            "rejected": {}, "as_of": time.time()}


async def create_pg_schema(dsn: str) -> None:
    """Once, before any worker starts: workers racing on CREATE TABLE would conflict."""
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(PG_SCHEMA)
    finally:
        await connection.close()
