"""What proof-of-work costs (engine/challenge.py, engine/defences.py, docs/security.md).

    python -m perf.bench_challenge [--bits 8,12,16,20] [--seconds-per-level 3]

Prints, in one run on this machine:
- the solve time of the native Python solver (`engine.challenge.solve`) at each
  difficulty: mean and p90 over as many challenges as fit in --seconds-per-level (at least
  3), and its hash rate;
- the server's cost per request: issuing a challenge, verifying a solution (the work a vote
  that carries one adds), and refusing a forged one;
- the vote path's defence checks when no proof-of-work is asked for (the default), beside
  the rate limiter's checks alone that they replace: the hot-path cost of this feature.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from engine import challenge
from engine.config import Config
from engine.defences import Defences
from engine.keys import ensure_keys, load_keys
from engine.ratelimit import RateLimiter

SOLVES_MIN = 3
VERIFY_ROUNDS = 20_000
HOT_PATH_VOTES = 200_000


def solve_times(keyring, bits: int, budget_s: float) -> tuple[list[float], int]:
    """Solve times (s) of fresh challenges at `bits` within budget_s, and the tries made."""
    times: list[float] = []
    tries = 0
    started = time.perf_counter()
    while len(times) < SOLVES_MIN or time.perf_counter() - started < budget_s:
        text = challenge.issue(keyring, "bench", len(times), bits, int(time.time()), 600)
        begun = time.perf_counter()
        solution = challenge.solve(text, bits)
        times.append(time.perf_counter() - begun)
        tries += int(solution) + 1
    return times, tries


def per_call_us(function, rounds: int) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        function()
    return (time.perf_counter() - started) / rounds * 1e6


def server_costs(keyring) -> dict[str, float]:
    now = int(time.time())
    text = challenge.issue(keyring, "bench", 7, 16, now, 600)
    solution = challenge.solve(text, 16)
    forged = text[:-4] + ("AAAA" if not text.endswith("AAAA") else "BBBB")

    def refuse() -> None:
        try:
            challenge.verify(keyring, forged, solution, "bench", 7, now, 16)
        except challenge.ChallengeFailed:
            pass

    return {
        "issue a challenge": per_call_us(
            lambda: challenge.issue(keyring, "bench", 7, 16, now, 600), VERIFY_ROUNDS),
        "verify a solution": per_call_us(
            lambda: challenge.verify(keyring, text, solution, "bench", 7, now, 16),
            VERIFY_ROUNDS),
        "refuse a forged challenge": per_call_us(refuse, VERIFY_ROUNDS),
    }


def hot_path_ns(keyring) -> dict[str, float]:
    """ns per vote of the checks around the token, with no proof-of-work asked for."""
    config = Config(ratelimit_exempt_networks="", ratelimit_address_burst=10**6,
                    ratelimit_prefix_burst=10**6, ratelimit_voter_burst=10**6)
    clients = [f"10.{index // 250 % 250}.{index % 250}.1:4000" for index in range(5000)]
    headers: dict[str, str] = {}

    def limiter_alone() -> float:
        limiter = RateLimiter(config)
        started = time.perf_counter()
        for vote in range(HOT_PATH_VOTES):
            if limiter.check_client(clients[vote % 5000], None, False):
                limiter.check_voter(vote)
        return (time.perf_counter() - started) / HOT_PATH_VOTES * 1e9

    def with_defences() -> float:
        defences = Defences(config, RateLimiter(config))
        started = time.perf_counter()
        for vote in range(HOT_PATH_VOTES):
            client = defences.check_client(clients[vote % 5000], None, False)
            defences.check_voter(client, vote, "bench", headers, keyring)
        return (time.perf_counter() - started) / HOT_PATH_VOTES * 1e9

    # Alternated, best of three each: the shared machine's noise hits both alike.
    alone, defended = [], []
    for _ in range(3):
        alone.append(limiter_alone())
        defended.append(with_defences())
    return {"rate limiter alone (before)": min(alone),
            "bans + limits + velocity + difficulty (now)": min(defended)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="8,12,16,20")
    parser.add_argument("--seconds-per-level", type=float, default=3.0)
    parser.add_argument("--data-dir", default="/tmp/bench-challenge-keys")
    args = parser.parse_args()
    levels = [int(bits) for bits in args.bits.split(",")]
    data_dir = Path(args.data_dir)
    ensure_keys(data_dir)
    keyring = load_keys(data_dir)
    print(f"# bench_challenge: {platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} CPUs ({platform.machine()}), bits {levels}, "
          f"{args.seconds_per_level} s per level")
    print("\n## Native Python solver (engine.challenge.solve), one core")
    print(f"{'bits':>4} {'solves':>6} {'mean ms':>10} {'p90 ms':>10} {'Mhash/s':>8}")
    for bits in levels:
        times, tries = solve_times(keyring, bits, args.seconds_per_level)
        p90 = statistics.quantiles(times, n=10)[-1] if len(times) >= 2 else times[0]
        print(f"{bits:>4} {len(times):>6} {statistics.mean(times) * 1e3:>10.2f} "
              f"{p90 * 1e3:>10.2f} {tries / sum(times) / 1e6:>8.2f}")
    print("\n## Server cost per request (us)")
    for name, value in server_costs(keyring).items():
        print(f"{name:<30} {value:>8.2f}")
    print("\n## Vote path checks, no proof-of-work asked for (ns per vote)")
    costs = hot_path_ns(keyring)
    for name, value in costs.items():
        print(f"{name:<45} {value:>8.0f}")
    before, now = costs.values()
    print(f"ratio now/before: {now / before:.2f} (+{now - before:.0f} ns per vote)")


if __name__ == "__main__":
    main()
