"""CPU time of process trees, sampled from /proc while a generator sends load.

``cpu_percent`` is percent of one core (a process using two cores fully shows 200). CPU is
read from /proc (no psutil); descendants are re-discovered at every sample, so workers
spawned late still count.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, utime+stime ticks) of one process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def process_tree(root_pids: int | list[int]) -> dict[int, int]:
    """{pid: cpu ticks} for the root pid(s) and all their descendants alive now."""
    roots = {root_pids} if isinstance(root_pids, int) else set(root_pids)
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is not None:
            parents[int(entry.name)], ticks[int(entry.name)] = stat
    tree = roots & ticks.keys()
    if not tree:
        return {}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return {pid: ticks[pid] for pid in tree}


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


@dataclass
class CpuUsage:
    cpu_percent: dict[str, float] = field(default_factory=dict)
    cpu_percent_peak: dict[str, float] = field(default_factory=dict)
    machine_busy_percent: float = 0.0
    machine_capacity_percent: float = 0.0
    interval_s: float = 0.0
    samples: int = 0


class CpuSampler:
    """Samples the CPU time of named process trees in a background thread.

    ``cpu_percent[name]`` is the CPU the tree used over the whole window, in percent of
    one core; ``cpu_percent_peak`` is the highest over any one sampling interval.
    Descendants are re-discovered at every sample, so workers spawned late still count.
    A name may stand for several roots (a list of pids), such as the processes of a stack.
    """

    def __init__(self, roots: dict[str, int | list[int]], interval_s: float = 0.5):
        self.roots = roots
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._first: dict[str, dict[int, int]] = {}
        self._last: dict[str, dict[int, int]] = {}
        self._peak: dict[str, float] = {name: 0.0 for name in roots}
        self._samples = 0
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _sample(self) -> dict[str, dict[int, int]]:
        return {name: process_tree(pid) for name, pid in self.roots.items()}

    def _record(self, sample: dict[str, dict[int, int]], elapsed_s: float) -> None:
        for name, ticks in sample.items():
            last = self._last.get(name, {})
            used = sum(t - last.get(pid, self._first[name].get(pid, 0)) for pid, t in ticks.items())
            if elapsed_s > 0 and last:
                percent = 100.0 * used / CLOCK_TICKS_PER_S / elapsed_s
                self._peak[name] = max(self._peak[name], percent)
            merged = dict(last)
            merged.update(ticks)
            self._last[name] = merged
        self._samples += 1

    def _run(self) -> None:
        previous = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            self._record(self._sample(), now - previous)
            previous = now

    def start(self) -> CpuSampler:
        self._first = self._sample()
        self._last = {name: dict(ticks) for name, ticks in self._first.items()}
        self._machine_first = _machine_ticks()
        self._started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> CpuUsage:
        self._stop.set()
        self._thread.join()
        self._record(self._sample(), 0.0)
        window_s = time.monotonic() - self._started
        busy_first, total_first = self._machine_first
        busy_last, total_last = _machine_ticks()
        cores = os.cpu_count() or 1
        usage = CpuUsage(
            interval_s=round(window_s, 3),
            samples=self._samples,
            machine_capacity_percent=100.0 * cores,
            machine_busy_percent=round(
                100.0 * cores * (busy_last - busy_first) / max(1, total_last - total_first), 1
            ),
        )
        for name in self.roots:
            first, last = self._first[name], self._last[name]
            used = sum(t - first.get(pid, 0) for pid, t in last.items())
            usage.cpu_percent[name] = round(100.0 * used / CLOCK_TICKS_PER_S / window_s, 1)
            usage.cpu_percent_peak[name] = round(self._peak[name], 1)
        return usage
