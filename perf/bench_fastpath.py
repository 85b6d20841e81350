"""Micro-benchmark: batch apply, compiled (engine/_fastpath.pyx) against its Python twin.

Both run on the same real WAL bytes: VoteBatch records encoded and decoded with the
engine's own record format (shards/records.py), one poll, distinct random voters spread
over one shard's id space (voter index = voter_id div shards), as the live path writes them
(each batch is of the shard's fencing group, here group 0, holding one vote group of the
shard: what the owner applies per shard of a group batch).
Each implementation gets a fresh bitmap and applies every batch once; the two runs
alternate `--rounds` times so drift on a noisy machine hits both alike. Prints conditions
and writes JSON.

    python -m perf.bench_fastpath [--voters-eligible 30000000] [--shards 64] [--turnout 0.5]
"""

from __future__ import annotations

import argparse
import array
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

from pyroaring import BitMap

from engine import _fastpath as compiled
from engine import fastpath_py as python_twin
from shards.records import VoteBatch, VoteGroup, decode_record, encode_record


def make_wal_payloads(
    voters_per_shard: int, votes: int, batch_votes: int, options: int, seed: int
) -> list[bytes]:
    rng = random.Random(seed)
    voter_indexes = rng.sample(range(voters_per_shard), votes)
    payloads = []
    for batch_seq, start in enumerate(range(0, votes, batch_votes)):
        chunk = voter_indexes[start : start + batch_votes]
        group = VoteGroup(
            shard=0,
            poll="bench",
            voters=array.array("I", chunk).tobytes(),
            options=array.array("H", [rng.randrange(options) for _ in chunk]).tobytes(),
        )
        record = VoteBatch(
            group=0,
            batch_seq=batch_seq,
            time_ms=0,
            groups=[group],
            batch_position=0,
            batch_nodes=[bytes(32)],
            signature=bytes(64),
            key_id="bench",
        )
        payloads.append(encode_record(record))
    return payloads


def run_apply(implementation, batches: list[VoteBatch], options: int) -> tuple[float, int]:
    bitmap = BitMap()
    tallies = array.array("Q", bytes(8 * options))
    locator = implementation.Locator()
    started = time.perf_counter()
    for batch in batches:
        for group in batch.groups:
            implementation.apply_group(
                bitmap, tallies, locator, group.voters, group.options, batch.batch_seq + 1
            )
    return time.perf_counter() - started, sum(tallies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voters-eligible", type=int, default=30_000_000)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--turnout", type=float, default=0.5)
    parser.add_argument("--batch-votes", type=int, default=4096)
    parser.add_argument("--options", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="perf/results/fastpath.json")
    args = parser.parse_args()

    voters_per_shard = args.voters_eligible // args.shards
    votes = int(voters_per_shard * args.turnout)
    payloads = make_wal_payloads(voters_per_shard, votes, args.batch_votes, args.options, args.seed)
    started = time.perf_counter()
    batches = [decode_record(payload) for payload in payloads]
    decode_s = time.perf_counter() - started

    rates: dict[str, list[float]] = {"cython": [], "python": []}
    for _ in range(args.rounds):
        for name, implementation in (("cython", compiled), ("python", python_twin)):
            elapsed_s, counted = run_apply(implementation, batches, args.options)
            if counted != votes:
                raise SystemExit(f"{name} counted {counted} of {votes} distinct votes")
            rates[name].append(votes / elapsed_s)

    cython_rate = statistics.median(rates["cython"])
    python_rate = statistics.median(rates["python"])
    result = {
        "conditions": {
            "machine": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "voters_eligible": args.voters_eligible,
            "shards": args.shards,
            "voters_per_shard": voters_per_shard,
            "turnout": args.turnout,
            "votes_applied": votes,
            "batch_votes": args.batch_votes,
            "rounds": args.rounds,
            "wal_bytes": sum(map(len, payloads)),
        },
        "decode_votes_per_s": votes / decode_s,
        "apply_votes_per_s": {"cython": cython_rate, "python": python_rate},
        "apply_votes_per_s_rounds": rates,
        "ratio_cython_over_python": cython_rate / python_rate,
    }
    print(json.dumps(result["conditions"], indent=2))
    print(f"{'implementation':<16}{'votes/s (median)':>20}")
    print(f"{'cython':<16}{cython_rate:>20,.0f}")
    print(f"{'python twin':<16}{python_rate:>20,.0f}")
    print(
        f"ratio cython/python: {cython_rate / python_rate:.1f}x; "
        f"msgpack decode of the same WAL records: {votes / decode_s:,.0f} votes/s"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
