"""The real local stack (3 Kafka brokers, S3, Redis) owned by one benchmark run.

It lives on its own base port, so it never touches a stack someone else is using. ``up``
starts it fresh (whatever an earlier run left on that port is stopped and wiped first), so
the WAL topic starts empty; ``down`` stops it and wipes its state. Call ``down`` in a
``finally``: a stack left up keeps three JVMs running. The stack's own progress lines go to
``log_path``.
"""

from __future__ import annotations

import contextlib
import json
import time
import tomllib
from pathlib import Path

from deploy.local.stack import LocalStack, StackError
from perf import BenchError


class PrivateStack:
    """A LocalStack on ``base_port`` with a WAL topic of ``partitions`` partitions."""

    def __init__(self, base_port: int, partitions: int, log_path: Path):
        self.base_port = base_port
        self.partitions = partitions
        self.log_path = log_path
        self.endpoints: dict = {}
        self.up_s: float | None = None
        self.started = False
        self._stack = LocalStack(base_port=base_port, partitions=partitions)

    def _logged(self):
        """The stack's progress lines (it prints to stderr) into this run's stack log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")  # noqa: SIM115 - closed by the ExitStack below
        stack = contextlib.ExitStack()
        stack.enter_context(log)
        stack.enter_context(contextlib.redirect_stderr(log))
        return stack

    def up(self) -> dict:
        """Start the stack with an empty WAL topic of ``partitions`` partitions."""
        started = time.monotonic()
        self.started = True  # from here on, down() has something to clean up
        try:
            with self._logged():
                self.endpoints = self._stack.up(fresh=True)
        except StackError as error:
            raise BenchError(f"the private stack did not come up: {error}") from error
        self.up_s = time.monotonic() - started
        found = self.endpoints.get("kafka", {}).get("partitions")
        if found != self.partitions:
            raise BenchError(f"the stack came up with {found} partitions, not {self.partitions}")
        return self.endpoints

    def wal_topic_for(self, suffix: str, partitions: int) -> str:
        """A further WAL topic ``<wal topic>-<suffix>`` with the WAL's settings (RF 3, min
        ISR 2), created now and fully replicated: a fresh log for one more engine."""
        from deploy.local.kafka_admin import TOPIC_TIMEOUT_S, WAL_TOPIC_CONFIGS
        from deploy.local.processes import run_coroutine

        topic = f"{self.endpoints['kafka']['wal_topic']}-{suffix}"
        try:
            with self._logged():
                found = run_coroutine(self._stack.kafka_admin.ensure_topic(
                    topic, partitions, WAL_TOPIC_CONFIGS))  # fmt: skip
                self._stack.wait_fully_replicated(topic, TOPIC_TIMEOUT_S)
        except StackError as error:
            raise BenchError(f"topic {topic} was not created: {error}") from error
        if found != partitions:
            raise BenchError(f"topic {topic} exists with {found} partitions, not {partitions}")
        return topic

    def write_engine_config(self, path: Path, shards: int | None = None,
                            wal_topic: str | None = None, s3_prefix: str | None = None) -> Path:
        """The `votes serve --config` TOML for this stack (Kafka WAL, S3 snapshots).

        ``shards`` None leaves the engine's default shard count (its groups follow from it:
        the topic must have one partition per group); ``wal_topic`` and ``s3_prefix`` give
        one engine a log and snapshots of its own on a shared stack."""
        # The stack module owns the mapping from its endpoints to the engine's settings.
        from deploy.local.stack import engine_config_toml

        values = tomllib.loads(engine_config_toml(self.endpoints))
        values.pop("shards", None)
        overrides = {"shards": shards, "wal_topic": wal_topic, "s3_prefix": s3_prefix}
        values.update({key: value for key, value in overrides.items() if value is not None})
        # json.dumps of a str or int is also a valid TOML value.
        path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
        return path

    def pids(self) -> list[int]:
        """Pids of the stack's running services (brokers, S3, Redis), for CPU sampling."""
        services = self._stack.status()["services"]
        return [service["pid"] for service in services.values() if service["alive"]]

    def down(self) -> float:
        """Stop the stack and delete its state; returns the seconds it took."""
        started = time.monotonic()
        try:
            with self._logged():
                self._stack.down(wipe=True)
        except StackError as error:
            raise BenchError(f"stopping the private stack failed: {error}") from error
        self.started = False
        return time.monotonic() - started
