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
        python -m perf.peers.fastapi_pg --port P
"""

from __future__ import annotations

import argparse
import asyncio
import os
from contextlib import asynccontextmanager
from typing import Annotated

import asyncpg
from fastapi import Depends, FastAPI, HTTPException

from perf.peers import shared
from perf.peers.fastapi_shared import (
    PollIn,
    VoteIn,
    add_readiness,
    admin,
    checked_poll,
    poll_options,
    state,
    voter,
)


@asynccontextmanager
async def lifespan(app: FastAPI):
    state.ring = shared.keyring()
    size = shared.pool_size()
    state.store = await asyncpg.create_pool(os.environ[shared.DSN_ENV], min_size=size, max_size=size)
    yield
    await state.store.close()


app = FastAPI(lifespan=lifespan)
add_readiness(app)


async def stored_options(poll: str) -> list[str] | None:
    return await state.store.fetchval("SELECT options FROM polls WHERE id = $1", poll)


@app.post("/v1/polls/{poll}/votes", status_code=201)
async def cast_vote(poll: str, vote: VoteIn, voter_id: Annotated[int, Depends(voter)]) -> dict:
    if vote.option not in await poll_options(poll, stored_options):
        raise HTTPException(status_code=422, detail="unknown-option")
    vote_id = await state.store.fetchval(shared.PG_INSERT_VOTE, poll, voter_id, vote.option)
    if vote_id is None:
        raise HTTPException(status_code=409, detail="already-voted")
    return {"receipt": str(vote_id)}


@app.post("/v1/polls", status_code=201, dependencies=[Depends(admin)])
async def create_poll(body: PollIn) -> dict:
    poll, options = checked_poll(body)
    created = await state.store.fetchval(
        "INSERT INTO polls (id, options) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING id",
        poll, options)  # fmt: skip
    if created is None:
        raise HTTPException(status_code=409, detail="poll-exists")
    return {"id": poll, "options": options}


@app.get("/v1/polls/{poll}/results")
async def results(poll: str) -> dict:
    options = await poll_options(poll, stored_options)
    counts = {row[0]: row[1] for row in await state.store.fetch(shared.PG_COUNTS, poll)}
    return shared.results_document(poll, counts, options)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    asyncio.run(shared.create_pg_schema(os.environ[shared.DSN_ENV]))
    import uvicorn

    uvicorn.run("perf.peers.fastapi_pg:app", host="127.0.0.1",
                port=args.port, workers=args.workers, loop="uvloop", http="httptools",
                access_log=False, log_level="warning")  # fmt: skip


if __name__ == "__main__":
    main()
