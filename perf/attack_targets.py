"""The attack simulation's targets (issue 12) and its printed report, from its document.

Pure: reads what perf/bench_attack.py measured, decides PASS / FAIL, prints tables. The
rows have the shape perf/targets_report.py prints (``target``, ``description``,
``threshold``, ``sense``, ``measured``, ``verdict``).
"""

from __future__ import annotations

from perf.output import print_table
from perf.targets import verdict_rows

# Server CPU per rejected request of each class, at most this share of an accepted vote's.
REJECTED_CPU_SHARE_MAX = 0.25
HONEST_ACCEPTED_PERCENT_MIN = 99.9
# The rejected classes of the CPU phase and the status each answers.
REJECTED_CLASSES = {"forged": "401", "rate-limited": "429", "duplicate": "409"}
CLASS_STATUSES = {"accepted": "201", **REJECTED_CLASSES, "http-floor": "201"}


# A class run stands for its class only when nearly all its answers had the class's status
# (a rate-limited run starts with one burst of 201s).
CLASS_SHARE_MIN = 0.9


def cpu_ratios(cpu: dict) -> dict:
    """Server CPU per answer of each rejected class ÷ an accepted vote's; None when unknown,
    or when either run's answers were not mostly of its class's status."""
    def cost(name: str) -> float | None:
        run = cpu.get(name) or {}
        share = class_share(run, CLASS_STATUSES[name]) if "statuses" in run else 1.0
        return run.get("server_cpu_us_per_answer") if (share or 0) >= CLASS_SHARE_MIN else None

    accepted = cost("accepted")
    ratios = {}
    for name in (*REJECTED_CLASSES, "http-floor"):
        value = cost(name)
        ratios[name] = round(value / accepted, 4) if value and accepted else None
    return ratios


def class_share(run: dict, status: str) -> float | None:
    """The share of a class run's answers that had the class's status."""
    answered = run.get("answered") or 0
    return round(run.get("statuses", {}).get(status, 0) / answered, 4) if answered else None


def flood_bound(document: dict) -> float | None:
    """The flood's accepted votes ÷ what the prefix limit allows over its elapsed time."""
    mixed, limits = document["mixed"], document["limits"]
    elapsed = mixed["elapsed_s"].get("flood-prefix")
    accepted = mixed["bots"].get("flood-prefix", {}).get("accepted")
    if not elapsed or accepted is None:
        return None
    allowed = limits["workers"] * (limits["prefix_burst"] + limits["prefix_per_s"] * elapsed)
    return round(accepted / allowed, 4)


def attack_targets(document: dict) -> list[dict]:
    mixed = document["mixed"]
    bots = mixed["bots"]
    honest = bots.get("honest", {})
    invalid_accepted = sum(bot["accepted"] for name, bot in bots.items()
                           if name.startswith("forged-"))
    values = {
        "attack honest accepted %": round(100 * honest["accepted"] / honest["sent"], 3)
        if honest.get("sent") else None,
        "attack invalid-token votes accepted": invalid_accepted,
        "attack votes per valid token max": mixed["tokens_accepted_max"],
        "attack flood accepted / prefix limit": flood_bound(document),
    }
    targets = [
        ("attack honest accepted %", "attack: honest votes accepted, % of sent (mixed with "
         "every bot)", HONEST_ACCEPTED_PERCENT_MIN, "min"),
        ("attack invalid-token votes accepted", "attack: votes accepted for forged or expired "
         "tokens", 0, "max"),
        ("attack votes per valid token max", "attack: most votes accepted for one valid token "
         "(stolen and replayed, reused at once)", 1, "max"),
        ("attack flood accepted / prefix limit", "attack: one /24's flood of fresh valid tokens, "
         "accepted ÷ prefix burst + rate x time", 1.0, "max"),
    ]
    for name, status in REJECTED_CLASSES.items():
        key = f"attack cpu {name} / accepted"
        targets.append((key, f"attack: server CPU per {status} ({name}) ÷ per accepted vote, "
                        "each class alone", REJECTED_CPU_SHARE_MAX, "max"))
        values[key] = document["cpu_ratios"].get(name)
    rows = verdict_rows(targets, values)
    rows.append({"target": "attack http floor / accepted", "threshold": None, "sense": "",
                 "description": "attack: server CPU per answer of perf/ceiling.py (bare Granian, "
                                "a fixed 201) ÷ per accepted vote: the floor under any rejection",
                 "measured": document["cpu_ratios"].get("http-floor"), "verdict": "reported"})
    rows.append(pow_row(document["pow"]))
    return rows


def pow_row(pow_result: dict) -> dict:
    row = {"target": "attack pow bots", "threshold": None, "sense": "", "measured": None}
    if not pow_result["built"]:
        status = pow_result.get("challenge_endpoint_status")
        return {**row, "verdict": "not measured",
                "description": f"attack: PoW not built (GET /v1/challenge answered {status}, "
                               "no vote answered 428)"}
    solved = pow_result.get("solved", 0)
    return {**row, "verdict": "reported", "measured": solved,
            "description": f"attack: PoW bots solved {solved} of {pow_result.get('challenges')} "
                           f"challenges in {pow_result.get('solve_s', 0):.2f} s of compute "
                           f"(budget {pow_result['budget_s']:g} s each)"}


def print_report(document: dict) -> None:
    mixed = document["mixed"]
    print(f"\n== mixed phase ({mixed['window_s']:g} s window): answers by class")
    print_table(["class", "sent", "accepted", "statuses", "elapsed s"],
                [[name, bot["sent"], bot["accepted"],
                  " ".join(f"{k}:{v}" for k, v in bot["statuses"].items()),
                  mixed["elapsed_s"].get(name.split("-")[0] if name.startswith("forged-")
                                         else name, "-")]
                 for name, bot in mixed["bots"].items()])
    print(f"  results total {mixed['results_total']}, rejected {mixed['rejected']}, "
          f"unanswered {mixed['unanswered']}, fail-open {mixed['fail_open']:g}, honest send "
          f"lag max {mixed['honest_send_lag_ms_max']} ms")
    print("\n== server CPU per request class, each alone")
    accepted = document["cpu_classes"].get("accepted", {}).get("server_cpu_us_per_answer")
    rows = []
    for name, run in document["cpu_classes"].items():
        us = run.get("server_cpu_us_per_answer")
        rows.append([name, f"{run['answered_per_s']:,.0f}",
                     f"{class_share(run, CLASS_STATUSES[name]) or 0:.1%} {CLASS_STATUSES[name]}",
                     f"{us:g}" if us else "-",
                     f"{us / accepted:.3f}" if us and accepted else "-"])
    print_table(["class", "answers/s", "share of its status", "server CPU us/answer",
                 "÷ accepted"], rows)
    print("\n== attack targets")
    print_table(["target", "threshold", "measured", "verdict"],
                [[row["description"], "-" if row["threshold"] is None
                  else f"{row['sense']} {row['threshold']:g}",
                  "-" if row["measured"] is None else f"{row['measured']:,.4g}", row["verdict"]]
                 for row in document["targets"]])
