"""What proof-of-work costs (engine/challenge.py, engine/defences.py, docs/security.md).

    python -m perf.bench_challenge [--bits 8,12,16,20] [--seconds-per-level 3] [--no-browser]

Prints, in one run on this machine:
- the solve time of the native Python solver (`engine.challenge.solve`) at each
  difficulty: mean and p90 over as many challenges as fit in --seconds-per-level (at least
  3), and its hash rate;
- the solve time of the results page's solver (engine/static/pow.js, WebCrypto) in
  headless Debian chromium (Playwright), on the same challenges, and its ratio to the
  Python solver's; both solvers try 0, 1, 2, ... so their solutions must be equal, and a
  difference fails the run;
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
BROWSER_ORIGIN = "http://127.0.0.1:9"  # never contacted: Playwright answers its requests


def solve_times(keyring, bits: int, budget_s: float) -> tuple[list[float], int, list[str]]:
    """Solve times (s) of fresh challenges at `bits` within budget_s, the tries made, and
    the challenges."""
    times: list[float] = []
    texts: list[str] = []
    tries = 0
    started = time.perf_counter()
    while len(times) < SOLVES_MIN or time.perf_counter() - started < budget_s:
        text = challenge.issue(keyring, "bench", len(times), bits, int(time.time()), 600)
        begun = time.perf_counter()
        solution = challenge.solve(text, bits)
        times.append(time.perf_counter() - begun)
        texts.append(text)
        tries += int(solution) + 1
    return times, tries, texts


def p90_of(times: list[float]) -> float:
    return statistics.quantiles(times, n=10)[-1] if len(times) >= 2 else times[0]


def browser_solve_times(texts: list[str], bits: int) -> list[float]:
    """pow.js's solve time (s, the page's performance.now()) for each challenge; exits
    non-zero when a solution differs from the Python solver's (the same search order)."""
    from playwright.sync_api import sync_playwright

    from deploy.local.installer import ensure_debian_package

    chromium = ensure_debian_package("chromium", "chromium")
    script = (Path(challenge.__file__).parent / "static" / "pow.js").read_text()
    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            # A loopback origin is a secure context, which WebCrypto needs; the page is
            # served by Playwright itself, so no server's work is in the figures.
            page.route(BROWSER_ORIGIN + "/**", lambda route: route.fulfill(
                content_type="text/html", body="<!doctype html><title>pow</title>"))
            page.goto(BROWSER_ORIGIN + "/pow")
            page.add_script_tag(content=script)
            for text in texts:
                solution, elapsed_ms = page.evaluate(
                    """async ([text, bits]) => {
                        const begun = performance.now();
                        const solution = await window.votesPow.solve(text, bits);
                        return [solution, performance.now() - begun];
                    }""", [text, bits])
                expected = challenge.solve(text, bits)
                if solution != expected:
                    raise SystemExit(f"integrity failure: pow.js solved {text!r} at {bits} bits "
                                     f"with {solution}, the Python solver with {expected}")
                times.append(elapsed_ms / 1e3)
        finally:
            browser.close()
    return times


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
    parser.add_argument("--no-browser", action="store_true",
                        help="skip the headless chromium measurement of pow.js")
    parser.add_argument("--browser-solves", type=int, default=8,
                        help="challenges per level solved in the browser (the first ones)")
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
    solved = {}
    for bits in levels:
        times, tries, texts = solve_times(keyring, bits, args.seconds_per_level)
        solved[bits] = (times, texts)
        print(f"{bits:>4} {len(times):>6} {statistics.mean(times) * 1e3:>10.2f} "
              f"{p90_of(times) * 1e3:>10.2f} {tries / sum(times) / 1e6:>8.2f}")
    if not args.no_browser:
        print("\n## Results page solver (engine/static/pow.js, WebCrypto) in headless chromium,"
              " the same challenges")
        print(f"{'bits':>4} {'solves':>6} {'mean ms':>10} {'p90 ms':>10} {'Mhash/s':>8} "
              f"{'vs Python':>9}")
        for bits in levels:
            times, texts = solved[bits]
            count = min(args.browser_solves, len(texts))
            browser = browser_solve_times(texts[:count], bits)
            tries = sum(int(challenge.solve(text, bits)) + 1 for text in texts[:count])
            python_mean = statistics.mean(times[:count])
            print(f"{bits:>4} {count:>6} {statistics.mean(browser) * 1e3:>10.2f} "
                  f"{p90_of(browser) * 1e3:>10.2f} {tries / sum(browser) / 1e6:>8.2f} "
                  f"{statistics.mean(browser) / python_mean:>8.2f}x")
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
