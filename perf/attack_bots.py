"""The honest voters and the bots of the attack simulation, and the ledger that judges them.

Pure parts (tested in tests/unit/test_attack_bots.py): the forged tokens, the client
addresses each class claims, the proof-of-work solver, and ``Ledger``, which records every
answer by class and token and says what breaks integrity:

- a 201 for a token that is not valid (forged, or validly signed but expired);
- more than one 201 for one valid token (a stolen token replayed, one token reused);
- a results total that does not match the 201s seen (a vote counted without its 201, or
  a 201 not counted), beyond the requests whose answer never came.

The bots themselves run in perf/bench_attack.py. Address ranges are documentation and
benchmark ranges (RFC 5737, RFC 2544, RFC 6598), sent as X-Forwarded-For to an engine that
trusts 127.0.0.1 as its proxy; nothing leaves the loopback interface.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from engine.tokens import b64url_encode

FLOOD_PREFIX = "203.0.113"  # RFC 5737 TEST-NET-3: the one /24 the flood comes from
POW_PREFIX = "192.0.2"  # RFC 5737 TEST-NET-1: the proof-of-work bots
REUSE_PREFIX = "198.51.100"  # RFC 5737 TEST-NET-2: one address per reused token
HONEST_NETWORK = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking
ROAMING_NETWORK = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598: replay and forgery bots
HONEST_PER_PREFIX = 200  # honest voters per /24: far below the prefix limit
FORGERY_KINDS = ("bad-mac", "unknown-key-id", "altered-claims", "expired")


def honest_address(index: int) -> str:
    """Honest voter ``index``'s own address, HONEST_PER_PREFIX of them per /24."""
    prefix, host = divmod(index, HONEST_PER_PREFIX)
    return str(HONEST_NETWORK[(prefix % (HONEST_NETWORK.num_addresses // 256)) * 256 + host + 1])


def roaming_address(rng: random.Random) -> str:
    """A random address in 100.64.0.0/10: a bot that changes address for every request."""
    return str(ROAMING_NETWORK[rng.randrange(1, ROAMING_NETWORK.num_addresses - 1)])


def prefix_address(prefix: str, index: int) -> str:
    """Host ``index`` (1..254 in turn) of a /24 given by its first three octets."""
    return f"{prefix}.{index % 254 + 1}"


def _parts(token: str) -> list[str]:
    parts = token.split(".")
    if len(parts) != 4:
        raise ValueError("not a v1 token")
    return parts


def _flip_first_char(text: str) -> str:
    # The first base64url character carries 6 full bits: changing it always changes the
    # decoded bytes (the last one may carry padding bits the decoder ignores).
    return ("B" if text[0] == "A" else "A") + text[1:]


def forge(token: str, kind: str) -> str:
    """A forgery of a valid token: bad MAC, an unknown key id, or altered claims (another
    voter id, the signature kept). ``expired`` is minted, not forged: see expired tokens."""
    version, key_id, payload, signature = _parts(token)
    if kind == "bad-mac":
        return ".".join((version, key_id, payload, _flip_first_char(signature)))
    if kind == "unknown-key-id":
        return ".".join((version, "forged-key", payload, signature))
    if kind == "altered-claims":
        claims = msgspec.msgpack.decode(_b64url_decode(payload))
        claims[1] = (claims[1] + 1) % 2**32  # another voter's vote, under this signature
        altered = b64url_encode(msgspec.msgpack.encode(claims)).decode()
        return ".".join((version, key_id, altered, signature))
    raise ValueError(f"unknown forgery {kind!r}; kinds: {', '.join(FORGERY_KINDS)}")


def _b64url_decode(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- proof-of-work -------------------------------------------------------------------------


@dataclass
class Solution:
    nonce: str | None  # None: not found within the budget
    hashes: int
    seconds: float


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def solve_sha256(challenge: str, difficulty_bits: int, budget_s: float,
                 hashes_max: int = 50_000_000) -> Solution:
    """The first nonce n (decimal) with SHA-256(challenge + "." + n) starting with
    ``difficulty_bits`` zero bits, or None once ``budget_s`` or ``hashes_max`` is spent.

    The form of the engine's proof-of-work (engine/challenge.py), written apart from the
    engine's own solver so the bench charges the bot its own hashing; a bot takes another
    solver through ``PowBot.solver``."""
    started = time.perf_counter()
    prefix = challenge.encode() + b"."
    nonce = 0
    deadline = started + budget_s
    while nonce < hashes_max:
        if leading_zero_bits(hashlib.sha256(prefix + str(nonce).encode()).digest()) >= difficulty_bits:
            return Solution(str(nonce), nonce + 1, time.perf_counter() - started)
        nonce += 1
        if nonce % 4096 == 0 and time.perf_counter() > deadline:
            break
    return Solution(None, nonce, time.perf_counter() - started)


Solver = Callable[[str, int, float], Solution]


@dataclass
class PowBot:
    """A bot that votes with fresh valid tokens and pays the proof-of-work when asked.

    When a vote answers 428 with a ``challenge`` (engine/openapi.yaml ChallengeRequired:
    ``challenge``, ``algorithm``, ``difficulty_bits``, ``expires_at``) it solves it with
    ``solver`` within ``budget_s`` of compute per challenge and sends the vote again with
    ``solution_headers``: X-Vote-Challenge and X-Vote-Solution (engine/challenge.py)."""

    budget_s: float
    solver: Solver = solve_sha256
    challenges: int = 0
    solved: int = 0
    unsolved: int = 0
    solve_s: float = 0.0
    hashes: int = 0

    def solve(self, challenge: dict) -> dict[str, str] | None:
        self.challenges += 1
        solution = self.solver(str(challenge.get("challenge", "")),
                               int(challenge.get("difficulty_bits", 0)), self.budget_s)
        self.solve_s += solution.seconds
        self.hashes += solution.hashes
        if solution.nonce is None:
            self.unsolved += 1
            return None
        self.solved += 1
        return self.solution_headers(str(challenge.get("challenge", "")), solution.nonce)

    @staticmethod
    def solution_headers(challenge: str, nonce: str) -> dict[str, str]:
        return {"X-Vote-Challenge": challenge, "X-Vote-Solution": nonce}


# --- the ledger ----------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every answer, by class and by token; what integrity requires of them."""

    statuses: dict[str, Counter] = field(default_factory=dict)
    accepted_by_token: Counter = field(default_factory=Counter)
    forged_accepted: Counter = field(default_factory=Counter)
    sent: Counter = field(default_factory=Counter)

    def record(self, bot: str, token_key: str, token_valid: bool, status: int) -> None:
        self.sent[bot] += 1
        self.statuses.setdefault(bot, Counter())[status] += 1
        if status == 201:
            if token_valid:
                self.accepted_by_token[token_key] += 1
            else:
                self.forged_accepted[bot] += 1

    def accepted(self, bot: str | None = None) -> int:
        if bot is None:
            return sum(counts[201] for counts in self.statuses.values())
        return self.statuses.get(bot, Counter())[201]

    def unanswered(self) -> int:
        from perf.attack_http import TRANSPORT_ERROR

        return sum(counts[TRANSPORT_ERROR] for counts in self.statuses.values())

    def tokens_accepted_twice(self) -> dict[str, int]:
        return {key: count for key, count in self.accepted_by_token.items() if count > 1}

    def integrity_failures(self, results_total: int) -> list[str]:
        """Every way the answers and the count break integrity; [] when they hold.

        ``results_total`` is the poll's settled total. A request with no answer may or may
        not have been counted, so the total may exceed the 201s by at most those."""
        failures = [f"{count} votes accepted for invalid tokens from bot {bot}"
                    for bot, count in sorted(self.forged_accepted.items())]
        twice = self.tokens_accepted_twice()
        if twice:
            sample = ", ".join(f"{key} x{count}" for key, count in sorted(twice.items())[:5])
            failures.append(f"{len(twice)} tokens accepted more than once ({sample})")
        accepted, unanswered = self.accepted(), self.unanswered()
        if not accepted <= results_total <= accepted + unanswered:
            failures.append(f"results total {results_total} outside [201s seen {accepted}, "
                            f"+ unanswered {unanswered}]")
        return failures
