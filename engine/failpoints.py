"""Failpoints: named places where a fault-injection test can hold the engine for a while, so a
real fault (a service stopped, a process killed) lands in an exact window, or switch a
safety step off, so a test can show that it catches the step missing.

Configured only through the environment, read once per process (at import):
`VOTES_FAILPOINTS="s3-snapshot-before-manifest=pause:6,segment-log-skip-fsync=on"`
(comma-separated `name=pause:SECONDS` for pause points, `name=on` for switches). Unset,
which is the only production setting, `await pause(name)` returns at once and a switched
call site holds the real function itself (`skipped_if_on`): no lookup per call. When a pause
point is armed, reaching it logs `failpoint reached: <name>` (tests wait for that line), then
sleeps; the sleep is bounded by PAUSE_S_MAX. An armed switch logs once when it is bound.

Pause points:
- `s3-snapshot-before-manifest`: in the S3 snapshot store, after the snapshot object was
  uploaded and before the manifest is replaced.

Switches (never in production: they break durability on purpose):
- `segment-log-skip-fsync`: the embedded segment log (shards/segment_log.py) skips its file
  fsyncs, so an append is acknowledged before it is durable. The power-loss test
  (tests/functional/test_power_loss.py) must then report lost acknowledged votes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import ParamSpec

from engine.errors import ConfigError

FAILPOINTS_ENV = "VOTES_FAILPOINTS"
PAUSE_S_MAX = 120.0
KNOWN = frozenset({"s3-snapshot-before-manifest"})
SWITCHES = frozenset({"segment-log-skip-fsync"})

log = logging.getLogger("votes.failpoints")
# The parameters of a switched function: its skipping stand-in takes the same ones.
_Parameters = ParamSpec("_Parameters")


def parse(text: str) -> dict[str, float | bool]:
    """`"name=pause:1.5,switch=on"` -> {name: seconds, switch: True}; ConfigError on anything
    else."""
    armed: dict[str, float | bool] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, _, action = entry.partition("=")
        if name in SWITCHES and action == "on":
            armed[name] = True
            continue
        kind, _, seconds = action.partition(":")
        try:
            pause_s = float(seconds)
        except ValueError:
            pause_s = -1.0
        if name not in KNOWN or kind != "pause" or not 0 <= pause_s <= PAUSE_S_MAX:
            raise ConfigError(f"{FAILPOINTS_ENV} entry {entry!r} is not NAME=pause:SECONDS with "
                              f"NAME in {sorted(KNOWN)} and SECONDS in 0..{PAUSE_S_MAX}, nor "
                              f"SWITCH=on with SWITCH in {sorted(SWITCHES)}")
        armed[name] = pause_s
    return armed


_armed = parse(os.environ.get(FAILPOINTS_ENV, ""))


async def pause(name: str) -> None:
    pause_s = _armed.get(name)
    if pause_s is None:
        return
    log.warning("failpoint reached: %s (pausing %.1f s)", name, pause_s)
    await asyncio.sleep(pause_s)


def _skipped(*_arguments: object, **_keywords: object) -> None:
    return None


def skipped_if_on(name: str, function: Callable[_Parameters, None]) -> Callable[_Parameters, None]:
    """`function` itself, or a call that does nothing when switch `name` is on. Bind the
    result once (at import): the call site then costs what `function` costs."""
    if name not in SWITCHES:
        raise ConfigError(f"{name!r} is not a failpoint switch ({sorted(SWITCHES)})")
    if _armed.get(name) is not True:
        return function
    log.warning("failpoint on: %s (%s is skipped)", name, getattr(function, "__name__", function))
    return _skipped
