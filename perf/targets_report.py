"""The last table of `make bench`: issue 10's targets, PASS / FAIL, from this run's files.

Reads what the steps before it wrote to perf/results/ (nothing is measured here):

- peers.json (perf/bench_peers.py): the engines against the ceiling at 64 and 256
  connections and Kafka's best, in the default config; the open-loop p99 at half max and
  the generator's own send lag beside it; the peers and the micro-benchmarks' targets;
- sweep.json (perf/sweep.py): 32 shards per worker ÷ 1 shard, embedded and Kafka;
- the capacity model (perf/capacity.py, its inputs measured in peers.json where it finds
  them): Kafka brokers for the design rate, at most 9, and the fleet total;
- memory.json (perf/bench_memory.py) if present: its ``targets`` rows (each ``target``,
  ``description``, ``threshold``, ``sense``, ``measured``, ``verdict``), else one row that
  says the file has none; "not measured" without the file;
- issue 12's rows the same way: defences.json (perf/bench_defences.py: throughput with
  every defence on ÷ off, Redis calls per vote) and attack.json (perf/bench_attack.py: the
  attack simulation), with their integrity failures.

A FAIL is reported, not fatal, as in perf/targets.py: the exit status is 1 only when a
target is INVALID (an integrity check failed: a vote lost or counted twice) or an input
file is unreadable. Prints the time and conditions of each file it read; writes
perf/results/targets.json.

    python -m perf.targets_report [--results-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from perf import RESULTS_DIR
from perf.output import print_table, write_json
from perf.report import ratio_cell
from perf.targets import INVALID


def read_json(path: Path) -> tuple[dict | None, str | None]:
    """(document, None), (None, None) when absent, (None, why) when unreadable."""
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as error:
        return None, f"{path.name}: {error}"


def capacity_rows(results_dir: Path) -> list[dict]:
    """The capacity model's broker verdict and fleet total, from the files just written."""
    from perf.capacity import KAFKA_BROKERS_TARGET, build

    model, inputs, _, _ = build(["--results-dir", str(results_dir)])
    out = model.out
    brokers = {"target": "kafka brokers", "threshold": KAFKA_BROKERS_TARGET, "sense": "<=",
               "description": f"capacity model: Kafka brokers (3 per AZ) for {out['design_votes_per_s']:,.0f} "
                              f"votes/s, {inputs['fencing_groups'].value:g} fencing groups",
               "measured": out["kafka_brokers"],
               "verdict": "PASS" if out["kafka_brokers_target_met"] else "FAIL"}  # fmt: skip
    fleet = {"target": "fleet total", "threshold": None, "sense": "", "measured": out["ec2_instances_total"],
             "description": f"capacity model: EC2 instances in all ({out['engine_instances']:.0f} engine, "
                            f"{out['kafka_brokers']:.0f} brokers, {out['redis_nodes']:.0f} Redis, "
                            f"{out['haproxy_instances']:.0f} HAProxy, {out['results_instances_with_cdn']:.0f} results)",
             "verdict": "reported"}  # fmt: skip
    return [brokers, fleet]


def capacity_source(results_dir: Path) -> str:
    """Which capacity-model inputs came from measured files, and the engine CPU per vote."""
    from perf.capacity import build

    _, inputs, used, _ = build(["--results-dir", str(results_dir)])
    cpu = inputs["engine_cpu_us_per_vote"]
    return f"inputs measured: {'; '.join(used) or 'none (defaults)'}; engine CPU {cpu.value:g} us/vote ({cpu.source})"


# The files whose own `targets` rows are printed as they are, and what each measures.
ROW_FILES = {"memory.json": ("memory", "memory per eligible voter (perf/bench_memory.py)"),
             "defences.json": ("defences", "throughput with the defences on (perf/bench_defences.py)"),
             "attack.json": ("attack", "the attack simulation (perf/bench_attack.py)")}  # fmt: skip


def file_rows(name: str, document: dict | None) -> list[dict]:
    target, description = ROW_FILES[name]
    if document is None:
        return [{"target": target, "description": description, "threshold": None, "sense": "",
                 "measured": None, "verdict": "not measured"}]  # fmt: skip
    rows = document.get("targets")
    if isinstance(rows, list) and rows:
        return rows
    return [{"target": target, "description": f"perf/results/{name} has no `targets` rows",
             "threshold": None, "sense": "", "measured": None, "verdict": "not measured"}]  # fmt: skip


def file_line(name: str, document: dict | None) -> str:
    if document is None:
        return f"  {name:14} not present"
    conditions = document.get("conditions") or {}
    load = conditions.get("load_average_at_start")
    return (f"  {name:14} {conditions.get('time_utc', '?')}, commit {(conditions.get('git') or {}).get('commit', '?')}, "
            f"{conditions.get('cores_usable', '?')} cores usable, load average at start "
            f"{', '.join(f'{x:.2f}' for x in load) if load else '?'}")  # fmt: skip


def threshold_cell(row: dict) -> str:
    return "-" if row.get("threshold") is None else f"{row['sense']} {row['threshold']:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=None, help="default: <results-dir>/targets.json")
    args = parser.parse_args(argv)
    problems = []
    files = {}
    for name in ("peers.json", "sweep.json", *ROW_FILES):
        files[name], problem = read_json(args.results_dir / name)
        if problem:
            problems.append(problem)
    peers, sweep = files["peers.json"], files["sweep.json"]
    rows = [*(peers or {}).get("targets", []), *(sweep or {}).get("targets", []),
            *capacity_rows(args.results_dir),
            *(row for name in ROW_FILES for row in file_rows(name, files[name]))]  # fmt: skip
    print("\n== issue 10 and 12 targets (from the files of this run, perf/results/)")
    for name, document in files.items():
        print(file_line(name, document))
    if peers:
        print(f"  engine config  {peers.get('parameters', {}).get('engine_config', '?')}")
    print(f"  capacity       {capacity_source(args.results_dir)}")
    print_table(["target", "threshold", "measured", "verdict"],
                [[row["description"], threshold_cell(row), ratio_cell(row["measured"], "{:,.4g}"),
                  row["verdict"]] for row in rows])  # fmt: skip
    integrity = [*(peers or {}).get("integrity", {}).get("failures", []),
                 *(sweep or {}).get("integrity", {}).get("failures", []),
                 *(f"{name}: {failure}" for name in ("defences.json", "attack.json")
                   for failure in (files[name] or {}).get("integrity", {}).get("failures", []))]  # fmt: skip
    for failure in integrity:
        print(f"  INTEGRITY FAILURE {failure}")
    for problem in problems:
        print(f"  UNREADABLE {problem}")
    verdicts = [row["verdict"] for row in rows]
    print(f"  {verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL, "
          f"{verdicts.count('not measured')} not measured, {verdicts.count(INVALID)} INVALID")
    write_json(args.out or args.results_dir / "targets.json",
               {"benchmark": "targets", "files": {name: (document or {}).get("conditions")
                                                  for name, document in files.items()},
                "targets": rows, "integrity_failures": integrity, "problems": problems})  # fmt: skip
    return 1 if integrity or problems or INVALID in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
