"""The chaos checker: what the client was told against what the engine recovered.

Inputs, all taken after the faults healed and the engine restarted (so the state is the
recovered one, not memory):
- the load client's ledger (tests/chaos/load.py);
- the poll's results from the restarted engine (`GET /v1/polls/{poll}/results`);
- the independent recount of the raw WAL by the replay tool (replay/recount.py): which voter
  is counted with which option;
- the exit code of `votes replay verify` (recount vs snapshot vs live results).

Per voter, from the answers it got:
- must be counted, with the option it sent: any ACKNOWLEDGED or DUPLICATE answer;
- must not be counted: every answer REJECTED or FAILED;
- may go either way: otherwise (some UNKNOWN, no acknowledgement), but at most once.
Violations: `lost` (must be counted, is not, or with another option), `wrongly counted`
(must not be counted, is), `phantom` (counted, never sent), `double counted` (the results
total exceeds the distinct voters counted, or one voter got two 201s), `unexpected` (a 5xx
the contract does not allow), results that differ from the recount, a failed verify, and a
fault that hit no request in flight.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tests.chaos.faults import FaultLog
from tests.chaos.load import (
    ACKNOWLEDGED,
    DUPLICATE,
    FAILED,
    REJECTED,
    UNEXPECTED,
    UNKNOWN,
    Ledger,
)

EXAMPLES_MAX = 5


@dataclass
class Verdict:
    schedule: str
    faults: int
    requests: int
    outcomes: Counter
    voters_sent: int
    voters_counted: int
    unknown_voters: int
    unknown_counted: int
    lost: int
    double_counted: int
    wrongly_counted: int
    phantom: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def row(self) -> dict[str, object]:
        return {
            "schedule": self.schedule,
            "faults": self.faults,
            "requests": self.requests,
            "acknowledged": self.outcomes[ACKNOWLEDGED],
            "duplicate": self.outcomes[DUPLICATE],
            "rejected": self.outcomes[REJECTED],
            "failed": self.outcomes[FAILED],
            "unknown": self.outcomes[UNKNOWN],
            "unknown counted": f"{self.unknown_counted}/{self.unknown_voters}",
            "lost": self.lost,
            "double counted": self.double_counted,
            "wrongly counted": self.wrongly_counted,
            "verdict": "ok" if self.ok else "FAIL",
        }


def check(schedule: str, ledger: Ledger, faults: FaultLog, results: dict,
          counted: dict[int, str], verify_exit_code: int | None,
          verify_output: str = "") -> Verdict:
    """`results`: the restarted engine's results body; `counted`: voter id -> option from the
    replay recount of the poll; `verify_exit_code`: of `votes replay verify` (None: not run,
    which is a problem)."""
    problems: list[str] = []
    history = ledger.by_voter()
    must: dict[int, str] = {}
    must_not: set[int] = set()
    unknown: set[int] = set()
    twice_acknowledged: list[int] = []
    unexpected: list[str] = []
    for voter, requests in history.items():
        outcomes = [request.outcome for request in requests]
        if outcomes.count(ACKNOWLEDGED) > 1:
            twice_acknowledged.append(voter)
        if ACKNOWLEDGED in outcomes or DUPLICATE in outcomes:
            must[voter] = requests[0].option
        elif all(outcome in (REJECTED, FAILED) for outcome in outcomes):
            must_not.add(voter)
        else:
            unknown.add(voter)
        unexpected += [f"voter {voter}: {request.detail}" for request in requests
                       if request.outcome == UNEXPECTED]

    lost = {voter: (option, counted.get(voter)) for voter, option in must.items()
            if counted.get(voter) != option}
    wrongly = sorted(voter for voter in must_not if voter in counted)
    phantom = sorted(voter for voter in counted if voter not in history)
    wrong_option_unknown = sorted(voter for voter in unknown if voter in counted
                                  and counted[voter] != history[voter][0].option)
    recount_counts = Counter(counted.values())
    total = int(results.get("total", -1))
    double = max(0, total - len(counted)) + len(twice_acknowledged)

    if lost:
        problems.append(f"{len(lost)} acknowledged voters lost (voter: (sent, counted)): "
                        f"{list(lost.items())[:EXAMPLES_MAX]}")
    if wrongly:
        problems.append(f"{len(wrongly)} voters counted though told rejected/failed: "
                        f"{wrongly[:EXAMPLES_MAX]}")
    if phantom:
        problems.append(f"{len(phantom)} voters counted that never voted: {phantom[:EXAMPLES_MAX]}")
    if wrong_option_unknown:
        problems.append(f"{len(wrong_option_unknown)} unknown outcomes counted with another "
                        f"option: {wrong_option_unknown[:EXAMPLES_MAX]}")
    if twice_acknowledged:
        problems.append(f"{len(twice_acknowledged)} voters acknowledged twice (201, 201): "
                        f"{twice_acknowledged[:EXAMPLES_MAX]}")
    if total != len(counted):
        problems.append(f"results total {total} != {len(counted)} voters counted in the log")
    results_counts = {option: count for option, count in results.get("counts", {}).items()
                      if count}
    if results_counts != dict(recount_counts):
        problems.append(f"results counts {results.get('counts')} != recount {dict(recount_counts)}")
    if unexpected:
        problems.append(f"{len(unexpected)} answers the contract does not allow: "
                        f"{unexpected[:EXAMPLES_MAX]}")
    if verify_exit_code is None:
        problems.append("votes replay verify was not run")
    elif verify_exit_code != 0:
        problems.append(f"votes replay verify exited {verify_exit_code}: {verify_output[-2000:]}")
    if faults.injected == 0:
        problems.append("no fault was injected")
    idle = faults.without_load()
    if idle:
        problems.append(f"{len(idle)} faults hit no request in flight: "
                        f"{[event.name for event in idle][:EXAMPLES_MAX]}")
    if not must:
        problems.append("no vote was acknowledged: the run proves nothing")

    return Verdict(
        schedule=schedule, faults=faults.injected, requests=len(ledger.requests),
        outcomes=ledger.outcome_counts(), voters_sent=len(history), voters_counted=len(counted),
        unknown_voters=len(unknown), unknown_counted=sum(voter in counted for voter in unknown),
        lost=len(lost), double_counted=double, wrongly_counted=len(wrongly), phantom=len(phantom),
        problems=problems,
    )


def summary_table(verdicts: list[Verdict]) -> str:
    """A plain-text table, one row per schedule run, plus a total row."""
    rows = [verdict.row() for verdict in verdicts]
    if not rows:
        return "(no chaos runs)"
    columns = list(rows[0])
    total: dict[str, object] = {"schedule": "TOTAL"}
    for column in columns[1:]:
        values = [row[column] for row in rows]
        if all(isinstance(value, int) for value in values):
            total[column] = sum(values)
        elif column == "verdict":
            total[column] = "ok" if all(value == "ok" for value in values) else "FAIL"
        else:
            total[column] = ""
    rows.append(total)
    widths = {column: max(len(column), *(len(str(row[column])) for row in rows))
              for column in columns}
    lines = [" | ".join(column.rjust(widths[column]) for column in columns),
             "-+-".join("-" * widths[column] for column in columns)]
    lines += [" | ".join(str(row[column]).rjust(widths[column]) for column in columns)
              for row in rows]
    return "\n".join(lines)
