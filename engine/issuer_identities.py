"""The issuer role's durable mapping from identity (`iss`, `sub`) to a dense voter id, in
PostgreSQL (Aurora PostgreSQL in production), through asyncpg.

    voter_identities(issuer text, subject text, voter_id bigint unique, created_at,
                     primary key (issuer, subject))

Invariants:
- An identity gets a voter id exactly once: the primary key makes a second row for it
  impossible, `INSERT ... ON CONFLICT DO NOTHING RETURNING` tells the winner it won, and a
  loser reads the winner's row, so concurrent first logins of one person all get one id.
- Ids come from the sequence voter_id_sequence (0, 1, 2, ... up to 2**32 - 1, the voter ids
  a token can carry). A per-identity transaction advisory lock makes concurrent first logins
  of one identity wait for each other, so only one of them draws a number: the losers do not
  burn sequence values, and ids stay dense. Logins of different identities do not wait for
  each other. A gap appears only when a transaction fails after drawing its number.
- Every statement runs with a bounded timeout; the pool has a bounded size. An unreachable
  database answers IdentityStoreUnavailable (503), never a guessed id.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

from engine.errors import NotReady

log = logging.getLogger("votes.issuer")

VOTER_ID_MAX = 2**32 - 1
POOL_CONNECTIONS_MAX = 10
STATEMENT_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 2.0
# Waits for a pooled connection at most this long (then 503): a bound on queued logins.
ACQUIRE_TIMEOUT_S = 2.0

SCHEMA = f"""
CREATE SEQUENCE IF NOT EXISTS voter_id_sequence AS bigint
    MINVALUE 0 MAXVALUE {VOTER_ID_MAX} START WITH 0 NO CYCLE;
CREATE TABLE IF NOT EXISTS voter_identities (
    issuer text NOT NULL,
    subject text NOT NULL,
    voter_id bigint NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (issuer, subject)
);
"""
SELECT_VOTER_ID = "SELECT voter_id FROM voter_identities WHERE issuer = $1 AND subject = $2"
# Serialises first logins of one identity (a hash collision only makes two identities wait
# for each other; the primary key, not the lock, is what keeps the mapping unique).
LOCK_IDENTITY = "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(10) || $2, 0))"
INSERT_IDENTITY = """
INSERT INTO voter_identities (issuer, subject, voter_id)
VALUES ($1, $2, nextval('voter_id_sequence'))
ON CONFLICT (issuer, subject) DO NOTHING
RETURNING voter_id
"""
# Creating the schema concurrently (two issuers starting together) can race inside
# PostgreSQL's catalogs even with IF NOT EXISTS: one advisory lock makes it one at a time.
SCHEMA_LOCK_KEY = 0x766F746572  # "voter"


class IdentityStoreUnavailable(NotReady):
    """The identity store (PostgreSQL) cannot be reached; retry shortly."""


class VoterIdentities:
    """Assigns voter ids through a lazily created asyncpg pool (the issuer starts, and says
    503, while PostgreSQL is down; the first request after it is back creates the pool)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.pool: asyncpg.Pool | None = None
        self.opening = asyncio.Lock()

    async def voter_id(self, issuer: str, subject: str) -> int:
        """The voter id of (issuer, subject), assigning the next one on its first login."""
        try:
            pool = await self._pool()
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as connection:
                found = await connection.fetchval(SELECT_VOTER_ID, issuer, subject,
                                                  timeout=STATEMENT_TIMEOUT_S)
                if found is not None:
                    return int(found)
                async with connection.transaction():
                    await connection.execute(LOCK_IDENTITY, issuer, subject,
                                             timeout=STATEMENT_TIMEOUT_S)
                    # Under the lock: a login that held it before us may have inserted.
                    found = await connection.fetchval(SELECT_VOTER_ID, issuer, subject,
                                                      timeout=STATEMENT_TIMEOUT_S)
                    if found is None:
                        found = await connection.fetchval(INSERT_IDENTITY, issuer, subject,
                                                          timeout=STATEMENT_TIMEOUT_S)
                if found is None:  # not while every writer takes the lock; the key holds anyway
                    found = await connection.fetchval(SELECT_VOTER_ID, issuer, subject,
                                                      timeout=STATEMENT_TIMEOUT_S)
                if found is None:
                    raise IdentityStoreUnavailable("the identity row vanished; retry")
                return int(found)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as exc:
            log.warning("issuer: identity store error: %r", exc)
            raise IdentityStoreUnavailable() from None

    async def _pool(self) -> asyncpg.Pool:
        if self.pool is not None:
            return self.pool
        async with self.opening:
            if self.pool is None:
                pool = await asyncpg.create_pool(
                    self.database_url, min_size=1, max_size=POOL_CONNECTIONS_MAX,
                    timeout=CONNECT_TIMEOUT_S, command_timeout=STATEMENT_TIMEOUT_S)
                try:
                    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as connection:
                        async with connection.transaction():
                            await connection.execute("SELECT pg_advisory_xact_lock($1)",
                                                     SCHEMA_LOCK_KEY)
                            await connection.execute(SCHEMA)
                except BaseException:
                    await pool.close()
                    raise
                self.pool = pool
        return self.pool

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
