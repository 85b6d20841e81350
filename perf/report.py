"""The driver's printed report: machine, peers table, scenarios table, ratios, targets.

Reads only the JSON document the driver writes (perf/results/peers.json), so the report
and the file always say the same. A ratio or target that integrity made INVALID is printed
as INVALID, never as a number with a verdict.
"""

from __future__ import annotations

import sys

from perf.output import format_us, print_table
from perf.scenarios import ENGINES, PACED_SCENARIO, PEERS
from perf.targets import INVALID, scenario_of


def lat(result: dict | None, key: str) -> str:
    return format_us(result["latency_us"].get(key)) if result and result.get("latency_us") else "-"


def cpu_cell(result: dict | None) -> str:
    cpu = (result or {}).get("cpu") or {}
    if not cpu:
        return "-"
    backend = f"+{cpu['backend_percent']:.0f}" if cpu.get("backend_percent") is not None else ""
    return f"{cpu['server_percent']:.0f}{backend}/{cpu['generator_percent'] or 0:.0f}%"


def ratio_cell(value, template: str) -> str:
    """A ratio for a table: '-' when not measured, INVALID when its counts failed."""
    if value is None:
        return "-"
    return INVALID if value == INVALID else template.format(value)


def print_scenario_line(name: str, result: dict, took_s: float) -> None:
    """One line per scenario as it finishes, while the bench runs."""
    lat_us = result["latency_us"]
    cpu = result.get("cpu") or {}
    check = result.get("cross_check")
    verdict = "n/a" if check is None else ("ok" if check["ok"] else "MISMATCH")
    others = {k: v for k, v in result["statuses"].items() if k != "201"}
    print(f"  {name:14} 201/s {result['created_per_s']:>9,.0f}  p50 {format_us(lat_us.get('p50')):>8}"
          f"  p99 {format_us(lat_us.get('p99')):>8}  max {format_us(lat_us.get('max')):>8}  "
          f"server {cpu.get('server_percent') or 0:.0f}%  backend {cpu.get('backend_percent') or 0:.0f}%  "
          f"gen {cpu.get('generator_percent') or 0:.0f}%  other {others or '-'}  "
          f"results check {verdict}  ({took_s:.0f}s)", flush=True)  # fmt: skip
    commits = result.get("wal_commits")
    if commits and commits.get("commits"):
        print(f"  {'':14} WAL commits {commits['commits']} ({commits['commits_per_s']}/s), mean "
              f"{commits['commit_ms_mean']} ms, {commits['items_per_commit_mean']} votes each, "
              f"{commits['in_flight_mean']} in flight on average", flush=True)  # fmt: skip


def print_machine(document: dict) -> None:
    conditions = document["conditions"]
    print("\n== machine")
    print(f"  {conditions['cpu_model']}, {conditions['cores_usable']} cores usable, "
          f"{conditions['memory_gib']} GiB, {conditions['os']}, kernel {conditions['kernel']}, "
          f"Python {conditions['python']}, load average at start "
          f"{', '.join(f'{x:.2f}' for x in conditions['load_average_at_start'])}")  # fmt: skip
    for what, fs in document["filesystems"].items():
        print(f"  {what:24} {fs['fs_type']} on {fs['device']} (mount {fs['mount_point']})")
    if document.get("postgres"):
        s = document["postgres"]["settings"]
        print(f"  PostgreSQL {s['server_version']}: fsync={s['fsync']} synchronous_commit="
              f"{s['synchronous_commit']} wal_sync_method={s['wal_sync_method']} "
              f"commit_delay={s['commit_delay']}")  # fmt: skip
    if document.get("redis"):
        print(f"  {document['redis']['version']}: {document['redis']['config']}")


def x_ceiling_of(document: dict, name: str):
    """A peer's closed_max 201/s over the ceiling's; INVALID if either failed integrity."""
    peers, ratios = document["peers"], document["ratios"]
    if name in ENGINES:
        return ratios.get(f"{name}/ceiling")
    closed, ceiling = scenario_of(peers, name, "closed_max"), scenario_of(peers, "ceiling", "closed_max")
    if not closed or not ceiling:
        return None
    invalid_last_round = (document["integrity"]["invalid_peers_by_round"] or [[]])[-1]
    if {name, "ceiling"} & set(invalid_last_round):
        return INVALID
    return round(closed["created_per_s"] / ceiling["created_per_s"], 4)


def peer_row(document: dict, name: str) -> list[str]:
    peers, ratios = document["peers"], document["ratios"]
    peer = peers[name]
    closed = scenario_of(peers, name, "closed_max")
    opened = scenario_of(peers, name, "open_half")
    engine_over = ratios.get(f"embedded/{name}") if name not in ENGINES else None
    shards, groups = peer.get("info", {}).get("shards"), peer.get("info", {}).get("groups")
    layout = f"{shards} shard{'s' if shards != 1 else ''}" + (f", {groups} groups" if groups else "")
    return [
        f"{name} ({layout})" if shards else name,
        peer["durability"],
        str(closed["connections"]) if closed else "-",
        f"{closed['created_per_s']:,.0f}" if closed else "FAILED",
        lat(closed, "p50"), lat(closed, "p99"), cpu_cell(closed),
        f"{closed['cpu_us_per_created']:.0f}" if closed and closed.get("cpu_us_per_created") else "-",
        f"{opened['created_per_s']:,.0f}" if opened else "-",
        lat(opened, "p50"), lat(opened, "p99"), lat(opened, "p99.9"), lat(opened, "max"),
        format_us(opened["send_lag_us"].get("p99")) if opened and opened.get("send_lag_us") else "-",
        ratio_cell(x_ceiling_of(document, name), "{:.3f}"),
        ratio_cell(engine_over, "{:.2f}x"),
    ]  # fmt: skip


def print_peers_table(document: dict) -> None:
    headers = ["peer", "durability", "conns", "closed 201/s", "p50", "p99", "CPU srv+db/gen",
               "CPU us/201", "open rate", "open p50", "p99", "p99.9", "max", "send lag p99",
               "x ceiling", "engine / peer"]  # fmt: skip
    rows = [peer_row(document, name) for name in document["peers"]]
    print("\n== result: closed loop max (wrk -t1; each peer's best of the connection counts "
          "tried, conns = the best) and open loop at half that rate (perf/loadgen.py, latency "
          "from intended send time)")
    print_table(headers, rows)
    print("  CPU srv+db/gen: server process tree + its database or stack / the generator, % of "
          "one core, mean over the run. CPU us/201: (server + database) CPU per 201.")


def scenarios_row(peers: dict, name: str) -> list[str]:
    peer = peers[name]
    repeat = scenario_of(peers, name, "repeat_votes")
    many = scenario_of(peers, name, "many_polls")
    burst = scenario_of(peers, name, "burst_opening")
    closed = scenario_of(peers, name, "closed_max")
    checks = [r["cross_check"]["ok"] for r in peer["scenarios"].values() if r.get("cross_check")]
    conflicts = repeat["statuses"].get("409", 0) if repeat else 0
    return [
        name,
        f"{repeat['created_per_s']:,.0f}" if repeat else "-",
        f"{conflicts:,} / {repeat['repeats_sent']:,}" if repeat else "-",
        f"{many['created_per_s']:,.0f}" if many else "-",
        f"{many['created_per_s'] / closed['created_per_s']:.2f}" if many and closed else "-",
        lat(burst, "p50"), lat(burst, "p99"), lat(burst, "max"),
        f"{burst['created']:,}/{burst['scheduled']:,}" if burst else "-",
        str(burst["unanswered"]) if burst else "-",
        f"{sum(checks)}/{len(checks)} ok" if checks else "-",
    ]  # fmt: skip


def print_scenarios_table(peers: dict) -> None:
    headers = ["peer", "repeat 201/s", "409s / repeats sent", "16 polls 201/s",
               "16 polls / hot", "burst p50", "burst p99", "burst max", "burst 201s",
               "unanswered", "results check"]  # fmt: skip
    rows = [scenarios_row(peers, name) for name in peers if PEERS[name].stateful]
    print("\n== scenarios: repeat votes, hot poll vs 16 polls, burst at poll opening")
    print_table(headers, rows)


def late_cell(pacing: dict | None) -> str:
    """Requests sent after their slot: the waits that wrk's latency leaves out."""
    if not pacing or not pacing.get("sends"):
        return "-"
    cell = f"{100 * pacing['late_sends'] / pacing['sends']:.1f}%"
    if pacing["late_sends"]:
        cell += f" ({pacing['late_ms_mean']:.0f}ms, {pacing['late_ms_max']:.0f}ms)"
    if pacing["slots_dropped"]:
        cell += f" +{pacing['slots_dropped']} dropped"
    return cell


def print_paced_table(peers: dict) -> None:
    """The engines' paced closed-loop runs (--paced-fraction), when there were any."""
    rows = []
    for name in peers:
        paced = scenario_of(peers, name, PACED_SCENARIO)
        if paced:
            check = paced.get("cross_check")
            rows.append([name, f"{paced['target_per_s']:,.0f}", f"{paced['created_per_s']:,.0f}",
                         *(lat(paced, p) for p in ("p50", "p90", "p99", "p99.9", "max")),
                         late_cell(paced.get("pacing")), cpu_cell(paced),
                         "-" if check is None else ("ok" if check["ok"] else "MISMATCH")])  # fmt: skip
    if rows:
        print("\n== paced closed loop (wrk at a fraction of closed_max; a closed loop still: "
              "late sends are the waits its latency leaves out)")
        print_table(["peer", "target/s", "201/s", "p50", "p90", "p99", "p99.9", "max",
                     "late sends (mean, max)", "CPU srv+db/gen", "results check"], rows)  # fmt: skip


def print_ratios(document: dict) -> None:
    ratios = document["ratios"]
    by_round = document.get("ratios_by_round") or []
    if len(by_round) > 1:
        keys = list(dict.fromkeys(key for r in by_round for key in r))
        print(f"\n== ratios by round ({len(by_round)} rounds; the tables above show the last round)")
        print_table(["ratio", *[f"r{i + 1}" for i in range(len(by_round))], "median"],
                    [[key, *[ratio_cell(r.get(key), "{:.4f}") for r in by_round],
                      ratio_cell(ratios[key], "{:.4f}")] for key in keys])  # fmt: skip
    print("\n== ratios (closed_max 201/s, measured side by side in this run"
          + (", median of rounds)" if len(by_round) > 1 else ")"))
    for key, value in ratios.items():
        if not key.startswith("cpu_per_201"):
            print(f"  {key:32} {ratio_cell(value, '{:.4f}')}")
    for key, value in ratios.items():
        if key.startswith("cpu_per_201"):
            print(f"  {'CPU per 201 ' + key.split(' ', 1)[1]:32} {ratio_cell(value, '{:.4f}')}  "
                  "(steadier when the machine is busy)")


def print_targets(document: dict) -> None:
    print("\n== targets (perf issue)")
    print_table(["target", "threshold", "measured", "verdict"],
                [[t["description"], f"{t['sense']} {t['threshold']:g}",
                  ratio_cell(t["measured"], "{:,.4g}"), t["verdict"]]
                 for t in document["targets"]])  # fmt: skip
    for warning in document["warnings"]:
        print(f"  WARNING {warning}")
    for failure in document["integrity"]["failures"]:
        print(f"  INTEGRITY FAILURE {failure}: the figures of this peer are INVALID")
    for name, peer in document["peers"].items():
        for scenario, error in peer.get("errors", {}).items():
            print(f"  FAILED {name} {scenario}: {error.splitlines()[0]}")


def print_sweep(sweep: dict) -> None:
    """The shard sweep (perf/sweep.py): one row per shard and connection count, engines side
    by side, with the ceiling's rates of the same run it is divided by."""
    rows_by_key: dict = {}
    for row in sweep["rows"]:
        key = (row["shards"], row["connections"])
        rows_by_key.setdefault(key, {})[row["engine"]] = row
    engines = list(sweep["engines"])
    headers = ["shards/worker", "groups", "conns"]
    for engine in engines:
        headers += [f"{engine} 201/s", "÷ ceiling", "÷ 1 shard", "server CPU"]
    table = []
    for (shards, connections), by_engine in sorted(rows_by_key.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        groups = next((r["groups"] for r in by_engine.values() if r["groups"]), "-")
        cells = [str(shards), str(groups), str(connections or "-")]
        for engine in engines:
            row = by_engine.get(engine)
            rate = row and row["created_per_s"]
            cpu = row and row["server_cpu_percent"]
            cells += [f"{rate:,.0f}" if rate else "FAILED" if row else "-",
                      ratio_cell(row and row["ratio_to_ceiling"], "{:.3f}"),
                      ratio_cell(row and row["ratio_to_1_shard"], "{:.3f}"),
                      f"{cpu:.0f}%" if cpu is not None else "-"]  # fmt: skip
        table.append(cells)
    ceiling = ", ".join(f"{rate:,.0f} at {count}" for count, rate in sweep["ceiling_created_per_s"].items())
    parameters = sweep["parameters"]
    workers = parameters["workers"]
    print(f"\n== shard sweep: {workers} worker{'s' if workers != 1 else ''}, wrk -t1 closed loop, "
          f"groups = {parameters['groups']}; "
          f"ceiling in this run (201/s at conns): {ceiling or 'not measured'}")
    print_table(headers, table)
    print("  Each case is a fresh engine (Kafka: a fresh topic, one partition per group, on the "
          "kafka peer's warm stack); ratios are to the ceiling and to the 1-shard case at the "
          "same connection count, measured in this run.")
    for failure in sweep["integrity"]["failures"]:
        print(f"  INTEGRITY FAILURE {failure}: its ratios are INVALID")
    for engine, cases in sweep["engines"].items():
        for shards, case in cases.items():
            for what, error in case["errors"].items():
                print(f"  FAILED {engine} {shards} shards ({what}): {error.splitlines()[0]}")
    sys.stdout.flush()


def print_report(document: dict) -> None:
    print_machine(document)
    print_peers_table(document)
    print_scenarios_table(document["peers"])
    print_paced_table(document["peers"])
    print_ratios(document)
    print_targets(document)
    sys.stdout.flush()
