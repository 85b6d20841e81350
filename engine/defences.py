"""The vote path's defences in one worker: ban lists, rate limits, velocity rules and the
proof-of-work difficulty, called twice per vote by engine/app.py (`check_client` after the
token's MAC, `check_voter` after it) and once per `GET /v1/challenge`.

Difficulty (engine/challenge.py solves and verifies) is the sum of what applies, capped at
`challenge_difficulty_bits_max`: `challenge_difficulty_bits_min` for everyone (0: off),
`challenge_difficulty_bits_load` while this worker takes more than
`challenge_load_votes_per_s` (0: never), and `challenge_difficulty_bits_suspicious` while
the client's address or prefix is suspicious: for `suspicion_s` after it was rate limited,
or after its prefix broke a velocity rule (more than `velocity_prefix_votes_max` votes or
`velocity_prefix_voters_max` distinct voters within `velocity_window_s`). With the
defaults honest traffic pays nothing: no PoW until a client or the load gives a reason.

A prefix with more than `velocity_autoban_voters_max` distinct voters in a window (0: off)
is banned for `velocity_autoban_ttl_s`, here at once and in the ban store for the other
workers (engine/bans.py). With `ratelimit_redis_url` the velocity counts are also every
worker's together (engine/velocity_sync.py). Every table here has a bound
(`suspicion_keys_max`); exempt
addresses (`ratelimit_exempt_networks`) are neither counted nor suspected. Nothing here
waits on I/O: a vote costs a few dict lookups, and none at all while the tables are empty.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import time
from typing import Any
from urllib.parse import parse_qsl

from engine import challenge
from engine.bans import Banned, BanList, BanRefresher
from engine.config import Config
from engine.errors import BadRequest
from engine.keys import KeyRing
from engine.ratelimit import ClientKeys, RateLimited, RateLimiter, rate_limited
from engine.velocity_sync import VelocitySync

LOAD_TICK_S = 1.0
QUERY_FIELDS_MAX = 4


# What check_client found, for check_voter: the client's keys, whether the voter limit is
# still to be checked, and whether the vote is one another node forwarded from the cluster's
# own network (that node checked it). A plain tuple: a NamedTuple's construction per vote
# was measurable (perf/bench_challenge.py).
ClientCheck = tuple[ClientKeys, bool, bool]


class ExpiringKeys:
    """key -> until (monotonic s), at most keys_max: when full, the expired entries go, and
    when that frees less than a quarter, the oldest-inserted ones too."""

    __slots__ = ("until", "keys_max")

    def __init__(self, keys_max: int) -> None:
        self.until: dict[str, float] = {}
        self.keys_max = keys_max

    def mark(self, key: str, until: float, now: float) -> None:
        if len(self.until) >= self.keys_max and key not in self.until:
            live = {k: t for k, t in self.until.items() if t > now}
            excess = len(live) - (self.keys_max - self.keys_max // 4)
            self.until = dict(itertools.islice(live.items(), max(excess, 0), None))
        self.until[key] = until

    def active(self, key: str, now: float) -> bool:
        return self.until.get(key, 0.0) > now


class Velocity:
    """Per prefix, the votes and distinct voters of the current window (at most
    voters_max + 1 voters remembered each: beyond, the rule has fired already)."""

    __slots__ = ("window_s", "voters_max", "keys_max", "windows", "syncing", "pending")

    def __init__(self, window_s: float, voters_max: int, keys_max: int,
                 syncing: bool = False) -> None:
        self.window_s = window_s
        self.voters_max = voters_max
        self.keys_max = keys_max
        # prefix -> [window start (monotonic s), votes, voters]: a list, updated in place.
        self.windows: dict[str, list[Any]] = {}
        # With a store (engine/velocity_sync.py): prefix -> [votes, voters] since the last
        # sync, at most keys_max prefixes and voters_max + 1 voters each.
        self.syncing = syncing
        self.pending: dict[str, list[Any]] = {}

    def record(self, prefix: str, voter: int, now: float) -> tuple[int, int]:
        """Count a vote; (votes, distinct voters) of the prefix's window so far."""
        entry = self.windows.get(prefix)
        if entry is None or now - entry[0] >= self.window_s:
            entry = self.start(prefix, now)
        entry[1] += 1
        voters = entry[2]
        if len(voters) <= self.voters_max:
            voters.add(voter)
        if self.syncing:
            waiting = self.pending.get(prefix)
            if waiting is None and len(self.pending) < self.keys_max:
                waiting = self.pending[prefix] = [0, set()]
            if waiting is not None:
                waiting[0] += 1
                if len(waiting[1]) <= self.voters_max:
                    waiting[1].add(voter)
        return entry[1], len(voters)

    def take_pending(self) -> dict[str, list[Any]]:
        pending, self.pending = self.pending, {}
        return pending

    def start(self, prefix: str, now: float) -> list[Any]:
        """A new window for the prefix; when the table is full, the ended windows go, and
        all of them when that is not enough."""
        if len(self.windows) >= self.keys_max:
            self.windows = {key: value for key, value in self.windows.items()
                            if now - value[0] < self.window_s}
            if len(self.windows) >= self.keys_max:
                self.windows.clear()
        entry = self.windows[prefix] = [now, 0, set()]
        return entry


def network_of_prefix(prefix: str) -> str:
    """The network a prefix key names: "10.1.2" -> "10.1.2.0/24"; IPv6 keys are networks."""
    return prefix if "/" in prefix else f"{prefix}.0/24"


def poll_of_query(query_string: str) -> str:
    """The `poll` of `GET /v1/challenge?poll=P`, the only field; else BadRequest."""
    try:
        fields = parse_qsl(query_string, strict_parsing=True, max_num_fields=QUERY_FIELDS_MAX)
    except ValueError:
        raise BadRequest("the query must be poll=<poll id>") from None
    if len(fields) != 1 or fields[0][0] != "poll":
        raise BadRequest("the query must be poll=<poll id>")
    return fields[0][1]


def challenge_document(text: str, difficulty_bits: int) -> dict[str, Any]:
    expires = datetime.datetime.fromtimestamp(challenge.expires_s_of(text), datetime.UTC)
    return {"challenge": text, "algorithm": challenge.ALGORITHM,
            "difficulty_bits": difficulty_bits,
            "expires_at": expires.isoformat().replace("+00:00", "Z")}


class Defences:
    """One worker's bans, limits, velocity rules and challenge difficulty."""

    def __init__(self, config: Config, limiter: RateLimiter, clock=time.monotonic) -> None:
        self.config = config
        self.limiter = limiter
        self.clock = clock
        self.bans = BanList()
        self.refresher = BanRefresher(config, self.bans) if config.bans_redis_url else None
        self.suspicious = ExpiringKeys(config.suspicion_keys_max)
        self.velocity = Velocity(config.velocity_window_s,
                                 max(config.velocity_prefix_voters_max,
                                     config.velocity_autoban_voters_max),
                                 config.suspicion_keys_max,
                                 syncing=bool(config.ratelimit_redis_url))
        self.velocity_sync: VelocitySync | None = (
            VelocitySync(config, self) if config.ratelimit_redis_url else None)
        self.bits_min = config.challenge_difficulty_bits_min
        self.load_bits = 0  # set by run() from the measured load
        # What every client of this worker is asked for now (min + load, capped): with no
        # suspicion either, a vote skips the difficulty's computation altogether.
        self.base_bits = min(self.bits_min, config.challenge_difficulty_bits_max)
        self.votes_seen = 0

    async def run(self) -> None:
        """The background part: the ban list's refresh and the load measurement."""
        tasks = [self._measure_load()]
        if self.refresher is not None:
            tasks.append(self.refresher.run())
        if self.velocity_sync is not None:
            tasks.append(self.velocity_sync.run())
        await asyncio.gather(*tasks)

    async def _measure_load(self) -> None:
        threshold = self.config.challenge_load_votes_per_s
        last = self.clock()
        while True:
            await asyncio.sleep(LOAD_TICK_S)
            now = self.clock()
            rate = self.votes_seen / max(now - last, 1e-3)
            self.votes_seen, last = 0, now
            self.set_load_bits(self.config.challenge_difficulty_bits_load
                               if threshold and rate > threshold else 0)

    def set_load_bits(self, bits: int) -> None:
        self.load_bits = bits
        self.base_bits = min(self.bits_min + bits, self.config.challenge_difficulty_bits_max)

    async def close(self) -> None:
        if self.refresher is not None:
            await self.refresher.close()
        if self.velocity_sync is not None:
            await self.velocity_sync.close()

    def check_client(self, scope_client: str, forwarded_for: str | None,
                     node_forwarded: bool) -> ClientCheck:
        """Bans and rate limits of the client's address and prefix (Banned, RateLimited)."""
        return self.check_client_keys(self.limiter.client_keys(scope_client, forwarded_for),
                                      node_forwarded)

    def client_address(self, scope_client: str, forwarded_for: str | None) -> tuple[str, str]:
        """(peer, client address) of the request (engine/ratelimit.py)."""
        return self.limiter.client_address(scope_client, forwarded_for)

    def refuse_limited(self, peer: str, address: str) -> None:
        """RateLimited at once when the client's address is past its limit now: one lookup
        (no key added, nothing counted), right after the token's MAC and before the body,
        so a flood past its limit costs little more than a 401 (perf/bench_attack.py's 429
        class). What passes is checked and counted by check_client_at, as before; a prefix
        past its limit is refused there."""
        wait_s = self.limiter.address_over_s(address)
        if wait_s:
            self._suspect(self.limiter.keys_of(peer, address))
            raise rate_limited(wait_s, "this address")

    def check_client_at(self, peer: str, address: str, node_forwarded: bool) -> ClientCheck:
        """check_client for what client_address found."""
        return self.check_client_keys(self.limiter.keys_of(peer, address), node_forwarded)

    def check_client_keys(self, keys: ClientKeys, node_forwarded: bool) -> ClientCheck:
        """check_client for the keys client_keys gave."""
        bans = self.bans
        if (bans.addresses or bans.prefixes) and bans.client_banned(
                keys.address, keys.prefix, time.time_ns() // 1_000_000):
            raise Banned("requests from this network are refused for now")
        try:
            voter_limited = self.limiter.check_client_keys(keys, node_forwarded)
        except RateLimited:
            self._suspect(keys)
            raise
        return keys, voter_limited, node_forwarded and keys.exempt and keys.address == keys.peer

    def check_voter(self, client: ClientCheck, voter: int, poll: str, headers: Any,
                    keyring: KeyRing) -> None:
        """The voter's ban and limit, the velocity rules, and the proof-of-work when one is
        asked for (Banned, RateLimited, ChallengeRequired, ChallengeFailed)."""
        keys, voter_limited, trusted_forward = client
        if self.bans.voters and self.bans.voter_banned(voter, time.time_ns() // 1_000_000):
            raise Banned("requests from this voter are refused for now")
        if voter_limited:
            try:
                self.limiter.check_voter(voter)
            except RateLimited:
                self._suspect(keys)
                raise
        if trusted_forward:
            return
        self.votes_seen += 1
        if not keys.exempt:
            self._apply_velocity(keys.prefix, voter)
        if self.base_bits or self.suspicious.until:
            bits = self.difficulty_bits(keys)
            if bits:
                self._check_solution(headers, poll, voter, bits, keyring)

    def difficulty_bits(self, keys: ClientKeys) -> int:
        bits = self.base_bits
        if self.suspicious.until and not keys.exempt:
            now = self.clock()
            if self.suspicious.active(keys.address, now) or self.suspicious.active(keys.prefix,
                                                                                   now):
                bits += self.config.challenge_difficulty_bits_suspicious
        return min(bits, self.config.challenge_difficulty_bits_max)

    def challenge_for(self, client: ClientCheck, poll: str, voter: int,
                      keyring: KeyRing) -> dict[str, Any]:
        """`GET /v1/challenge`: a challenge at the difficulty this client is asked for now
        (0: none is asked for; a vote without a solution is accepted)."""
        bits = self.difficulty_bits(client[0])
        return challenge_document(self._issue(poll, voter, bits, keyring), bits)

    def _issue(self, poll: str, voter: int, bits: int, keyring: KeyRing) -> str:
        return challenge.issue(keyring, poll, voter, bits, int(time.time()),
                               self.config.challenge_ttl_s)

    def _check_solution(self, headers: Any, poll: str, voter: int, bits: int,
                        keyring: KeyRing) -> None:
        bits_min = max(bits - self.config.challenge_grace_bits, 0)
        try:
            challenge.verify(keyring, headers.get(challenge.CHALLENGE_HEADER),
                             headers.get(challenge.SOLUTION_HEADER), poll, voter,
                             int(time.time()), bits_min)
        except (challenge.ChallengeRequired, challenge.ChallengeFailed) as exc:
            fresh = challenge_document(self._issue(poll, voter, bits, keyring), bits)
            raise type(exc)(exc.detail, challenge=fresh) from None

    def _suspect(self, keys: ClientKeys) -> None:
        if keys.exempt:
            return
        now = self.clock()
        suspicion_s = self.config.suspicion_s
        marked = self.suspicious.until
        # A client past its limit is refused on every request: its marks are renewed once
        # they have run half their course, not on every 429.
        renew_before = now + suspicion_s / 2
        if marked.get(keys.address, 0.0) > renew_before and \
                marked.get(keys.prefix, 0.0) > renew_before:
            return
        until = now + suspicion_s
        self.suspicious.mark(keys.address, until, now)
        self.suspicious.mark(keys.prefix, until, now)

    def _apply_velocity(self, prefix: str, voter: int) -> None:
        votes, voters = self.velocity.record(prefix, voter, self.clock())
        if self.apply_global_velocity(prefix, votes, voters):
            raise Banned("requests from this network are refused for now")

    def apply_global_velocity(self, prefix: str, votes: int, voters: int) -> bool:
        """The velocity rules on a prefix's counts: this worker's window, or every worker's
        as the store answered them (engine/velocity_sync.py). True when it was banned."""
        config, now = self.config, self.clock()
        if votes > config.velocity_prefix_votes_max or voters > config.velocity_prefix_voters_max:
            self.suspicious.mark(prefix, now + config.suspicion_s, now)
            if config.velocity_autoban_voters_max and voters > config.velocity_autoban_voters_max:
                self._autoban(prefix)
                return True
        return False

    def _autoban(self, prefix: str) -> None:
        expires_ms = time.time_ns() // 1_000_000 + self.config.velocity_autoban_ttl_s * 1000
        if prefix in self.bans.prefixes or len(self.bans.prefixes) >= self.config.bans_max:
            return
        self.bans.prefixes[prefix] = expires_ms
        if self.refresher is not None:
            self.refresher.queue_autoban("prefix", network_of_prefix(prefix), expires_ms)
