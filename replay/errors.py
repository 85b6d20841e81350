"""The replay tool's errors: each carries the exit code the command line ends with.

Exit codes of every `votes replay` verb:
- 0: done, and everything checked agrees (verify), the vote counted (prove), the export
  matches (export --check);
- 1: a finding about the data: a difference, a vote not counted, a damaged log or export;
- 2: the tool could not do its job: bad input, a missing data dir, an engine holding the
  log, Kafka or S3 or the engine's HTTP endpoint not answering within its bound;
- 3: `rebuild --records-max` stopped early on purpose; its checkpoint resumes the work.
"""

from __future__ import annotations

from engine.errors import VotesError

EXIT_OK = 0
EXIT_FINDING = 1
EXIT_CANNOT = 2
EXIT_PAUSED = 3


class ReplayError(VotesError):
    """Root of the tool's errors; `exit_code` is what the command line exits with."""

    exit_code = EXIT_CANNOT


class BadInput(ReplayError):
    """Something the user gave is wrong: a path, a shard, a poll, a receipt, a flag."""

    title = "Bad input"


class Unavailable(ReplayError):
    """A service or a resource did not answer, or is held by someone else."""

    title = "Unavailable"
    retriable = True


class DataDamaged(ReplayError):
    """The log, a snapshot or an export is damaged: a finding, not a usage error."""

    exit_code = EXIT_FINDING
    title = "Damaged data"


def exit_code_of(exc: VotesError) -> int:
    """The exit code for an error from the tool or from the engine's modules it calls."""
    if isinstance(exc, ReplayError):
        return exc.exit_code
    if exc.problem == "log-corrupt":
        return EXIT_FINDING
    return EXIT_CANNOT
