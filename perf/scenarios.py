"""What the driver measures: the peers (in run order) and the scenarios of a TOML file.

A scenario is closed loop (wrk, max throughput) or open loop (perf/loadgen.py, requests at
scheduled times); open-loop rates may be fractions of the peer's own ``closed_max`` rate, so
``closed_max`` must come first. Durations scale with ``--duration-scale``; wrk takes whole
seconds only.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from perf import BenchError


@dataclass(frozen=True)
class PeerKind:
    label: str
    durability: str
    stateful: bool
    backend: str | None  # what else the peer runs on, sampled as "backend" CPU


# In run order. The kafka peer runs last: its private stack (3 JVMs, S3, Redis) comes up
# for it and goes down after it, so it never competes with another peer for the CPU.
PEERS = {
    "ceiling": PeerKind("ceiling: Granian, fixed 201", "n/a: keeps nothing", False, None),
    "embedded": PeerKind("engine, embedded log", "durable: fsync'd log, group commit", True, None),
    "granian_asyncpg": PeerKind(
        "Granian+msgspec+asyncpg+PG", "durable: PG sync commit, fsync", True, "postgres"
    ),
    "fastapi_pg": PeerKind(
        "FastAPI+uvicorn+asyncpg+PG", "durable: PG sync commit, fsync", True, "postgres"
    ),
    "fastapi_redis": PeerKind(
        "FastAPI+uvicorn+Redis", "NOT durable: Redis, no persistence", True, "redis"
    ),
    "kafka": PeerKind("engine, Kafka WAL", "durable: acks=all, RF 3, min ISR 2", True, "stack"),
}
DEFAULT_PEERS = "ceiling,embedded,granian_asyncpg,fastapi_pg,fastapi_redis"
ENGINES = ("embedded", "kafka")
PACED_SCENARIO = "closed_paced"


@dataclass
class Scenario:
    name: str
    title: str
    generator: str  # "wrk" or "open"
    duration_s: float = 0.0
    profile: list[dict] = field(default_factory=list)
    peers: str = "all"
    polls: int = 1
    repeat_share: float = 0.0
    new_poll: bool = False
    connections: int | None = None
    # Closed loop only: run once per connection count and keep the best (max throughput
    # needs enough requests in flight to cover each peer's commit latency).
    connections_tried: list[int] = field(default_factory=list)
    # Closed loop only: wrk paces each connection to this fraction of the peer's closed_max
    # rate (VOTES_RATE_PER_S in perf/wrk/votes.lua); 0 = as fast as answers come.
    paced_fraction_of_max: float = 0.0

    def applies_to(self, peer: str) -> bool:
        if self.peers == "engines":
            return peer in ENGINES
        return self.peers == "all" or (self.peers == "stateful" and PEERS[peer].stateful)

    def needs_max(self) -> bool:
        return bool(self.paced_fraction_of_max) or any(
            "fraction_of_max" in segment for segment in self.profile
        )


@dataclass
class ScenarioSet:
    connections: int
    warmup_s: float
    options: list[str]
    repeat_gap: int
    scenarios: list[Scenario]
    source: str


def load_scenarios(path: Path, duration_scale: float) -> ScenarioSet:
    document = tomllib.loads(path.read_text())
    run = document.get("run", {})
    scenarios = []
    for entry in document.get("scenario", []):
        scenario = Scenario(**entry)
        if scenario.generator not in ("wrk", "open"):
            raise BenchError(f"scenario {scenario.name}: generator must be wrk or open")
        if scenario.generator == "wrk" and scenario.duration_s <= 0:
            raise BenchError(f"scenario {scenario.name}: a wrk scenario needs duration_s")
        if scenario.generator == "open" and not scenario.profile:
            raise BenchError(f"scenario {scenario.name}: an open scenario needs a profile")
        if scenario.peers not in ("all", "stateful", "engines"):
            raise BenchError(f"scenario {scenario.name}: peers must be all, stateful or engines")
        if scenario.paced_fraction_of_max and scenario.generator != "wrk":
            raise BenchError(f"scenario {scenario.name}: only a wrk scenario is paced")
        if scenario.needs_max() and not any(s.name == "closed_max" for s in scenarios):
            raise BenchError(f"scenario {scenario.name}: fraction_of_max needs an earlier "
                             "scenario named closed_max")  # fmt: skip
        # wrk takes whole seconds only.
        scenario.duration_s = float(max(1, round(scenario.duration_s * duration_scale)))
        scenario.profile = [
            {**segment, "duration_s": segment["duration_s"] * duration_scale}
            for segment in scenario.profile
        ]
        scenarios.append(scenario)
    return ScenarioSet(
        connections=run.get("connections", 64),
        warmup_s=float(max(1, round(run.get("warmup_s", 2.0) * duration_scale))),
        options=run.get("options", ["a", "b", "c"]),
        repeat_gap=run.get("repeat_gap", 512),
        scenarios=scenarios,
        source=str(path),
    )


def paced_scenario(closed_max: Scenario, fraction: float) -> Scenario:
    """wrk paced at ``fraction`` of each engine's closed_max rate, for as long as closed_max.

    Still a closed loop: a connection sends only after its last answer, so when the server
    stalls the unsent requests are in no percentile (coordinated omission). perf/wrk/votes.lua
    counts the sends more than 1 ms after their slot and drops slots more than 1 s behind;
    the open-loop ``open_half`` scenario is the latency measurement without that gap.
    """
    if not 0 < fraction < 1:
        raise BenchError(f"--paced-fraction must be in (0, 1), not {fraction:g}")
    return Scenario(
        name=PACED_SCENARIO,
        title=f"closed loop paced at {fraction:g} of closed_max (wrk)",
        generator="wrk",
        duration_s=closed_max.duration_s,
        peers="engines",
        connections=closed_max.connections,
        paced_fraction_of_max=fraction,
    )
