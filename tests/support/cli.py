"""Run the `votes` command line from a test; a failing command fails the test with its output."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI_TIMEOUT_S = 60.0
OUTPUT_TAIL_BYTES = 4000


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", *args]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `votes ARGS...`; with check, fail the test (with its output) on non-zero exit."""
    completed = subprocess.run(cli_command(*args), capture_output=True, text=True,
                               timeout=CLI_TIMEOUT_S, check=False)
    if check and completed.returncode != 0:
        pytest.fail(f"`votes {' '.join(args)}` exited {completed.returncode}\n"
                    f"stdout: {completed.stdout[-OUTPUT_TAIL_BYTES:]}\n"
                    f"stderr: {completed.stderr[-OUTPUT_TAIL_BYTES:]}")
    return completed


def votes_cli(*args: str) -> str:
    """Run `votes ARGS...` and return its stdout; fail the test on a non-zero exit."""
    return run_cli(*args).stdout


def admin_token(data_dir: Path, ttl_s: int | None = None) -> str:
    """An admin token from `votes admin-token --data-dir DIR [--ttl-s N]`."""
    args = ["admin-token", "--data-dir", str(data_dir)]
    if ttl_s is not None:
        args += ["--ttl-s", str(ttl_s)]
    token = votes_cli(*args).strip()
    assert token and "\n" not in token, f"admin-token printed {token!r}"
    return token


def voter_tokens(data_dir: Path, first: int, count: int, poll: str | None = None,
                 ttl_s: int = 3600) -> list[str]:
    """Tokens for voters first..first+count-1, in that order, from `votes token`."""
    args = ["token", "--data-dir", str(data_dir), "--voter", str(first),
            "--count", str(count), "--ttl-s", str(ttl_s)]
    if poll is not None:
        args += ["--poll", poll]
    tokens = votes_cli(*args).split()
    assert len(tokens) == count, f"`votes token` printed {len(tokens)} tokens, not {count}"
    return tokens


# Expired tokens are issued in the past rather than waited for: a token's expiry is wall-clock
# seconds, and a test that sleeps past it depends on how the seconds fall.
EXPIRED_ISSUED_AGO_S = 3600


def expired_admin_token(data_dir: Path) -> str:
    """An admin token signed with the data dir's keys that expired long ago."""
    from engine.keys import load_keys
    from engine.tokens import issue_admin_token

    issued_s = int(time.time()) - EXPIRED_ISSUED_AGO_S
    return issue_admin_token(load_keys(data_dir), ttl_s=1, now_s=issued_s)


def expired_voter_token(data_dir: Path, voter: int) -> str:
    """A voter token for `voter`, signed with the data dir's keys, that expired long ago."""
    from engine.keys import load_keys
    from engine.tokens import issue_voter_token

    issued_s = int(time.time()) - EXPIRED_ISSUED_AGO_S
    return issue_voter_token(load_keys(data_dir), voter, ttl_s=1, now_s=issued_s)
