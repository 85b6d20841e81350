"""One error root for the engine; every error that reaches HTTP maps to one problem+json shape.

Callers act on class attributes (`status`, `problem`, `retriable`), never on message text.
`problem` is the slug of the problem type: the body's `type` is `/problems/<slug>`.
"""

from __future__ import annotations


class VotesError(Exception):
    status = 500
    problem = "internal"
    title = "Internal error"
    retriable = False

    def __init__(self, detail: str = "", **extra: object) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = extra


class BadRequest(VotesError):
    status = 400
    problem = "bad-request"
    title = "The request is malformed"


class NotFound(VotesError):
    status = 404
    problem = "not-found"
    title = "No such resource"


class MethodNotAllowed(VotesError):
    status = 405
    problem = "method-not-allowed"
    title = "Method not allowed on this resource"


class BodyTooLarge(VotesError):
    status = 413
    problem = "body-too-large"
    title = "The request body is larger than allowed"


class PollNotFound(VotesError):
    status = 404
    problem = "poll-not-found"
    title = "No such poll"


class PollExists(VotesError):
    status = 409
    problem = "poll-exists"
    title = "A poll with this id already exists"


class AlreadyVoted(VotesError):
    status = 409
    problem = "already-voted"
    title = "This voter has already voted in this poll"


class UnknownOption(VotesError):
    status = 422
    problem = "unknown-option"
    title = "The poll has no such option"


class PollClosed(VotesError):
    status = 422
    problem = "poll-closed"
    title = "The poll is closed"


class PollNotOpen(VotesError):
    status = 422
    problem = "poll-not-open"
    title = "The poll is not open yet"


class WalUnavailable(VotesError):
    """The append failed and was rolled back: nothing was counted, the voter may retry."""

    status = 503
    problem = "wal-unavailable"
    title = "The write-ahead log could not take the vote; nothing was counted"
    retriable = True


class OutcomeUnknown(VotesError):
    """The append may or may not be in the log; it will be counted at most once."""

    status = 503
    problem = "outcome-unknown"
    title = "The vote may or may not have been recorded; it counts at most once"
    retriable = True


class NotReady(VotesError):
    status = 503
    problem = "not-ready"
    title = "The shard is being fenced or is catching up"
    retriable = True


class Overloaded(VotesError):
    """A bounded queue is full: shed load rather than grow without limit."""

    status = 503
    problem = "overloaded"
    title = "The shard's queue is full; retry shortly"
    retriable = True


class LogCorrupt(VotesError):
    """Corruption in the middle of a log: the shard stops rather than guess."""

    problem = "log-corrupt"
    title = "The write-ahead log is corrupt"


class ConfigError(VotesError):
    problem = "config-error"
    title = "The configuration is invalid"
