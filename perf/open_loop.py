"""One open-loop run of a peer: perf/loadgen.py sends votes at scheduled times.

Latency counts from each request's intended send time, so a stalled server cannot hide
the requests it delayed (no coordinated omission). The generator runs as its own process
(``python -m perf.loadgen``); its CPU is sampled once it says every connection is open.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from perf import REPO_DIR, BenchError
from perf.closed_loop import cpu_json, cpu_us_per_created
from perf.cpu_sampling import CpuSampler
from perf.loadgen import READY_TAG, SUMMARY_TAG

if TYPE_CHECKING:
    from perf.peer_servers import Harness, RunningPeer

READY_TIMEOUT_S = 120.0  # loading a token file of millions of lines, opening connections
EXIT_MARGIN_S = 120.0  # beyond schedule + drain: writing the summary of exact latencies
# Commands that start the generator with its scheduling (bench_peers --generator-scheduling).
# A request's latency counts from its intended send time, so a generator that waits for the
# CPU when a send is due adds its wait to every latency: on 2 cores shared with a server,
# other work (load average 6-9), the ceiling's open_half run sent 15.7 ms late at p99 with
# normal scheduling, 6.2 ms at nice -10 and 2.9 ms under SCHED_FIFO (2026-12-02).
GENERATOR_SCHEDULING = {
    "fifo": ["chrt", "--fifo", "1"],
    "nice": ["nice", "-n", "-10"],
    "normal": [],
}


def usable_scheduling(name: str) -> str:
    """``name`` if its command runs here (chrt --fifo and nice -10 need CAP_SYS_NICE), else
    "normal", with a line that says so: the run goes on, its send lag shows the cost."""
    prefix = GENERATOR_SCHEDULING[name]
    if not prefix:
        return name
    try:
        done = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        problem = str(error)
    else:
        problem = "" if done.returncode == 0 and not done.stderr else done.stderr.strip()
    if not problem:
        return name
    print(f"  open-loop generator: `{shlex.join(prefix)}` is not permitted here ({problem}): "
          "normal scheduling; watch its send lag", flush=True)
    return "normal"


def run_open(h: Harness, peer: RunningPeer, tokens: Path, segments: list[tuple[float, float]],
             polls: list[str], connections: int) -> dict:  # fmt: skip
    profile = ",".join(f"{d:g}:{r:.3f}" for d, r in segments)
    argv = [sys.executable, "-m", "perf.loadgen", "--url", peer.base_url, "--tokens", str(tokens),
            "--profile", profile, "--connections", str(connections), "--polls", ",".join(polls),
            "--options", ",".join(h.set.options), "--drain-timeout-s", str(h.args.drain_timeout_s)]  # fmt: skip
    # chrt and nice exec the generator (same pid: its CPU is still sampled as the generator's).
    argv = [*GENERATOR_SCHEDULING[h.args.generator_scheduling], *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO_DIR)  # fmt: skip
    ready = threading.Event()
    stderr_lines: list[str] = []
    stdout_lines: list[str] = []

    def read_stderr() -> None:
        for line in proc.stderr:
            if line.startswith(READY_TAG):
                ready.set()
            else:
                stderr_lines.append(line)
        ready.set()

    readers = [threading.Thread(target=read_stderr, daemon=True),
               threading.Thread(target=lambda: stdout_lines.extend(proc.stdout), daemon=True)]  # fmt: skip
    for reader in readers:
        reader.start()
    sampler = None
    schedule_s = sum(d for d, _ in segments)
    try:
        if not ready.wait(READY_TIMEOUT_S):
            raise BenchError(f"loadgen did not get ready within {READY_TIMEOUT_S:g} s")
        if proc.poll() is None:
            sampler = CpuSampler({**peer.cpu_roots(), "generator": proc.pid}).start()
        proc.wait(timeout=schedule_s + h.args.drain_timeout_s + EXIT_MARGIN_S)
    finally:
        cpu = sampler.stop() if sampler is not None else None
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for reader in readers:
            reader.join(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    line = next((text for text in stdout_lines if text.startswith(SUMMARY_TAG)), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"loadgen exited {proc.returncode}: {shlex.join(argv)}\n"
                         f"{''.join(stderr_lines)[-3000:]}")  # fmt: skip
    summary = json.loads(line[len(SUMMARY_TAG) :])
    cpu_doc = cpu_json(cpu, "generator")
    summary.update(
        argv=shlex.join(argv[argv.index("-m") :]).replace(str(REPO_DIR) + "/", ""),
        generator_scheduling=h.args.generator_scheduling,
        in_flight_at_end=summary["unanswered"] + summary["connection_lost_pending"],
        cpu=cpu_doc,
        cpu_us_per_created=cpu_us_per_created(cpu_doc, summary["created_per_s"]),
    )
    return summary
