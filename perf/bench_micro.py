"""Micro-benchmarks of the engine's own hot functions, on real WAL bytes, and voter memory.

Each measurement imports the engine's code and runs it in-process; nothing is
re-implemented here:

1. batch apply: engine/_fastpath.pyx against its Python twin (engine/fastpath_py.py) on
   VoteBatch records encoded and decoded with shards/records.py (perf/bench_fastpath.py);
2. WAL encode/decode: shards/records.py encode_record + frame, decode_record, on batches
   of ``--batch-votes`` votes: votes/s, MB/s, bytes per vote on the log;
3. token verify: engine/tokens.py verify_voter_token on distinct real tokens; and the rate
   limiter's checks (engine/ratelimit.py) over as many distinct addresses and voters;
4. receipt signing: engine/signing.py sign_commit (one Ed25519 signature and the Merkle
   trees per commit cycle, a SignedBatch per fencing group batch) and
   SignedBatch.receipt_bodies (every 201 body), per commit and per vote, for commits of 8 to
   4096 votes shaped as the engine signs them (log format 3): one batch per fencing group
   (``--receipt-groups``) holding a run per shard with votes, the votes spread at random
   over ``--receipt-shards`` shards (shard s in group s mod groups);
5. voter memory in the engine's sharded layout (shard = voter_id mod S, index = voter_id
   div S, one pyroaring BitMap per shard and poll) for 300M eligible voters at 10/50/90 %
   random turnout and S = 8, 256 and 1024: the serialized size (BitMap.serialize) and the
   container bytes (get_statistics), in bits per eligible voter. Shards with more than
   ``--bitmap-sample-max`` indexes are measured on a prefix of that many indexes of one
   shard and extrapolated (random turnout is uniform, so every 2^16-index container of a
   shard looks alike); smaller shards are built whole. Beside it, the engine's receipt
   locator's RAM (shards/locator_runs.py: a fence of 4 bytes per 1024 counted votes and the
   open run at its bound, 12 bytes x locator_run_entries per shard; the entries themselves
   are in run files on disk, 12 bytes per counted vote), a
   Redis SET (MEMORY USAGE of a sample set in a private redis-server, scaled per member;
   computed from Redis's encoding when no redis-server runs) and a Bloom filter at a 1e-6
   false-positive rate (computed: -n ln p / (ln 2)^2 bits).

Prints the conditions and a table with pass/fail against the perf issue's targets
(apply >= 5M votes/s and >= 10x the twin; bitmaps <= 2.2 bits per eligible voter at 50 %
turnout) and writes perf/results/micro.json.

    python -m perf.bench_micro [--quick]
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import msgspec
from pyroaring import BitMap

from engine import _fastpath as compiled
from engine import fastpath_py as python_twin
from engine import signing, tokens
from engine.config import Config
from engine.keys import ensure_keys, load_keys
from perf import PERF_DIR
from perf.bench_fastpath import make_wal_payloads, run_apply
from perf.machine import describe_machine
from perf.output import print_conditions, print_table, write_json
from perf.processes import ServerProcess, free_port
from shards.locator_runs import RUN_ENTRIES_DEFAULT
from shards.run_files import RUN_BLOCK_ENTRIES
from shards.records import decode_record, encode_record, frame

VOTERS_ELIGIBLE = 300_000_000
TURNOUTS = (0.1, 0.5, 0.9)
SHARD_COUNTS = (8, 256, 1024)
BLOOM_FALSE_POSITIVE = 1e-6
# The engine's default layout (shards, and the fencing groups it resolves them to).
DEFAULT_LAYOUT = Config().validate()
CONTAINER_INDEXES = 1 << 16
TARGETS = {
    "cython apply votes/s": (5e6, "min"),
    "cython/python apply": (10.0, "min"),
    "bitmap bits/voter at 50%": (2.2, "max"),
}


def median_rate(function, count: int, rounds: int) -> float:
    """Median of ``rounds`` timings of ``function()``, as ``count`` items per second."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return count / statistics.median(times)


# --- 1. batch apply ---------------------------------------------------------------------


def bench_apply(args) -> dict:
    voters_per_shard = args.apply_voters_eligible // args.apply_shards
    votes = int(voters_per_shard * 0.5)
    payloads = make_wal_payloads(voters_per_shard, votes, args.batch_votes, 4, args.seed)
    batches = [decode_record(payload) for payload in payloads]
    rates: dict[str, list[float]] = {"cython": [], "python": []}
    for _ in range(args.rounds):
        for name, implementation in (("cython", compiled), ("python", python_twin)):
            elapsed_s, counted = run_apply(implementation, batches, 4)
            if counted != votes:
                raise SystemExit(f"{name} counted {counted} of {votes} distinct votes")
            rates[name].append(votes / elapsed_s)
    cython, python = statistics.median(rates["cython"]), statistics.median(rates["python"])
    return {
        "voters_eligible": args.apply_voters_eligible,
        "shards": args.apply_shards,
        "votes_applied": votes,
        "batch_votes": args.batch_votes,
        "votes_per_s": {"cython": round(cython), "python": round(python)},
        "rounds": {k: [round(v) for v in vs] for k, vs in rates.items()},
        "ratio_cython_over_python": round(cython / python, 2),
    }


# --- 2. WAL encode / decode -------------------------------------------------------------


def bench_wal(args) -> dict:
    votes = args.batch_votes * 64
    payloads = make_wal_payloads(votes * 4, votes, args.batch_votes, 4, args.seed)
    batches = [decode_record(payload) for payload in payloads]
    payload_bytes = sum(map(len, payloads))
    framed_bytes = sum(len(frame(payload)) for payload in payloads)
    encode = median_rate(lambda: [frame(encode_record(b)) for b in batches], votes, args.rounds)
    decode = median_rate(lambda: [decode_record(p) for p in payloads], votes, args.rounds)
    # A one-vote batch shows the fixed cost of a record (signature, Merkle node, key id).
    single = make_wal_payloads(1000, 1, 1, 4, args.seed)[0]
    return {
        "batch_votes": args.batch_votes,
        "votes": votes,
        "encode_frame_votes_per_s": round(encode),
        "decode_votes_per_s": round(decode),
        "encode_mb_per_s": round(encode * framed_bytes / votes / 1e6, 1),
        "decode_mb_per_s": round(decode * payload_bytes / votes / 1e6, 1),
        "bytes_per_vote_framed": round(framed_bytes / votes, 3),
        "record_bytes_one_vote": len(frame(single)),
    }


# --- 3. token verify --------------------------------------------------------------------


def bench_tokens(args, keyring) -> dict:
    count = args.tokens
    issued = list(tokens.issue_voter_tokens(keyring, 1, count, ttl_s=3600, poll="bench"))
    headers = [("Bearer " + token).encode() for token in issued]
    now_s = int(time.time())
    verify = tokens.verify_voter_token

    def run() -> None:
        for header in headers:
            verify(keyring, header, now_s, "bench")

    rate = median_rate(run, count, args.rounds)
    return {"tokens": count, "token_len": len(issued[0]), "verify_per_s": round(rate),
            "verify_us": round(1e6 / rate, 2)}  # fmt: skip


# --- 3b. rate limit check ---------------------------------------------------------------


def bench_ratelimit(args) -> dict:
    """engine/ratelimit.py on the vote path's two calls: check_client (address + /24 prefix,
    before the token; once at each address's first sight, then on known addresses) and
    check_voter, over `--tokens` distinct addresses and voters, and one Gcra.check on a
    warm key. Generous limits: every check admits (the common case)."""
    from engine.ratelimit import RateLimiter

    count = args.tokens
    config = msgspec.structs.replace(
        Config(), ratelimit_exempt_networks="", ratelimit_redis_url="redis://unused:1",
        ratelimit_address_per_s=1e6, ratelimit_prefix_per_s=1e6, ratelimit_voter_per_s=1e6)
    limiter = RateLimiter(config)  # syncing: pending counts kept, as with a Redis Cluster
    clients = [f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}:40000"
               for index in range(count)]
    gcra, now = limiter.address, time.monotonic()

    def run_client() -> None:
        for client in clients:
            limiter.check_client(client, None)

    def run_voter() -> None:
        for voter in range(count):
            limiter.check_voter(voter)

    def run_warm() -> None:
        for _ in range(count):
            gcra.check("10.0.0.1", now)

    # First sight of every address: the exemption and prefix are computed (ipaddress) and
    # cached, and every key is new; then the timed rounds see known keys.
    first_sight_s = time.perf_counter()
    run_client()
    first_sight_s = time.perf_counter() - first_sight_s
    rates = {name: median_rate(run, count, args.rounds)
             for name, run in (("check_client", run_client), ("check_voter", run_voter),
                               ("gcra_check_warm", run_warm))}
    return {"keys": count, "check_client_first_sight_us": round(first_sight_s / count * 1e6, 3),
            **{f"{name}_us": round(1e6 / rate, 3) for name, rate in rates.items()}}


# --- 4. receipt signing -----------------------------------------------------------------


RECEIPT_VOTES_PER_COMMIT = (8, 64, 512, 4096)


def receipt_cycle_shape(args) -> str:
    """What a signed commit cycle of section 4 holds (printed with the conditions)."""
    return (f"one batch per fencing group per commit, {args.receipt_groups} groups of "
            f"{args.receipt_shards} shards (shard s in group s mod {args.receipt_groups}), "
            f"votes spread over the shards at random, one run per shard in its group's batch")


def commit_cycle(rng: random.Random, shards: int, groups: int, batch_seq: int,
                 votes: int) -> list[tuple[int, int, list[signing.VoteRun]]]:
    """One commit cycle's (group, batch_seq, runs) as a worker owning every group signs it
    (shards/planning.py): `votes` votes of random voters, each of shard voter mod shards; a
    batch per group with votes holding a run per shard (one poll), in the order the shards'
    first votes arrived. Every group's batch of this cycle is its `batch_seq`-th."""
    by_group: dict[int, dict[int, list[tuple[str, int, str]]]] = {}
    for _ in range(votes):
        voter = rng.randrange(1, 2**32)
        shard = voter % shards
        by_group.setdefault(shard % groups, {}).setdefault(shard, []).append(("bench", voter, "a"))
    return [(group, batch_seq, [run for shard, shard_votes in by_shard.items()
                                for run in signing.vote_runs(shard, shard_votes)])
            for group, by_shard in sorted(by_group.items())]


def bench_receipts(args, keyring) -> list[dict]:
    hasher = signing.VoterHasher(keyring.voter_hash_secret)
    rows = []
    rng = random.Random(args.seed)
    shards, groups = args.receipt_shards, args.receipt_groups
    for votes in RECEIPT_VOTES_PER_COMMIT:
        commits = max(3, 4096 // votes)
        cycles = [commit_cycle(rng, shards, groups, commit, votes) for commit in range(commits)]
        signed_all: list = []

        def sign(cycles=cycles, signed_all=signed_all) -> None:
            signed_all.clear()
            for batches in cycles:
                signed_all.append(signing.sign_commit(keyring, hasher, 1, batches))

        def cut(signed_all=signed_all) -> None:
            for signed in signed_all:
                for batch in signed:
                    batch.receipt_bodies(0)

        sign_per_s = median_rate(sign, commits, args.rounds)
        receipts_per_s = median_rate(cut, commits * votes, args.rounds)
        rows.append({
            "shards": shards,
            "groups": groups,
            "votes_per_commit": votes,
            # Fewer than `groups` when a small commit leaves a group without votes.
            "group_batches_per_commit": round(statistics.fmean(len(cycle) for cycle in cycles), 2),
            "shard_runs_per_commit": round(statistics.fmean(
                sum(len(runs) for _, _, runs in cycle) for cycle in cycles), 2),
            "sign_commit_us": round(1e6 / sign_per_s, 1),
            "sign_us_per_vote": round(1e6 / sign_per_s / votes, 2),
            "receipts_us_per_vote": round(1e6 / receipts_per_s, 2),
        })  # fmt: skip
    return rows


# --- 5. voter memory --------------------------------------------------------------------


def random_subset_bitmap(size: int, turnout: float, rng: random.Random) -> BitMap:
    """A bitmap of a uniform random ``turnout`` share of range(size): sample the smaller
    side (the voters, or the abstainers to remove from a full bitmap)."""
    voted = round(size * turnout)
    if voted <= size // 2:
        return BitMap(rng.sample(range(size), voted))
    bitmap = BitMap(range(size))
    bitmap.difference_update(BitMap(rng.sample(range(size), size - voted)))
    return bitmap


def bench_bitmaps(args) -> list[dict]:
    rng = random.Random(args.seed)
    rows = []
    for shards in SHARD_COUNTS:
        per_shard = math.ceil(VOTERS_ELIGIBLE / shards)
        sampled = min(per_shard, args.bitmap_sample_max)
        # A prefix is a whole number of containers, so no partial container skews it.
        if sampled < per_shard:
            sampled = max(CONTAINER_INDEXES, sampled // CONTAINER_INDEXES * CONTAINER_INDEXES)
        for turnout in TURNOUTS:
            bitmap = random_subset_bitmap(sampled, turnout, rng)
            serialized = len(bitmap.serialize())
            stats = bitmap.get_statistics()
            container_bytes = (stats["n_bytes_array_containers"] + stats["n_bytes_run_containers"]
                               + stats["n_bytes_bitset_containers"])  # fmt: skip
            # The receipt locator's RAM: a fence per RUN_BLOCK_ENTRIES counted votes, and the
            # open run at its bound spread over the whole shard (the entries are on disk).
            locator_bytes = (4 * math.ceil(len(bitmap) / RUN_BLOCK_ENTRIES)
                             + 12 * RUN_ENTRIES_DEFAULT * sampled / per_shard)
            rows.append({
                "shards": shards,
                "turnout": turnout,
                "indexes_per_shard": per_shard,
                "indexes_measured": sampled,
                "extrapolated": sampled < per_shard,
                "serialized_bytes_measured": serialized,
                "containers": stats["n_containers"],
                "bitset_containers": stats["n_bitset_containers"],
                "array_containers": stats["n_array_containers"],
                "run_containers": stats["n_run_containers"],
                "bits_per_eligible_serialized": round(8 * serialized / sampled, 4),
                "bits_per_eligible_containers": round(8 * container_bytes / sampled, 4),
                "fleet_bytes_serialized": round(serialized / sampled * per_shard * shards),
                "locator_bits_per_eligible": round(8 * locator_bytes / sampled, 2),
                "locator_disk_bits_per_eligible": round(96 * len(bitmap) / sampled, 2),
            })  # fmt: skip
    return rows


def redis_set_bytes_per_member(args) -> dict:
    """MEMORY USAGE of a sample SET of voter ids in a private redis-server, per member."""
    redis_bin = shutil.which("redis-server")
    members = args.redis_sample
    if redis_bin is None:
        return computed_redis_set()
    import redis

    port = free_port()
    run_dir = Path(args.work_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess("redis", [redis_bin, "--port", str(port), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "no", "--dir", str(run_dir)],
                           run_dir / "micro-redis.log")  # fmt: skip
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        rng = random.Random(args.seed)
        ids = rng.sample(range(VOTERS_ELIGIBLE), members)
        pipe = client.pipeline(transaction=False)
        for start in range(0, members, 10_000):
            pipe.sadd("voted:bench", *ids[start : start + 10_000])
        pipe.execute()
        usage = client.memory_usage("voted:bench", samples=0)
        encoding = client.object("encoding", "voted:bench")
        version = client.info("server")["redis_version"]
    finally:
        server.stop()
    return {"method": f"measured: MEMORY USAGE SAMPLES 0 of a SET of {members:,} random voter ids "
                      f"in redis-server {version} (encoding {encoding.decode() if isinstance(encoding, bytes) else encoding}), "
                      "scaled per member",
            "bytes_per_member": round(usage / members, 2)}  # fmt: skip


def computed_redis_set() -> dict:
    """Redis 7 hashtable SET of sds members (jemalloc size classes): dictEntry 24 B,
    sds of a 9-digit id (3 B header + 9 + 1) in a 16 B class, ~1.5 bucket pointers."""
    return {"method": "computed from Redis 7's hashtable set encoding (no redis-server here)",
            "bytes_per_member": 24 + 16 + 8 * 1.5}  # fmt: skip


def compare_memory(bitmaps: list[dict], redis_set: dict) -> list[dict]:
    bloom_bits_per_member = -math.log(BLOOM_FALSE_POSITIVE) / math.log(2) ** 2
    rows = []
    for turnout in TURNOUTS:
        bitmap_bits = {row["shards"]: row["bits_per_eligible_serialized"] for row in bitmaps
                       if row["turnout"] == turnout}  # fmt: skip
        locator_bits = max(row["locator_bits_per_eligible"] for row in bitmaps if row["turnout"] == turnout)
        rows.append({
            "turnout": turnout,
            **{f"bitmap_S{shards}_bits": bits for shards, bits in bitmap_bits.items()},
            "redis_set_bits": round(8 * redis_set["bytes_per_member"] * turnout, 2),
            "bloom_1e-6_bits": round(bloom_bits_per_member * turnout, 2),
            "engine_locator_bits": locator_bits,
            "fleet_gb_bitmap_S256": round(bitmap_bits.get(256, 0) * VOTERS_ELIGIBLE / 8 / 1e9, 3),
            "fleet_gb_redis_set": round(redis_set["bytes_per_member"] * turnout * VOTERS_ELIGIBLE / 1e9, 2),
            "fleet_gb_locator": round(locator_bits * VOTERS_ELIGIBLE / 8 / 1e9, 2),
        })  # fmt: skip
    return rows


# --- report -----------------------------------------------------------------------------


def targets_measured(apply: dict, bitmaps: list[dict]) -> dict:
    at_half = [row["bits_per_eligible_serialized"] for row in bitmaps if row["turnout"] == 0.5]
    return {
        "cython apply votes/s": apply["votes_per_s"]["cython"],
        "cython/python apply": apply["ratio_cython_over_python"],
        # The worst shard count measured: the target must hold for each layout.
        "bitmap bits/voter at 50%": max(at_half) if at_half else None,
    }


def verdicts(measured: dict) -> list[dict]:
    rows = []
    for key, (threshold, sense) in TARGETS.items():
        value = measured.get(key)
        ok = value is not None and (value >= threshold if sense == "min" else value <= threshold)
        rows.append({"target": key, "threshold": threshold, "sense": ">=" if sense == "min" else "<=",
                     "measured": value, "verdict": "not measured" if value is None else ("PASS" if ok else "FAIL")})  # fmt: skip
    return rows


def print_report(result: dict) -> None:
    apply = result["apply"]
    print("\n== batch apply (real WAL records, one shard, 50 % turnout)")
    print_table(["implementation", "votes/s (median)"],
                [["cython", f"{apply['votes_per_s']['cython']:,}"],
                 ["python twin", f"{apply['votes_per_s']['python']:,}"],
                 ["ratio", f"{apply['ratio_cython_over_python']:.1f}x"]])  # fmt: skip
    wal = result["wal"]
    print(f"\n== WAL records ({wal['batch_votes']} votes per batch)")
    print(f"  encode+frame {wal['encode_frame_votes_per_s']:,} votes/s ({wal['encode_mb_per_s']} MB/s), "
          f"decode {wal['decode_votes_per_s']:,} votes/s ({wal['decode_mb_per_s']} MB/s), "
          f"{wal['bytes_per_vote_framed']} bytes per vote on the log; a 1-vote record is "
          f"{wal['record_bytes_one_vote']} bytes")  # fmt: skip
    tok = result["tokens"]
    print(f"\n== token verify: {tok['verify_per_s']:,}/s ({tok['verify_us']} us each, "
          f"{tok['token_len']}-char tokens)")  # fmt: skip
    limits = result["ratelimit"]
    print(f"\n== rate limit ({limits['keys']:,} distinct keys): check_client "
          f"{limits['check_client_us']} us ({limits['check_client_first_sight_us']} us at an "
          f"address's first sight), check_voter {limits['check_voter_us']} us, one warm "
          f"Gcra.check {limits['gcra_check_warm_us']} us")
    receipts = result["receipts"]
    print("\n== receipt signing (sign_commit: Merkle trees + one Ed25519 signature per commit; "
          f"a batch per fencing group, {receipts[0]['groups']} groups of {receipts[0]['shards']} "
          "shards, votes spread over the shards)")
    print_table(["votes/commit", "group batches", "shard runs", "sign us/commit", "sign us/vote",
                 "receipts us/vote"],
                [[r["votes_per_commit"], r["group_batches_per_commit"], r["shard_runs_per_commit"],
                  r["sign_commit_us"], r["sign_us_per_vote"], r["receipts_us_per_vote"]]
                 for r in receipts])  # fmt: skip
    print(f"\n== voter bitmaps, {VOTERS_ELIGIBLE:,} eligible voters (bits per eligible voter, serialized)")
    print_table(["S", "turnout", "indexes/shard", "measured", "containers (bitset/array)",
                 "bits/eligible", "container bits", "fleet MB"],
                [[r["shards"], f"{r['turnout']:.0%}", f"{r['indexes_per_shard']:,}",
                  f"{r['indexes_measured']:,}" + (" (prefix, extrapolated)" if r["extrapolated"] else " (whole shard)"),
                  f"{r['containers']} ({r['bitset_containers']}/{r['array_containers']})",
                  f"{r['bits_per_eligible_serialized']:.3f}", f"{r['bits_per_eligible_containers']:.3f}",
                  f"{r['fleet_bytes_serialized'] / 1e6:,.1f}"] for r in result["bitmaps"]])  # fmt: skip
    print(f"\n== voter memory compared, bits per eligible voter (Redis: {result['redis_set']['method']}; "
          f"Bloom computed at p = {BLOOM_FALSE_POSITIVE:g})")  # fmt: skip
    print_table(["turnout", "bitmap S=8", "S=256", "S=1024", "Redis SET", "Bloom 1e-6",
                 "engine locator", "fleet GB: bitmap / Redis / locator"],
                [[f"{r['turnout']:.0%}", r.get("bitmap_S8_bits"), r.get("bitmap_S256_bits"),
                  r.get("bitmap_S1024_bits"), r["redis_set_bits"], r["bloom_1e-6_bits"],
                  r["engine_locator_bits"],
                  f"{r['fleet_gb_bitmap_S256']} / {r['fleet_gb_redis_set']} / {r['fleet_gb_locator']}"]
                 for r in result["memory_compared"]])  # fmt: skip
    print("  The engine keeps, per poll and shard, a receipt locator (shards/locator_runs.py) "
          "beside the bitmap: in RAM a fence per 1024 counted votes and a bounded open run "
          "(the column above; bench_memory measured 0.44 bits per eligible voter at 10M voters, "
          "32 shards), on disk 12 bytes per counted vote in run files.")  # fmt: skip
    print("\n== targets")
    print_table(["target", "threshold", "measured", "verdict"],
                [[t["target"], f"{t['sense']} {t['threshold']:g}", f"{t['measured']:,.4g}" if t["measured"] is not None else "-",
                  t["verdict"]] for t in result["targets"]])  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller samples")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--apply-voters-eligible", type=int, default=30_000_000)
    parser.add_argument("--apply-shards", type=int, default=64)
    parser.add_argument("--batch-votes", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--receipt-shards", type=int, default=DEFAULT_LAYOUT.shards,
                        help="shards of a signed commit cycle (engine.config's by default)")
    parser.add_argument("--receipt-groups", type=int, default=DEFAULT_LAYOUT.groups,
                        help="fencing groups of a signed commit cycle, the batches per commit "
                             "(engine.config's for its shards by default)")
    parser.add_argument("--bitmap-sample-max", type=int, default=4 * CONTAINER_INDEXES * 16,
                        help="largest shard prefix built, in voter indexes (whole shards below it)")  # fmt: skip
    parser.add_argument("--redis-sample", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work-dir", default="/var/tmp/votes-bench/micro")
    parser.add_argument("--out", type=Path, default=PERF_DIR / "results" / "micro.json")
    args = parser.parse_args(argv)
    if not 1 <= args.receipt_groups <= args.receipt_shards or \
            args.receipt_shards % args.receipt_groups:
        parser.error("--receipt-groups must divide --receipt-shards")
    if args.quick:
        args.rounds = 1
        args.tokens = 10_000
        args.bitmap_sample_max = 16 * CONTAINER_INDEXES
        args.redis_sample = 200_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    conditions = describe_machine(("votes-engine", "pyroaring", "cryptography", "redis"))
    conditions["fastpath"] = getattr(compiled, "__file__", "?")
    conditions["receipt_cycle"] = receipt_cycle_shape(args)
    print_conditions(conditions, {k: v for k, v in vars(args).items() if k != "out"})
    started = time.monotonic()
    keys_dir = Path(args.work_dir) / "keys-data"
    ensure_keys(keys_dir)
    keyring = load_keys(keys_dir)
    result: dict = {"benchmark": "micro", "conditions": conditions,
                    "parameters": {k: v for k, v in vars(args).items() if k != "out"}}  # fmt: skip
    steps = (("apply", lambda: bench_apply(args)), ("wal", lambda: bench_wal(args)),
             ("tokens", lambda: bench_tokens(args, keyring)),
             ("ratelimit", lambda: bench_ratelimit(args)),
             ("receipts", lambda: bench_receipts(args, keyring)),
             ("bitmaps", lambda: bench_bitmaps(args)),
             ("redis_set", lambda: redis_set_bytes_per_member(args)))  # fmt: skip
    for name, step in steps:
        step_started = time.monotonic()
        result[name] = step()
        print(f"  {name}: {time.monotonic() - step_started:.1f}s", flush=True)
    result["memory_compared"] = compare_memory(result["bitmaps"], result["redis_set"])
    result["targets_measured"] = targets_measured(result["apply"], result["bitmaps"])
    result["targets"] = verdicts(result["targets_measured"])
    result["run_s"] = round(time.monotonic() - started, 1)
    print_report(result)
    write_json(args.out, result)
    print(f"\nwrote {args.out} ({result['run_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
