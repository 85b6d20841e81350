"""Proves that errors are answered by class, in the two tables that decide it: the HTTP
answer (engine/problems.py) and the replay tool's exit code (replay/errors.py). A class not
listed answers as its nearest listed base class, so a new subclass can never fall through to
a wrong status or exit code; and no error class carries an HTTP status or slug itself.
"""

from __future__ import annotations

import pytest

from engine import errors
from engine.problems import PROBLEMS, Problem, problem_of
from engine.tokens import TokenExpired, TokenForbidden
from replay.errors import (
    EXIT_CANNOT,
    EXIT_FINDING,
    EXIT_PAUSED,
    BadInput,
    DataDamaged,
    Unavailable,
    exit_code_of,
)
from replay.rebuild import RebuildPaused
from shards.kafka_wal import WalFenced


class UnlistedOverload(errors.Overloaded):
    """A subclass nobody added to the table."""


@pytest.mark.parametrize(("error", "expected"), [
    (errors.WalUnavailable("x"), (503, "wal-unavailable")),
    (errors.AlreadyVoted("x"), (409, "already-voted")),
    (WalFenced("x"), (503, "not-ready")),
    (UnlistedOverload("x"), (503, "overloaded")),
    (TokenExpired(), (401, "token-expired")),
    (TokenForbidden(), (403, "token-forbidden")),
    (errors.InvariantViolation("x"), (500, "internal")),
    (BadInput("x"), (500, "internal")),  # a tool error never reaches HTTP: a bug if it does
])
def test_each_error_answers_by_its_class(error: errors.VotesError,
                                         expected: tuple[int, str]) -> None:
    assert problem_of(error)[:2] == expected


def test_a_subclass_keeps_its_own_title() -> None:
    assert problem_of(WalFenced()).title == "Another owner holds this shard"
    assert problem_of(errors.NotReady()).title == "The shard is being fenced or is catching up"


def test_no_error_class_carries_an_http_status_or_slug() -> None:
    for cls in PROBLEMS:
        assert not {"status", "problem", "retriable"} & set(vars(cls)), cls
    assert all(isinstance(problem, Problem) for problem in PROBLEMS.values())


@pytest.mark.parametrize(("error", "code"), [
    (errors.LogCorrupt("x"), EXIT_FINDING),
    (DataDamaged("x"), EXIT_FINDING),
    (RebuildPaused("x"), EXIT_PAUSED),
    (BadInput("x"), EXIT_CANNOT),
    (Unavailable("x"), EXIT_CANNOT),
    (errors.WalUnavailable("x"), EXIT_CANNOT),
    (errors.VotesError("x"), EXIT_CANNOT),
])
def test_replay_exit_codes_follow_the_class(error: errors.VotesError, code: int) -> None:
    assert exit_code_of(error) == code


def test_an_error_without_detail_says_what_it_means() -> None:
    assert str(errors.PollClosed()) == "The poll is closed."
    assert errors.PollClosed().detail == ""
