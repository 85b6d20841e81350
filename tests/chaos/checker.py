"""The chaos checker: what the client was told against what the engine recovered.

Inputs, all taken after the faults healed and the engine restarted (so the state is the
recovered one, not memory):
- the load client's ledger (tests/chaos/load.py), receipts included;
- the poll's results from the restarted engine (`GET /v1/polls/{poll}/results`);
- the independent recount of the raw WAL by the replay tool (replay/recount.py): which voter
  is counted with which option;
- the exit code of `votes replay verify` (recount vs snapshots vs live results, and every
  batch signature);
- the deployment's receipt keys (`ReceiptKeys`: keys/receipt-public.json of the data dir, and
  its voter hash secret), to verify every receipt offline.

Per voter, from the answers it got:
- must be counted, with the option it sent: any ACKNOWLEDGED or DUPLICATE answer;
- must not be counted: every answer REJECTED or FAILED;
- may go either way: otherwise (some UNKNOWN, no acknowledgement), but at most once.
Receipts: every 201's receipt verifies under the deployment's public key, agrees with the
body's plain fields, and names the poll and option the voter sent, the voter's shard, that
shard's fencing group (shard mod groups: a batch record, and so a receipt's batch node, names
its group since log format 3) and (with the secret) the voter's keyed hash; every 409's receipt equals the voter's 201 receipt
when that 201 was seen (and verifies as above when it was not); a 409 is only possible after
an answer that may have stored the vote (201, 409 or unknown), never as a voter's first
answer nor after only refusals.

Every violation is a problem tagged with one of DEFECTS (`Verdict.defects`), so a test can
tell which defect a run was failed for. `check` is a pure function of its inputs: the unit
test (tests/unit/test_chaos_checker.py) feeds it hand-made ledgers with each defect.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import VotesError
from engine.keys import RECEIPT_PUBLIC_FILE, keys_dir, load_keys, load_public_key_document
from engine.receipts import decode_receipt, verify_receipt, voter_hash
from shards.layout import CLUSTER_FILE, check_format
from tests.chaos.faults import FaultLog
from tests.chaos.load import (
    ACKNOWLEDGED,
    DUPLICATE,
    FAILED,
    REJECTED,
    UNEXPECTED,
    UNKNOWN,
    Ledger,
    Request,
)

EXAMPLES_MAX = 5

LOST = "lost"
WRONG_OPTION = "wrong option"
DOUBLE_COUNTED = "double counted"
WRONGLY_COUNTED = "counted though refused"
PHANTOM = "phantom voter"
UNEXPECTED_ANSWER = "unexpected answer"
RECEIPT_INVALID = "receipt does not verify"
RECEIPT_MISMATCH = "receipt names another vote"
DUPLICATE_RECEIPT_DIFFERS = "409 receipt differs from the 201's"
DUPLICATE_WITHOUT_VOTE = "409 without an earlier vote"
RESULTS_DIFFER = "results differ from the recount"
VERIFY_FAILED = "replay verify failed"
NO_FAULT = "no fault injected"
IDLE_FAULT = "fault without load"
NOTHING_ACKNOWLEDGED = "nothing acknowledged"
SCHEDULE_EXPECTATION = "schedule expectation"
DEFECTS = (LOST, WRONG_OPTION, DOUBLE_COUNTED, WRONGLY_COUNTED, PHANTOM, UNEXPECTED_ANSWER,
           RECEIPT_INVALID, RECEIPT_MISMATCH, DUPLICATE_RECEIPT_DIFFERS, DUPLICATE_WITHOUT_VOTE,
           RESULTS_DIFFER, VERIFY_FAILED, NO_FAULT, IDLE_FAULT, NOTHING_ACKNOWLEDGED,
           SCHEDULE_EXPECTATION)
# The plain fields of a VoteReceipt body (engine/openapi.yaml) and how the signed receipt
# spells each.
_BODY_FIELDS = ("poll", "shard", "group", "offset", "index", "batch_seq", "time_ms")


@dataclass(frozen=True)
class ReceiptKeys:
    """What verifying receipts offline takes: the public keys (key id -> raw Ed25519 key),
    the voter hash secret (None: the voter hash is not checked), the shard count and the
    fencing group count (a voter of shard s is in the batch of group s mod groups)."""

    public_keys: dict[str, bytes]
    voter_hash_secret: bytes | None
    shards_total: int
    groups_total: int

    @classmethod
    def from_data_dir(cls, data_dir: Path, shards_total: int,
                      groups_total: int | None = None) -> ReceiptKeys:
        """The keys of the data dir; `groups_total` None: the group count its cluster.json
        records (written by `votes serve`, shards/layout.py), which must be of
        `shards_total` shards."""
        public_keys = load_public_key_document(keys_dir(data_dir) / RECEIPT_PUBLIC_FILE)
        try:
            secret = load_keys(data_dir).voter_hash_secret
        except VotesError:
            secret = None
        if groups_total is None:
            groups_total = _recorded_groups(data_dir, shards_total)
        return cls(public_keys, secret, shards_total, groups_total)


def _recorded_groups(data_dir: Path, shards_total: int) -> int:
    """The fencing group count of the data dir's cluster.json."""
    path = data_dir / CLUSTER_FILE
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VotesError(f"cannot read the layout {path} (its group count checks receipts): "
                         f"{exc}") from None
    if not isinstance(recorded, dict):
        raise VotesError(f"{path} holds {recorded!r}, not a layout")
    check_format(data_dir, recorded)  # receipts of another format bind other fields
    groups = recorded.get("groups")
    if not isinstance(groups, int) or groups < 1 or recorded.get("shards") != shards_total \
            or shards_total % groups:
        raise VotesError(f"{path} records {recorded!r}, not a layout of {shards_total} shards")
    return groups


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
    receipts_checked: int = 0
    problems: list[str] = field(default_factory=list)
    defects: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, defect: str, text: str) -> None:
        if defect not in DEFECTS:
            raise ValueError(f"unknown defect {defect!r}")
        self.defects[defect] += 1
        self.problems.append(f"{defect}: {text}")

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
            "unexpected": self.outcomes[UNEXPECTED],
            "unknown counted": f"{self.unknown_counted}/{self.unknown_voters}",
            "receipts checked": self.receipts_checked,
            "lost": self.lost,
            "double counted": self.double_counted,
            "wrongly counted": self.wrongly_counted,
            "verdict": "ok" if self.ok else "FAIL",
        }


@dataclass
class _Voters:
    """The ledger judged voter by voter (see the module docstring)."""

    history: dict[int, list[Request]]
    must: dict[int, str] = field(default_factory=dict)
    must_not: set[int] = field(default_factory=set)
    unknown: set[int] = field(default_factory=set)
    twice_acknowledged: list[int] = field(default_factory=list)


def _judge_voters(ledger: Ledger) -> _Voters:
    voters = _Voters(ledger.by_voter())
    for voter, requests in voters.history.items():
        outcomes = [request.outcome for request in requests]
        if outcomes.count(ACKNOWLEDGED) > 1:
            voters.twice_acknowledged.append(voter)
        if ACKNOWLEDGED in outcomes or DUPLICATE in outcomes:
            voters.must[voter] = requests[0].option
        elif all(outcome in (REJECTED, FAILED) for outcome in outcomes):
            voters.must_not.add(voter)
        else:
            voters.unknown.add(voter)
    return voters


def _examples(items) -> list:
    return list(items)[:EXAMPLES_MAX]


def _check_counts(verdict: Verdict, voters: _Voters, results: dict,
                  counted: dict[int, str]) -> None:
    history = voters.history
    lost = sorted(voter for voter in voters.must if voter not in counted)
    wrong_option = sorted(voter for voter in counted if voter in history
                          and voter not in voters.must_not
                          and counted[voter] != history[voter][0].option)
    wrongly = sorted(voter for voter in voters.must_not if voter in counted)
    phantom = sorted(voter for voter in counted if voter not in history)
    total = int(results.get("total", -1))
    verdict.lost, verdict.wrongly_counted, verdict.phantom = len(lost), len(wrongly), len(phantom)
    verdict.double_counted = max(0, total - len(counted)) + len(voters.twice_acknowledged)
    if lost:
        verdict.add(LOST, f"{len(lost)} acknowledged voters are not counted: {_examples(lost)}")
    if wrong_option:
        examples = [(voter, history[voter][0].option, counted[voter])
                    for voter in _examples(wrong_option)]
        verdict.add(WRONG_OPTION, f"{len(wrong_option)} voters counted with another option than "
                                  f"they sent (voter, sent, counted): {examples}")
    if wrongly:
        verdict.add(WRONGLY_COUNTED, f"{len(wrongly)} voters counted though every answer was "
                                     f"rejected/failed: {_examples(wrongly)}")
    if phantom:
        verdict.add(PHANTOM, f"{len(phantom)} voters counted that never voted: "
                             f"{_examples(phantom)}")
    if voters.twice_acknowledged:
        verdict.add(DOUBLE_COUNTED, f"{len(voters.twice_acknowledged)} voters acknowledged twice "
                                    f"(201, 201): {_examples(voters.twice_acknowledged)}")
    if total > len(counted):
        verdict.add(DOUBLE_COUNTED, f"results total {total} exceeds the {len(counted)} distinct "
                                    "voters counted in the log")
    elif total != len(counted):
        verdict.add(RESULTS_DIFFER, f"results total {total} != {len(counted)} voters counted "
                                    "in the log")
    results_counts = {option: count for option, count in results.get("counts", {}).items()
                      if count}
    recount_counts = dict(Counter(counted.values()))
    if results_counts != recount_counts:
        verdict.add(RESULTS_DIFFER, f"results counts {results.get('counts')} != recount "
                                    f"{recount_counts}")


def receipt_problem(body: object, request: Request, poll: str,
                    keys: ReceiptKeys) -> tuple[str, str] | None:
    """(defect, why) when a receipt body does not prove this request's vote, else None."""
    if not isinstance(body, dict) or not isinstance(body.get("receipt"), str):
        return RECEIPT_INVALID, f"no compact receipt in {str(body)[:200]}"
    try:
        receipt = decode_receipt(body["receipt"])
    except VotesError as exc:
        return RECEIPT_INVALID, f"the compact receipt does not decode: {exc.detail}"
    public_key = keys.public_keys.get(receipt.key_id)
    if public_key is None or not verify_receipt(receipt, public_key):
        return RECEIPT_INVALID, (f"the receipt does not verify under the deployment's key "
                                 f"{receipt.key_id!r}")
    plain = {name: body.get(name) for name in _BODY_FIELDS}
    signed = {name: getattr(receipt, name) for name in _BODY_FIELDS}
    if plain != signed or body.get("voter_hash") != receipt.voter_hash.hex():
        return RECEIPT_INVALID, f"the body's fields {plain} disagree with its signed receipt"
    wanted_shard = request.voter % keys.shards_total
    wanted_group = wanted_shard % keys.groups_total
    if (receipt.poll, receipt.option, receipt.shard, receipt.group) != \
            (poll, request.option, wanted_shard, wanted_group):
        return RECEIPT_MISMATCH, (f"the receipt names poll {receipt.poll!r} option "
                                  f"{receipt.option!r} shard {receipt.shard} group "
                                  f"{receipt.group}; sent poll {poll!r} option "
                                  f"{request.option!r} (shard {wanted_shard}, group "
                                  f"{wanted_group})")
    if keys.voter_hash_secret is not None and \
            receipt.voter_hash != voter_hash(keys.voter_hash_secret, poll, request.voter):
        return RECEIPT_MISMATCH, "the receipt's voter hash is not this voter's"
    return None


def _check_receipts(verdict: Verdict, voters: _Voters, poll: str,
                    keys: ReceiptKeys | None) -> None:
    """Every 201's receipt, and every 409's against its voter's 201 (see the docstring)."""
    if keys is None:
        verdict.add(RECEIPT_INVALID, "receipts were not verified: no receipt keys given")
        return
    found: dict[str, list[str]] = {}
    for voter, requests in voters.history.items():
        first_receipt = next((request.receipt for request in requests
                              if request.outcome == ACKNOWLEDGED), None)
        for request in requests:
            if request.outcome not in (ACKNOWLEDGED, DUPLICATE):
                continue
            if request.outcome == DUPLICATE and not _may_have_voted_before(request, requests):
                found.setdefault(DUPLICATE_WITHOUT_VOTE, []).append(
                    f"voter {voter}: 409 with no earlier 201, 409 or unknown outcome")
            if request.outcome == DUPLICATE and first_receipt is not None:
                if request.receipt != first_receipt:
                    found.setdefault(DUPLICATE_RECEIPT_DIFFERS, []).append(
                        f"voter {voter}: 409 receipt {str(request.receipt)[:160]} != 201 "
                        f"receipt {str(first_receipt)[:160]}")
                continue  # equal to a receipt checked below
            verdict.receipts_checked += 1
            problem = receipt_problem(request.receipt, request, poll, keys)
            if problem is not None:
                found.setdefault(problem[0], []).append(
                    f"voter {voter} ({request.outcome}): {problem[1]}")
        duplicates = {str(request.receipt) for request in requests
                      if request.outcome == DUPLICATE}
        if first_receipt is None and len(duplicates) > 1:
            found.setdefault(DUPLICATE_RECEIPT_DIFFERS, []).append(
                f"voter {voter}: its 409s carry {len(duplicates)} different receipts")
    for defect, lines in found.items():
        verdict.add(defect, f"{len(lines)}: {_examples(lines)}")


def _may_have_voted_before(duplicate: Request, requests: list[Request]) -> bool:
    """Some earlier answer of this voter (ended before the 409 was sent) may have stored a
    vote: a 201, a 409 or an unknown outcome (UNKNOWN, or UNEXPECTED: a defect already)."""
    return any(request is not duplicate and request.ended_s <= duplicate.started_s
               and request.outcome in (ACKNOWLEDGED, DUPLICATE, UNKNOWN, UNEXPECTED)
               for request in requests)


def _check_run(verdict: Verdict, ledger: Ledger, faults: FaultLog, voters: _Voters,
               verify_exit_code: int | None, verify_output: str) -> None:
    unexpected = [f"voter {request.voter}: {request.detail}" for request in ledger.requests
                  if request.outcome == UNEXPECTED]
    if unexpected:
        verdict.add(UNEXPECTED_ANSWER, f"{len(unexpected)} answers no vote of this load may "
                                       f"get: {_examples(unexpected)}")
    if verify_exit_code is None:
        verdict.add(VERIFY_FAILED, "votes replay verify was not run")
    elif verify_exit_code != 0:
        verdict.add(VERIFY_FAILED, f"votes replay verify exited {verify_exit_code}: "
                                   f"{verify_output[-2000:]}")
    if faults.injected == 0:
        verdict.add(NO_FAULT, "no fault was injected")
    idle = faults.without_load()
    if idle:
        verdict.add(IDLE_FAULT, f"{len(idle)} faults hit no request in flight: "
                                f"{_examples(event.name for event in idle)}")
    if not voters.must:
        verdict.add(NOTHING_ACKNOWLEDGED, "no vote was acknowledged: the run proves nothing")


def check(schedule: str, ledger: Ledger, faults: FaultLog, results: dict,
          counted: dict[int, str], verify_exit_code: int | None,
          verify_output: str = "", *, poll: str, keys: ReceiptKeys | None) -> Verdict:
    """`results`: the restarted engine's results body; `counted`: voter id -> option from the
    replay recount of the poll; `verify_exit_code`: of `votes replay verify` (None: not run,
    which is a problem); `poll`: the poll voted in; `keys`: to verify receipts (None: not
    verified, which is a problem)."""
    voters = _judge_voters(ledger)
    verdict = Verdict(
        schedule=schedule, faults=faults.injected, requests=len(ledger.requests),
        outcomes=ledger.outcome_counts(), voters_sent=len(voters.history),
        voters_counted=len(counted), unknown_voters=len(voters.unknown),
        unknown_counted=sum(voter in counted for voter in voters.unknown),
        lost=0, double_counted=0, wrongly_counted=0, phantom=0)
    _check_counts(verdict, voters, results, counted)
    _check_receipts(verdict, voters, poll, keys)
    _check_run(verdict, ledger, faults, voters, verify_exit_code, verify_output)
    return verdict


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
