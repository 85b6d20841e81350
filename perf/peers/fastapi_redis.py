"""Peer: FastAPI on uvicorn (uvloop, httptools) + Redis; NOT durable.

The "just use Redis" design: ``SADD voted:<poll> <voter>`` dedupes (1 = first vote,
0 = repeat → 409) and ``HINCRBY tally:<poll> <option> 1`` counts. Polls are hashes
``poll:<id>``. Tokens are the engine's own (engine/tokens.py).

It is not durable, and the harness's table says so: the private redis-server runs with
``--save "" --appendonly no``, so an acknowledged vote lives only in memory (even with
``appendfsync always`` a Redis primary acknowledges before its replicas have the write,
and a failover loses it). The two commands are also not atomic: a crash between them
leaves a voter marked as voted with no vote counted. It is here as the fast, lossy
baseline that a durable design is often compared with.

    VOTES_PEER_KEYS_DIR=... VOTES_PEER_REDIS_URL=redis://127.0.0.1:P/0 \\
        python perf/peers/fastapi_redis.py --port P
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, ClassVar

import redis.asyncio as redis
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
    client: redis.Redis
    ring = None
    polls: ClassVar[dict[str, list[str]]] = {}


state = State()


@asynccontextmanager
async def lifespan(app: FastAPI):
    state.ring = shared.keyring()
    # A blocking pool: a request waits for a free connection, as with the asyncpg pool
    # (redis-py's default pool raises "Too many connections" instead).
    pool = redis.BlockingConnectionPool.from_url(
        os.environ[shared.REDIS_URL_ENV], max_connections=shared.pool_size(), timeout=10,
        decode_responses=True,
    )
    state.client = redis.Redis(connection_pool=pool)
    await state.client.ping()
    yield
    await state.client.aclose()


app = FastAPI(lifespan=lifespan)


def voter(poll: str, authorization: Annotated[str | None, Header()] = None) -> int:
    try:
        return shared.voter_of(state.ring, authorization, poll)
    except shared.PeerError as error:
        raise HTTPException(status_code=error.status, detail=error.problem) from None


def admin(authorization: Annotated[str | None, Header()] = None) -> None:
    try:
        shared.check_admin(state.ring, authorization)
    except shared.PeerError as error:
        raise HTTPException(status_code=error.status, detail=error.problem) from None


async def poll_options(poll: str) -> list[str]:
    options = state.polls.get(poll)
    if options is None:
        stored = await state.client.hget(f"poll:{poll}", "options")
        if stored is None:
            raise HTTPException(status_code=404, detail="poll-not-found")
        state.polls[poll] = options = stored.split(",")
    return options


@app.post("/v1/polls/{poll}/votes", status_code=201)
async def cast_vote(poll: str, vote: VoteIn, voter_id: Annotated[int, Depends(voter)]) -> dict:
    if vote.option not in await poll_options(poll):
        raise HTTPException(status_code=422, detail="unknown-option")
    if not await state.client.sadd(f"voted:{poll}", voter_id):
        raise HTTPException(status_code=409, detail="already-voted")
    count = await state.client.hincrby(f"tally:{poll}", vote.option, 1)
    return {"receipt": f"{poll}:{vote.option}:{count}"}


@app.post("/v1/polls", status_code=201, dependencies=[Depends(admin)])
async def create_poll(body: PollIn) -> dict:
    try:
        poll, options = shared.check_poll_body(body.id, body.options)
    except shared.PeerError as error:
        raise HTTPException(status_code=error.status, detail=error.problem) from None
    if not await state.client.hsetnx(f"poll:{poll}", "options", ",".join(options)):
        raise HTTPException(status_code=409, detail="poll-exists")
    return {"id": poll, "options": options}


@app.get("/v1/polls/{poll}/results")
async def results(poll: str) -> dict:
    options = await poll_options(poll)
    counts = {k: int(v) for k, v in (await state.client.hgetall(f"tally:{poll}")).items()}
    return shared.results_document(poll, counts, options)


@app.get("/readyz")
async def readyz() -> dict:
    return {"ready": True}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run("fastapi_redis:app", app_dir=str(Path(__file__).resolve().parent),
                host="127.0.0.1", port=args.port, workers=args.workers, loop="uvloop",
                http="httptools", access_log=False, log_level="warning")  # fmt: skip


if __name__ == "__main__":
    main()
