"""Failpoints: named places where a fault-injection test can hold the engine for a while, so a
real fault (a service stopped, a process killed) lands in an exact window.

Configured only through the environment, read once per process:
`VOTES_FAILPOINTS="s3-snapshot-before-manifest=pause:6"` (comma-separated `name=pause:SECONDS`).
Unset, which is the only production setting, `await pause(name)` returns at once. When a
point is armed, reaching it logs `failpoint reached: <name>` (tests wait for that line), then
sleeps; the sleep is bounded by PAUSE_S_MAX.

Points:
- `s3-snapshot-before-manifest`: in the S3 snapshot store, after the snapshot object was
  uploaded and before the manifest is replaced.
"""

from __future__ import annotations

import asyncio
import logging
import os

from engine.errors import ConfigError

FAILPOINTS_ENV = "VOTES_FAILPOINTS"
PAUSE_S_MAX = 120.0
KNOWN = frozenset({"s3-snapshot-before-manifest"})

log = logging.getLogger("votes.failpoints")


def parse(text: str) -> dict[str, float]:
    """`"name=pause:1.5,..."` -> {name: seconds}; ConfigError on anything else."""
    armed: dict[str, float] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, _, action = entry.partition("=")
        kind, _, seconds = action.partition(":")
        try:
            pause_s = float(seconds)
        except ValueError:
            pause_s = -1.0
        if name not in KNOWN or kind != "pause" or not 0 <= pause_s <= PAUSE_S_MAX:
            raise ConfigError(f"{FAILPOINTS_ENV} entry {entry!r} is not NAME=pause:SECONDS with "
                              f"NAME in {sorted(KNOWN)} and SECONDS in 0..{PAUSE_S_MAX}")
        armed[name] = pause_s
    return armed


_armed = parse(os.environ.get(FAILPOINTS_ENV, ""))


async def pause(name: str) -> None:
    pause_s = _armed.get(name)
    if pause_s is None:
        return
    log.warning("failpoint reached: %s (pausing %.1f s)", name, pause_s)
    await asyncio.sleep(pause_s)
