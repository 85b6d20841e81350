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
        python -m perf.peers.fastapi_redis --port P
"""

from __future__ import annotations

import argparse
import os
from contextlib import asynccontextmanager
from typing import Annotated

import redis.asyncio as redis
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
    # A blocking pool: a request waits for a free connection, as with the asyncpg pool
    # (redis-py's default pool raises "Too many connections" instead).
    pool = redis.BlockingConnectionPool.from_url(
        os.environ[shared.REDIS_URL_ENV], max_connections=shared.pool_size(), timeout=10,
        decode_responses=True,
    )
    state.store = redis.Redis(connection_pool=pool)
    await state.store.ping()
    yield
    await state.store.aclose()


app = FastAPI(lifespan=lifespan)
add_readiness(app)


async def stored_options(poll: str) -> list[str] | None:
    stored = await state.store.hget(f"poll:{poll}", "options")
    return None if stored is None else stored.split(",")


@app.post("/v1/polls/{poll}/votes", status_code=201)
async def cast_vote(poll: str, vote: VoteIn, voter_id: Annotated[int, Depends(voter)]) -> dict:
    if vote.option not in await poll_options(poll, stored_options):
        raise HTTPException(status_code=422, detail="unknown-option")
    if not await state.store.sadd(f"voted:{poll}", voter_id):
        raise HTTPException(status_code=409, detail="already-voted")
    count = await state.store.hincrby(f"tally:{poll}", vote.option, 1)
    return {"receipt": f"{poll}:{vote.option}:{count}"}


@app.post("/v1/polls", status_code=201, dependencies=[Depends(admin)])
async def create_poll(body: PollIn) -> dict:
    poll, options = checked_poll(body)
    if not await state.store.hsetnx(f"poll:{poll}", "options", ",".join(options)):
        raise HTTPException(status_code=409, detail="poll-exists")
    return {"id": poll, "options": options}


@app.get("/v1/polls/{poll}/results")
async def results(poll: str) -> dict:
    options = await poll_options(poll, stored_options)
    counts = {k: int(v) for k, v in (await state.store.hgetall(f"tally:{poll}")).items()}
    return shared.results_document(poll, counts, options)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run("perf.peers.fastapi_redis:app", host="127.0.0.1", port=args.port,
                workers=args.workers, loop="uvloop", http="httptools", access_log=False,
                log_level="warning")  # fmt: skip


if __name__ == "__main__":
    main()
