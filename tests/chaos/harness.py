"""What every chaos schedule shares: the profile (short in CI, long for `make chaos`), running
load while a schedule injects faults, and the final check against the recovered state.

A schedule is an async function `schedule(run: ChaosRun)` that injects its faults through
`run.faults.fire(...)` while the load runs, and heals everything before it returns. Then
`ChaosRun.finish` stops the load, restarts the engine(s) from disk / the WAL (so the state
checked is the recovered one), reads the results, recounts the raw WAL with the replay tool
and runs `votes replay verify`, and returns the checker's verdict, which also verifies every
receipt the load got with the deployment's keys (`receipt_keys`).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.config import Config, load_config
from tests.chaos.checker import SCHEDULE_EXPECTATION, ReceiptKeys, Verdict, check
from tests.chaos.faults import FaultLog
from tests.chaos.load import LoadClient
from tests.support.http_client import ValidatingClient

PROFILE_ENV = "VOTES_CHAOS_PROFILE"
VERIFY_TIMEOUT_S = 300.0
RESULTS_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Profile:
    """How hard and how long: each schedule scales its fault count and pauses by these."""

    name: str
    rounds: int  # fault rounds per schedule
    load_s_between_faults: float
    concurrency: int
    rate_per_s: float | None  # None: as fast as the engine answers (closed loop)
    voters: int  # tokens minted per run; a run ends early if they run out


SHORT = Profile("short", rounds=2, load_s_between_faults=1.5, concurrency=12, rate_per_s=400,
                voters=20_000)
LONG = Profile("long", rounds=8, load_s_between_faults=4.0, concurrency=32, rate_per_s=None,
               voters=400_000)
PROFILES = {profile.name: profile for profile in (SHORT, LONG)}

# Every verdict of this session, for the summary table (tests/chaos/conftest.py prints it).
VERDICTS: list[Verdict] = []


def profile_from_environment() -> Profile:
    name = os.environ.get(PROFILE_ENV, SHORT.name)
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r}: use one of {sorted(PROFILES)}")
    return PROFILES[name]


def seeded_random(label: str) -> random.Random:
    seed = int(os.environ.get("VOTES_TEST_SEED", random.randrange(2**32)))
    print(f"\n[chaos] {label} seed={seed} (set VOTES_TEST_SEED to repeat)", flush=True)
    return random.Random(seed)


def engine_config(data_dir: Path, env: dict[str, str] | None = None) -> Config:
    """The config an engine started with `env` (VOTES_* variables) on `data_dir` runs with,
    for the replay tool's reader; the shard count comes from the data dir. VOTES_* variables
    that are not config fields (VOTES_FAILPOINTS, VOTES_LOG_LEVEL) are not config: skipped."""
    overrides = {}
    for name, value in (env or {}).items():
        field_name = name[len("VOTES_"):].lower()
        if name.startswith("VOTES_") and field_name in Config.__struct_fields__:
            overrides[field_name] = value
    overrides["data_dir"] = str(data_dir)
    return load_config(None, **{key: _typed(key, value) for key, value in overrides.items()})


def _typed(name: str, value: str):
    default = getattr(Config(), name, None)
    if default is None or isinstance(default, str):
        return value
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes")
    return type(default)(value)


async def recounted_voters(config: Config, poll: str) -> dict[int, str]:
    """Voter id -> option of every counted vote of `poll`, from the replay tool's independent
    recount of the raw WAL (every shard)."""
    from replay.recount import merged_voter_options, recount

    recounts = await recount(config, keep_voters=True)
    return merged_voter_options(recounts).get(poll, {})


def replay_verify(arguments: Sequence[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `votes-replay verify ARGUMENTS...`; return (exit code, output)."""
    command = [sys.executable, "-m", "replay.cli", "verify", *arguments]
    environment = {**os.environ, **(env or {})}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment,
                               timeout=VERIFY_TIMEOUT_S, check=False)
    output = completed.stdout + completed.stderr
    print(f"[chaos] votes replay verify {' '.join(arguments)} -> exit {completed.returncode}\n"
          f"{output[-3000:]}", flush=True)
    return completed.returncode, output


def results_of(base_url: str, poll: str) -> dict:
    with ValidatingClient(timeout=RESULTS_TIMEOUT_S) as client:
        answer = client.get(f"{base_url}/v1/polls/{poll}/results")
    assert answer.status_code == 200, f"results: {answer.status_code} {answer.text[:300]}"
    return answer.json()


def receipt_keys(config: Config) -> ReceiptKeys:
    """The keys that verify the receipts of the deployment `config` runs (its data dir's)."""
    return ReceiptKeys.from_data_dir(config.data_path, config.shards)


class ChaosRun:
    """One schedule's run: load on `targets`, a fault log, and the final check."""

    def __init__(self, schedule: str, profile: Profile, targets: Sequence[str], poll: str,
                 options: Sequence[str], tokens: dict[int, str], rng: random.Random) -> None:
        self.schedule = schedule
        self.profile = profile
        self.poll = poll
        self.options = list(options)
        self.rng = rng
        self.load = LoadClient(targets, poll, options, tokens, concurrency=profile.concurrency,
                               rate_per_s=profile.rate_per_s, rng=rng)
        self.faults = FaultLog(self.load)
        # The schedule's own expectations that failed (see `require`); part of the verdict.
        self.problems: list[str] = []

    def require(self, condition: bool, problem: str) -> bool:
        """Note a schedule's own expectation (the server stayed up, 201s resumed after the
        heal...): a false one is logged now and becomes a problem of the run's verdict, so the
        run still ends with the full check and a row in the summary."""
        if not condition:
            self.problems.append(problem)
            self.faults.note(f"PROBLEM: {problem}")
        return condition

    async def between_faults(self, seconds: float | None = None) -> None:
        """Let the load run for a while (the profile's pause by default)."""
        await asyncio.sleep(self.profile.load_s_between_faults if seconds is None else seconds)

    async def run(self, schedule: Callable[[ChaosRun], Awaitable[None]]) -> None:
        """Start the load, run the schedule (which heals what it broke), stop the load."""
        await self.load.start()
        try:
            await self.between_faults()
            await schedule(self)
            await self.between_faults()
        finally:
            await self.load.stop()
        counts = self.load.ledger.outcome_counts()
        self.faults.note(f"load stopped: {len(self.load.ledger.requests)} requests "
                         f"{dict(counts)}{' (tokens exhausted)' if self.load.exhausted else ''}")

    def finish(self, results: dict, counted: dict[int, str], verify: tuple[int, str] | None,
               keys: ReceiptKeys | None) -> Verdict:
        """Check the ledger (receipts with `keys`) against the recovered state; remember the
        verdict for the summary."""
        exit_code, output = verify if verify is not None else (None, "")
        verdict = check(self.schedule, self.load.ledger, self.faults, results, counted,
                        exit_code, output, poll=self.poll, keys=keys)
        for problem in self.problems:
            verdict.add(SCHEDULE_EXPECTATION, problem)
        VERDICTS.append(verdict)
        print(f"[chaos] {self.schedule}: {verdict.row()}", flush=True)
        for problem in verdict.problems:
            print(f"[chaos] {self.schedule} PROBLEM: {problem}", flush=True)
        return verdict
