"""The embedded log on a full disk: votes are refused cleanly, nothing refused is counted.

The server runs with its data dir on a 16 MiB tmpfs. After a poll exists and votes were
accepted (so keys and segment files exist), a filler file takes every free byte. Then:
- each shard takes at most a few more votes into the slack of its segment's last page; once
  one of its appends failed, most votes answer 503 `/problems/wal-unavailable` and the rest
  201 (a smaller record may still fit), never another 5xx, while the process stays up and
  /healthz answers 200;
- with the filler removed, votes succeed again without a restart;
- the results count exactly the 201s, also after a SIGKILL and restart, and re-sending
  each refused vote is accepted as a new vote (201): the failed appends left nothing behind.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.support import http_client
from tests.support.engine_process import EngineProcess
from tests.support.filesystem import fill_filesystem, unmount
from tests.support.http_client import ValidatingClient
from tests.support.vote_client import bearer, open_poll, problem_type

POLL = "full"
OPTIONS = ["yes", "no"]
TMPFS_SIZE = "16m"
VOTERS = 2048
REQUEST_TIMEOUT_S = 10.0
# Votes one shard may still take after the disk is full: records of a batch of one vote
# are a few hundred bytes, and only the slack of the segment's last 4 KiB page is left.
SLACK_VOTES_MAX = 64
VOTES_ON_FULL_DISK = 96
CONCURRENCY = 8
# Once each shard has refused a vote, most further votes must be refused too; a few may
# still fit where a record is smaller than the one refused (records differ in size).
REFUSED_SHARE_MIN = 0.75


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs",
                              str(mount_point)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a {TMPFS_SIZE} tmpfs at {mount_point} (exit "
                    f"{mounted.returncode}): {mounted.stderr.strip() or mounted.stdout.strip()}")
    try:
        yield mount_point
    finally:
        unmount(mount_point)


def send_votes(client: httpx.Client, tokens: dict[int, str],
               votes: dict[int, str]) -> dict[int, httpx.Response | httpx.TransportError]:
    """POST each voter's vote, CONCURRENCY at a time; a transport error is kept as the answer."""

    def send(voter: int) -> httpx.Response | httpx.TransportError:
        try:
            return client.post(f"/v1/polls/{POLL}/votes", json={"option": votes[voter]},
                               headers=bearer(tokens[voter]))
        except httpx.TransportError as error:
            return error

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        return dict(zip(votes, pool.map(send, votes)))


class Ledger:
    """What the client was told, per voter, and what the results must therefore say."""

    def __init__(self, server: EngineProcess, tokens: dict[int, str], shards: int) -> None:
        self.server = server
        self.tokens = tokens
        self.shards = shards
        self.client = ValidatingClient(base_url=server.base_url, timeout=REQUEST_TIMEOUT_S)
        self.unused = sorted(tokens)
        self.accepted: dict[int, tuple[str, str]] = {}  # voter -> (option, receipt)
        self.refused: dict[int, str] = {}  # voter -> option, for 503 wal-unavailable

    def reconnect(self) -> None:
        """A fresh connection pool, for a restarted server."""
        self.client.close()
        self.client = ValidatingClient(base_url=self.server.base_url, timeout=REQUEST_TIMEOUT_S)

    def take_voters(self, count: int, shards: list[int] | None = None) -> list[int]:
        """`count` unused voters, or one unused voter for each of `shards`."""
        if shards is None:
            chosen = self.unused[:count]
        else:
            chosen = [next(voter for voter in self.unused if voter % self.shards == shard)
                      for shard in shards]
        assert len(chosen) == count, "ran out of voter tokens"
        taken = set(chosen)
        self.unused = [voter for voter in self.unused if voter not in taken]
        return chosen

    def send(self, votes: dict[int, str]) -> dict[int, httpx.Response]:
        answers = send_votes(self.client, self.tokens, votes)
        broken = {voter: answer for voter, answer in answers.items()
                  if isinstance(answer, httpx.TransportError)}
        if broken:
            first = next(iter(broken.values()))
            pytest.fail(f"{len(broken)} votes got no HTTP answer (first: {first!r}); server "
                        f"process alive: {self.server.alive()}; log:\n{self.server.log_tail()}")
        return answers  # type: ignore[return-value]

    def vote(self, voters: list[int], *, allow_refusal: bool) -> dict[int, httpx.Response]:
        votes = {voter: OPTIONS[voter % len(OPTIONS)] for voter in voters}
        responses = self.send(votes)
        for voter, response in responses.items():
            if response.status_code == 201:
                self.accepted[voter] = (votes[voter], response.json()["receipt"])
            elif (allow_refusal and response.status_code == 503
                  and problem_type(response) == "/problems/wal-unavailable"):
                self.refused[voter] = votes[voter]
            else:
                pytest.fail(f"voter {voter}: unexpected {response.status_code} "
                            f"{response.text[:300]}; log:\n{self.server.log_tail()}")
        return responses

    def expected_counts(self) -> dict[str, int]:
        tally = Counter(option for option, _ in self.accepted.values())
        return {option: tally[option] for option in OPTIONS}

    def results(self) -> dict:
        answer = self.client.get(f"/v1/polls/{POLL}/results")
        assert answer.status_code == 200, answer.text
        return answer.json()


def test_full_disk_refuses_votes_cleanly_and_recovers_without_restart(
        small_filesystem: Path, tmp_path: Path) -> None:
    server = EngineProcess(small_filesystem / "data", tmp_path / "server.log", workers=1)
    with ExitStack() as stack:
        stack.callback(server.kill)
        server.start()
        server.wait_ready()
        readiness = http_client.get(server.base_url + "/readyz", timeout=REQUEST_TIMEOUT_S).json()
        shards = readiness["shards_total"]
        issued = open_poll(server, POLL, OPTIONS, first_voter=0, voters=VOTERS,
                           timeout_s=REQUEST_TIMEOUT_S)
        tokens = dict(enumerate(issued))
        ledger = Ledger(server, tokens, shards)
        stack.callback(lambda: ledger.client.close())
        # Votes on every shard before the disk fills: each shard's segment file exists.
        ledger.vote(ledger.take_voters(2 * shards), allow_refusal=False)
        assert ledger.results()["counts"] == ledger.expected_counts()

        filled = fill_filesystem(small_filesystem / "filler")
        print(f"\n[disk-full] filler took {filled} bytes; free now "
              f"{os.statvfs(small_filesystem).f_bavail} blocks")

        # Drain each shard's page slack, one vote per shard at a time, until its first refusal.
        slack_votes: dict[int, int] = {}
        draining = list(range(shards))
        for attempt in range(SLACK_VOTES_MAX + 1):
            assert attempt < SLACK_VOTES_MAX, f"shards {draining} kept accepting on a full disk"
            voters = ledger.take_voters(len(draining), draining)
            answers = ledger.vote(voters, allow_refusal=True)
            for shard, voter in zip(list(draining), voters):
                if answers[voter].status_code == 503:
                    slack_votes[shard] = attempt
                    draining.remove(shard)
            if not draining:
                break
        accepted_before = len(ledger.accepted)
        refused_before = len(ledger.refused)
        ledger.vote(ledger.take_voters(VOTES_ON_FULL_DISK), allow_refusal=True)
        accepted_full = len(ledger.accepted) - accepted_before
        refused_full = len(ledger.refused) - refused_before
        print(f"[disk-full] slack votes per shard {slack_votes}; then {VOTES_ON_FULL_DISK} votes: "
              f"{refused_full} x 503 wal-unavailable, {accepted_full} x 201")
        assert refused_full >= VOTES_ON_FULL_DISK * REFUSED_SHARE_MIN
        assert server.alive(), server.log_tail()
        health = http_client.get(server.base_url + "/healthz", timeout=REQUEST_TIMEOUT_S)
        assert health.status_code == 200, health.text
        assert ledger.results()["counts"] == ledger.expected_counts()

        (small_filesystem / "filler").unlink()
        ledger.vote(ledger.take_voters(4 * shards), allow_refusal=False)
        results = ledger.results()
        assert results["counts"] == ledger.expected_counts()
        assert results["total"] == len(ledger.accepted)

        server.kill()
        server.start()
        server.wait_ready()
        ledger.reconnect()
        assert ledger.results()["counts"] == ledger.expected_counts()

        refused = dict(ledger.refused)
        again = ledger.send(refused)
        not_new = {voter: (response.status_code, response.text[:200])
                   for voter, response in again.items() if response.status_code != 201}
        assert not not_new, f"refused votes were in the log after all: {list(not_new.items())[:5]}"
        accepted = list(ledger.accepted.items())
        sample = dict(accepted[::max(1, len(accepted) // (CONCURRENCY * 2))])
        repeats = ledger.send({voter: option for voter, (option, _) in sample.items()})
        for voter, response in repeats.items():
            assert response.status_code == 409, response.text
            assert response.json()["receipt"]["receipt"] == sample[voter][1]
        results = ledger.results()
        assert results["total"] == len(ledger.accepted) + len(refused)
        print(f"[disk-full] accepted {len(ledger.accepted)}, refused {len(refused)} (all accepted "
              f"on re-send after restart); final total {results['total']}")
        assert "Traceback" not in server.log_text(), server.log_tail()
