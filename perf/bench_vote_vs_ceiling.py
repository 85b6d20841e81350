"""Vote throughput of the engine as a fraction of the server stack's ceiling.

In one run on one machine, with the same generator (wrk + perf/wrk/votes.lua) and the
same settings, this measures

1. the ceiling: perf/ceiling.py, a bare Granian RSGI app answering a fixed 201;
2. the engine: ``votes serve`` on a fresh data directory on a real disk, fed votes from
   distinct voters (every token is used once; warm-up uses other voters),

and prints a table (201/s, latency percentiles, non-201 counts, CPU of server and
generator) with the ratio engine/ceiling, then writes perf/results/vote_vs_ceiling.json.
Only 201 responses count as throughput, and the engine's results endpoint is checked
against them: 201s seen <= votes counted <= 201s seen + requests still in flight.

The generator runs on the same 2-core machine as the server, so absolute numbers move
with everything else running; the ratio, measured side by side, is the figure to compare.
See perf/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PERF_DIR,
    BenchError,
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
# Token-file sizing: at least this many times the rate the run could reach, so that a
# thread never runs dry; the ceiling's own rate bounds the engine's.
TOKEN_MARGIN = 2.0
# Lines written for the ceiling's warm-up, per second of warm-up: above any rate one
# generator thread reaches here, so the warm-up measures the rate that sizes the rest.
CEILING_WARMUP_TOKENS_PER_S = 250_000
# The least the ceiling's measured token file holds, per second of run.
CEILING_TOKENS_PER_S_MIN = 100_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (-t)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (-c)")
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured run length")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="warm-up run length")
    parser.add_argument("--timeout-s", type=float, default=2.0, help="wrk --timeout")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--rounds", type=int, default=1, help="ceiling/engine pairs to run")
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
    parser.add_argument("--ceiling-only", action="store_true", help="skip the engine")
    parser.add_argument(
        "--votes-bin", type=Path, default=VENV_BIN / "votes", help="the engine's `votes` command"
    )
    parser.add_argument("--out", type=Path, default=PERF_DIR / "results" / "vote_vs_ceiling.json")
    return parser.parse_args(argv)


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


# --- phases -------------------------------------------------------------------------------


def wrk_parameters(args, duration_s: float) -> WrkParameters:
    return WrkParameters(args.threads, args.connections, duration_s, args.timeout_s)


def lua_env(tokens_path: Path, args) -> dict[str, str]:
    return {
        "VOTES_TOKENS_FILE": str(tokens_path),
        "VOTES_POLL": args.poll,
        "VOTES_OPTIONS": args.options,
    }


def require_not_exhausted(result: WrkResult, what: str) -> None:
    if result.exhausted:
        raise BenchError(
            f"{what}: wrk ran out of tokens ({result.tokens_loaded} loaded): the rate is "
            f"not valid; raise --tokens-max or shorten --duration-s"
        )


def run_ceiling(args, run_dir: Path, wrk_path: str, token_len: int) -> dict:
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
                lua_env(measured_tokens, args), cpu_roots={"server": server.pid},
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
        "ready_s": round(ready_s, 3),
        "warmup_created_per_s": round(warmup.created_per_s, 1),
        "token_len": token_len,
        "tokens_file_lines": count,
        "result": result,
    }


def start_engine(
    args, run_dir: Path, data_dir: Path, log_name: str = "engine.log"
) -> tuple[ServerProcess, str, float]:
    port = free_port()
    argv = [
        str(VOTES_BIN), "serve", "--data-dir", str(data_dir),
        "--port", str(port), "--workers", str(args.workers),
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


def run_engine(args, run_dir: Path, wrk_path: str, ceiling_rate_per_s: float) -> dict:
    # A fresh data dir per round: --keep-data leaves the earlier ones in place.
    data_dir = Path(tempfile.mkdtemp(prefix="engine-data-", dir=run_dir))
    server, base_url, ready_s = start_engine(args, run_dir, data_dir, f"{data_dir.name}.log")
    try:
        admin_token = votes_cli("admin-token", "--data-dir", str(data_dir)).strip().splitlines()[-1]
        create_poll(base_url, args, admin_token)

        count = tokens_needed(
            ceiling_rate_per_s, args.duration_s, args.connections, args.tokens_max
        )
        warmup_count = tokens_needed(
            ceiling_rate_per_s, args.warmup_s, args.connections, args.tokens_max
        )
        measured_tokens = run_dir / "engine.tokens"
        warmup_tokens = run_dir / "engine-warmup.tokens"
        print(f"  minting {count} + {warmup_count} voter tokens ...", flush=True)
        mint_s = mint_tokens(data_dir, args.poll, 1, count, measured_tokens, args)
        mint_s += mint_tokens(data_dir, args.poll, count + 1, warmup_count, warmup_tokens, args)
        print(f"  minted in {mint_s:.1f}s", flush=True)
        with open(measured_tokens) as tokens:
            token_len = len(tokens.readline().strip())

        warmup = run_wrk(
            base_url, VOTES_SCRIPT, wrk_parameters(args, args.warmup_s),
            lua_env(warmup_tokens, args), wrk_path=wrk_path,
        )  # fmt: skip
        before = settled_results(base_url, args.poll, admin_token, args.settle_timeout_s)
        result = run_wrk(
            base_url, VOTES_SCRIPT, wrk_parameters(args, args.duration_s),
            lua_env(measured_tokens, args), cpu_roots={"server": server.pid}, wrk_path=wrk_path,
        )  # fmt: skip
        after = settled_results(base_url, args.poll, admin_token, args.settle_timeout_s)
        require_not_exhausted(result, "engine")
        if result.created == 0:
            raise BenchError(
                f"the engine answered no 201 in the measured run: statuses {result.statuses}, "
                f"errors {result.errors}, first bodies {result.bodies_not_created}"
            )
        if server.proc.poll() is not None:
            raise BenchError(f"engine exited during the run with code {server.proc.returncode}")
    except BenchError as error:
        raise BenchError(f"{error}\n{server.log_tail()}") from None
    finally:
        server.stop()
        if not args.keep_data:
            for path in run_dir.glob("engine*.tokens"):
                path.unlink()
            shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "peer": "engine",
        "ready_s": round(ready_s, 3),
        "warmup_created_per_s": round(warmup.created_per_s, 1),
        "warmup_statuses": {str(k): v for k, v in sorted(warmup.statuses.items())},
        "token_len": token_len,
        "tokens_file_lines": count,
        "mint_s": round(mint_s, 1),
        "result": result,
        "cross_check": cross_check(result, before, after),
    }


# --- reporting ----------------------------------------------------------------------------


def table_row(label: str, result: WrkResult) -> list[str]:
    lat = result.latency_us
    not_created = " ".join(f"{s}:{n}" for s, n in result.not_created.items()) or "-"
    errors = " ".join(f"{k}:{v}" for k, v in result.errors.items() if v and k != "status")
    cpu = result.cpu
    return [
        label,
        f"{result.created_per_s:,.0f}",
        format_us(lat.get("p50")),
        format_us(lat.get("p90")),
        format_us(lat.get("p99")),
        format_us(lat.get("p99.9")),
        format_us(lat.get("max")),
        not_created + (f" ({errors})" if errors else ""),
        f"{cpu.cpu_percent['server']:.0f}% (pk {cpu.cpu_percent_peak['server']:.0f})",
        f"{result.server_cpu_us_per_created:.1f}" if result.server_cpu_us_per_created else "-",
        f"{cpu.cpu_percent['wrk']:.0f}% (pk {cpu.cpu_percent_peak['wrk']:.0f})",
        f"{cpu.machine_busy_percent:.0f}/{cpu.machine_capacity_percent:.0f}%",
    ]


HEADERS = [
    "peer", "201/s", "p50", "p90", "p99", "p99.9", "max", "non-201 (errors)",
    "server CPU", "CPU us/201", "wrk CPU", "machine busy",
]  # fmt: skip


def print_cross_check(check: dict) -> None:
    verdict = "ok" if check["lower_ok"] and check["upper_ok"] else "MISMATCH"
    print(
        f"  cross-check ({verdict}): 201s seen {check['created_seen']} <= votes counted by "
        f"results endpoint {check['votes_counted']} <= 201s + in flight at end "
        f"({check['in_flight_at_end']}) + timeouts ({check['timeouts']}) = {check['upper_bound']}"
    )
    after = check["results_after"]
    print(
        f"  results after: total {after.get('total')} counts {after.get('counts')} "
        f"rejected {after.get('rejected')} final {after.get('final')}"
    )


def phase_warnings(label: str, result: WrkResult) -> list[str]:
    """Conditions that make a row doubtful, printed under the table and kept in the JSON."""
    warnings = []
    responses = sum(result.statuses.values())
    not_created = responses - result.created
    if responses and not_created > 0.01 * responses:
        warnings.append(f"{label}: {not_created} of {responses} responses were not 201")
    errors = {k: v for k, v in result.errors.items() if v and k != "status"}
    if errors:
        warnings.append(f"{label}: wrk socket errors/timeouts {errors}")
    cpu = result.cpu
    if cpu is not None:
        if cpu.cpu_percent["wrk"] >= 90:
            warnings.append(
                f"{label}: wrk used {cpu.cpu_percent['wrk']:.0f}% of a core: the generator "
                "may be the bottleneck"
            )
        others = cpu.machine_busy_percent - cpu.cpu_percent["server"] - cpu.cpu_percent["wrk"]
        if cpu.cpu_percent["server"] < 80:
            warnings.append(
                f"{label}: the server used only {cpu.cpu_percent['server']:.0f}% of a core: "
                "it waited (on disk, locks, the generator or the CPU), it did not saturate"
            )
        if others > 20:
            warnings.append(
                f"{label}: other processes used {others:.0f}% of the machine's CPU during "
                "the run: absolute rates are depressed; compare ratios"
            )
    return warnings


def phase_json(phase: dict) -> dict:
    document = {k: v for k, v in phase.items() if k != "result"}
    document.update(phase["result"].to_json())
    return document


def run_phase(label: str, run) -> tuple[dict, WrkResult | None]:
    """Run one peer's phase; a failure becomes {"error": ...} instead of ending the run."""
    print(f"\n== {label}", flush=True)
    try:
        phase = run()
    except (BenchError, subprocess.TimeoutExpired, OSError) as error:
        print(f"!! {label} failed: {error}", flush=True)
        return {"error": str(error)}, None
    document = phase_json(phase)
    document["warnings"] = phase_warnings(phase["peer"], phase["result"])
    return document, phase["result"]


def run_round(index: int, args, run_dir: Path, wrk_path: str, token_len: int, engine: bool):
    """One ceiling run then one engine run, printed side by side with their ratio."""
    prefix = f"round {index + 1}/{args.rounds}"
    round_doc: dict = {}
    round_doc["ceiling"], ceiling = run_phase(
        f"{prefix}: ceiling", lambda: run_ceiling(args, run_dir, wrk_path, token_len)
    )
    rows = [table_row("ceiling", ceiling)] if ceiling else []
    if engine and ceiling is not None:
        # The ceiling's rate bounds the engine's; its warm-up rate covers a slow patch.
        rate_bound = max(ceiling.created_per_s, round_doc["ceiling"]["warmup_created_per_s"])
        round_doc["engine"], result = run_phase(
            f"{prefix}: engine",
            lambda: run_engine(args, run_dir, wrk_path, rate_bound),
        )
        if result is not None:
            rows.append(table_row("engine", result))
            ratio = result.created_per_s / ceiling.created_per_s
            round_doc["ratio"] = {"engine_over_ceiling": round(ratio, 4)}
            if result.server_cpu_us_per_created and ceiling.server_cpu_us_per_created:
                cost_ratio = ceiling.server_cpu_us_per_created / result.server_cpu_us_per_created
                round_doc["ratio"]["cpu_cost_ceiling_over_engine"] = round(cost_ratio, 4)
    print()
    if rows:
        print_table(HEADERS, rows)
    if "ratio" in round_doc:
        ratio = round_doc["ratio"]
        print(f"  ratio engine/ceiling (201/s): {ratio['engine_over_ceiling']:.3f}")
        if "cpu_cost_ceiling_over_engine" in ratio:
            print(
                "  ratio of server CPU per 201, ceiling/engine: "
                f"{ratio['cpu_cost_ceiling_over_engine']:.3f}"
            )
        print_cross_check(round_doc["engine"]["cross_check"])
        if round_doc["engine"]["token_len"] != token_len:
            print(f"  note: engine tokens are {round_doc['engine']['token_len']} chars, the "
                  f"ceiling's stand-ins {token_len}")  # fmt: skip
    for peer in round_doc.values():
        for warning in peer.get("warnings", []):
            print(f"  WARNING {warning}")
    return round_doc


def describe_run(args, run_dir: Path) -> tuple[dict, dict]:
    """(conditions, parameters): printed first and stored with the results."""
    conditions = describe_machine(("votes-engine",))
    conditions["data_dir_filesystem"] = filesystem_of(run_dir)
    parameters = {
        "generator": "wrk (closed loop) + perf/wrk/votes.lua",
        "wrk_argv": " ".join(wrk_parameters(args, args.duration_s).argv()),
        "threads": args.threads,
        "connections": args.connections,
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "timeout_s": args.timeout_s,
        "server_workers": args.workers,
        "rounds": args.rounds,
        "poll": args.poll,
        "options": args.options,
        "run_dir": str(run_dir),
        "engine_extra_args": args.engine_extra_args,
        "votes_bin": str(args.votes_bin),
    }
    return conditions, parameters


def check_engine(args, run_dir: Path) -> tuple[str | None, int | None]:
    """(why the engine cannot be measured or None, length of its tokens if known)."""
    if args.ceiling_only:
        return None, None
    problem = engine_available()
    if problem is None:
        try:
            return None, probe_engine(run_dir, args)
        except (BenchError, subprocess.TimeoutExpired, OSError) as error:
            problem = f"the engine probe failed: {error}"
    print(f"\n!! engine not runnable, measuring the ceiling only:\n{problem}")
    return problem, None


def summarize(rounds: list[dict], args, engine_problem: str | None) -> dict:
    ratios = [r["ratio"]["engine_over_ceiling"] for r in rounds if "ratio" in r]
    cost_ratios = [
        r["ratio"]["cpu_cost_ceiling_over_engine"]
        for r in rounds
        if "cpu_cost_ceiling_over_engine" in r.get("ratio", {})
    ]
    return {
        "ceiling_created_per_s": [
            r["ceiling"]["created_per_s"] for r in rounds if "created_per_s" in r["ceiling"]
        ],
        "engine_created_per_s": [
            r["engine"]["created_per_s"] for r in rounds if "created_per_s" in r.get("engine", {})
        ],
        "ratio_engine_over_ceiling": ratios,
        "ratio_median": round(statistics.median(ratios), 4) if ratios else None,
        "cpu_cost_ratio_ceiling_over_engine": cost_ratios,
        "cpu_cost_ratio_median": round(statistics.median(cost_ratios), 4) if cost_ratios else None,
        "engine_skipped": bool(args.ceiling_only),
        "engine_problem": engine_problem,
        "failures": [r[peer]["error"] for r in rounds for peer in r if "error" in r[peer]],
        "warnings": [w for r in rounds for peer in r for w in r[peer].get("warnings", [])],
    }


def main(argv: list[str] | None = None) -> int:
    global VOTES_BIN
    args = parse_args(argv)
    VOTES_BIN = args.votes_bin
    wrk_path = ensure_wrk()
    run_dir = args.data_root / time.strftime("run-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    conditions, parameters = describe_run(args, run_dir)
    print_conditions(conditions, parameters)
    fs_type = conditions["data_dir_filesystem"]["fs_type"]
    if fs_type in ("tmpfs", "ramfs", "overlay"):
        print(f"  WARNING: {run_dir} is on {fs_type}, not a real disk: fsyncs cost nothing")

    engine_problem, engine_token_len = check_engine(args, run_dir)
    engine_wanted = not args.ceiling_only and engine_problem is None
    token_len = args.token_len or engine_token_len or 160
    parameters["ceiling_token_len"] = token_len
    parameters["engine_token_len"] = engine_token_len

    rounds = [
        run_round(index, args, run_dir, wrk_path, token_len, engine_wanted)
        for index in range(args.rounds)
    ]
    summary = summarize(rounds, args, engine_problem)
    print("\n== summary")
    print(json.dumps(summary, indent=2))
    document = {
        "benchmark": "vote_vs_ceiling",
        "conditions": conditions,
        "parameters": parameters,
        "rounds": rounds,
        "summary": summary,
    }
    write_json(args.out, document)
    print(f"wrote {args.out}\nlogs in {run_dir}")
    return 1 if summary["failures"] or engine_problem else 0


if __name__ == "__main__":
    sys.exit(main())
