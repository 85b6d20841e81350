"""wrk, the closed-loop generator: installing it, running it with perf/wrk/votes.lua, parsing it.

Only the Lua script's summary line (statuses, latency histogram, tokens used) is trusted for
counts; wrk's own text output is kept beside it for its Requests/sec and percentiles.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local.installer import ensure_debian_package
from perf import BenchError
from perf.cpu_sampling import CpuSampler, CpuUsage

WRK_SUMMARY_TAG = "VOTES_WRK_SUMMARY "
WRK_READY_TAG = "VOTES_WRK_THREAD_READY "


def ensure_wrk() -> str:
    """Path of wrk, installing Debian's package through the project's one installer."""
    return ensure_debian_package("wrk", "wrk")


@dataclass
class WrkParameters:
    threads: int
    connections: int
    duration_s: float
    timeout_s: float

    def argv(self) -> list[str]:
        return [
            f"-t{self.threads}",
            f"-c{self.connections}",
            f"-d{self.duration_s:g}s",
            f"--timeout={self.timeout_s:g}s",
            "--latency",
        ]


@dataclass
class WrkResult:
    statuses: dict[int, int]
    latency_us: dict[str, float]
    duration_s: float
    requests: int
    errors: dict[str, int]
    exhausted: bool
    tokens_loaded: int
    votes_sent: int
    sent_after_exhaustion: int
    threads: int
    text_requests_per_s: float | None
    text_latency_us: dict[str, float]
    bodies_not_created: dict[str, str] = field(default_factory=dict)
    cpu: CpuUsage | None = None
    # Paced runs only (VOTES_RATE_PER_S): sends, late sends and lateness, dropped slots.
    pacing: dict | None = None
    # Per-second counts (VOTES_SERIES=1), for the plots over time.
    series: dict | None = None
    output: str = ""

    @property
    def created(self) -> int:
        return self.statuses.get(201, 0)

    @property
    def created_per_s(self) -> float:
        return self.created / self.duration_s if self.duration_s > 0 else 0.0


_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _duration_us(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNIT_US[match.group(2)]


def parse_wrk_text(output: str) -> tuple[float | None, dict[str, float]]:
    """Requests/sec and the --latency distribution from wrk's human-readable output."""
    rate = None
    match = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    if match:
        rate = float(match.group(1))
    latency: dict[str, float] = {}
    block = output.split("Latency Distribution", 1)
    if len(block) == 2:
        for percent, value in re.findall(r"^\s+([\d.]+)%\s+(\S+)\s*$", block[1], re.MULTILINE):
            latency[f"p{float(percent):g}"] = _duration_us(value)
    return rate, latency


def parse_wrk_summary(output: str) -> dict:
    """The JSON line that perf/wrk/votes.lua prints from done()."""
    for line in output.splitlines():
        if line.startswith(WRK_SUMMARY_TAG):
            return json.loads(line[len(WRK_SUMMARY_TAG) :])
    raise BenchError(f"wrk printed no {WRK_SUMMARY_TAG.strip()} line:\n{output}")


def _drain(stream, sink: list[str], ready: threading.Event | None, ready_count: int) -> None:
    """Read a pipe to the end; set ``ready`` once ``ready_count`` threads said so."""
    seen = 0
    for line in stream:
        if ready is not None and line.startswith(WRK_READY_TAG):
            seen += 1
            if seen >= ready_count:
                ready.set()
            continue
        sink.append(line)
    if ready is not None:
        ready.set()


class _WrkProcess:
    """A running wrk with its stdout and stderr drained by threads (never a full pipe)."""

    def __init__(self, argv: list[str], env: dict[str, str], threads: int):
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, text=True, errors="replace")  # fmt: skip
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        # Set once every wrk thread has loaded its tokens (or wrk's stderr closed).
        self.ready = threading.Event()
        self.readers = [
            threading.Thread(target=_drain, args=(self.proc.stdout, self.stdout_lines, None, 0),
                             daemon=True),
            threading.Thread(target=_drain, args=(self.proc.stderr, self.stderr_lines,
                                                  self.ready, threads), daemon=True),
        ]  # fmt: skip
        for reader in self.readers:
            reader.start()

    def end(self) -> tuple[str, str]:
        """Kill wrk if it still runs, join the readers; (stdout, stderr)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for reader in self.readers:
            reader.join(timeout=10)
        return "".join(self.stdout_lines), "".join(self.stderr_lines)


def run_wrk(
    url: str,
    script: Path,
    parameters: WrkParameters,
    env: dict[str, str],
    cpu_roots: dict[str, int | list[int]] | None = None,
    wrk_path: str = "wrk",
    load_timeout_s: float = 300.0,
) -> WrkResult:
    """Run wrk once against ``url`` and return its parsed results.

    ``env`` is added to this process's environment for the Lua script. When
    ``cpu_roots`` is given ({name: pid or [pids]}), the CPU of those process trees and of wrk
    itself (under the name "wrk") is sampled while wrk sends load: sampling starts when
    every wrk thread has loaded its tokens, so loading is not charged to the generator.
    """
    argv = [wrk_path, *parameters.argv(), "-s", str(script), url]
    full_env = {**os.environ, **env, "VOTES_WRK_THREADS": str(parameters.threads)}
    wrk = _WrkProcess(argv, full_env, parameters.threads)
    sampler = None
    try:
        if not wrk.ready.wait(load_timeout_s):
            raise BenchError(f"wrk threads did not load their tokens within {load_timeout_s:g}s")
        if cpu_roots is not None and wrk.proc.poll() is None:
            sampler = CpuSampler({**cpu_roots, "wrk": wrk.proc.pid}).start()
        deadline_s = parameters.duration_s + parameters.timeout_s + 60
        try:
            wrk.proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"wrk did not finish within {deadline_s:g}s: {' '.join(argv)}")
    finally:
        cpu = sampler.stop() if sampler is not None else None
        stdout, stderr = wrk.end()
    output = stdout + (f"\n[stderr]\n{stderr}" if stderr.strip() else "")
    if wrk.proc.returncode != 0:
        raise BenchError(f"wrk exited with {wrk.proc.returncode}: {' '.join(argv)}\n{output}")
    if stderr.strip():
        # The Lua script's errors (bad token file, ...) go to stderr while wrk carries on.
        raise BenchError(f"wrk reported errors: {' '.join(argv)}\n{output}")
    return wrk_result(stdout, output, parameters, cpu)


def wrk_result(stdout: str, output: str, parameters: WrkParameters, cpu: CpuUsage | None):
    """The WrkResult of one finished run, from the Lua summary line and wrk's text."""
    summary = parse_wrk_summary(stdout)
    text_rate, text_latency = parse_wrk_text(stdout)
    if summary["threads"] != parameters.threads:
        raise BenchError(f"wrk ran {summary['threads']} threads, expected {parameters.threads}")
    return WrkResult(
        statuses={int(k): v for k, v in summary["statuses"].items()},
        latency_us={k: float(v) for k, v in summary["latency_us"].items()},
        duration_s=summary["duration_us"] / 1e6,
        requests=summary["requests"],
        errors=summary["errors"],
        exhausted=summary["exhausted"],
        tokens_loaded=summary["tokens_loaded"],
        votes_sent=summary["votes_sent"],
        sent_after_exhaustion=summary["sent_after_exhaustion"],
        threads=summary["threads"],
        text_requests_per_s=text_rate,
        text_latency_us=text_latency,
        bodies_not_created=summary.get("samples", {}),
        cpu=cpu,
        pacing=summary.get("pacing"),
        series=summary.get("series"),
        output=output,
    )
