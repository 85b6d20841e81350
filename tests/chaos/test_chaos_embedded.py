"""Chaos schedules on the embedded log (no Kafka): faults under load, checked after recovery.

Each schedule runs the profile's load (tests/chaos/harness.py) against one `votes serve`,
injects its faults round after round, heals them, then SIGKILLs the whole server and starts
it again on the same data, so what the checker sees is the state recovered from disk. The
checker (tests/chaos/checker.py) then holds every answer the client got against the results,
the replay tool's recount of the raw log and `votes replay verify`: no acknowledged vote
lost, no voter counted twice, nothing counted that the client was told failed or was
rejected, an unknown outcome counted at most once, no 5xx outside the contract, no 4xx but
409 `already-voted` (every answer is validated against engine/openapi.yaml), every receipt
verified offline with the data dir's public key and naming the poll and option sent, and
every 409's receipt equal to its voter's 201 receipt.

- `kill-workers`: two Granian workers (8 shards). Each round SIGKILLs one worker process at
  random (never the main process) with requests in flight; Granian respawns it, the new
  worker takes the freed slot, fences and replays that slot's shards, and /readyz answers 200
  again within a bound while the load keeps running. After each respawn every shard
  acknowledges votes again. A worker respawned less than 7 s ago is not chosen: Granian takes
  a second death within 5.5 s of a respawn for a crash loop and stops the whole server (a
  supervisor's job to restart, not this schedule's fault model).
- `disk-full`: the data dir on a small tmpfs. Each round a filler file takes every free byte
  and is held there for a pause: the same server process and worker keep running, /healthz
  answers 200, votes answer 503 `wal-unavailable` (FAILED; at least one in every full period)
  and never a 5xx outside the contract. Then the filler is removed, and every shard
  acknowledges votes again without a restart.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.checker import Verdict
from tests.chaos.harness import (
    ChaosRun,
    Profile,
    engine_config,
    profile_from_environment,
    receipt_keys,
    recounted_voters,
    replay_verify,
    results_of,
    seeded_random,
)
from tests.chaos.load import ACKNOWLEDGED, DUPLICATE, FAILED, UNEXPECTED
from tests.support.engine_process import EngineProcess
from tests.support.filesystem import fill_filesystem, unmount
from tests.support.http_client import ValidatingAsyncClient, ValidatingClient
from tests.support.vote_client import open_poll

PROFILE = profile_from_environment()
# Each schedule bounds its own waits; this only stops a run that hangs anyway.
pytestmark = pytest.mark.timeout(300 if PROFILE.name == "short" else 1200)

POLL = "chaos"
OPTIONS = ["red", "green", "blue"]
FIRST_VOTER = 1
SHARDS = 8
ENGINE_ENV = {"VOTES_SHARDS": str(SHARDS)}
HTTP_TIMEOUT_S = 10.0
# A killed worker is respawned by Granian (respawn_interval 0.5 s), then fences and replays
# its shards; on a busy 2-core machine that takes 0.2-2 s, so 20 s only catches a hang.
RESPAWN_READY_WAIT_S = 20.0
# Granian stops the whole server ("Worker crash loop detected") when a worker it respawned
# dies again within 5.5 s; a worker respawned less than this long ago is never the victim.
CRASH_LOOP_WINDOW_S = 5.5 + 1.5
WAIT_POLL_S = 0.05
EXIT_WAIT_S = 5.0
EXIT_POLL_S = 0.01
RESTART_READY_WAIT_S = 60.0
# Bytes the embedded log uses per acknowledged vote, measured at 200-230 with small group
# commits (one vote per batch costs the most); three times that as a bound, plus room for
# keys, snapshots and the slack of each shard's segment pages.
LOG_BYTES_PER_VOTE_MAX = 600
TMPFS_MARGIN_BYTES = 16 << 20
# A full disk is held for the profile's pause and then until this many votes were refused:
# each shard first fills the slack of its segment's last page (a slow machine may send
# little more than that in a short pause).
FAILED_WHILE_FULL_MIN = 20
FULL_HOLD_S_MAX = 15.0
# A fault round is at most this long beyond its pauses (fill, respawn, checks).
ROUND_EXTRA_S_MAX = max(RESPAWN_READY_WAIT_S + EXIT_WAIT_S + CRASH_LOOP_WINDOW_S,
                        FULL_HOLD_S_MAX) + 5.0
LOAD_STOP_S_MAX = 20.0


# Processes ------------------------------------------------------------------------------------

def process_state(pid: int) -> str | None:
    """The state letter of `pid` (R, S, Z...), or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def running(pid: int) -> bool:
    return process_state(pid) not in (None, "Z", "X")


def worker_pids(main_pid: int) -> list[int]:
    """The running child processes of the Granian main process: its workers."""
    children: set[int] = set()
    for task in Path(f"/proc/{main_pid}/task").glob("*"):
        try:
            children.update(int(pid) for pid in (task / "children").read_text().split())
        except OSError:
            continue
    return sorted(pid for pid in children if running(pid))


async def pick_victim(run: ChaosRun, main_pid: int,
                      respawned_at: dict[int, float]) -> tuple[int, list[int]]:
    """A random worker not respawned within the crash-loop window (waiting for one, bounded),
    and all the workers."""
    deadline = time.monotonic() + CRASH_LOOP_WINDOW_S + EXIT_WAIT_S
    while True:
        workers = worker_pids(main_pid)
        now = time.monotonic()
        eligible = [pid for pid in workers
                    if now - respawned_at.get(pid, float("-inf")) > CRASH_LOOP_WINDOW_S]
        if eligible:
            return run.rng.choice(eligible), workers
        if now > deadline:
            pytest.fail(f"no worker to kill among {workers} (respawned at {respawned_at})")
        await asyncio.sleep(WAIT_POLL_S)


async def wait_exited(pid: int) -> None:
    deadline = time.monotonic() + EXIT_WAIT_S
    while running(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"process {pid} still runs {EXIT_WAIT_S} s after SIGKILL")
        await asyncio.sleep(EXIT_POLL_S)


# Shared steps ---------------------------------------------------------------------------------

def schedule_bound_s(profile: Profile) -> float:
    """The longest a schedule's load phase may take before the test gives up on it."""
    pause = profile.load_s_between_faults
    return 2 * pause + profile.rounds * (2 * pause + ROUND_EXTRA_S_MAX) + LOAD_STOP_S_MAX


def start_with_poll(server: EngineProcess, schedule: str, profile: Profile) -> ChaosRun:
    """Start `server`, create the poll, mint the profile's voter tokens, and set up the run."""
    rng = seeded_random(schedule)
    server.start()
    server.wait_ready()
    with ValidatingClient(timeout=HTTP_TIMEOUT_S) as client:
        shards_total = client.get(server.base_url + "/readyz").json()["shards_total"]
    assert shards_total == SHARDS, f"the server runs {shards_total} shards, not {SHARDS}"
    tokens = open_poll(server, POLL, OPTIONS, first_voter=FIRST_VOTER, voters=profile.voters,
                       timeout_s=HTTP_TIMEOUT_S)
    return ChaosRun(schedule, profile, [server.base_url], POLL, OPTIONS,
                    dict(enumerate(tokens, FIRST_VOTER)), rng)


def acknowledged_shards(run: ChaosRun, start_s: float, end_s: float) -> set[int]:
    return {request.voter % SHARDS
            for request in run.load.ledger.acknowledged_between(start_s, end_s)}


def restart_and_check(run: ChaosRun, server: EngineProcess) -> Verdict:
    """SIGKILL the whole server, start it on the same data, and check the recovered state."""
    answers = Counter(request.detail for request in run.load.ledger.requests
                      if request.outcome not in (ACKNOWLEDGED, DUPLICATE))
    run.faults.note(f"answers other than 201/409: {dict(answers.most_common())}")
    server.kill()
    server.start()
    ready_s = server.wait_ready(RESTART_READY_WAIT_S)
    run.faults.note(f"server killed and restarted: ready after {ready_s:.2f} s")
    results = results_of(server.base_url, POLL)
    config = engine_config(server.data_dir, server.env)
    counted = asyncio.run(recounted_voters(config, POLL))
    verify = replay_verify(["--data-dir", str(server.data_dir), "--url", server.base_url,
                            "--poll", POLL])
    run.require("Traceback" not in server.log_text(),
                f"the server logged a traceback:\n{server.log_tail()}")
    return run.finish(results, counted, verify, receipt_keys(config))


# kill-workers ---------------------------------------------------------------------------------

def test_kill_workers(tmp_path: Path) -> None:
    """SIGKILL of one worker at a time under load loses no acknowledged vote and counts no
    voter twice; the respawned worker replays its shards and serves again."""
    server = EngineProcess(tmp_path / "data", tmp_path / "server.log", ENGINE_ENV, workers=2)
    try:
        run = start_with_poll(server, "kill-workers", PROFILE)
        main_pid = server.process.pid
        respawned_at: dict[int, float] = {}

        async def kill_workers(run: ChaosRun) -> None:
            for round_number in range(1, PROFILE.rounds + 1):
                victim, workers = await pick_victim(run, main_pid, respawned_at)
                assert len(workers) == 2, f"workers before round {round_number}: {workers}"
                await run.faults.fire("kill-worker", functools.partial(os.kill, victim,
                                                                       signal.SIGKILL),
                                      f"pid {victim} of {workers}")
                await wait_exited(victim)
                ready_s = await server.wait_ready_async(RESPAWN_READY_WAIT_S)
                ready_at = time.monotonic()
                respawned = worker_pids(main_pid)
                respawned_at.update((pid, ready_at) for pid in respawned if pid not in workers)
                run.faults.note(f"ready again after {ready_s:.2f} s; workers {respawned}")
                run.require(len(respawned) == 2 and victim not in respawned,
                            f"round {round_number}: workers after the respawn: {respawned}")
                await run.between_faults()
                shards = acknowledged_shards(run, ready_at, time.monotonic())
                run.require(shards == set(range(SHARDS)),
                            f"round {round_number}: after the respawn only shards "
                            f"{sorted(shards)} acknowledged votes")
            run.require(server.alive(), "the server's main process died")

        asyncio.run(asyncio.wait_for(run.run(kill_workers), schedule_bound_s(PROFILE)))
        verdict = restart_and_check(run, server)
        assert verdict.ok, verdict.problems
    finally:
        server.kill()


# disk-full ------------------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs that holds every vote the profile can send, and little more."""
    size_bytes = PROFILE.voters * LOG_BYTES_PER_VOTE_MAX + TMPFS_MARGIN_BYTES
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs",
                              str(mount_point)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.fail(f"disk-full needs to mount a tmpfs (run as root, or with CAP_SYS_ADMIN): "
                    f"mount at {mount_point} exited {mounted.returncode}: "
                    f"{mounted.stderr.strip() or mounted.stdout.strip()}")
    print(f"\n[chaos] disk-full: tmpfs of {size_bytes >> 20} MiB at {mount_point}")
    try:
        yield mount_point
    finally:
        unmount(mount_point)


async def hold_until_refused(run: ChaosRun, full_from: float) -> None:
    """Keep the disk full until FAILED_WHILE_FULL_MIN votes sent since `full_from` were
    refused (bounded: the round's check reports a disk that refused too few)."""
    deadline = time.monotonic() + FULL_HOLD_S_MAX
    while time.monotonic() < deadline:
        refused = sum(request.outcome == FAILED and request.started_s >= full_from
                      for request in run.load.ledger.requests)
        if refused >= FAILED_WHILE_FULL_MIN:
            return
        await asyncio.sleep(WAIT_POLL_S)


async def healthz(server: EngineProcess) -> int:
    async with ValidatingAsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        return (await client.get(server.base_url + "/healthz")).status_code


def test_disk_full(small_tmpfs: Path, tmp_path: Path) -> None:
    """A full disk under load is refused cleanly (503 wal-unavailable, nothing counted), the
    server stays up, and votes are acknowledged again once space is back, without a restart."""
    server = EngineProcess(small_tmpfs / "data", tmp_path / "server.log", ENGINE_ENV, workers=1)
    filler = small_tmpfs / "filler"
    try:
        run = start_with_poll(server, "disk-full", PROFILE)
        main_pid = server.process.pid
        workers = worker_pids(main_pid)

        async def disk_full(run: ChaosRun) -> None:
            for round_number in range(1, PROFILE.rounds + 1):
                filled = await run.faults.fire("fill-disk", lambda: fill_filesystem(filler),
                                               f"round {round_number}", blocking=True)
                full_from = time.monotonic()
                await run.between_faults()
                await hold_until_refused(run, full_from)
                status = await healthz(server)
                full_until = time.monotonic()
                filler.unlink()
                healed_at = time.monotonic()
                run.faults.note(f"heal: filler of {filled >> 10} KiB removed")
                await run.between_faults()
                full = Counter(request.outcome for request in run.load.ledger.requests
                               if full_from <= request.started_s < full_until)
                run.faults.note(f"round {round_number}: while full {dict(full)}; /healthz "
                                f"{status}")
                run.require(status == 200, f"round {round_number}: /healthz {status} while full")
                run.require(server.alive() and worker_pids(main_pid) == workers,
                            f"round {round_number}: server or worker restarted (workers "
                            f"{workers} -> {worker_pids(main_pid)})")
                run.require(full[FAILED] > 0 and full[UNEXPECTED] == 0,
                            f"round {round_number}: answers while full: {dict(full)}")
                shards = acknowledged_shards(run, healed_at, time.monotonic())
                run.require(shards == set(range(SHARDS)),
                            f"round {round_number}: after the heal only shards {sorted(shards)} "
                            f"acknowledged votes")

        try:
            asyncio.run(asyncio.wait_for(run.run(disk_full), schedule_bound_s(PROFILE)))
        finally:
            filler.unlink(missing_ok=True)
        verdict = restart_and_check(run, server)
        assert verdict.ok, verdict.problems
    finally:
        server.kill()
