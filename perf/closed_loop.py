"""One closed-loop run of a peer with wrk, and the CPU figures every run reports.

wrk -t<threads> sends votes from a token file through perf/wrk/votes.lua; only 201 counts
as throughput. A paced run (``rate_per_s``) is still a closed loop: votes.lua reports its
late sends and dropped slots under ``pacing``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from perf import PERF_DIR
from perf.cpu_sampling import CpuUsage
from perf.wrk import WrkParameters, run_wrk

if TYPE_CHECKING:
    from perf.peer_servers import Harness, RunningPeer

VOTES_SCRIPT = PERF_DIR / "wrk" / "votes.lua"


def cpu_json(cpu: CpuUsage | None, generator_key: str) -> dict | None:
    """Mean CPU of server, backend and generator over a run, % of one core."""
    if cpu is None:
        return None
    percent, peak = cpu.cpu_percent, cpu.cpu_percent_peak
    return {
        "server_percent": percent.get("server"),
        "server_percent_peak": peak.get("server"),
        "backend_percent": percent.get("backend"),
        "generator_percent": percent.get(generator_key),
        "machine_busy_percent": cpu.machine_busy_percent,
        "machine_capacity_percent": cpu.machine_capacity_percent,
        "window_s": cpu.interval_s,
    }


def cpu_us_per_created(cpu: dict | None, created_per_s: float) -> float | None:
    """Server + backend CPU time per 201, µs: the whole system's cost of one vote."""
    if not cpu or not created_per_s:
        return None
    percent = (cpu["server_percent"] or 0) + (cpu["backend_percent"] or 0)
    return round(percent / 100 * 1e6 / created_per_s, 1)


def run_closed(h: Harness, peer: RunningPeer, tokens: Path, duration_s: float, polls: list[str],
               connections: int, measure: bool = True, rate_per_s: float | None = None) -> dict:  # fmt: skip
    """One wrk run; ``measure`` samples CPU, ``rate_per_s`` paces the whole run."""
    env = {"VOTES_TOKENS_FILE": str(tokens), "VOTES_POLLS": ",".join(polls),
           "VOTES_OPTIONS": ",".join(h.set.options), "VOTES_SERIES": "1"}  # fmt: skip
    if rate_per_s is not None:
        env["VOTES_RATE_PER_S"] = f"{rate_per_s:.3f}"
    parameters = WrkParameters(h.args.wrk_threads, connections, duration_s, h.args.timeout_s)
    result = run_wrk(peer.base_url, VOTES_SCRIPT, parameters, env,
                     cpu_roots=peer.cpu_roots() if measure else None, wrk_path=h.wrk_path)  # fmt: skip
    responses = sum(result.statuses.values())
    cpu = cpu_json(result.cpu, "wrk")
    document = {
        "generator": "wrk (closed loop)" if rate_per_s is None else "wrk (closed loop, paced)",
        "wrk_argv": " ".join(parameters.argv()),
        "connections": connections,
        "duration_s": round(result.duration_s, 3),
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "created": result.created,
        "created_per_s": round(result.created_per_s, 1),
        "latency_us": result.latency_us,
        "errors": result.errors,
        "bodies_not_created": result.bodies_not_created,
        "votes_sent": result.votes_sent,
        "in_flight_at_end": max(0, result.votes_sent + result.sent_after_exhaustion - responses)
        + result.errors.get("timeout", 0),
        "exhausted": result.exhausted,
        "tokens_loaded": result.tokens_loaded,
        "series": result.series,
        "cpu": cpu,
        "cpu_us_per_created": cpu_us_per_created(cpu, result.created_per_s),
    }
    if rate_per_s is not None:
        document.update(target_per_s=round(rate_per_s, 1), pacing=result.pacing)
    return document
