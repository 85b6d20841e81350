"""Velocity rules across workers (engine/velocity_sync.py) on the session's real three-master
Redis Cluster: two workers' defences (engine/defences.py) each see 200 distinct voters from
one /24, under the limit of 300 in either; once both have synchronised their counts, the
prefix is suspicious (so its votes must carry a proof of work) in the worker that learns
the global count, and in the other at its next vote's sync. Without the store, the same
traffic leaves the prefix unsuspected in both: the test of the global rule would fail if
the counts stayed local. Duplicated voters across workers are counted once (HyperLogLog),
and a worker whose store does not answer keeps its local rule and counts the fail-open.
"""

from __future__ import annotations

import asyncio
import itertools

import msgspec
import pytest

from engine.config import Config
from engine.challenge import ChallengeRequired
from engine.defences import Defences
from engine.keys import ensure_keys, load_keys
from engine.metrics import RATELIMIT_FAIL_OPEN
from engine.ratelimit import RateLimiter

VOTERS_MAX = 300
_prefixes = itertools.count(1)


def defences_config(store_url: str) -> Config:
    return msgspec.structs.replace(
        Config(), ratelimit_exempt_networks="", ratelimit_redis_url=store_url,
        velocity_prefix_voters_max=VOTERS_MAX, velocity_prefix_votes_max=100_000,
        ratelimit_store_timeout_ms=2000).validate()


def worker(store_url: str) -> Defences:
    config = defences_config(store_url)
    return Defences(config, RateLimiter(config))


def vote_from(defences: Defences, prefix_third: int, voters: range, keyring=None) -> str:
    """Each voter once, from the addresses of one /24 in turn; returns the prefix key."""
    addresses = [f"198.{51 + prefix_third // 256}.{prefix_third % 256}.{last}"
                 for last in range(1, 251)]
    for voter, address in zip(voters, itertools.cycle(addresses)):
        client = defences.check_client(f"{address}:40000", None, False)
        defences.check_voter(client, voter, "poll", {}, keyring)
    return client[0].prefix


def suspicious(defences: Defences, prefix: str) -> bool:
    return defences.suspicious.active(prefix, defences.clock())


def test_a_prefix_over_the_limit_across_workers_is_suspicious_in_both(redis_cluster) -> None:
    async def run() -> None:
        first, second = worker(redis_cluster.url), worker(redis_cluster.url)
        third = next(_prefixes)
        prefix = vote_from(first, third, range(1, 201))
        assert vote_from(second, third, range(1001, 1201)) == prefix
        assert not suspicious(first, prefix) and not suspicious(second, prefix)
        try:
            await first.velocity_sync.sync_once()  # global 200: under the limit
            assert not suspicious(first, prefix)
            await second.velocity_sync.sync_once()  # global 400 distinct voters
            assert suspicious(second, prefix)
            assert not suspicious(first, prefix)  # it has not synchronised since
            vote_from(first, third, range(2001, 2002))
            await first.velocity_sync.sync_once()
            assert suspicious(first, prefix)
        finally:
            await first.close()
            await second.close()
    asyncio.run(run())


def test_the_same_voters_in_both_workers_count_once(redis_cluster) -> None:
    async def run() -> None:
        first, second = worker(redis_cluster.url), worker(redis_cluster.url)
        third = next(_prefixes)
        prefix = vote_from(first, third, range(1, 251))
        vote_from(second, third, range(1, 251))  # the same 250 voters, retried elsewhere
        try:
            await first.velocity_sync.sync_once()
            await second.velocity_sync.sync_once()
            assert not suspicious(second, prefix)  # 250 distinct, not 500
        finally:
            await first.close()
            await second.close()
    asyncio.run(run())


def test_without_the_store_each_worker_sees_its_share_only() -> None:
    local = msgspec.structs.replace(defences_config(""), ratelimit_redis_url="").validate()
    first, second = Defences(local, RateLimiter(local)), Defences(local, RateLimiter(local))
    assert first.velocity_sync is None
    third = next(_prefixes)
    prefix = vote_from(first, third, range(1, 201))
    vote_from(second, third, range(1001, 1201))
    assert not suspicious(first, prefix) and not suspicious(second, prefix)


def test_a_store_that_does_not_answer_fails_open_counted(tmp_path) -> None:
    ensure_keys(tmp_path)
    keyring = load_keys(tmp_path)

    async def run() -> None:
        defences = worker("redis://127.0.0.1:1")  # nothing listens there
        defences.velocity_sync.timeout_s = 0.5
        before = RATELIMIT_FAIL_OPEN._value.get()
        prefix = vote_from(defences, next(_prefixes), range(1, 11))
        try:
            await defences.velocity_sync.sync_once()
        finally:
            await defences.close()
        assert RATELIMIT_FAIL_OPEN._value.get() - before == 10
        assert not suspicious(defences, prefix)
        # The local rule still applies: the 301st voter here alone makes the prefix suspect,
        # and that very vote is asked for a proof of work.
        prefix = vote_from(defences, 999, range(1, VOTERS_MAX + 1))
        assert not suspicious(defences, prefix)
        with pytest.raises(ChallengeRequired):
            vote_from(defences, 999, range(5000, 5001), keyring)
        assert suspicious(defences, prefix)
    asyncio.run(run())
