"""Peer: FastAPI on uvicorn (uvloop, httptools) + asyncpg, votes in PostgreSQL.

What most teams build: a FastAPI route with a pydantic body model, the token checked in a
dependency, an asyncpg pool opened in the app's lifespan, and the vote stored with one
``INSERT ... ON CONFLICT DO NOTHING RETURNING id`` into ``votes`` whose primary key is
(poll, voter): no row back means a repeat vote, 409. Autocommit makes each vote one
transaction and ``synchronous_commit=on`` means the 201 is sent after the commit is
flushed to disk: durable before answering. Results are ``count(*) GROUP BY option``.
Tokens are the engine's own (engine/tokens.py, keys from ``VOTES_PEER_KEYS_DIR``).

The same schema and statements as perf/peers/granian_asyncpg.py, so the difference
between the two peers is the framework and server (FastAPI, pydantic, Starlette, uvicorn)
and nothing else.

    VOTES_PEER_KEYS_DIR=... VOTES_PEER_DSN=postgresql://... \\
        python perf/peers/fastapi_pg.py --port P
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, ClassVar

import asyncpg
from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))

import shared

OPTION_PATTERN = shared.IDENTIFIER.pattern


class VoteIn(BaseModel):
    option: str = Field(pattern=OPTION_PATTERN)


class PollIn(BaseModel):
    id: str = Field(pattern=OPTION_PATTERN)
    options: list[str] = Field(min_length=1, max_length=shared.OPTIONS_MAX)


class State:
    pool: asyncpg.Pool
    ring = None
    polls: ClassVar[dict[str, list[str]]] = {}


state = State()


@asynccontextmanager
async def lifespan(app: FastAPI):
    state.ring = shared.keyring()
    size = shared.pool_size()
    state.pool = await asyncpg.create_pool(os.environ[shared.DSN_ENV], min_size=size, max_size=size)
    yield
    await state.pool.close()


app = FastAPI(lifespan=lifespan)


def http_error(error: shared.PeerError) -> HTTPException:
    return HTTPException(status_code=error.status, detail=error.problem)


def voter(poll: str, authorization: Annotated[str | None, Header()] = None) -> int:
    try:
        return shared.voter_of(state.ring, authorization, poll)
    except shared.PeerError as error:
        raise http_error(error) from None


def admin(authorization: Annotated[str | None, Header()] = None) -> None:
    try:
        shared.check_admin(state.ring, authorization)
    except shared.PeerError as error:
        raise http_error(error) from None


async def poll_options(poll: str) -> list[str]:
    options = state.polls.get(poll)
    if options is None:
        options = await state.pool.fetchval("SELECT options FROM polls WHERE id = $1", poll)
        if options is None:
            raise HTTPException(status_code=404, detail="poll-not-found")
        state.polls[poll] = options = list(options)
    return options


@app.post("/v1/polls/{poll}/votes", status_code=201)
async def cast_vote(poll: str, vote: VoteIn, voter_id: Annotated[int, Depends(voter)]) -> dict:
    if vote.option not in await poll_options(poll):
        raise HTTPException(status_code=422, detail="unknown-option")
    vote_id = await state.pool.fetchval(shared.PG_INSERT_VOTE, poll, voter_id, vote.option)
    if vote_id is None:
        raise HTTPException(status_code=409, detail="already-voted")
    return {"receipt": str(vote_id)}


@app.post("/v1/polls", status_code=201, dependencies=[Depends(admin)])
async def create_poll(body: PollIn) -> dict:
    try:
        poll, options = shared.check_poll_body(body.id, body.options)
    except shared.PeerError as error:
        raise http_error(error) from None
    created = await state.pool.fetchval(
        "INSERT INTO polls (id, options) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING id",
        poll, options)  # fmt: skip
    if created is None:
        raise HTTPException(status_code=409, detail="poll-exists")
    return {"id": poll, "options": options}


@app.get("/v1/polls/{poll}/results")
async def results(poll: str) -> dict:
    options = await poll_options(poll)
    counts = {row[0]: row[1] for row in await state.pool.fetch(shared.PG_COUNTS, poll)}
    return shared.results_document(poll, counts, options)


@app.get("/readyz")
async def readyz() -> dict:
    return {"ready": True}


async def create_schema(dsn: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(shared.PG_SCHEMA)
    finally:
        await connection.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    asyncio.run(create_schema(os.environ[shared.DSN_ENV]))
    import uvicorn

    uvicorn.run("fastapi_pg:app", app_dir=str(Path(__file__).resolve().parent), host="127.0.0.1",
                port=args.port, workers=args.workers, loop="uvloop", http="httptools",
                access_log=False, log_level="warning")  # fmt: skip


if __name__ == "__main__":
    main()
