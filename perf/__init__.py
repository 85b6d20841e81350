"""The perf harness: benchmarks of the engine, its ceiling and its peers (perf/README.md).

Every benchmark runs from the repository root as ``python -m perf.<module>``; the peers'
servers run as ``python -m perf.peers.<name>``. Modules here import the engine and the local
stack as ordinary packages; nothing in perf/ edits ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path

PERF_DIR = Path(__file__).resolve().parent
REPO_DIR = PERF_DIR.parent
RESULTS_DIR = PERF_DIR / "results"


class BenchError(RuntimeError):
    """A benchmark could not produce a valid measurement; the message says why."""
