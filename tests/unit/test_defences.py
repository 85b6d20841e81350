"""One worker's defences (engine/defences.py) with a fake clock: honest traffic is asked for
no proof-of-work; a rate-limited address makes its address and prefix suspicious (16 bits)
for suspicion_s, others not; the velocity rules mark a prefix suspicious or ban it; a vote
asked for a solution gets 428 with a fresh challenge and passes with its solution; the local
ban list refuses banned voters, addresses and prefixes until their expiry, and keeps applying
when the ban store does not answer; every table stays within its bound.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from prometheus_client import REGISTRY

from engine import challenge
from engine.bans import (
    AUTOBANS_PENDING_MAX,
    Banned,
    BanList,
    BanRefresher,
    BanValueInvalid,
    normalized,
)
from engine.challenge import ChallengeFailed, ChallengeRequired
from engine.config import Config
from engine.defences import Defences, ExpiringKeys, Velocity, poll_of_query
from engine.errors import BadRequest
from engine.ratelimit import RateLimited, RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def defences_of(**overrides) -> tuple[Defences, FakeClock]:
    base = Config()
    config = msgspec.structs.replace(base, ratelimit_exempt_networks="", **overrides)
    clock = FakeClock()
    return Defences(config, RateLimiter(config, clock), clock), clock


def peer(address: str) -> str:
    """Granian's `scope.client` form of an address."""
    return f"[{address}]:40000" if ":" in address else f"{address}:40000"


def vote(defences: Defences, address: str, voter: int, keyring, headers=None,
         poll: str = "p") -> None:
    client = defences.check_client(peer(address), None, False)
    defences.check_voter(client, voter, poll, headers or {}, keyring)


def test_honest_traffic_is_asked_for_nothing(keyring) -> None:
    defences, _ = defences_of()
    for voter in range(200):  # the address burst, from one address
        vote(defences, "198.51.100.7", voter, keyring)
    assert defences.difficulty_bits(defences.limiter.client_keys(peer("198.51.100.7"), None)) == 0


def test_a_rate_limited_address_must_solve_for_a_while(keyring) -> None:
    defences, clock = defences_of(ratelimit_address_burst=2, ratelimit_address_per_s=0.01)
    for voter in range(2):
        vote(defences, "198.51.100.7", voter, keyring)
    with pytest.raises(RateLimited):
        vote(defences, "198.51.100.7", 3, keyring)
    bits = defences.config.challenge_difficulty_bits_suspicious
    keys_of = defences.limiter.client_keys
    assert defences.difficulty_bits(keys_of(peer("198.51.100.7"), None)) == bits
    assert defences.difficulty_bits(keys_of(peer("198.51.100.99"), None)) == bits  # same /24
    assert defences.difficulty_bits(keys_of(peer("198.51.101.7"), None)) == 0
    clock.now += defences.config.suspicion_s
    assert defences.difficulty_bits(keys_of(peer("198.51.100.99"), None)) == 0


def test_a_client_past_its_limit_is_refused_before_anything_is_counted(keyring) -> None:
    """refuse_limited (run before the token) refuses what check_client_keys would, with the
    same Retry-After, and adds no key: a fresh address passes it without leaving a trace."""
    defences, clock = defences_of(ratelimit_address_burst=2, ratelimit_address_per_s=0.5)
    limiter = defences.limiter
    defences.refuse_limited(*defences.client_address(peer("203.0.113.5"), None))
    assert not any(key.startswith("203.0.113.") for key in limiter.address.arrivals)
    assert not any(key.startswith("203.0.113.") for key in limiter.prefix.arrivals)
    for voter in range(2):
        vote(defences, "198.51.100.7", voter, keyring)
    limited = limiter.client_keys(peer("198.51.100.7"), None)
    state = dict(limiter.address.arrivals), dict(limiter.address.pending)
    with pytest.raises(RateLimited) as looked:
        defences.refuse_limited(limited.peer, limited.address)
    assert (dict(limiter.address.arrivals), dict(limiter.address.pending)) == state
    with pytest.raises(RateLimited) as counted:
        defences.check_client_keys(limited, False)
    assert looked.value.extra == counted.value.extra
    assert looked.value.extra["retry_after"] == 2
    clock.now += 2.0  # one interval later: admitted again
    defences.refuse_limited(limited.peer, limited.address)


def test_a_client_refused_for_long_stays_suspicious(keyring) -> None:
    """A flood refused on every request by refuse_limited keeps its address and prefix
    suspicious for as long as it lasts: the marks are renewed, once per half their length."""
    defences, clock = defences_of(ratelimit_address_burst=1, ratelimit_address_per_s=0.001)
    vote(defences, "198.51.100.7", 1, keyring)
    keys = defences.limiter.client_keys(peer("198.51.100.7"), None)
    suspicion_s = defences.config.suspicion_s
    for _ in range(8):  # twice the suspicion's length, a request every quarter of it
        with pytest.raises(RateLimited):
            defences.refuse_limited(keys.peer, keys.address)
        clock.now += suspicion_s / 4
        assert defences.difficulty_bits(keys) == defences.config.challenge_difficulty_bits_suspicious


def test_a_vote_asked_to_solve_gets_a_challenge_and_passes_with_its_solution(keyring) -> None:
    defences, _ = defences_of(challenge_difficulty_bits_min=8)
    with pytest.raises(ChallengeRequired) as required:
        vote(defences, "198.51.100.7", 5, keyring)
    document = required.value.extra["challenge"]
    assert document["difficulty_bits"] == 8 and document["algorithm"] == "sha256"
    text = document["challenge"]
    headers = {challenge.CHALLENGE_HEADER: text,
               challenge.SOLUTION_HEADER: challenge.solve(text, 8)}
    vote(defences, "198.51.100.7", 5, keyring, headers)
    with pytest.raises(ChallengeFailed) as failed:  # another voter cannot use it
        vote(defences, "198.51.100.7", 6, keyring, headers)
    assert failed.value.extra["challenge"]["challenge"] != text
    with pytest.raises(ChallengeFailed):  # nor can a vote in another poll
        vote(defences, "198.51.100.7", 5, keyring, headers, poll="q")


def test_the_difficulty_is_capped_and_a_little_grace_is_given(keyring) -> None:
    defences, _ = defences_of(challenge_difficulty_bits_min=6, challenge_difficulty_bits_max=8,
                              challenge_grace_bits=2)
    defences.set_load_bits(12)
    keys = defences.limiter.client_keys(peer("198.51.100.7"), None)
    assert defences.difficulty_bits(keys) == 8
    text = challenge.issue(keyring, "p", 5, 6, int(time.time()), 60)
    headers = {challenge.CHALLENGE_HEADER: text,
               challenge.SOLUTION_HEADER: challenge.solve(text, 6)}
    vote(defences, "198.51.100.7", 5, keyring, headers)  # 6 >= 8 - 2
    text = challenge.issue(keyring, "p", 5, 5, int(time.time()), 60)
    headers = {challenge.CHALLENGE_HEADER: text,
               challenge.SOLUTION_HEADER: challenge.solve(text, 5)}
    with pytest.raises(ChallengeRequired):
        vote(defences, "198.51.100.7", 5, keyring, headers)


def test_many_voters_from_one_prefix_raise_suspicion_then_a_ban(keyring) -> None:
    defences, _ = defences_of(velocity_prefix_voters_max=5, velocity_autoban_voters_max=8,
                              suspicion_keys_max=1000)
    keys = defences.limiter.client_keys(peer("203.0.113.1"), None)
    for voter in range(5):
        vote(defences, f"203.0.113.{voter + 1}", voter, keyring)
    assert defences.difficulty_bits(keys) == 0
    with pytest.raises(ChallengeRequired):  # the sixth distinct voter: suspicious now
        vote(defences, "203.0.113.6", 6, keyring)
    assert defences.difficulty_bits(keys) == defences.config.challenge_difficulty_bits_suspicious
    for voter in (7, 8):
        with pytest.raises(ChallengeRequired):
            vote(defences, "203.0.113.6", voter, keyring)
    with pytest.raises(Banned):  # the ninth: the prefix is banned
        vote(defences, "203.0.113.6", 9, keyring)
    with pytest.raises(Banned):  # and refused before its token is even looked at
        defences.check_client(peer("203.0.113.200"), None, False)
    defences.check_client(peer("203.0.114.1"), None, False)  # another prefix is not


def test_many_votes_from_one_prefix_raise_suspicion(keyring) -> None:
    defences, clock = defences_of(velocity_prefix_votes_max=3, velocity_window_s=10)
    keys = defences.limiter.client_keys(peer("203.0.113.1"), None)
    for _ in range(3):
        vote(defences, "203.0.113.1", 1, keyring)
    assert defences.difficulty_bits(keys) == 0
    with pytest.raises(ChallengeRequired):
        vote(defences, "203.0.113.1", 1, keyring)
    clock.now += defences.config.suspicion_s  # a new window and the suspicion over
    vote(defences, "203.0.113.1", 1, keyring)


def test_the_local_ban_list_applies_until_expiry(keyring) -> None:
    defences, _ = defences_of()
    now_ms = time.time_ns() // 1_000_000
    defences.bans.replace(1, {"voter": [("77", now_ms + 60_000), ("78", now_ms - 1)],
                              "address": [("198.51.100.9", now_ms + 60_000)],
                              "prefix": [("203.0.113.0/24", now_ms + 60_000),
                                         ("2001:db8:0:100::/56", now_ms + 60_000)]})
    for address in ("198.51.100.9", "203.0.113.77", "2001:db8:0:1ff::1"):
        with pytest.raises(Banned):
            defences.check_client(peer(address), None, False)
    with pytest.raises(Banned):
        vote(defences, "198.51.100.8", 77, keyring)
    vote(defences, "198.51.100.8", 78, keyring)  # expired
    vote(defences, "2001:db8:0:200::1", 79, keyring)


def test_ban_values_are_normalised_or_refused() -> None:
    assert normalized("voter", " 0042 ") == "42"
    assert normalized("address", "2001:DB8::1") == "2001:db8::1"
    assert normalized("prefix", "10.1.2.3/24") == "10.1.2.0/24"
    assert normalized("prefix", "2001:db8:0:1ab::/56") == "2001:db8:0:100::/56"
    for kind, value in (("voter", "-1"), ("voter", str(2**32)), ("voter", "x"),
                        ("address", "10.1.2"), ("prefix", "10.1.0.0/16"),
                        ("prefix", "2001:db8::/48"), ("prefix", "nonsense"), ("poll", "p")):
        with pytest.raises(BanValueInvalid):
            normalized(kind, value)


def test_tables_stay_within_their_bounds() -> None:
    keys = ExpiringKeys(keys_max=100)
    for index in range(1000):
        keys.mark(str(index), until=10_000.0, now=0.0)
        assert len(keys.until) <= 100
    assert keys.active("999", 0.0)
    velocity = Velocity(window_s=60, voters_max=10, keys_max=50)
    for index in range(500):
        velocity.record(f"prefix-{index % 200}", index, 0.0)
        assert len(velocity.windows) <= 50
    for voter in range(1000):
        votes, voters = velocity.record("one", voter, 1.0)
    assert (votes, voters) == (1000, 11)
    assert len(velocity.windows["one"][2]) == 11
    assert BanList().client_banned("1.2.3.4", "1.2.3", 0) is False


def test_the_challenge_query_is_strict() -> None:
    assert poll_of_query("poll=p1") == "p1"
    for query in ("", "poll=a&poll=b", "other=1", "poll", "poll=a&x=1"):
        with pytest.raises(BadRequest):
            poll_of_query(query)


def test_a_ban_store_that_does_not_answer_keeps_the_last_list() -> None:
    config = msgspec.structs.replace(Config(), bans_redis_url="redis://127.0.0.1:1",
                                     bans_store_timeout_ms=50)
    bans = BanList()
    now_ms = time.time_ns() // 1_000_000
    bans.replace(3, {"address": [("198.51.100.9", now_ms + 60_000)]})

    class Unanswering:
        async def execute_command(self, *args):
            raise ConnectionError("down")

        async def aclose(self) -> None:
            pass

    async def script(**kwargs):
        await asyncio.sleep(1.0)  # longer than the store timeout

    refresher = BanRefresher(config, bans, Unanswering())
    refresher.script = script
    refresher.queue_autoban("prefix", "203.0.113.0/24", now_ms + 60_000)
    failures_before = REGISTRY.get_sample_value("vote_bans_refresh_failures_total") or 0.0
    asyncio.run(refresher.refresh_once())
    assert bans.client_banned("198.51.100.9", "198.51.100", now_ms) and bans.version == 3
    assert refresher.autobans  # kept for the next refresh
    assert REGISTRY.get_sample_value("vote_bans_refresh_failures_total") == failures_before + 1
    for _ in range(AUTOBANS_PENDING_MAX):
        refresher.queue_autoban("prefix", "203.0.113.0/24", now_ms)
    assert len(refresher.autobans) == AUTOBANS_PENDING_MAX
