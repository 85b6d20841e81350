"""Acknowledged votes survive power cuts; and with fsync switched off, this test says so.

The engine (`votes serve --workers 2`) keeps its data dir on the power-loss filesystem
(tests/support/powerloss), which keeps every write not yet fsynced in memory only. Senders
cast votes (each voter once) while power is cut three times: the filesystem's cut, which
drops every unsynced write, tears the last one and leaves the power off, then SIGKILL of
every engine process, then power on.
After each cut, before the restart, the shards' logs as they are on the disk are recounted
with `replay` (replay/recount.py): every vote that got a 201 before the cut must be counted,
with its receipt's option. After the last restart, over the validating client: every
acknowledged vote re-sent answers 409 with its original receipt, the results total equals
acknowledged + unknown-but-held (nobody counted twice), voters told "not counted" are not,
and, with the engine stopped, the recount and `votes replay verify` agree with the results.

`check_power_loss` collects what went wrong instead of failing at once, so the second test
can show that the check catches a missing fsync: with the failpoint `segment-log-skip-fsync`
(engine/failpoints.py) the same run must report lost acknowledged votes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from engine.receipts import decode_receipt
from tests.support.cli import run_cli
from tests.support.disk_count import counted_on_disk
from tests.support.engine_process import EngineProcess
from tests.support.http_client import ValidatingAsyncClient, client_for
from tests.support.powerloss import PowerLossFilesystem, mounted
from tests.support.vote_client import (
    ACKED,
    ALREADY_VOTED,
    NOT_COUNTED,
    UNEXPECTED,
    UNKNOWN,
    Answer,
    RequestProgress,
    bearer,
    by_kind,
    open_poll,
    post_vote,
    problem_type,
    seeded_rng,
)

POLL = "power"
OPTIONS = ["red", "green", "blue"]
WORKERS = 2
SENDERS = 16
CUTS = 3
VOTERS = 3_000
FIRST_VOTER = 1
ACKS_BEFORE_CUT = 100
# Every fsync of the disk takes this long, so a cut finds appends written and not yet durable.
FSYNC_DELAY_S = 0.03
CUT_DELAY_S = (0.05, 0.4)
ACKS_WAIT_S = 20.0
REQUEST_TIMEOUT_S = 10.0
BACKOFF_S = 0.05
REFUSED_BACKOFF_S = 0.2
RUN_S_MAX = 120.0
NOT_COUNTED_PROBLEMS = ("/problems/wal-unavailable", "/problems/not-ready")
LOST = "lost acknowledged votes"


def lost_acknowledged(answers: dict[int, Answer], counted: dict[int, str]) -> dict[int, str]:
    """Acknowledged voters not counted with their receipt's option: voter -> what happened."""
    lost = {}
    for voter, answer in by_kind(answers)[ACKED].items():
        option = decode_receipt(answer.receipt).option
        if counted.get(voter) != option:
            lost[voter] = f"receipt says {option!r}, disk counts {counted.get(voter)!r}"
    return lost


@dataclass
class PowerLossRun:
    engine: EngineProcess
    disk: PowerLossFilesystem
    tokens: list[str]
    rng: random.Random
    answers: dict[int, Answer] = field(default_factory=dict)
    in_flight: dict[int, RequestProgress] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    cuts: list[dict] = field(default_factory=list)
    acked_total: int = 0
    next_index: int = 0
    stopping: bool = False

    async def sender(self, client: httpx.AsyncClient) -> None:
        while not self.stopping and self.next_index < len(self.tokens):
            voter = FIRST_VOTER + self.next_index
            self.next_index += 1
            option = self.rng.choice(OPTIONS)
            answer = await post_vote(client, f"/v1/polls/{POLL}/votes",
                                     self.tokens[voter - FIRST_VOTER], option, voter=voter,
                                     in_flight=self.in_flight,
                                     not_counted_problems=NOT_COUNTED_PROBLEMS)
            self.answers[voter] = answer
            if answer.kind == ACKED:
                self.acked_total += 1
            else:
                await asyncio.sleep(REFUSED_BACKOFF_S if answer.detail.startswith("refused")
                                    else BACKOFF_S)

    async def wait_for_acks(self, count: int) -> bool:
        target = self.acked_total + count
        deadline = time.monotonic() + ACKS_WAIT_S
        while self.acked_total < target:
            if time.monotonic() > deadline or self.next_index >= len(self.tokens):
                self.problems.append(
                    f"only {self.acked_total} of {target} acks within {ACKS_WAIT_S} s; answers: "
                    f"{Counter(a.detail for a in self.answers.values())}")
                return False
            await asyncio.sleep(0.01)
        return True

    async def cut_power(self) -> bool:
        """Cut the power and kill every engine process at once (the power stays off until
        they are all dead: a killed process still finishes its fsync in flight, which must
        not land), recount the disk; False once something is wrong."""
        self.cuts.append(self.disk.cut(tear=True, seed=self.rng.randrange(2**32),
                                       power_off=True))
        self.engine.kill()
        self.disk.power_on()
        on_disk = await counted_on_disk(self.disk.backing / "data", POLL)
        lost = lost_acknowledged(self.answers, on_disk)
        if lost:
            self.problems.append(f"{LOST} after cut {len(self.cuts)}: {len(lost)} of "
                                 f"{self.acked_total}, e.g. {list(lost.items())[:3]}")
            return False
        self.engine.start()
        try:
            await self.engine.wait_ready_async()
        except pytest.fail.Exception as failure:
            self.problems.append(f"engine did not recover after cut {len(self.cuts)}: {failure}")
            return False
        return True

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=SENDERS, max_keepalive_connections=SENDERS)
        async with ValidatingAsyncClient(base_url=self.engine.base_url, limits=limits,
                                         timeout=REQUEST_TIMEOUT_S) as client:
            senders = [asyncio.create_task(self.sender(client)) for _ in range(SENDERS)]
            try:
                for _ in range(CUTS):
                    if not await self.wait_for_acks(ACKS_BEFORE_CUT):
                        return
                    await asyncio.sleep(self.rng.uniform(*CUT_DELAY_S))
                    if not await self.cut_power():
                        return
                await self.wait_for_acks(ACKS_BEFORE_CUT)
            finally:
                self.stopping = True
                await asyncio.gather(*senders)


async def resend(base_url: str, tokens: list[str],
                 votes: dict[int, str]) -> dict[int, httpx.Response]:
    slots = asyncio.Semaphore(SENDERS)
    async with ValidatingAsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client:

        async def one(voter: int, option: str) -> tuple[int, httpx.Response]:
            async with slots:
                return voter, await client.post(f"/v1/polls/{POLL}/votes", json={"option": option},
                                                headers=bearer(tokens[voter - FIRST_VOTER]))

        return dict(await asyncio.gather(*(one(voter, option) for voter, option in votes.items())))


def check_after_restart(run: PowerLossRun) -> None:
    """The live engine and, once stopped, the replay tool agree with what voters were told."""
    engine, problems = run.engine, run.problems
    kinds = by_kind(run.answers)
    acked, unknown, not_counted = kinds[ACKED], kinds[UNKNOWN], kinds[NOT_COUNTED]
    if kinds[UNEXPECTED]:
        problems.append(f"unexpected answers: {list(kinds[UNEXPECTED].items())[:5]}")
    with client_for(engine.base_url, timeout_s=REQUEST_TIMEOUT_S) as client:
        before = client.get(f"/v1/polls/{POLL}/results").json()

    def again(answers: dict[int, Answer]) -> dict[int, httpx.Response]:
        return asyncio.run(resend(engine.base_url, run.tokens,
                                  {voter: answer.option for voter, answer in answers.items()}))

    acked_again = again(acked)
    lost = {voter for voter, response in acked_again.items() if response.status_code == 201}
    if lost:
        problems.append(f"{LOST}: {len(lost)} of {len(acked)} re-sent were counted anew")
    wrong = {voter for voter, response in acked_again.items() if response.status_code != 201 and (
        response.status_code != 409 or problem_type(response) != ALREADY_VOTED
        or response.json()["receipt"]["receipt"] != acked[voter].receipt)}
    if wrong:
        problems.append(f"{len(wrong)} acknowledged voters did not get their receipt back")
    unknown_again = again(unknown)
    held = {voter for voter, response in unknown_again.items() if response.status_code == 409}
    if before["total"] != len(acked) - len(lost) + len(held):
        problems.append(f"results total {before['total']} != acked {len(acked)} - lost "
                        f"{len(lost)} + unknown held {len(held)} (counted twice or lost)")
    counted_anyway = [voter for voter, response in again(not_counted).items()
                      if response.status_code != 201]
    if counted_anyway:
        problems.append(f"{len(counted_anyway)} voters told 'not counted' were counted")
    with client_for(engine.base_url, timeout_s=REQUEST_TIMEOUT_S) as client:
        after = client.get(f"/v1/polls/{POLL}/results").json()
    engine.stop()
    on_disk = asyncio.run(counted_on_disk(engine.data_dir, POLL))
    if dict(Counter(on_disk.values())) != {k: v for k, v in after["counts"].items() if v}:
        problems.append(f"recount {Counter(on_disk.values())} != results {after['counts']}")
    verified = run_cli("replay", "verify", "--data-dir", str(engine.data_dir), check=False)
    if verified.returncode != 0:
        problems.append(f"votes replay verify exited {verified.returncode}: "
                        f"{verified.stdout[-1500:]} {verified.stderr[-1500:]}")
    print(f"[power-loss] cuts={run.cuts} sent={len(run.answers)} acked={len(acked)} "
          f"unknown={len(unknown)} (held {len(held)}) not counted={len(not_counted)} "
          f"total={after['total']}")


def check_power_loss(tmp_path: Path, label: str,
                     env: dict[str, str] | None = None) -> tuple[list[str], list[dict]]:
    """Run the campaign (cuts and checks); return the problems found ([] when none) and
    what each cut dropped."""
    rng = seeded_rng(label)
    with mounted(tmp_path / "powerloss") as disk:
        engine = EngineProcess(disk.mount_point / "data", tmp_path / "server.log", env,
                               workers=WORKERS)
        try:
            engine.start()
            engine.wait_ready()
            tokens = open_poll(engine, POLL, OPTIONS, first_voter=FIRST_VOTER, voters=VOTERS,
                               timeout_s=REQUEST_TIMEOUT_S)
            # No sync here: the set-up (keys, cluster.json, the poll's record) must be durable
            # on its own, or the first cut leaves an engine that cannot start.
            disk.delay_fsync(FSYNC_DELAY_S)
            run = PowerLossRun(engine, disk, tokens, rng)
            started = time.monotonic()
            asyncio.run(asyncio.wait_for(run.run(), RUN_S_MAX))
            print(f"{label} campaign {time.monotonic() - started:.1f} s; disk {disk.stats()}")
            if not run.problems:
                check_after_restart(run)
            if "Traceback" in engine.log_text():
                run.problems.append(f"engine logged a traceback:\n{engine.log_tail()}")
            return run.problems, run.cuts
        finally:
            engine.kill()


def test_acknowledged_votes_survive_power_cuts(tmp_path: Path) -> None:
    problems, cuts = check_power_loss(tmp_path, "[power-loss]")
    assert problems == []
    assert len(cuts) == CUTS
    # The cuts met the engine mid-append: unsynced log bytes were dropped, and torn.
    assert sum(cut["dropped_bytes"] for cut in cuts) > 0, cuts


def test_the_power_loss_check_catches_a_missing_fsync(tmp_path: Path) -> None:
    problems, _ = check_power_loss(tmp_path, "[power-loss fsync off]",
                                {"VOTES_FAILPOINTS": "segment-log-skip-fsync=on"})
    print("[power-loss fsync off] problems reported:", problems)
    assert any(LOST in problem for problem in problems), problems
