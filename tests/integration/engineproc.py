"""Compatibility adapter: the old `EngineProcess` interface on top of tests/support.

New tests import `tests.support.engine_process` directly. This module keeps the former
interface for code still written against it: `EngineProcess(data_dir, log_path, env)` waits
for readiness as long as an engine on the Kafka WAL needs, and its `stop()` SIGKILLs the
whole group (the shared class's `kill()`; its `stop()` is SIGTERM first).
"""

from __future__ import annotations

from pathlib import Path

from tests.support import engine_process
from tests.support.cli import votes_cli
from tests.support.engine_process import KAFKA_READINESS, free_port, kafka_env

__all__ = ["EngineProcess", "free_port", "kafka_env", "votes_cli"]


class EngineProcess(engine_process.EngineProcess):
    def __init__(self, data_dir: Path, log_path: Path, env: dict[str, str], *,
                 keys_from: Path | None = None, port: int | None = None) -> None:
        super().__init__(data_dir, log_path, env, keys_from=keys_from, port=port,
                         **KAFKA_READINESS)

    def stop(self) -> None:
        self.kill()
