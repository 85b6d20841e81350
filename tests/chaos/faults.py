"""The fault log: every fault a schedule injects, with the load it hit.

A fault counts only if it hit requests in flight: `fire` waits (bounded) for an open
request, reads the number of open requests immediately before the action runs, and records
it; the checker fails a run with a fault that hit none. Blocking actions (signals are quick,
stopping a broker is not) run in a thread so the load keeps going while they act.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.chaos.load import LoadClient

IN_FLIGHT_WAIT_S = 5.0


@dataclass(slots=True)
class FaultEvent:
    name: str
    detail: str
    at_s: float  # monotonic, when the action started
    in_flight: int
    requests_before: int  # requests that had ended when it fired
    took_s: float = 0.0


@dataclass
class FaultLog:
    load: LoadClient
    events: list[FaultEvent] = field(default_factory=list)
    started_s: float = field(default_factory=time.monotonic)

    async def fire(self, name: str, action: Callable[[], object], detail: str = "",
                   *, blocking: bool = False) -> object:
        """Run `action` (sync, async, or blocking with blocking=True) once requests are open."""
        await self.load.wait_for_in_flight(IN_FLIGHT_WAIT_S)
        event = FaultEvent(name, detail, time.monotonic(), self.load.in_flight,
                           len(self.load.ledger.requests))
        self.events.append(event)
        if blocking:
            result = await asyncio.to_thread(action)
        else:
            result = action()
            if inspect.isawaitable(result):
                result = await result
        event.took_s = time.monotonic() - event.at_s
        print(f"[chaos] t={event.at_s - self.started_s:7.2f}s fault {name} {detail} "
              f"(in flight {event.in_flight}, {event.requests_before} requests so far, "
              f"took {event.took_s:.2f}s)", flush=True)
        return result

    def note(self, text: str) -> None:
        """A line in the run's log that is not a fault (a heal, a restart, a check)."""
        print(f"[chaos] t={time.monotonic() - self.started_s:7.2f}s {text}", flush=True)

    @property
    def injected(self) -> int:
        return len(self.events)

    def without_load(self) -> list[FaultEvent]:
        return [event for event in self.events if event.in_flight <= 0]
