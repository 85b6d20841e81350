"""What a benchmark prints and writes: conditions, tables, latencies, JSON result files.

Result files are written whole (a temporary file, then a rename), so a reader never sees
half a document; ``merged_results`` keeps the other cases of a file beside the new one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def print_conditions(conditions: dict, parameters: dict) -> None:
    print("== conditions")
    for key, value in conditions.items():
        print(f"  {key:24} {value}")
    print("== parameters")
    for key, value in parameters.items():
        print(f"  {key:24} {value}")
    sys.stdout.flush()


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def merged_results(path: Path, benchmark: str, case_name: str, case: dict) -> dict:
    """The results file at `path` with this case replaced, so runs of other sizes stay beside it."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        document = {}
    cases = document.get("cases") if isinstance(document.get("cases"), dict) else {}
    cases[case_name] = case
    return {"benchmark": benchmark, "cases": dict(sorted(cases.items()))}


def format_us(value_us: float | None) -> str:
    """A latency for a table: µs below 1 ms, ms below 1 s, else s."""
    if value_us is None:
        return "-"
    if value_us < 1000:
        return f"{value_us:.0f}us"
    if value_us < 1e6:
        return f"{value_us / 1e3:.2f}ms"
    return f"{value_us / 1e6:.2f}s"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    line = "  ".join(f"{h:>{w}}" for h, w in zip(headers, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(f"{c!s:>{w}}" for c, w in zip(row, widths)))
    sys.stdout.flush()
