"""One error root for the engine, and the domain and storage errors every layer raises.

Errors say what went wrong, not how to answer it: none carries an HTTP status or a problem
slug. The serving layer maps each class to its HTTP answer in one table
(engine/problems.py), the replay tool maps them to its exit codes (replay/errors.py), and
callers act on the class, never on message text. `detail` is the message given when the
error was raised ("" when none was); `str(error)` falls back to the class's docstring.
"""

from __future__ import annotations


class VotesError(Exception):
    """Internal error."""

    def __init__(self, detail: str = "", **extra: object) -> None:
        super().__init__(detail or _summary(type(self)))
        self.detail = detail
        self.extra = extra


def _summary(cls: type) -> str:
    """The first line of the class's docstring: what the error means, for logs and the CLI."""
    return (cls.__doc__ or cls.__name__).strip().splitlines()[0]


class BadRequest(VotesError):
    """The request is malformed."""


class NotFound(VotesError):
    """No such resource."""


class MethodNotAllowed(VotesError):
    """Method not allowed on this resource."""


class BodyTooLarge(VotesError):
    """The request body is larger than allowed."""


class PollNotFound(VotesError):
    """No such poll."""


class PollExists(VotesError):
    """A poll with this id already exists."""


class AlreadyVoted(VotesError):
    """This voter has already voted in this poll."""


class UnknownOption(VotesError):
    """The poll has no such option."""


class PollClosed(VotesError):
    """The poll is closed."""


class PollNotOpen(VotesError):
    """The poll is not open yet."""


class WalUnavailable(VotesError):
    """The append failed and was rolled back: nothing was counted, the voter may retry."""


class OutcomeUnknown(VotesError):
    """The append may or may not be in the log; it will be counted at most once."""


class NotReady(VotesError):
    """The shard is being fenced or is catching up."""


class Overloaded(VotesError):
    """A bounded queue is full: shed load rather than grow without limit."""


class LogCorrupt(VotesError):
    """Corruption in the middle of a log: the shard stops rather than guess."""


class InvariantViolation(VotesError):
    """A rule the data depends on was broken (docs/design.md "Invariants"): stop, never guess.

    Raised by explicit checks that stay on in production (never a bare `assert`): a log
    that answered for fewer records than it was given, an offset that did not grow, more
    commit cycles in flight than their bound."""


class ConfigError(VotesError):
    """The configuration is invalid."""
