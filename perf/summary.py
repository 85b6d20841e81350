"""The verdict part of a driver run: ratios, targets, integrity, warnings, exit status.

``summarize_rounds`` turns the rounds of peer documents into the figures the report prints
and peers.json stores. Integrity failures (perf/integrity.py) make every figure of the
peers concerned INVALID, their targets INVALID, and ``exit_status`` non-zero: a run whose
counts did not add up never reports a ratio with PASS.
"""

from __future__ import annotations

import json

from perf import RESULTS_DIR
from perf.integrity import round_integrity
from perf.output import format_us
from perf.targets import (
    invalidated,
    measured_targets,
    median_by_key,
    open_p99_ms,
    ratios_of,
    scenario_of,
)

# Shares of a core (percent) above which a run's conditions draw a warning.
CEILING_SATURATED_PERCENT_MIN = 90
GENERATOR_BUSY_PERCENT_MAX = 90
OTHER_PROCESSES_PERCENT_MAX = 25
SEND_LAG_P99_US_MAX = 5000
# A paced run reaching less than this share of its target rate draws a warning.
PACED_SHORTFALL_SHARE_MIN = 0.9


def summarize_rounds(rounds: list[dict], micro: dict | None) -> dict:
    """Ratios (medians of rounds, INVALID where a round's counts failed), targets, checks."""
    integrity_by_round = [round_integrity(round_peers) for round_peers in rounds]
    raw_by_round = [ratios_of(round_peers) for round_peers in rounds]
    ratios_by_round = [invalidated(ratios, integrity["invalid_peers"])
                       for ratios, integrity in zip(raw_by_round, integrity_by_round)]  # fmt: skip
    p99_by_round = [invalidated(open_p99_ms(round_peers), integrity["invalid_peers"])
                    for round_peers, integrity in zip(rounds, integrity_by_round)]  # fmt: skip
    ratios = median_by_key(ratios_by_round)
    prefix = (lambda index: f"r{index + 1} ") if len(rounds) > 1 else (lambda index: "")
    failures = [prefix(index) + failure for index, integrity in enumerate(integrity_by_round)
                for failure in integrity["failures"]]  # fmt: skip
    return {
        "ratios": ratios,
        "ratios_as_measured": median_by_key(raw_by_round),
        "ratios_by_round": ratios_by_round,
        "open_half_p99_ms_by_round": p99_by_round,
        "targets": measured_targets(ratios, median_by_key(p99_by_round), micro),
        "integrity": {
            "ok": not failures,
            "failures": failures,
            "invalid_peers_by_round": [i["invalid_peers"] for i in integrity_by_round],
        },
        "warnings": [prefix(index) + warning for index, round_peers in enumerate(rounds)
                     for warning in warnings_of(round_peers)],
    }


def exit_status(document: dict) -> int:
    """0 only when every peer ran every scenario and every integrity check held."""
    peer_errors = any(peer.get("errors") for peer in document["peers"].values()) or any(
        peer.get("errors") for round_peers in document.get("earlier_rounds", [])
        for peer in round_peers.values())  # fmt: skip
    if document.get("failures") or peer_errors or not document["integrity"]["ok"]:
        return 1
    return 0


def warnings_of(peers: dict) -> list[str]:
    """Conditions that make a round's figures doubtful (not wrong: that is integrity's)."""
    warnings = []
    ceiling = scenario_of(peers, "ceiling", "closed_max")
    if ceiling and ceiling.get("cpu") and ceiling["cpu"]["server_percent"] < CEILING_SATURATED_PERCENT_MIN:
        warnings.append(f"the ceiling's server used {ceiling['cpu']['server_percent']:.0f}% of a core "
                        "in closed_max: it did not saturate, so the ratios to it flatter the engine")  # fmt: skip
    for name, peer in peers.items():
        for scenario, result in peer["scenarios"].items():
            warnings.extend(result_warnings(f"{name} {scenario}", result))
    return warnings


def result_warnings(label: str, result: dict) -> list[str]:
    warnings = []
    cpu = result.get("cpu") or {}
    if cpu and (cpu.get("generator_percent") or 0) >= GENERATOR_BUSY_PERCENT_MAX:
        warnings.append(f"{label}: the generator used {cpu['generator_percent']:.0f}% "
                        "of a core: it may be the bottleneck")  # fmt: skip
    if cpu:
        others = cpu["machine_busy_percent"] - sum(
            cpu.get(k) or 0 for k in ("server_percent", "backend_percent", "generator_percent"))
        if others > OTHER_PROCESSES_PERCENT_MAX:
            warnings.append(f"{label}: other processes used {others:.0f}% of the "
                            "machine: absolute rates are depressed; compare ratios")  # fmt: skip
    if result.get("overloaded_at_s") is not None:
        warnings.append(f"{label}: open loop stopped sending at "
                        f"{result['overloaded_at_s']} s: too many requests unanswered")  # fmt: skip
    lag = (result.get("send_lag_us") or {}).get("p99")
    if lag is not None and lag > SEND_LAG_P99_US_MAX:
        warnings.append(f"{label}: the generator sent late (p99 send lag "
                        f"{format_us(lag)}): its lateness is in the latencies")  # fmt: skip
    pacing = result.get("pacing")
    target = result.get("target_per_s")
    if pacing and target and result["created_per_s"] < PACED_SHORTFALL_SHARE_MIN * target:
        warnings.append(f"{label}: paced run reached {result['created_per_s']:,.0f}/s of a "
                        f"{result['target_per_s']:,.0f}/s target: when answers take longer than "
                        "connections / rate, no connection is free when a slot comes")  # fmt: skip
    return warnings


def load_micro() -> dict | None:
    path = RESULTS_DIR / "micro.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
