"""The replay tool's errors, and the one table that maps every error to an exit code.

Exit codes of every `votes replay` verb:
- 0: done, and everything checked agrees (verify), the vote counted (prove), the export
  matches (export --check);
- 1: a finding about the data: a difference, a vote not counted, a damaged log or export;
- 2: the tool could not do its job: bad input, a missing data dir, a data dir or log of
  another layout (format 1, or another group's header), an engine holding the log, Kafka or S3 or the engine's HTTP endpoint not answering within its bound;
- 3: `rebuild --records-max` stopped early on purpose; its checkpoint resumes the work.

`exit_code_of` decides by class (the nearest listed base class of the error), never by
message text; an error not listed is 2.
"""

from __future__ import annotations

from engine.errors import LogCorrupt, VotesError

EXIT_OK = 0
EXIT_FINDING = 1
EXIT_CANNOT = 2
EXIT_PAUSED = 3


class ReplayError(VotesError):
    """Root of the tool's errors."""


class BadInput(ReplayError):
    """Bad input: something the user gave is wrong (a path, a shard, a poll, a flag)."""


class Unavailable(ReplayError):
    """Unavailable: a service or a resource did not answer, or is held by someone else."""


class DataDamaged(ReplayError):
    """Damaged data: the log, a snapshot or an export is damaged (a finding, not misuse)."""


class WrongLayout(ReplayError):
    """Another layout: a log whose first record is not this layout's header for its group."""


class Paused(ReplayError):
    """Paused on purpose; a checkpoint holds the work done so far."""


EXIT_CODES: dict[type[VotesError], int] = {
    VotesError: EXIT_CANNOT,
    DataDamaged: EXIT_FINDING,
    LogCorrupt: EXIT_FINDING,
    WrongLayout: EXIT_CANNOT,
    Paused: EXIT_PAUSED,
}


def exit_code_of(error: VotesError) -> int:
    """The exit code for an error from the tool or from the engine's modules it calls."""
    for cls in type(error).__mro__:
        code = EXIT_CODES.get(cls)
        if code is not None:
            return code
    return EXIT_CANNOT
