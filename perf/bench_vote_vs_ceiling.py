"""Vote throughput of the engine as a fraction of the server stack's ceiling.

In one run on one machine, with the same generator (wrk + perf/wrk/votes.lua) and the
same settings, this measures up to three peers:

1. ceiling: perf/ceiling.py, a bare Granian RSGI app answering a fixed 201;
2. embedded: ``votes serve`` on the embedded log, in a fresh data directory on a real
   disk, fed votes from distinct voters (every token is used once; warm-up uses others);
3. kafka (``--kafka``): ``votes serve --config`` on the Kafka WAL (3 brokers, acks=all,
   one transactional producer per shard) and S3 snapshots of a private local stack
   (deploy/local/stack.py on ``--stack-base-port``, brought up with ``--fresh`` and always
   taken down with ``--wipe``, even on failure).

Each engine peer gets a saturating run (every connection sends as soon as it is answered)
and then a paced run at ``--pace-fraction`` (default half) of the rate it just reached.
The bench prints a table per run kind and a result table (201/s, latency, paced latency,
server CPU per 201, ratios to the ceiling and to the embedded engine), then writes
perf/results/vote_vs_ceiling.json. Only 201 responses count as throughput, and the
engine's results endpoint is checked against them: 201s seen <= votes counted <= 201s
seen + requests still in flight.

The generator runs on the same 2-core machine as the server, so absolute numbers move
with everything else running; the ratios, measured side by side, are the figures to
compare. wrk is a closed loop even when paced. See perf/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PERF_DIR,
    BenchError,
    PrivateStack,
    ServerProcess,
    WrkParameters,
    WrkResult,
    describe_machine,
    ensure_wrk,
    filesystem_of,
    format_us,
    free_port,
    http_request,
    print_conditions,
    print_table,
    run_wrk,
    wait_for_http,
    write_json,
)

VOTES_SCRIPT = PERF_DIR / "wrk" / "votes.lua"
CEILING_SCRIPT = PERF_DIR / "ceiling.py"
VENV_BIN = Path(sys.executable).parent
# The engine's command line; --votes-bin replaces it.
VOTES_BIN = VENV_BIN / "votes"
PEERS = ("ceiling", "embedded", "kafka")
# Token-file sizing: at least this many times the rate the run could reach, so that a
# thread never runs dry; the ceiling's own rate bounds the engines'.
TOKEN_MARGIN = 2.0
# Lines written for the ceiling's warm-up, per second of warm-up: above any rate one
# generator thread reaches here, so the warm-up measures the rate that sizes the rest.
CEILING_WARMUP_TOKENS_PER_S = 250_000
# The least the ceiling's measured token file holds, per second of run.
CEILING_TOKENS_PER_S_MIN = 100_000
# A paced run that reaches less than this share of its target rate draws a warning.
PACED_SHORTFALL_WARN = 0.9
# The engine's group-commit histograms (engine/metrics.py), read from GET /metrics.
COMMIT_SECONDS = "vote_wal_commit_duration_seconds"
COMMIT_ITEMS = "vote_wal_commit_items"
CLOSED_LOOP_NOTE = (
    "wrk is a closed loop, paced or not: a connection sends its next request only after "
    "the answer to the last one, and the latency clock starts when the request is "
    "written. When the server stalls, requests that an open-loop client would have sent "
    "then wait unsent, and that wait is in no percentile: latency is under-reported "
    "(coordinated omission). Paced runs count the requests sent more than 1 ms after "
    "their slot (late sends) and how late, and drop slots more than 1 s behind; a paced "
    "rate below its target means the closed loop could not keep up."
)
KAFKA_NOTE = (
    "kafka: the engine on the stack's WAL topic (3 brokers, replication 3, "
    "min.insync.replicas 2, acks=all, one idempotent transactional producer per shard). "
    "Each WAL commit of a shard is one Kafka transaction (begin, AddPartitionsToTxn, "
    "produce, EndTxn), one at a time per shard, and a vote is answered only after its "
    "transaction commits. So with C connections the rate is at most C / commit time: "
    "when the server CPU is low, Kafka's commit latency bounds the rate, not the CPU. "
    "The WAL-commit lines show how long commits took and how many were in flight."
)


@dataclass
class EngineData:
    """An engine data dir kept across runs, with the voters and the poll it has seen.

    A Kafka peer keeps one for the life of its stack: the WAL topic outlives each engine
    process, and the records in it were signed with the keys in this directory.
    """

    path: Path
    voter_next: int = 1
    poll_created: bool = False


@dataclass
class EnginePeer:
    """One engine configuration to measure against the ceiling."""

    name: str  # its key in the JSON: "embedded", "kafka", "kafka-2p", "kafka-c512"
    connections: int
    config_path: Path | None = None  # `votes serve --config`: the Kafka WAL and S3
    stack: PrivateStack | None = None
    data: EngineData | None = None  # None: a fresh data dir for every run
    kafka_partitions: int | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--peers",
        default="ceiling,embedded",
        help=f"comma-separated peers from {','.join(PEERS)}; the ceiling is always measured",
    )
    parser.add_argument("--kafka", action="store_true", help="add the kafka peer to --peers")
    parser.add_argument("--ceiling-only", action="store_true", help="measure the ceiling only")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (-t)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (-c)")
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured run length")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="warm-up run length")
    parser.add_argument("--timeout-s", type=float, default=2.0, help="wrk --timeout")
    parser.add_argument(
        "--pace-fraction",
        type=float,
        default=0.5,
        help="paced run of each engine peer at this fraction of its saturating rate; 0 = none",
    )
    parser.add_argument(
        "--paced-duration-s", type=float, default=None, help="paced run length (--duration-s)"
    )
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of all peers to run")
    parser.add_argument(
        "--stack-base-port",
        type=int,
        default=19800,
        help="base port of the kafka peer's private stack (it uses base..base+99)",
    )
    parser.add_argument(
        "--kafka-partitions",
        type=int,
        default=8,
        help="partitions of the private stack's WAL topic = the kafka engine's shards",
    )
    parser.add_argument(
        "--kafka-extra-connections",
        type=int,
        default=512,
        help="after the rounds, one more kafka run with this many connections; 0 = none",
    )
    parser.add_argument(
        "--kafka-extra-partitions",
        type=int,
        default=2,
        help="then one more kafka run on a fresh stack with this many partitions; 0 = none",
    )
    parser.add_argument("--poll", default="bench")
    parser.add_argument("--options", default="a,b,c", help="poll options, voted in turn")
    parser.add_argument(
        "--token-len",
        type=int,
        default=0,
        help="length of the ceiling's stand-in tokens; 0 = the length of a real engine token",
    )
    parser.add_argument("--tokens-max", type=int, default=3_000_000, help="cap per token file")
    parser.add_argument("--token-ttl-s", type=int, default=3600)
    parser.add_argument("--mint-procs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path("/var/tmp/votes-bench"),
        help="where run directories (engine data, tokens, logs) go; must be a real disk",
    )
    parser.add_argument("--keep-data", action="store_true", help="keep data dirs and tokens")
    parser.add_argument("--ready-timeout-s", type=float, default=60.0)
    parser.add_argument("--settle-timeout-s", type=float, default=15.0)
    parser.add_argument("--engine-extra-args", default="", help="appended to `votes serve`")
    parser.add_argument(
        "--votes-bin", type=Path, default=VENV_BIN / "votes", help="the engine's `votes` command"
    )
    parser.add_argument("--out", type=Path, default=PERF_DIR / "results" / "vote_vs_ceiling.json")
    args = parser.parse_args(argv)
    peers = {peer.strip() for peer in args.peers.split(",") if peer.strip()}
    unknown = peers - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {','.join(PEERS)}")
    if args.kafka:
        peers.add("kafka")
    if args.ceiling_only:
        peers = set()
    peers.add("ceiling")
    args.peer_names = [peer for peer in PEERS if peer in peers]
    if args.paced_duration_s is None:
        args.paced_duration_s = args.duration_s
    if not 0 <= args.pace_fraction < 1:
        parser.error("--pace-fraction must be in [0, 1)")
    return args


# --- tokens -------------------------------------------------------------------------------


def write_standin_tokens(path: Path, count: int, length: int, first: int = 0) -> None:
    """Distinct stand-in tokens of a fixed length for the ceiling, which checks none."""
    digits = max(1, length - 1)
    with open(path, "w") as out:
        for start in range(first, first + count, 100_000):
            stop = min(first + count, start + 100_000)
            out.write("".join(f"t{i:0{digits}d}\n" for i in range(start, stop)))


def votes_cli(*args: str, timeout_s: float = 120.0) -> str:
    argv = [str(VOTES_BIN), *args]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise BenchError(
            f"`{shlex.join(argv)}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout


def mint_tokens(data_dir: Path, poll: str, voter_first: int, count: int, path: Path, args) -> float:
    """Write ``count`` tokens for voters voter_first.. to ``path``; returns seconds taken.

    Minting is split over ``--mint-procs`` processes on disjoint voter ranges and the
    pieces are concatenated in voter order.
    """
    started = time.monotonic()
    procs = max(1, min(args.mint_procs, count))
    share = math.ceil(count / procs)
    pieces = []
    for index in range(procs):
        first = voter_first + index * share
        n = min(share, voter_first + count - first)
        if n <= 0:
            break
        argv = [
            str(VOTES_BIN), "token", "--data-dir", str(data_dir), "--voter", str(first),
            "--count", str(n), "--poll", poll, "--ttl-s", str(args.token_ttl_s),
        ]  # fmt: skip
        part = path.with_name(f"{path.name}.part{index}")
        with open(part, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE)
        pieces.append((argv, part, proc))
    errors = []
    with open(path, "wb") as whole:
        for argv, part, proc in pieces:
            _, stderr = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                errors.append(f"`{shlex.join(argv)}` exited {proc.returncode}: {stderr.decode()}")
            else:
                with open(part, "rb") as piece:
                    shutil.copyfileobj(piece, whole)
            part.unlink()
    if errors:
        raise BenchError("minting tokens failed:\n" + "\n".join(errors))
    with open(path, "rb") as tokens:
        lines = sum(1 for line in tokens if line.strip())
    if lines != count:
        raise BenchError(f"`votes token` wrote {lines} tokens to {path}, expected {count}")
    return time.monotonic() - started


def tokens_needed(rate_per_s: float, duration_s: float, connections: int, cap: int) -> int:
    needed = math.ceil(TOKEN_MARGIN * rate_per_s * duration_s) + 2 * connections
    return min(needed, cap)


# --- engine helpers -----------------------------------------------------------------------


def engine_available() -> str | None:
    """None if `votes serve` looks runnable, else why not."""
    votes = VOTES_BIN
    if not votes.exists():
        return f"{votes} does not exist"
    try:
        done = subprocess.run(
            [str(votes), "--help"], check=False, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return "`votes --help` did not finish within 60 s"
    if done.returncode != 0:
        return f"`votes --help` exited {done.returncode}:\n{(done.stdout + done.stderr)[-2000:]}"
    missing = [cmd for cmd in ("serve", "token", "admin-token") if cmd not in done.stdout]
    if missing:
        return f"`votes --help` does not list {missing}:\n{done.stdout}"
    return None


def probe_engine(run_dir: Path, args) -> int:
    """Start the engine once on a scratch data dir, mint one token, stop it.

    It fails early, with the server's log tail, if the engine cannot come up, and it
    returns the length of a real token so the ceiling's stand-ins cost the same to send.
    The engine creates its keys at start-up, so a token can only be minted after that.
    """
    probe_dir = run_dir / "probe-data"
    probe_dir.mkdir(parents=True, exist_ok=True)
    try:
        server, _, ready_s = start_engine(args, run_dir, probe_dir, "engine-probe.log")
        try:
            out = votes_cli(
                "token", "--data-dir", str(probe_dir), "--voter", "1", "--count", "1",
                "--poll", args.poll, "--ttl-s", str(args.token_ttl_s), timeout_s=60,
            )  # fmt: skip
        finally:
            server.stop()
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    if not lines:
        raise BenchError(f"`votes token --count 1` printed no token: {out!r}")
    print(f"  engine probe: ready in {ready_s:.2f}s, token length {len(lines[0])}")
    return len(lines[0])


def poll_results(base_url: str, poll: str, admin_token: str) -> dict:
    status, body = http_request(
        "GET", f"{base_url}/v1/polls/{poll}/results", token=admin_token, timeout_s=5
    )
    if status != 200:
        raise BenchError(f"GET /v1/polls/{poll}/results answered {status}: {body[:500]!r}")
    return json.loads(body)


def settled_results(base_url: str, poll: str, admin_token: str, timeout_s: float) -> dict:
    """Results once ``total`` has stopped moving (in-flight votes applied), or at timeout."""
    deadline = time.monotonic() + timeout_s
    last = poll_results(base_url, poll, admin_token)
    steady = 0
    while time.monotonic() < deadline and steady < 5:
        time.sleep(0.2)
        now = poll_results(base_url, poll, admin_token)
        steady = steady + 1 if now.get("total") == last.get("total") else 0
        last = now
    return last


def commit_counters(base_url: str) -> dict[str, float] | None:
    """Sums and counts of the engine's group-commit histograms, or None if unreadable."""
    try:
        status, body = http_request("GET", f"{base_url}/metrics", timeout_s=5)
    except OSError:
        return None
    if status != 200:
        return None
    wanted = {
        f"{metric}_{part}" for metric in (COMMIT_SECONDS, COMMIT_ITEMS) for part in ("sum", "count")
    }
    totals = dict.fromkeys(wanted, 0.0)
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name_and_labels, value = line.rsplit(" ", 1)
        name = name_and_labels.split("{", 1)[0]
        if name in wanted:
            totals[name] += float(value)
    return totals


def wal_commits(before: dict | None, after: dict | None, duration_s: float) -> dict | None:
    """The engine's WAL commits between two readings of its vote_wal_commit_* histograms.

    How many, how long each, how many votes each, and how many were in flight on average
    (1 when a worker commits one cycle at a time; up to the shard count when each shard
    commits on its own).
    """
    if before is None or after is None:
        return None
    commits = after[f"{COMMIT_SECONDS}_count"] - before[f"{COMMIT_SECONDS}_count"]
    if commits <= 0:
        return {"commits": 0}
    seconds = after[f"{COMMIT_SECONDS}_sum"] - before[f"{COMMIT_SECONDS}_sum"]
    items = after[f"{COMMIT_ITEMS}_sum"] - before[f"{COMMIT_ITEMS}_sum"]
    return {
        "commits": int(commits),
        "commits_per_s": round(commits / duration_s, 1) if duration_s > 0 else None,
        "commit_ms_mean": round(1000 * seconds / commits, 2),
        "items_per_commit_mean": round(items / commits, 1),
        "in_flight_mean": round(seconds / duration_s, 2) if duration_s > 0 else None,
    }


# --- phases -------------------------------------------------------------------------------


def wrk_parameters(args, duration_s: float, connections: int | None = None) -> WrkParameters:
    return WrkParameters(args.threads, connections or args.connections, duration_s, args.timeout_s)


def lua_env(tokens_path: Path, args, rate_per_s: float | None = None) -> dict[str, str]:
    env = {
        "VOTES_TOKENS_FILE": str(tokens_path),
        "VOTES_POLL": args.poll,
        "VOTES_OPTIONS": args.options,
    }
    if rate_per_s is not None:
        env["VOTES_RATE_PER_S"] = f"{rate_per_s:.3f}"
    return env


def require_not_exhausted(result: WrkResult, what: str) -> None:
    if result.exhausted:
        raise BenchError(
            f"{what}: wrk ran out of tokens ({result.tokens_loaded} loaded): the rate is "
            f"not valid; raise --tokens-max or shorten --duration-s"
        )


def run_ceiling(args, run_dir: Path, wrk_path: str, token_len: int, cpu_extra: dict) -> dict:
    port = free_port()
    server = ServerProcess(
        "ceiling",
        [sys.executable, str(CEILING_SCRIPT), "--port", str(port), "--workers", str(args.workers)],
        run_dir / "ceiling.log",
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        ready_s = wait_for_http(f"{base_url}/readyz", args.ready_timeout_s, 201, server)
        warmup_tokens = run_dir / "ceiling-warmup.tokens"
        warmup_count = min(args.tokens_max, math.ceil(CEILING_WARMUP_TOKENS_PER_S * args.warmup_s))
        write_standin_tokens(warmup_tokens, warmup_count, token_len, first=10**9)
        warmup = run_wrk(
            base_url, VOTES_SCRIPT, wrk_parameters(args, args.warmup_s),
            lua_env(warmup_tokens, args), wrk_path=wrk_path,
        )  # fmt: skip
        warmup_rate = max(warmup.created_per_s, warmup.votes_sent / args.warmup_s)
        count = max(
            tokens_needed(warmup_rate, args.duration_s, args.connections, args.tokens_max),
            min(args.tokens_max, math.ceil(CEILING_TOKENS_PER_S_MIN * args.duration_s)),
        )
        measured_tokens = run_dir / "ceiling.tokens"
        for _ in range(2):
            write_standin_tokens(measured_tokens, count, token_len)
            result = run_wrk(
                base_url, VOTES_SCRIPT, wrk_parameters(args, args.duration_s),
                lua_env(measured_tokens, args), cpu_roots={"server": server.pid, **cpu_extra},
                wrk_path=wrk_path,
            )  # fmt: skip
            if not result.exhausted or count >= args.tokens_max:
                break
            # The warm-up under-estimated the rate: one more try with twice the voters.
            print(f"  ceiling ran out of {count} tokens; retrying with more", flush=True)
            count = min(args.tokens_max, 2 * count)
        require_not_exhausted(result, "ceiling")
    finally:
        server.stop()
        if not args.keep_data:
            for path in run_dir.glob("ceiling*.tokens"):
                path.unlink()
    return {
        "peer": "ceiling",
        "connections": args.connections,
        "ready_s": round(ready_s, 3),
        "warmup_created_per_s": round(warmup.created_per_s, 1),
        "token_len": token_len,
        "tokens_file_lines": count,
        "result": result,
    }


def start_engine(
    args, run_dir: Path, data_dir: Path, log_name: str = "engine.log", config_path=None
) -> tuple[ServerProcess, str, float]:
    port = free_port()
    argv = [
        str(VOTES_BIN), "serve", "--data-dir", str(data_dir),
        "--port", str(port), "--workers", str(args.workers),
        *(["--config", str(config_path)] if config_path else []),
        *shlex.split(args.engine_extra_args),
    ]  # fmt: skip
    server = ServerProcess("engine", argv, run_dir / log_name)
    base_url = f"http://127.0.0.1:{port}"
    try:
        ready_s = wait_for_http(f"{base_url}/readyz", args.ready_timeout_s, 200, server)
    except BaseException:
        server.stop()
        raise
    return server, base_url, ready_s


def create_poll(base_url: str, args, admin_token: str) -> None:
    options = [option for option in args.options.split(",") if option]
    status, body = http_request(
        "POST", f"{base_url}/v1/polls", {"id": args.poll, "options": options}, admin_token
    )
    if status != 201:
        raise BenchError(f"POST /v1/polls answered {status}, expected 201: {body[:500]!r}")


def cross_check(result: WrkResult, before: dict, after: dict) -> dict:
    """Votes the engine counted in the measured run against the 201s the generator saw."""
    counted = after["total"] - before["total"]
    responses = sum(result.statuses.values())
    in_flight = max(0, result.votes_sent + result.sent_after_exhaustion - responses)
    upper = result.created + in_flight + result.errors.get("timeout", 0)
    return {
        "created_seen": result.created,
        "votes_counted": counted,
        "votes_sent": result.votes_sent,
        "responses": responses,
        "in_flight_at_end": in_flight,
        "timeouts": result.errors.get("timeout", 0),
        "upper_bound": upper,
        "lower_ok": result.created <= counted,
        "upper_ok": counted <= upper,
        "results_before": before,
        "results_after": after,
    }


@dataclass
class EngineRun:
    """One engine process under test: where it answers and what it was given."""

    server: ServerProcess
    base_url: str
    admin_token: str
    cpu_roots: dict
    wrk_path: str
    connections: int
    label: str


def measure(run: EngineRun, args, tokens: Path, duration_s: float, rate_per_s=None) -> dict:
    """One wrk run with CPU sampling, checked against the results endpoint."""
    before = settled_results(run.base_url, args.poll, run.admin_token, args.settle_timeout_s)
    counters_before = commit_counters(run.base_url)
    result = run_wrk(
        run.base_url, VOTES_SCRIPT, wrk_parameters(args, duration_s, run.connections),
        lua_env(tokens, args, rate_per_s), cpu_roots={"server": run.server.pid, **run.cpu_roots},
        wrk_path=run.wrk_path,
    )  # fmt: skip
    after = settled_results(run.base_url, args.poll, run.admin_token, args.settle_timeout_s)
    require_not_exhausted(result, run.label)
    if result.created == 0:
        raise BenchError(
            f"{run.label} answered no 201: statuses {result.statuses}, errors "
            f"{result.errors}, first bodies {result.bodies_not_created}"
        )
    if run.server.proc.poll() is not None:
        raise BenchError(
            f"{run.label} exited during the run with code {run.server.proc.returncode}"
        )
    return {
        "result": result,
        "cross_check": cross_check(result, before, after),
        "wal_commits": wal_commits(
            counters_before, commit_counters(run.base_url), result.duration_s
        ),
    }


def mint_ranges(
    data: EngineData, counts: dict[str, int], run_dir: Path, args
) -> tuple[dict, float]:
    """Token files for consecutive voter ranges, one per purpose; (paths, seconds)."""
    paths, mint_s = {}, 0.0
    for purpose, count in counts.items():
        path = run_dir / f"engine-{purpose}.tokens"
        mint_s += mint_tokens(data.path, args.poll, data.voter_next, count, path, args)
        data.voter_next += count
        paths[purpose] = path
    return paths, mint_s


def run_engine(
    args, run_dir: Path, wrk_path: str, rate_bound: float, peer: EnginePeer, tag: str,
    cpu_extra: dict,
) -> dict:  # fmt: skip
    """Warm-up, saturating run and paced run of one engine peer on one engine process."""
    # The embedded peer gets a fresh data dir per run: --keep-data leaves the earlier ones.
    data = peer.data or EngineData(Path(tempfile.mkdtemp(prefix=f"{peer.name}-data-", dir=run_dir)))
    try:
        server, base_url, ready_s = start_engine(
            args, run_dir, data.path, f"{peer.name}-{tag}.log", peer.config_path
        )
    except BaseException:
        if peer.data is None and not args.keep_data:
            shutil.rmtree(data.path, ignore_errors=True)
        raise
    try:
        admin_token = (
            votes_cli("admin-token", "--data-dir", str(data.path)).strip().splitlines()[-1]
        )
        if not data.poll_created:
            create_poll(base_url, args, admin_token)
            data.poll_created = True
        shards = json.loads((data.path / "cluster.json").read_text())["shards"]
        connections = peer.connections
        counts = {
            "measured": tokens_needed(rate_bound, args.duration_s, connections, args.tokens_max),
            "warmup": tokens_needed(rate_bound, args.warmup_s, connections, args.tokens_max),
        }
        if args.pace_fraction:
            counts["paced"] = tokens_needed(
                args.pace_fraction * rate_bound, args.paced_duration_s, connections, args.tokens_max
            )
        print(
            f"  minting {' + '.join(str(n) for n in counts.values())} voter tokens ...", flush=True
        )
        tokens, mint_s = mint_ranges(data, counts, run_dir, args)
        print(f"  minted in {mint_s:.1f}s", flush=True)
        with open(tokens["measured"]) as measured_tokens:
            token_len = len(measured_tokens.readline().strip())
        run = EngineRun(server, base_url, admin_token, cpu_extra, wrk_path, connections, peer.name)
        warmup = run_wrk(
            base_url, VOTES_SCRIPT, wrk_parameters(args, args.warmup_s, connections),
            lua_env(tokens["warmup"], args), wrk_path=wrk_path,
        )  # fmt: skip
        saturating = measure(run, args, tokens["measured"], args.duration_s)
        paced = None
        if args.pace_fraction:
            target = args.pace_fraction * saturating["result"].created_per_s
            print(f"  paced run at {target:,.0f}/s ({args.pace_fraction:g} of the saturating rate)",
                  flush=True)  # fmt: skip
            paced = measure(run, args, tokens["paced"], args.paced_duration_s, rate_per_s=target)
            paced["target_per_s"] = round(target, 1)
    except BenchError as error:
        raise BenchError(f"{error}\n{server.log_tail()}") from None
    finally:
        server.stop()
        if not args.keep_data:
            for path in run_dir.glob("engine-*.tokens"):
                path.unlink()
            if peer.data is None:
                shutil.rmtree(data.path, ignore_errors=True)
    return {
        "peer": peer.name,
        "wal": "kafka" if peer.config_path else "embedded",
        "shards": shards,
        "kafka_partitions": peer.kafka_partitions,
        "connections": connections,
        "ready_s": round(ready_s, 3),
        "warmup_created_per_s": round(warmup.created_per_s, 1),
        "warmup_statuses": {str(k): v for k, v in sorted(warmup.statuses.items())},
        "token_len": token_len,
        "tokens_file_lines": counts,
        "mint_s": round(mint_s, 1),
        **saturating,
        "paced": paced,
    }


# --- reporting ----------------------------------------------------------------------------


def peer_label(phase: dict) -> str:
    """A row label: the peer, its shards and, when not the default, its connections."""
    if phase["peer"] == "ceiling":
        return "ceiling"
    label = f"{phase['wal']} {phase['shards']}sh"
    return label if phase.get("connections_default") else f"{label} c{phase['connections']}"


def cpu_cell(result: WrkResult, name: str) -> str:
    cpu = result.cpu
    if cpu is None or name not in cpu.cpu_percent:
        return "-"
    return f"{cpu.cpu_percent[name]:.0f}% (pk {cpu.cpu_percent_peak[name]:.0f})"


def not_created_cell(result: WrkResult) -> str:
    not_created = " ".join(f"{s}:{n}" for s, n in result.not_created.items()) or "-"
    errors = " ".join(f"{k}:{v}" for k, v in result.errors.items() if v and k != "status")
    return not_created + (f" ({errors})" if errors else "")


def machine_cell(result: WrkResult) -> str:
    cpu = result.cpu
    return f"{cpu.machine_busy_percent:.0f}/{cpu.machine_capacity_percent:.0f}%" if cpu else "-"


SATURATING_HEADERS = [
    "peer", "201/s", "p50", "p90", "p99", "p99.9", "max", "non-201 (errors)",
    "server CPU", "CPU us/201", "stack CPU", "wrk CPU", "machine busy",
]  # fmt: skip


def saturating_row(label: str, result: WrkResult) -> list[str]:
    lat = result.latency_us
    cost = result.server_cpu_us_per_created
    return [
        label,
        f"{result.created_per_s:,.0f}",
        *(format_us(lat.get(p)) for p in ("p50", "p90", "p99", "p99.9", "max")),
        not_created_cell(result),
        cpu_cell(result, "server"),
        f"{cost:.1f}" if cost else "-",
        cpu_cell(result, "stack"),
        cpu_cell(result, "wrk"),
        machine_cell(result),
    ]


PACED_HEADERS = [
    "peer", "target/s", "201/s", "p50", "p90", "p99", "p99.9", "max", "non-201 (errors)",
    "late sends (mean, max)", "server CPU", "stack CPU", "machine busy",
]  # fmt: skip


def late_cell(result: WrkResult) -> str:
    """Requests sent after their slot: the waits that wrk's latency leaves out."""
    pacing = result.pacing
    if not pacing or not pacing["sends"]:
        return "-"
    share = 100 * pacing["late_sends"] / pacing["sends"]
    cell = f"{share:.1f}%"
    if pacing["late_sends"]:
        cell += f" ({pacing['late_ms_mean']:.0f}ms, {pacing['late_ms_max']:.0f}ms)"
    if pacing["slots_dropped"]:
        cell += f" +{pacing['slots_dropped']} dropped"
    return cell


def paced_row(label: str, paced: dict) -> list[str]:
    result, lat = paced["result"], paced["result"].latency_us
    return [
        label,
        f"{paced['target_per_s']:,.0f}",
        f"{result.created_per_s:,.0f}",
        *(format_us(lat.get(p)) for p in ("p50", "p90", "p99", "p99.9", "max")),
        not_created_cell(result),
        late_cell(result),
        cpu_cell(result, "server"),
        cpu_cell(result, "stack"),
        machine_cell(result),
    ]


def cpu_us_per_created_with_stack(result: WrkResult) -> float | None:
    """Server plus stack (brokers, S3, Redis) CPU per 201, in µs."""
    cpu = result.cpu
    if cpu is None or "stack" not in cpu.cpu_percent or not result.created:
        return None
    percent = cpu.cpu_percent["server"] + cpu.cpu_percent["stack"]
    return percent / 100 * 1e6 / result.created_per_s


def print_cross_check(label: str, check: dict) -> None:
    verdict = "ok" if check["lower_ok"] and check["upper_ok"] else "MISMATCH"
    print(
        f"  {label} cross-check ({verdict}): 201s seen {check['created_seen']} <= votes counted "
        f"{check['votes_counted']} <= 201s + in flight at end ({check['in_flight_at_end']}) + "
        f"timeouts ({check['timeouts']}) = {check['upper_bound']}"
    )


def print_commits(label: str, commits: dict | None) -> None:
    if commits and commits.get("commits"):
        print(
            f"  {label} WAL commits: {commits['commits']} ({commits['commits_per_s']}/s), mean "
            f"{commits['commit_ms_mean']} ms, {commits['items_per_commit_mean']} votes each, "
            f"{commits['in_flight_mean']} in flight on average"
        )


def phase_warnings(label: str, result: WrkResult, stack_is_peer: bool) -> list[str]:
    """Conditions that make a saturating row doubtful, printed and kept in the JSON."""
    warnings = response_warnings(label, result)
    cpu = result.cpu
    if cpu is not None:
        if cpu.cpu_percent["wrk"] >= 90:
            warnings.append(
                f"{label}: wrk used {cpu.cpu_percent['wrk']:.0f}% of a core: the generator "
                "may be the bottleneck"
            )
        if cpu.cpu_percent["server"] < 80:
            warnings.append(
                f"{label}: the server used only {cpu.cpu_percent['server']:.0f}% of a core: "
                "it waited (on disk, the WAL, locks, the generator or the CPU), it did not "
                "saturate"
            )
        # An idle stack during another peer's run is interference; the kafka peer's
        # brokers are part of what is measured.
        stack = cpu.cpu_percent.get("stack", 0.0) if stack_is_peer else 0.0
        others = (
            cpu.machine_busy_percent - cpu.cpu_percent["server"] - cpu.cpu_percent["wrk"] - stack
        )
        if others > 20:
            warnings.append(
                f"{label}: other processes used {others:.0f}% of the machine's CPU during "
                "the run: absolute rates are depressed; compare ratios"
            )
    return warnings


def response_warnings(label: str, result: WrkResult) -> list[str]:
    warnings = []
    responses = sum(result.statuses.values())
    not_created = responses - result.created
    if responses and not_created > 0.01 * responses:
        warnings.append(f"{label}: {not_created} of {responses} responses were not 201")
    errors = {k: v for k, v in result.errors.items() if v and k != "status"}
    if errors:
        warnings.append(f"{label}: wrk socket errors/timeouts {errors}")
    return warnings


def paced_warnings(label: str, paced: dict) -> list[str]:
    result = paced["result"]
    warnings = response_warnings(f"{label} paced", result)
    if result.created_per_s < PACED_SHORTFALL_WARN * paced["target_per_s"]:
        warnings.append(
            f"{label} paced: reached {result.created_per_s:,.0f}/s of a "
            f"{paced['target_per_s']:,.0f}/s target: when answers take longer than "
            "connections / rate, no connection is free when a slot comes (see late sends)"
        )
    return warnings


def result_to_json(measured: dict, on_stack: bool) -> dict:
    """A run's JSON; ``on_stack``: the stack is part of the peer, so its CPU is a cost."""
    document = {k: v for k, v in measured.items() if k not in ("result", "paced")}
    document.update(measured["result"].to_json())
    with_stack = cpu_us_per_created_with_stack(measured["result"])
    if on_stack and with_stack is not None:
        document["server_and_stack_cpu_us_per_created"] = round(with_stack, 2)
    return document


def phase_json(phase: dict, args) -> dict:
    on_stack = phase.get("wal") == "kafka"
    document = result_to_json(phase, on_stack)
    document["connections_default"] = phase["connections"] == args.connections
    label = peer_label(document)
    document["label"] = label
    document["warnings"] = phase_warnings(label, phase["result"], on_stack)
    if phase.get("paced"):
        document["paced"] = result_to_json(phase["paced"], on_stack)
        document["paced"]["warnings"] = paced_warnings(label, phase["paced"])
    return document


def run_phase(label: str, run, args) -> tuple[dict, dict | None]:
    """Run one peer's phase; a failure becomes {"error": ...} instead of ending the run."""
    print(f"\n== {label}", flush=True)
    try:
        phase = run()
    except (BenchError, subprocess.TimeoutExpired, OSError) as error:
        print(f"!! {label} failed: {error}", flush=True)
        return {"error": str(error)}, None
    return phase_json(phase, args), phase


def ratios_of(documents: dict, ceiling: dict, embedded: dict | None) -> dict:
    """Rates and CPU per 201 of each engine peer against the ceiling and the embedded one."""
    ratios = {}
    for name, document in documents.items():
        if "created_per_s" not in document or name == "ceiling":
            continue
        for base_name, base in (("ceiling", ceiling), ("embedded", embedded)):
            if name == base_name or not base or "created_per_s" not in base:
                continue
            ratios[f"{name}/{base_name}"] = round(
                document["created_per_s"] / base["created_per_s"], 4
            )
            cost, base_cost = (
                document.get("server_cpu_us_per_created"), base.get("server_cpu_us_per_created")
            )  # fmt: skip
            if cost and base_cost:
                ratios[f"cpu_per_201 {base_name}/{name}"] = round(base_cost / cost, 4)
    return ratios


def print_phases(title: str, documents: dict, phases: dict, args) -> None:
    """The saturating and paced tables of some peers, then their checks and warnings."""
    labelled = [(documents[name]["label"], phases[name]) for name in phases]
    print(
        f"\n{title}: saturating runs (wrk -t{args.threads} -c{args.connections} unless the "
        f"peer says c<N>, {args.duration_s:g} s; latency from wrk's histogram)"
    )
    print_table(SATURATING_HEADERS, [saturating_row(label, p["result"]) for label, p in labelled])
    paced = [(label, p["paced"]) for label, p in labelled if p.get("paced")]
    if paced:
        print(f"\n{title}: paced runs (closed loop; see the note below)")
        print_table(PACED_HEADERS, [paced_row(label, p) for label, p in paced])
    for label, phase in labelled:
        if "cross_check" in phase:
            print_cross_check(label, phase["cross_check"])
            print_commits(label, phase["wal_commits"])
            if phase.get("paced"):
                print_cross_check(f"{label} paced", phase["paced"]["cross_check"])
                print_commits(f"{label} paced", phase["paced"]["wal_commits"])
    for document in documents.values():
        for warning in document.get("warnings", []) + document.get("paced", {}).get("warnings", []):
            print(f"  WARNING {warning}")


def run_round(index: int, args, run_dir: Path, wrk_path: str, token_len: int, engines, cpu_extra):
    """The ceiling, then each engine peer, printed side by side with their ratios."""
    prefix = f"round {index + 1}/{args.rounds}"
    documents: dict = {}
    phases: dict = {}
    documents["ceiling"], phases["ceiling"] = run_phase(
        f"{prefix}: ceiling",
        lambda: run_ceiling(args, run_dir, wrk_path, token_len, cpu_extra),
        args,
    )
    ceiling = phases["ceiling"]
    if ceiling is not None:
        # The ceiling's rate bounds the engines'; its warm-up rate covers a slow patch.
        rate_bound = max(ceiling["result"].created_per_s, ceiling["warmup_created_per_s"])
        for peer in engines:
            documents[peer.name], phases[peer.name] = run_phase(
                f"{prefix}: {peer.name}",
                lambda peer=peer: run_engine(
                    args, run_dir, wrk_path, rate_bound, peer, f"r{index + 1}", cpu_extra
                ),
                args,
            )
    print_phases(prefix, documents, {k: v for k, v in phases.items() if v is not None}, args)
    documents["ratios"] = ratios_of(documents, documents["ceiling"], documents.get("embedded"))
    print_ratios(documents["ratios"])
    return documents


def print_ratios(ratios: dict) -> None:
    for key, value in ratios.items():
        if not key.startswith("cpu_per_201"):
            print(f"  ratio {key} (201/s): {value:.4f}")
    for key, value in ratios.items():
        if key.startswith("cpu_per_201"):
            print(f"  ratio of server CPU per 201, {key.split(' ', 1)[1]}: {value:.3f}")


RESULT_HEADERS = [
    "peer", "201/s", "p50", "p99", "paced 201/s (target)", "paced p50", "paced p99",
    "CPU us/201", "+stack", "x ceiling", "x embedded",
]  # fmt: skip


def result_row(document: dict, ratios: dict, prefix: str = "") -> list[str]:
    name = document["peer"]
    paced = document.get("paced") or {}
    paced_lat = paced.get("latency_us", {})
    cost = document.get("server_cpu_us_per_created")
    with_stack = document.get("server_and_stack_cpu_us_per_created")
    return [
        prefix + document["label"],
        f"{document['created_per_s']:,.0f}",
        format_us(document["latency_us"].get("p50")),
        format_us(document["latency_us"].get("p99")),
        f"{paced['created_per_s']:,.0f} ({paced['target_per_s']:,.0f})" if paced else "-",
        format_us(paced_lat.get("p50")) if paced else "-",
        format_us(paced_lat.get("p99")) if paced else "-",
        f"{cost:.1f}" if cost else "-",
        f"{with_stack:.1f}" if with_stack else "-",
        f"{ratios[f'{name}/ceiling']:.4f}" if f"{name}/ceiling" in ratios else "-",
        f"{ratios[f'{name}/embedded']:.4f}" if f"{name}/embedded" in ratios else "-",
    ]


def print_result(rounds: list[dict], extras: list[dict], kafka: bool) -> None:
    rows = []
    for index, documents in enumerate(rounds):
        prefix = f"r{index + 1} " if len(rounds) > 1 else ""
        for name, document in documents.items():
            if name != "ratios" and "created_per_s" in document:
                rows.append(result_row(document, documents["ratios"], prefix))
    for document in extras:
        if "created_per_s" in document:
            rows.append(result_row(document, document["ratios"], "extra: "))
    if rows:
        print("\n== result (saturating, then paced; ratios of 201/s, measured in this run)")
        print_table(RESULT_HEADERS, rows)
        print(f"  {CLOSED_LOOP_NOTE}")
        if kafka:
            print(f"  {KAFKA_NOTE}")


# --- the run ------------------------------------------------------------------------------


def describe_run(args, run_dir: Path) -> tuple[dict, dict]:
    """(conditions, parameters): printed first and stored with the results."""
    conditions = describe_machine(("votes-engine", "aiokafka"))
    conditions["data_dir_filesystem"] = filesystem_of(run_dir)
    parameters = {
        "peers": ",".join(args.peer_names),
        "generator": "wrk (closed loop, also when paced) + perf/wrk/votes.lua",
        "wrk_argv": " ".join(wrk_parameters(args, args.duration_s).argv()),
        "threads": args.threads,
        "connections": args.connections,
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "timeout_s": args.timeout_s,
        "pace_fraction": args.pace_fraction,
        "paced_duration_s": args.paced_duration_s,
        "server_workers": args.workers,
        "rounds": args.rounds,
        "poll": args.poll,
        "options": args.options,
        "run_dir": str(run_dir),
        "engine_extra_args": args.engine_extra_args,
        "votes_bin": str(args.votes_bin),
    }
    if "kafka" in args.peer_names:
        parameters.update(
            stack_base_port=args.stack_base_port,
            kafka_partitions=args.kafka_partitions,
            kafka_extra_connections=args.kafka_extra_connections,
            kafka_extra_partitions=args.kafka_extra_partitions,
        )
    return conditions, parameters


def check_engine(args, run_dir: Path) -> tuple[str | None, int | None]:
    """(why the engine cannot be measured or None, length of its tokens if known)."""
    if args.peer_names == ["ceiling"]:
        return None, None
    problem = engine_available()
    if problem is None:
        try:
            return None, probe_engine(run_dir, args)
        except (BenchError, subprocess.TimeoutExpired, OSError) as error:
            problem = f"the engine probe failed: {error}"
    print(f"\n!! engine not runnable, measuring the ceiling only:\n{problem}")
    return problem, None


def start_stack(args, run_dir: Path, partitions: int, stack_doc: list) -> PrivateStack:
    """A private stack with an empty WAL topic; its `up` is recorded in ``stack_doc``."""
    stack = PrivateStack(args.stack_base_port, partitions, run_dir / "stack.log")
    print(f"\n== private stack on base port {args.stack_base_port}, {partitions} partitions "
          "(up --fresh)", flush=True)  # fmt: skip
    stack_doc.append({"partitions": partitions})
    try:
        endpoints = stack.up()
    except BaseException:
        # A stack that failed half-way up may have brokers running: take it down now,
        # since the caller never gets hold of it.
        stop_stack(stack, stack_doc)
        raise
    stack_doc[-1].update(up_s=round(stack.up_s, 1), kafka_version=endpoints["kafka"].get("version"))
    print(f"  up in {stack.up_s:.1f}s: Kafka {endpoints['kafka'].get('version')}, "
          f"{endpoints['kafka']['bootstrap_servers']}", flush=True)  # fmt: skip
    return stack


def kafka_peer(name: str, stack: PrivateStack, run_dir: Path, connections: int, data=None):
    config_path = stack.write_engine_config(run_dir / f"{name}-engine.toml")
    if data is None:
        path = run_dir / f"{name}-data"
        path.mkdir()
        data = EngineData(path)
    return EnginePeer(name, connections, config_path, stack, data, stack.partitions)


def stop_stack(stack: PrivateStack | None, stack_doc: list) -> None:
    if stack is None or not stack.started:
        return
    try:
        down_s = stack.down()
        print(f"  private stack down and wiped in {down_s:.1f}s", flush=True)
        if stack_doc:
            stack_doc[-1]["down_wipe_s"] = round(down_s, 1)
    except (BenchError, subprocess.TimeoutExpired, OSError) as error:
        print(f"!! `stack.py down --wipe --base-port {stack.base_port}` failed: {error}")
        if stack_doc:
            stack_doc[-1]["down_error"] = str(error)


def run_extras(args, run_dir, wrk_path, rounds, stack_holder, kafka, stack_doc, cpu_extra):
    """Kafka runs beside the last round: more connections, then fewer partitions."""
    extras = []
    last = rounds[-1]
    ceiling = last.get("ceiling", {})
    if "created_per_s" not in ceiling:
        return extras
    rate_bound = max(ceiling["created_per_s"], ceiling["warmup_created_per_s"])

    def one(peer: EnginePeer, cpu: dict) -> None:
        document, phase = run_phase(
            f"extra: {peer.name}",
            lambda: run_engine(args, run_dir, wrk_path, rate_bound, peer, "extra", cpu),
            args,
        )
        if phase is not None:
            print_phases(f"extra {peer.name}", {peer.name: document}, {peer.name: phase}, args)
            document["ratios"] = ratios_of({peer.name: document}, ceiling, last.get("embedded"))
            print_ratios(document["ratios"])
        extras.append({"name": peer.name, **document})

    if args.kafka_extra_connections and kafka is not None:
        connections = args.kafka_extra_connections
        peer = EnginePeer(f"kafka-c{connections}", connections, kafka.config_path, kafka.stack,
                          kafka.data, kafka.kafka_partitions)  # fmt: skip
        one(peer, cpu_extra)
    if args.kafka_extra_partitions and kafka is not None:
        partitions = args.kafka_extra_partitions
        stop_stack(stack_holder[0], stack_doc)
        try:
            stack_holder[0] = start_stack(args, run_dir, partitions, stack_doc)
        except (BenchError, subprocess.TimeoutExpired, OSError) as error:
            print(f"!! private stack with {partitions} partitions failed: {error}")
            extras.append({"name": f"kafka-{partitions}p", "error": str(error)})
            return extras
        stack = stack_holder[0]
        peer = kafka_peer(f"kafka-{partitions}p", stack, run_dir, args.connections)
        one(peer, {**cpu_extra, "stack": stack.pids()})
    return extras


def summarize(rounds: list[dict], extras: list[dict], args, engine_problem: str | None) -> dict:
    rates = {
        name: [r[name]["created_per_s"] for r in rounds if "created_per_s" in r.get(name, {})]
        for name in args.peer_names
    }
    ratio_keys = sorted({key for r in rounds for key in r["ratios"]})
    ratios = {key: [r["ratios"][key] for r in rounds if key in r["ratios"]] for key in ratio_keys}
    paced = {
        name: [
            {
                "target_per_s": r[name]["paced"]["target_per_s"],
                "created_per_s": r[name]["paced"]["created_per_s"],
                "p50_us": r[name]["paced"]["latency_us"]["p50"],
                "p99_us": r[name]["paced"]["latency_us"]["p99"],
                "pacing": r[name]["paced"]["pacing"],
            }
            for r in rounds
            if r.get(name, {}).get("paced")
        ]
        for name in args.peer_names
        if name != "ceiling"
    }
    documents = [r[peer] for r in rounds for peer in r if peer != "ratios"] + extras
    return {
        "created_per_s": rates,
        "ratios": ratios,
        "ratio_medians": {key: round(statistics.median(v), 4) for key, v in ratios.items() if v},
        "paced": paced,
        "extra": [
            {"name": e["name"], "created_per_s": e.get("created_per_s"), "ratios": e.get("ratios")}
            for e in extras
        ],
        "engine_problem": engine_problem,
        "failures": [d["error"] for d in documents if "error" in d],
        "warnings": [
            w
            for d in documents
            for w in d.get("warnings", []) + (d.get("paced") or {}).get("warnings", [])
        ],
    }


def raise_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the finally blocks stop servers and the stack."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    global VOTES_BIN
    args = parse_args(argv)
    VOTES_BIN = args.votes_bin
    raise_on_sigterm()
    wrk_path = ensure_wrk()
    run_dir = args.data_root / time.strftime("run-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    conditions, parameters = describe_run(args, run_dir)
    print_conditions(conditions, parameters)
    fs_type = conditions["data_dir_filesystem"]["fs_type"]
    if fs_type in ("tmpfs", "ramfs", "overlay"):
        print(f"  WARNING: {run_dir} is on {fs_type}, not a real disk: fsyncs cost nothing")
    started = time.monotonic()

    engine_problem, engine_token_len = check_engine(args, run_dir)
    token_len = args.token_len or engine_token_len or 160
    parameters["ceiling_token_len"] = token_len
    parameters["engine_token_len"] = engine_token_len
    stack_holder: list[PrivateStack | None] = [None]
    stack_doc: list[dict] = []
    kafka_problem = None
    try:
        engines: list[EnginePeer] = []
        cpu_extra: dict = {}
        kafka = None
        if engine_problem is None and "embedded" in args.peer_names:
            engines.append(EnginePeer("embedded", args.connections))
        if engine_problem is None and "kafka" in args.peer_names:
            try:
                stack_holder[0] = start_stack(args, run_dir, args.kafka_partitions, stack_doc)
                kafka = kafka_peer("kafka", stack_holder[0], run_dir, args.connections)
                engines.append(kafka)
                # The stack runs through every peer's runs, so its CPU is shown for each.
                cpu_extra = {"stack": stack_holder[0].pids()}
                print(f"  {KAFKA_NOTE}")
            except (BenchError, subprocess.TimeoutExpired, OSError) as error:
                kafka_problem = f"the private stack did not come up: {error}"
                print(f"!! {kafka_problem}\n   measuring without the kafka peer")

        rounds = [
            run_round(index, args, run_dir, wrk_path, token_len, engines, cpu_extra)
            for index in range(args.rounds)
        ]
        extras = run_extras(
            args, run_dir, wrk_path, rounds, stack_holder, kafka, stack_doc, cpu_extra
        )
        print_result(rounds, extras, kafka is not None)
        stop_stack(stack_holder[0], stack_doc)
    finally:
        # Also on failure or SIGTERM: no stack is left up, whatever happened above.
        stop_stack(stack_holder[0], stack_doc)
        if not args.keep_data:
            for path in run_dir.glob("kafka*-data"):
                shutil.rmtree(path, ignore_errors=True)

    summary = summarize(rounds, extras, args, engine_problem)
    if kafka_problem:
        summary["failures"].append(kafka_problem)
    summary["run_s"] = round(time.monotonic() - started, 1)
    print("\n== summary")
    print(json.dumps(summary, indent=2))
    document = {
        "benchmark": "vote_vs_ceiling",
        "conditions": conditions,
        "parameters": parameters,
        "notes": {"closed_loop": CLOSED_LOOP_NOTE, **({"kafka": KAFKA_NOTE} if stack_doc else {})},
        "stack": stack_doc,
        "rounds": rounds,
        "extra": extras,
        "summary": summary,
    }
    write_json(args.out, document)
    print(f"wrote {args.out}\nlogs in {run_dir}")
    return 1 if summary["failures"] or engine_problem else 0


if __name__ == "__main__":
    sys.exit(main())
