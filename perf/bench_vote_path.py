"""The engine's own Python work per vote, without HTTP: the event loop's CPU per vote.

Drives `engine.app.App.__rsgi__` in-process (a fresh data dir, the embedded log with real
fsyncs) from N closed-loop clients, each sending its next vote when it has the answer to the
last, with real signed tokens and distinct voters. Granian is left out on purpose: this
figure, beside the loop thread's CPU per vote under wrk (perf/bench_peers.py) and
the ceiling's, says how much of the engine's cost is its own Python and how much the server
and the GIL around it (docs/performance.md, "What limits the embedded engine now").

    python -m perf.bench_vote_path [--shards 1] [--groups 0] [--clients 64] [--votes 100000]
    python -m perf.bench_vote_path --compare-breakdown [--rounds 2]

With --compare-breakdown it alternates a poll without breakdown (the default, first) and one
created with `breakdown: ["country"]` (its votes' country claims recorded and counted per
country, 20 countries in the tokens either way), each run on a fresh data dir, and prints
the ratio of the medians.

Prints votes/s, the event loop thread's CPU per vote (time.thread_time) and the whole
process's CPU per vote (the log writer's threads included), and how busy the loop was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


class Scope:
    """What the app reads of Granian's RSGI scope."""

    __slots__ = ("client", "headers", "method", "path", "proto")

    def __init__(self, method: str, path: str, headers: dict) -> None:
        self.proto = "http"
        self.client = "127.0.0.1:40000"  # the peer address the rate limiter reads
        self.method = method
        self.path = path
        self.headers = headers


class Proto:
    """What the app uses of Granian's RSGI protocol object: the body, and the answer."""

    __slots__ = ("body", "out", "status")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.status = None
        self.out = b""

    async def __call__(self) -> bytes:
        return self.body

    def response_bytes(self, status: int, headers, body: bytes) -> None:
        self.status = status
        self.out = body


async def drive(app, tokens: list[str], clients: int) -> tuple[dict, float, float, float]:
    statuses: dict[int, int] = {}
    bodies = [b'{"option":"a"}', b'{"option":"b"}', b'{"option":"c"}']
    numbers = iter(range(len(tokens)))

    async def client() -> None:
        for number in numbers:
            proto = Proto(bodies[number % 3])
            scope = Scope("POST", "/v1/polls/bench/votes",
                          {"authorization": "Bearer " + tokens[number], "content-length": "14"})
            await app.__rsgi__(scope, proto)
            statuses[proto.status] = statuses.get(proto.status, 0) + 1

    wall_started, loop_started, process_started = time.perf_counter(), time.thread_time(), time.process_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    return (statuses, time.perf_counter() - wall_started, time.thread_time() - loop_started,
            time.process_time() - process_started)


COUNTRIES = ["DE", "FR", "IT", "ES", "PL", "NL", "SE", "PT", "GR", "IE", "AT", "BE", "DK", "FI",
             "NO", "CH", "CZ", "HU", "RO", "UK"]  # the country claims of --compare-breakdown


def run_once(args, breakdown: list[str], config_overrides: dict | None = None) -> dict:
    """One fresh data dir, one poll (with `breakdown`), args.votes votes: the figures.

    `config_overrides` are further Config fields (perf/bench_tracing.py turns tracing on)."""
    import uvloop

    from engine import tokens as token_codec
    from engine.cli import prepare_data_dir
    from engine.config import CONFIG_ENV, config_for_workers, load_config
    from engine.keys import load_keys

    data_dir = Path(tempfile.mkdtemp(prefix="votes-vote-path-", dir=args.data_root))
    try:
        config = load_config(None, data_dir=str(data_dir), shards=args.shards, groups=args.groups,
                             **(config_overrides or {}))
        prepare_data_dir(config)
        os.environ[CONFIG_ENV] = config_for_workers(config)
        keyring = load_keys(config.data_path)
        # Tokens of mixed countries either way, so the two runs differ only by the poll.
        tokens = [token for first in range(0, args.votes, 1000)
                  for token in token_codec.issue_voter_tokens(
                      keyring, first, min(1000, args.votes - first), ttl_s=3600, poll="bench",
                      country=COUNTRIES[first // 1000 % len(COUNTRIES)])]

        async def run():
            from engine.app import App

            app = App()
            app.__rsgi_init__(asyncio.get_running_loop())
            for _ in range(400):
                if app.node.slot is not None and (await app.node.readiness())["ready"]:
                    break
                await asyncio.sleep(0.05)
            admin = token_codec.issue_admin_token(keyring, ttl_s=3600)
            body = json.dumps({"id": "bench", "options": ["a", "b", "c"],
                               "breakdown": breakdown}).encode()
            create = Proto(body)
            await app.__rsgi__(Scope("POST", "/v1/polls", {"authorization": "Bearer " + admin,
                                                            "content-length": str(len(body))}), create)
            if create.status != 201:
                raise SystemExit(f"creating the poll failed: {create.status} {create.out!r}")
            try:
                return await drive(app, tokens, args.clients)
            finally:
                await app.node.stop()

        statuses, wall_s, loop_s, process_s = uvloop.run(run())
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    created = statuses.get(201, 0)
    if created != args.votes:
        raise SystemExit(f"not every vote was answered 201: {statuses}")
    return {
        "shards": args.shards, "groups": config.resolved().groups, "clients": args.clients, "votes": created,
        "breakdown": breakdown,
        "votes_per_s": round(created / wall_s), "loop_us_per_vote": round(loop_s / created * 1e6, 1),
        "process_us_per_vote": round(process_s / created * 1e6, 1), "loop_busy": round(loop_s / wall_s, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--groups", type=int, default=0,
                        help="fencing groups (0: the engine's automatic choice)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--votes", type=int, default=100_000)
    parser.add_argument("--data-root", default="/var/tmp", help="a real (non-tmpfs) filesystem")
    parser.add_argument("--compare-breakdown", action="store_true",
                        help="also a poll with the country breakdown, alternating with the "
                             "default poll (default first) for --rounds rounds; prints ratios")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not args.compare_breakdown:
        print(json.dumps(run_once(args, [])))
        return 0
    from perf.machine import describe_machine
    from perf.output import print_conditions

    print_conditions(describe_machine(), vars(args))
    runs: dict[str, list[dict]] = {"default": [], "country": []}
    for _ in range(args.rounds):
        for name, breakdown in (("default", []), ("country", ["country"])):
            runs[name].append(run_once(args, breakdown))
            print(json.dumps(runs[name][-1]), flush=True)
    for figure in ("loop_us_per_vote", "process_us_per_vote"):
        default = sorted(run[figure] for run in runs["default"])[len(runs["default"]) // 2]
        country = sorted(run[figure] for run in runs["country"])[len(runs["country"]) // 2]
        print(f"{figure}: default {default}, country breakdown {country}, "
              f"ratio {country / default:.3f} (medians of {args.rounds} runs each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
