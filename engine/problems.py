"""Every error's HTTP answer, in one table: the only place a status is chosen for an error.

Each error class (engine/errors.py and the modules that raise their own) maps to a
`Problem`: the status, the slug of the problem type (the body's `type` is
`/problems/<slug>`) and the title. A class not in the table answers as its nearest listed
base class, so every VotesError has an answer and an unlisted one is a 500, never a guess.
The answers are the ones engine/openapi.yaml documents (docs/design.md "HTTP contract").
"""

from __future__ import annotations

from typing import NamedTuple

from engine import errors
from engine.bans import Banned, BanValueInvalid
from engine.challenge import ChallengeFailed, ChallengeRequired
from engine.keys import KeysCorrupt, KeysMissing
from engine.ratelimit import RateLimited
from engine.receipts import ReceiptInvalid
from engine.tokens import TokenError, TokenExpired, TokenForbidden, TokenInvalid, TokenMissing
from shards.kafka_wal import WalFenced
from shards.s3_snapshots import SnapshotStoreUnavailable


class Problem(NamedTuple):
    status: int
    slug: str
    title: str


PROBLEMS: dict[type[errors.VotesError], Problem] = {
    errors.VotesError: Problem(500, "internal", "Internal error"),
    errors.BadRequest: Problem(400, "bad-request", "The request is malformed"),
    errors.NotFound: Problem(404, "not-found", "No such resource"),
    errors.MethodNotAllowed: Problem(405, "method-not-allowed",
                                     "Method not allowed on this resource"),
    errors.BodyTooLarge: Problem(413, "body-too-large", "The request body is larger than allowed"),
    errors.PollNotFound: Problem(404, "poll-not-found", "No such poll"),
    errors.PollExists: Problem(409, "poll-exists", "A poll with this id already exists"),
    errors.AlreadyVoted: Problem(409, "already-voted", "This voter has already voted in this poll"),
    errors.UnknownOption: Problem(422, "unknown-option", "The poll has no such option"),
    errors.PollClosed: Problem(422, "poll-closed", "The poll is closed"),
    errors.PollNotOpen: Problem(422, "poll-not-open", "The poll is not open yet"),
    errors.WalUnavailable: Problem(
        503, "wal-unavailable", "The write-ahead log could not take the vote; nothing was counted"),
    errors.OutcomeUnknown: Problem(
        503, "outcome-unknown", "The vote may or may not have been recorded; it counts at most once"),
    errors.NotReady: Problem(503, "not-ready", "The shard is being fenced or is catching up"),
    WalFenced: Problem(503, "not-ready", "Another owner holds this shard"),
    RateLimited: Problem(429, "rate-limited", "Too many requests; retry after Retry-After"),
    ChallengeRequired: Problem(428, "challenge-required",
                               "Solve the proof-of-work challenge and send the solution"),
    ChallengeFailed: Problem(403, "challenge-failed", "The proof-of-work solution is not valid"),
    Banned: Problem(403, "banned", "Requests from here are refused for now"),
    BanValueInvalid: Problem(400, "bad-request", "The request is malformed"),
    errors.Overloaded: Problem(503, "overloaded", "The shard's queue is full; retry shortly"),
    errors.LogCorrupt: Problem(500, "log-corrupt", "The write-ahead log is corrupt"),
    errors.InvariantViolation: Problem(500, "internal", "Internal error"),
    errors.ConfigError: Problem(500, "config-error", "The configuration is invalid"),
    SnapshotStoreUnavailable: Problem(503, "snapshot-store-unavailable",
                                      "The snapshot store could not be reached"),
    KeysMissing: Problem(500, "keys-missing", "Key material is missing"),
    KeysCorrupt: Problem(500, "keys-corrupt", "Key material is malformed"),
    ReceiptInvalid: Problem(400, "receipt-invalid", "The receipt is malformed"),
    TokenError: Problem(401, "token-invalid", "The token is not valid"),
    TokenMissing: Problem(401, "token-missing", "A bearer token is required"),
    TokenInvalid: Problem(401, "token-invalid", "The token is not valid"),
    TokenExpired: Problem(401, "token-expired", "The token has expired"),
    TokenForbidden: Problem(403, "token-forbidden",
                            "The token does not grant access to this resource"),
}


def problem_of(error: errors.VotesError) -> Problem:
    """The answer for `error`: its class's entry, else its nearest listed base class's."""
    for cls in type(error).__mro__:
        problem = PROBLEMS.get(cls)
        if problem is not None:
            return problem
    return PROBLEMS[errors.VotesError]
