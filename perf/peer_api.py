"""The HTTP calls the driver makes to a peer besides the load: polls, results, commit metrics.

Every peer speaks the engine's contract for these (POST /v1/polls, GET results with the
admin token); only the engines have /metrics, whose group-commit histograms say how many
WAL commits a run took and how many votes each carried.
"""

from __future__ import annotations

import json
import time
from typing import Protocol

from perf import BenchError
from perf.processes import http_request

# The engine's group-commit histograms (engine/metrics.py), read from GET /metrics.
COMMIT_SECONDS = "vote_commit_cycle_duration_seconds"
COMMIT_ITEMS = "vote_commit_cycle_items"
RESULTS_TIMEOUT_S = 30.0


class Peer(Protocol):
    name: str
    base_url: str


def create_poll(peer: Peer, poll: str, options: list[str], admin_token: str) -> None:
    status, body = http_request("POST", f"{peer.base_url}/v1/polls",
                                {"id": poll, "options": options}, admin_token)  # fmt: skip
    if status != 201:
        raise BenchError(f"{peer.name}: POST /v1/polls {poll} answered {status}: {body[:300]!r}")


def results_total(peer: Peer, polls: list[str], admin_token: str) -> int:
    total = 0
    for poll in polls:
        status, body = http_request("GET", f"{peer.base_url}/v1/polls/{poll}/results",
                                    token=admin_token, timeout_s=RESULTS_TIMEOUT_S)  # fmt: skip
        if status != 200:
            raise BenchError(f"{peer.name}: GET results of {poll} answered {status}: {body[:300]!r}")
        total += json.loads(body)["total"]
    return total


def settled_total(peer: Peer, polls: list[str], admin_token: str, timeout_s: float) -> int:
    """The results total once it has stopped moving (votes in flight applied)."""
    deadline = time.monotonic() + timeout_s
    last = results_total(peer, polls, admin_token)
    steady = 0
    while steady < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
        now = results_total(peer, polls, admin_token)
        steady = steady + 1 if now == last else 0
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
    """The engine's WAL commits between two readings of its vote_commit_cycle_* histograms.

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
