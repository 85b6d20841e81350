"""Chaos tests: faults under load, each run checked against the recovered state.

The profile comes from VOTES_CHAOS_PROFILE (`short`, the default, in `make test`; `long` in
`make chaos`). At the end of the session the summary table of every run is printed (and
written as JSON next to the tests' temporary files when VOTES_CHAOS_SUMMARY names a file).
"""

from __future__ import annotations

import json
import os

from tests.chaos.checker import summary_table
from tests.chaos.harness import VERDICTS, profile_from_environment


def pytest_terminal_summary(terminalreporter) -> None:
    if not VERDICTS:
        return
    profile = profile_from_environment()
    terminalreporter.write_sep("=", f"chaos summary ({profile.name} profile)")
    terminalreporter.write_line(summary_table(VERDICTS))
    for verdict in VERDICTS:
        for problem in verdict.problems:
            terminalreporter.write_line(f"{verdict.schedule}: {problem}")
    summary_path = os.environ.get("VOTES_CHAOS_SUMMARY")
    if summary_path:
        with open(summary_path, "w") as handle:
            json.dump({"profile": profile.name,
                       "runs": [{**verdict.row(), "problems": verdict.problems}
                                for verdict in VERDICTS]}, handle, indent=2)
