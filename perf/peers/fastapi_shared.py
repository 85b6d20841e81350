"""What the two FastAPI peers share: request models, the token dependencies, the poll
cache, and the routes that do not touch their store. Each peer passes its own store calls."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel, Field

from perf.peers import shared

OPTION_PATTERN = shared.IDENTIFIER.pattern


class VoteIn(BaseModel):
    option: str = Field(pattern=OPTION_PATTERN)


class PollIn(BaseModel):
    id: str = Field(pattern=OPTION_PATTERN)
    options: list[str] = Field(min_length=1, max_length=shared.OPTIONS_MAX)


class State:
    """Per process (each peer is its own process): the keyring, the store client and the
    options of polls seen so far."""

    def __init__(self) -> None:
        self.ring = None
        self.store: Any = None
        self.polls: dict[str, list[str]] = {}


state = State()


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


def checked_poll(body: PollIn) -> tuple[str, list[str]]:
    try:
        return shared.check_poll_body(body.id, body.options)
    except shared.PeerError as error:
        raise http_error(error) from None


async def poll_options(poll: str, load: Callable[[str], Awaitable[list[str] | None]]) -> list[str]:
    """The poll's options, from the cache or `load` (the store); 404 if it has none."""
    options = state.polls.get(poll)
    if options is None:
        options = await load(poll)
        if options is None:
            raise HTTPException(status_code=404, detail="poll-not-found")
        state.polls[poll] = options = list(options)
    return options


def add_readiness(app: FastAPI) -> None:
    @app.get("/readyz")
    async def readyz() -> dict:
        return {"ready": True}


__all__ = ["PollIn", "VoteIn", "add_readiness", "admin", "checked_poll",
           "http_error", "poll_options", "state", "voter"]
