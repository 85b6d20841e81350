"""Integrity of a run: do the peer's own counts agree with what the generator saw?

A throughput figure is only worth its ratio if the votes it counts were really counted:

- results cross-check: 201s seen <= votes the peer counted (its results total, settled,
  after minus before) <= 201s + requests unanswered when the run stopped;
- repeat check: no more 409s than repeats sent, no more 201s than distinct voters sent
  (a vote counted twice or a first vote refused breaks it).

A failure of either makes the peer's figures of that round INVALID (perf/targets.py) and
the bench exit non-zero; it is never a warning beside a ratio that still passes.
"""

from __future__ import annotations


def cross_check(created: int, counted: int | None, in_flight: int) -> dict | None:
    """201s seen <= votes the peer counted <= 201s + requests unanswered at the end."""
    if counted is None:
        return None  # a stateless peer (the ceiling) counts nothing
    return {"created_seen": created, "votes_counted": counted, "in_flight_at_end": in_flight,
            "ok": created <= counted <= created + in_flight}  # fmt: skip


def repeat_check(conflicts: int, repeats_sent: int, votes_sent: int, created: int) -> dict:
    """No repeat may count twice and no first vote may be refused as a repeat."""
    distinct_sent = votes_sent - repeats_sent
    return {"conflicts": conflicts, "repeats_sent": repeats_sent, "distinct_sent": distinct_sent,
            "ok": conflicts <= repeats_sent and created <= distinct_sent}  # fmt: skip


def failures_of(peer: str, scenario: str, result: dict) -> list[str]:
    """Why one scenario's result of one peer cannot be trusted; empty when it can."""
    failures = []
    check = result.get("cross_check")
    if check is not None and not check["ok"]:
        failures.append(f"{peer} {scenario}: results total {check['votes_counted']} does not "
                        f"match the 201s seen {check['created_seen']} "
                        f"(+{check['in_flight_at_end']} in flight)")  # fmt: skip
    repeat = result.get("repeat_check")
    if repeat is not None and not repeat["ok"]:
        failures.append(f"{peer} {scenario}: {repeat['conflicts']} 409s for "
                        f"{repeat['repeats_sent']} repeats sent, {result['created']} 201s for "
                        f"{repeat['distinct_sent']} distinct voters: a vote counted twice or a "
                        "first vote refused")  # fmt: skip
    return failures


def round_integrity(peers: dict) -> dict:
    """{"ok", "failures", "invalid_peers"} of one round of peers ({name: peer document})."""
    failures: list[str] = []
    invalid_peers: list[str] = []
    for name, peer in peers.items():
        found = [failure for scenario, result in peer.get("scenarios", {}).items()
                 for failure in failures_of(name, scenario, result)]  # fmt: skip
        if found:
            invalid_peers.append(name)
            failures.extend(found)
    return {"ok": not failures, "failures": failures, "invalid_peers": invalid_peers}
