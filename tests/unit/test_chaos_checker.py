"""A checked chaos checker: tests/chaos/checker.py must fail a run on each defect it claims to
catch, name that defect, and pass a clean run.

The inputs are made by hand, no engine: a ledger of answers (with receipts signed as the
engine signs them, engine/signing.sign_commit, under keys made for the test), the recovered
state (the replay recount's voter -> option, the restarted engine's results), the verify exit
code and a fault log. The clean run holds every kind of answer a chaos run sees (201, a repeat's
409, refusals, unknown outcomes counted and not, a 409 after an unknown outcome, a retry that
got a 201). Each defect case changes one thing of it; `DEFECT_TABLE` is printed (pytest -s)
and must say "yes" on every row. The load client's classification is checked through its own
code path: answers from a transport made here go through ValidatingAsyncClient and
LoadClient._send, so a 4xx other than 409 `already-voted` and a response that breaks
engine/openapi.yaml both end as UNEXPECTED without stopping the load.
"""

from __future__ import annotations

import array
import asyncio
import copy
import itertools
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import msgspec
import pytest

from engine.keys import ensure_keys, load_keys
from engine.receipts import decode_receipt, encode_receipt
from engine.signing import VoteRun, VoterHasher, receipt_document, sign_commit
from shards.layout import CLUSTER_FILE, LAYOUT_FORMAT
from tests.chaos import checker
from tests.chaos.checker import ReceiptKeys, Verdict, check
from tests.chaos.faults import FaultEvent, FaultLog
from tests.chaos.load import (
    ACKNOWLEDGED,
    DUPLICATE,
    FAILED,
    UNEXPECTED,
    UNKNOWN,
    Ledger,
    LoadClient,
    Request,
    record_answer,
)
from tests.support.http_client import ValidatingAsyncClient

POLL = "chaos"
OPTIONS = ["red", "green", "blue"]
SHARDS = 4
GROUPS = 2
TIME_MS = 1_700_000_000_000
OFFSET = 4096
BASE_URL = "http://engine.invalid"


def option_of(voter: int) -> str:
    return OPTIONS[voter % len(OPTIONS)]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> tuple[ReceiptKeys, Callable[..., dict]]:
    """Receipt keys of a made-up deployment (SHARDS shards in GROUPS fencing groups, its
    cluster.json as `votes serve` writes it) and `sign(votes)`: voter -> 201 body for each
    (voter, option), signed in one commit cycle as the engine signs it: one batch per
    fencing group, holding a run per shard of the group (shard s in group s mod GROUPS;
    `group_of` overrides that, to make genuine receipts that name the wrong group)."""
    data_dir = tmp_path_factory.mktemp("deployment")
    ensure_keys(data_dir)
    (data_dir / CLUSTER_FILE).write_text(json.dumps(
        {"format": LAYOUT_FORMAT, "shards": SHARDS, "groups": GROUPS}) + "\n")
    keyring = load_keys(data_dir)
    hasher = VoterHasher(keyring.voter_hash_secret)

    def sign(votes: dict[int, str],
             group_of: Callable[[int], int] = lambda shard: shard % GROUPS) -> dict[int, dict]:
        by_group: dict[int, dict[int, list[int]]] = {}
        for voter in sorted(votes):
            shard = voter % SHARDS
            by_group.setdefault(group_of(shard), {}).setdefault(shard, []).append(voter)
        batches = [(group, 1, [VoteRun(shard, POLL, OPTIONS, array.array("Q", voters).tobytes(),
                                       array.array("H", [OPTIONS.index(votes[voter])
                                                         for voter in voters]).tobytes())
                               for shard, voters in shards.items()])
                   for group, shards in sorted(by_group.items())]
        signed = sign_commit(keyring, hasher, TIME_MS, batches)
        bodies = {}
        for batch, (_, _, runs) in zip(signed, batches, strict=True):
            # Leaves are the runs' votes in run order: a vote's index counts across runs.
            voters = [voter for run in runs for voter in array.array("Q", run.voters)]
            for index, voter in enumerate(voters):
                bodies[voter] = receipt_document(batch.receipt(index, OFFSET + batch.group))
        return bodies

    keys = ReceiptKeys.from_data_dir(data_dir, SHARDS)  # the group count from cluster.json
    assert keys.voter_hash_secret is not None and keys.groups_total == GROUPS
    return keys, sign


# The clean run -----------------------------------------------------------------------------


@dataclass
class Run:
    """One hand-made run: everything `check` takes."""

    ledger: Ledger
    counted: dict[int, str]
    results: dict | None  # None: the engine's results agree with `counted`
    verify_exit_code: int | None
    faults: FaultLog
    receipts: dict[int, dict]  # every voter's genuine 201 body

    def verdict(self, keys: ReceiptKeys | None) -> Verdict:
        results = self.results if self.results is not None else results_for(self.counted)
        return check("hand-made", self.ledger, self.faults, results, self.counted,
                     self.verify_exit_code, "verify output", poll=POLL, keys=keys)

    def requests_of(self, voter: int) -> list[Request]:
        return [request for request in self.ledger.requests if request.voter == voter]


def results_for(counted: dict[int, str]) -> dict:
    counts = Counter(counted.values())
    return {"poll": POLL, "counts": {option: counts[option] for option in OPTIONS},
            "total": len(counted)}


class Clock:
    """Monotonic times for hand-made requests: each one ends before the next starts."""

    def __init__(self) -> None:
        self._ticks = itertools.count(1)

    def request(self, voter: int, outcome: str, receipt: dict | None = None,
                detail: str = "") -> Request:
        started = float(next(self._ticks))
        return Request(voter, option_of(voter), BASE_URL, started, ended_s=started + 0.5,
                       outcome=outcome, receipt=receipt, detail=detail or outcome)


def clean_run(sign) -> Run:
    """Voters 1-6 acknowledged (2 repeated: 409 with its receipt), 7 refused, 8 unknown and
    counted, 9 unknown and not counted, 10 refused then unknown then 409 (no 201 seen), 11
    refused then acknowledged."""
    counted_voters = [1, 2, 3, 4, 5, 6, 8, 10, 11]
    receipts = sign({voter: option_of(voter) for voter in counted_voters})
    clock = Clock()
    requests = [clock.request(voter, ACKNOWLEDGED, receipts[voter]) for voter in range(1, 7)]
    requests += [
        clock.request(2, DUPLICATE, copy.deepcopy(receipts[2])),
        clock.request(7, FAILED), clock.request(7, FAILED),
        clock.request(8, UNKNOWN),
        clock.request(9, UNKNOWN),
        clock.request(10, FAILED), clock.request(10, UNKNOWN),
        clock.request(10, DUPLICATE, copy.deepcopy(receipts[10])),
        clock.request(11, FAILED), clock.request(11, ACKNOWLEDGED, receipts[11]),
    ]
    faults = FaultLog(load=None, events=[FaultEvent("kill-worker", "pid 1", 3.0, in_flight=4,
                                                    requests_before=3)])
    return Run(Ledger(requests), {voter: option_of(voter) for voter in counted_voters}, None, 0,
               faults, receipts)


def test_a_clean_run_passes(deployment):
    keys, sign = deployment
    verdict = clean_run(sign).verdict(keys)
    assert verdict.ok, verdict.problems
    assert verdict.receipts_checked == 8  # 7 201s and the 409 of voter 10 (no 201 seen)
    assert verdict.unknown_voters == 2 and verdict.unknown_counted == 1


# Defects -------------------------------------------------------------------------------------


def other_option(voter: int) -> str:
    return OPTIONS[(OPTIONS.index(option_of(voter)) + 1) % len(OPTIONS)]


def with_signature_flipped(body: dict) -> dict:
    receipt = decode_receipt(body["receipt"])
    signature = bytearray(receipt.signature)
    signature[5] ^= 0x01
    return {**body, "receipt": encode_receipt(msgspec.structs.replace(
        receipt, signature=bytes(signature)))}


def lost_201(run: Run, sign) -> None:
    del run.counted[3]


def double_count_two_201s(run: Run, sign) -> None:
    run.ledger.requests.append(Clock().request(4, ACKNOWLEDGED, run.receipts[4]))


def double_count_in_the_results(run: Run, sign) -> None:
    run.results = results_for(run.counted)
    run.results["counts"]["red"] += 1
    run.results["total"] += 1


def phantom_voter(run: Run, sign) -> None:
    run.counted[999] = "red"


def wrong_option(run: Run, sign) -> None:
    run.counted[5] = other_option(5)


def counted_after_only_refusals(run: Run, sign) -> None:
    run.counted[7] = option_of(7)


def unexpected_answer(status: int, problem: str) -> Callable[[Run, object], None]:
    def add(run: Run, sign) -> None:
        request = Clock().request(12, UNKNOWN)
        record_answer(request, status, {"type": problem, "title": "t", "status": status,
                                        "detail": "d"})
        run.ledger.requests.append(request)
        run.faults.events[0].at_s = request.started_s  # while the fault acts
    return add


def duplicate_receipt_differs(run: Run, sign) -> None:
    run.requests_of(2)[1].receipt = copy.deepcopy(run.receipts[1])


def receipt_does_not_verify(run: Run, sign) -> None:
    run.requests_of(3)[0].receipt = with_signature_flipped(run.receipts[3])


def receipt_fields_disagree(run: Run, sign) -> None:
    run.requests_of(3)[0].receipt = {**run.receipts[3], "offset": run.receipts[3]["offset"] + 1}


def receipt_for_another_option(run: Run, sign) -> None:
    """A genuine, verifying receipt, but of another option than the voter sent."""
    run.requests_of(6)[0].receipt = sign({6: other_option(6)})[6]


def receipt_group_disagrees(run: Run, sign) -> None:
    run.requests_of(4)[0].receipt = {**run.receipts[4], "group": run.receipts[4]["group"] + 1}


def receipt_of_another_group(run: Run, sign) -> None:
    """A genuine, verifying receipt whose batch is of another group than the voter's shard
    is in (shard mod groups)."""
    run.requests_of(6)[0].receipt = sign({6: option_of(6)},
                                         group_of=lambda shard: (shard + 1) % GROUPS)[6]


def receipt_of_another_voter(run: Run, sign) -> None:
    run.requests_of(5)[0].receipt = copy.deepcopy(run.receipts[1])


def duplicate_as_first_answer(run: Run, sign) -> None:
    first = Clock().request(13, DUPLICATE, sign({13: option_of(13)})[13])
    run.ledger.requests.insert(0, first)
    run.counted[13] = option_of(13)


def duplicate_after_only_refusals(run: Run, sign) -> None:
    clock = Clock()
    run.ledger.requests += [clock.request(14, FAILED),
                            clock.request(14, DUPLICATE, sign({14: option_of(14)})[14])]
    run.counted[14] = option_of(14)


def verify_failed(run: Run, sign) -> None:
    run.verify_exit_code = 1


def fault_without_load(run: Run, sign) -> None:
    run.faults.events[0].in_flight = 0


# (case, the defect the checker must name)
DEFECT_CASES: list[tuple[str, Callable[[Run, object], None], str]] = [
    ("a lost 201", lost_201, checker.LOST),
    ("a double count: two 201s for one voter", double_count_two_201s, checker.DOUBLE_COUNTED),
    ("a double count: results total above the voters counted", double_count_in_the_results,
     checker.DOUBLE_COUNTED),
    ("a phantom voter", phantom_voter, checker.PHANTOM),
    ("a wrong option", wrong_option, checker.WRONG_OPTION),
    ("a vote counted after only rejections and failures", counted_after_only_refusals,
     checker.WRONGLY_COUNTED),
    ("an unexpected 404 poll-not-found during a fault",
     unexpected_answer(404, "/problems/poll-not-found"), checker.UNEXPECTED_ANSWER),
    ("an unexpected 401 token-invalid during a fault",
     unexpected_answer(401, "/problems/token-invalid"), checker.UNEXPECTED_ANSWER),
    ("an unexpected 422 unknown-option during a fault",
     unexpected_answer(422, "/problems/unknown-option"), checker.UNEXPECTED_ANSWER),
    ("an unexpected 400 bad-request during a fault",
     unexpected_answer(400, "/problems/bad-request"), checker.UNEXPECTED_ANSWER),
    ("a 409 poll-exists (a 409 that is not already-voted)",
     unexpected_answer(409, "/problems/poll-exists"), checker.UNEXPECTED_ANSWER),
    ("an unexpected 500 during a fault", unexpected_answer(500, "/problems/internal"),
     checker.UNEXPECTED_ANSWER),
    ("a 409 whose receipt differs from the 201's", duplicate_receipt_differs,
     checker.DUPLICATE_RECEIPT_DIFFERS),
    ("a 201 whose receipt does not verify (one signature byte flipped)",
     receipt_does_not_verify, checker.RECEIPT_INVALID),
    ("a 201 whose plain fields disagree with its signed receipt", receipt_fields_disagree,
     checker.RECEIPT_INVALID),
    ("a 201 whose plain group disagrees with its signed receipt", receipt_group_disagrees,
     checker.RECEIPT_INVALID),
    ("a 201 whose genuine receipt names another option", receipt_for_another_option,
     checker.RECEIPT_MISMATCH),
    ("a 201 whose genuine receipt names another fencing group", receipt_of_another_group,
     checker.RECEIPT_MISMATCH),
    ("a 201 carrying another voter's genuine receipt", receipt_of_another_voter,
     checker.RECEIPT_MISMATCH),
    ("a 409 as a voter's first answer", duplicate_as_first_answer,
     checker.DUPLICATE_WITHOUT_VOTE),
    ("a 409 after only refusals", duplicate_after_only_refusals, checker.DUPLICATE_WITHOUT_VOTE),
    ("votes replay verify exited 1", verify_failed, checker.VERIFY_FAILED),
    ("a fault that hit no request in flight", fault_without_load, checker.IDLE_FAULT),
]


def defect_table(keys: ReceiptKeys, sign) -> tuple[str, list[tuple[str, str, bool, list]]]:
    rows = []
    for case, make, defect in DEFECT_CASES:
        run = clean_run(sign)
        make(run, sign)
        verdict = run.verdict(keys)
        caught = not verdict.ok and verdict.defects[defect] > 0
        rows.append((case, defect, caught, verdict.problems))
    width = max(len(case) for case, _, _, _ in rows)
    defect_width = max(len(defect) for _, defect, _, _ in rows)
    lines = [f"{'defect':<{width}} | {'named as':<{defect_width}} | caught",
             f"{'-' * width}-+-{'-' * defect_width}-+-------"]
    lines += [f"{case:<{width}} | {defect:<{defect_width}} | {'yes' if caught else 'NO'}"
              for case, defect, caught, _ in rows]
    return "\n".join(lines), rows


def test_the_checker_fails_each_defect_and_names_it(deployment):
    keys, sign = deployment
    table, rows = defect_table(keys, sign)
    print("\n" + table)
    missed = [(case, defect, problems) for case, defect, caught, problems in rows if not caught]
    assert not missed, f"defects not caught:\n{table}\n{missed}"


def test_receipts_not_verified_fail_the_run(deployment):
    _, sign = deployment
    verdict = clean_run(sign).verdict(None)
    assert not verdict.ok and verdict.defects[checker.RECEIPT_INVALID] == 1, verdict.problems


# The load client's classification, through its own code path ---------------------------------


def answers(request: httpx.Request) -> httpx.Response:
    """What a broken engine might answer, by voter token."""
    token = request.headers["Authorization"].removeprefix("Bearer ")
    problem = {"title": "t", "detail": "d"}
    if token == "not-found":
        return httpx.Response(404, json={"type": "/problems/poll-not-found", "status": 404,
                                         **problem},
                              headers={"Content-Type": "application/problem+json"})
    if token == "broken-201":
        return httpx.Response(201, json={"receipt": "not a receipt"})
    if token == "refused":
        return httpx.Response(503, json={"type": "/problems/wal-unavailable", "status": 503,
                                         **problem},
                              headers={"Content-Type": "application/problem+json"})
    raise AssertionError(f"unexpected token {token}")


def test_the_load_client_marks_wrong_4xx_and_contract_violations_unexpected():
    tokens = {1: "not-found", 2: "broken-201", 3: "refused"}
    load = LoadClient([BASE_URL], POLL, OPTIONS, tokens, concurrency=1, rng=random.Random(1))

    async def send_all() -> None:
        load._client = ValidatingAsyncClient(transport=httpx.MockTransport(answers))
        try:
            for voter in tokens:
                await load._send(voter)
        finally:
            await load._client.aclose()

    asyncio.run(send_all())
    outcomes = {request.voter: request for request in load.ledger.requests}
    assert outcomes[1].outcome == UNEXPECTED and "poll-not-found" in outcomes[1].detail
    assert outcomes[2].outcome == UNEXPECTED and "contract violation" in outcomes[2].detail
    assert outcomes[3].outcome == FAILED and outcomes[3].receipt is None
