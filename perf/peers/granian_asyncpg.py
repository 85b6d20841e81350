"""Peer: Granian RSGI + msgspec + asyncpg, no framework, votes in PostgreSQL.

The leanest honest way to build the vote endpoint on a database: the same server stack as
the engine (Granian, RSGI, uvloop, one worker), msgspec for the body, the engine's own
token verification, and one ``INSERT ... ON CONFLICT DO NOTHING RETURNING id`` per vote
into ``votes`` whose primary key is (poll, voter). No row back means the voter already
voted: 409. The statement runs in autocommit, so each vote is its own transaction, and
with ``synchronous_commit=on`` the 201 goes out only after PostgreSQL has flushed the
commit to its WAL on disk: durable before answering, like the engine's embedded log.
PostgreSQL's own group commit batches concurrent flushes.

Tallies are ``count(*) ... GROUP BY option`` when results are read (the default,
``VOTES_PEER_TALLY=count``); with ``VOTES_PEER_TALLY=counter`` each vote also increments
a counter row in the same statement (a CTE), which serialises votes for one option on
that row's lock until commit.

    VOTES_PEER_KEYS_DIR=<data dir with keys/> VOTES_PEER_DSN=postgresql://... \\
        python -m perf.peers.granian_asyncpg --port P [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os

import msgspec

from perf.peers import shared

JSON = [("content-type", "application/json")]
PROBLEM = [("content-type", "application/problem+json")]


class VoteBody(msgspec.Struct, forbid_unknown_fields=True):
    option: str


class PollBody(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    options: list[str]


_vote_decoder = msgspec.json.Decoder(VoteBody)
_poll_decoder = msgspec.json.Decoder(PollBody)
_encode = msgspec.json.Encoder().encode


class App:
    """The RSGI application; each worker opens its own asyncpg pool."""

    def __init__(self) -> None:
        self.pool = None
        self.pool_task: asyncio.Task | None = None
        self.polls: dict[str, list[str]] = {}

    def __rsgi_init__(self, loop) -> None:
        import asyncpg

        self.ring = shared.keyring()
        self.tally = shared.tally_mode()
        self.insert_sql = (shared.PG_INSERT_VOTE_COUNTER if self.tally == "counter"
                           else shared.PG_INSERT_VOTE)  # fmt: skip
        size = shared.pool_size()

        async def open_pool():
            return await asyncpg.create_pool(os.environ[shared.DSN_ENV], min_size=size,
                                             max_size=size)  # fmt: skip

        self.pool_task = loop.create_task(open_pool())

    def __rsgi_del__(self, loop) -> None:
        if self.pool is not None:
            loop.run_until_complete(self.pool.close())

    async def _pool(self):
        if self.pool is None:
            self.pool = await self.pool_task
        return self.pool

    async def __rsgi__(self, scope, proto) -> None:
        if scope.proto != "http":
            return
        try:
            status, body = await self._route(scope, proto)
            proto.response_bytes(status, JSON, body)
        except shared.PeerError as error:
            document = {"type": f"/problems/{error.problem}", "status": error.status,
                        "detail": error.detail}  # fmt: skip
            proto.response_bytes(error.status, PROBLEM, _encode(document))

    async def _route(self, scope, proto) -> tuple[int, bytes]:
        parts = scope.path.strip("/").split("/")
        if len(parts) == 4 and parts[:2] == ["v1", "polls"]:
            if parts[3] == "votes" and scope.method == "POST":
                return await self._vote(scope, proto, parts[2])
            if parts[3] == "results" and scope.method == "GET":
                return await self._results(parts[2])
        elif parts == ["v1", "polls"] and scope.method == "POST":
            return await self._create(scope, proto)
        elif parts == ["readyz"]:
            await self._pool()
            return 200, b'{"ready":true}'
        raise shared.PeerError(404, "not-found", scope.path)

    async def _body(self, proto) -> bytes:
        body = await proto()
        if len(body) > shared.BODY_BYTES_MAX:
            raise shared.PeerError(413, "body-too-large")
        return body

    async def _options(self, poll: str) -> list[str]:
        options = self.polls.get(poll)
        if options is None:
            pool = await self._pool()
            options = await pool.fetchval("SELECT options FROM polls WHERE id = $1", poll)
            if options is None:
                raise shared.PeerError(404, "poll-not-found", poll)
            self.polls[poll] = options = list(options)
        return options

    async def _vote(self, scope, proto, poll: str) -> tuple[int, bytes]:
        body = await self._body(proto)
        try:
            vote = _vote_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as error:
            raise shared.PeerError(400, "bad-request", str(error)) from None
        voter = shared.voter_of(self.ring, scope.headers.get("authorization"), poll)
        if vote.option not in await self._options(poll):
            raise shared.PeerError(422, "unknown-option", vote.option)
        pool = await self._pool()
        vote_id = await pool.fetchval(self.insert_sql, poll, voter, vote.option)
        if vote_id is None:
            raise shared.PeerError(409, "already-voted", f"voter {voter} already voted")
        return 201, _encode({"receipt": str(vote_id)})

    async def _create(self, scope, proto) -> tuple[int, bytes]:
        body = await self._body(proto)
        shared.check_admin(self.ring, scope.headers.get("authorization"))
        try:
            document = _poll_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as error:
            raise shared.PeerError(400, "bad-request", str(error)) from None
        poll, options = shared.check_poll_body(document.id, document.options)
        pool = await self._pool()
        async with pool.acquire() as connection, connection.transaction():
            created = await connection.fetchval(
                "INSERT INTO polls (id, options) VALUES ($1, $2) ON CONFLICT DO NOTHING "
                "RETURNING id", poll, options)  # fmt: skip
            if created is None:
                raise shared.PeerError(409, "poll-exists", poll)
            await connection.executemany(
                "INSERT INTO tallies (poll, option) VALUES ($1, $2)",
                [(poll, option) for option in options])  # fmt: skip
        return 201, _encode({"id": poll, "options": options})

    async def _results(self, poll: str) -> tuple[int, bytes]:
        options = await self._options(poll)
        pool = await self._pool()
        sql = shared.PG_COUNTS_COUNTER if self.tally == "counter" else shared.PG_COUNTS
        counts = {row[0]: row[1] for row in await pool.fetch(sql, poll)}
        return 200, _encode(shared.results_document(poll, counts, options))


app = App()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    asyncio.run(shared.create_pg_schema(os.environ[shared.DSN_ENV]))
    from granian import Granian

    # The target by module name: the workers import it as the package module it is.
    Granian("perf.peers.granian_asyncpg:app", interface="rsgi", address="127.0.0.1",
            port=args.port, workers=args.workers, loop="uvloop", log_access=False).serve()  # fmt: skip


if __name__ == "__main__":
    main()
