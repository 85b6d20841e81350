"""Shared helpers for the benchmarks in perf/: conditions, servers, CPU, and wrk.

Everything here talks to 127.0.0.1 only, and every wait has a timeout. CPU is read from
/proc (no psutil), so a benchmark runs with nothing but the project's own dependencies
and Debian's wrk.

Units are in the names: ``*_s`` seconds, ``*_us`` microseconds, ``cpu_percent`` is
percent of one core (a process using two cores fully shows 200).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

PERF_DIR = Path(__file__).resolve().parent
REPO_DIR = PERF_DIR.parent
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
WRK_SUMMARY_TAG = "VOTES_WRK_SUMMARY "
WRK_READY_TAG = "VOTES_WRK_THREAD_READY "


class BenchError(RuntimeError):
    """A benchmark could not produce a valid measurement; the message says why."""


# --- conditions ---------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def wrk_version(wrk_path: str | None = None) -> str | None:
    wrk_path = wrk_path or shutil.which("wrk")
    if not wrk_path:
        return None
    # wrk prints its version line and usage on stdout and exits non-zero for -v.
    out = subprocess.run([wrk_path, "-v"], check=False, capture_output=True, text=True, timeout=10)
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip() if first else None


def filesystem_of(path: Path) -> dict:
    """The mount holding ``path``: mount point, filesystem type and device (/proc/mounts)."""
    real = os.path.realpath(path)
    best = {"mount_point": "/", "fs_type": "unknown", "device": "unknown"}
    best_len = -1
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount_point, fs_type = line.split()[:3]
        mount_point = mount_point.replace("\\040", " ")
        prefix = mount_point.rstrip("/") + "/"
        if (real == mount_point or real.startswith(prefix) or mount_point == "/") and len(
            mount_point
        ) > best_len:
            best = {"mount_point": mount_point, "fs_type": fs_type, "device": device}
            best_len = len(mount_point)
    return best


def describe_machine(extra_packages: tuple[str, ...] = ()) -> dict:
    """Machine, cores, kernel and versions: printed and stored with every result."""
    packages = ("granian", "uvloop", "msgspec", *extra_packages)
    try:
        cores_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cores_usable = os.cpu_count()
    mem_total_kib = None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_total_kib = int(line.split()[1])
    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cores_online": os.cpu_count(),
        "cores_usable": cores_usable,
        "memory_gib": round(mem_total_kib / 2**20, 1) if mem_total_kib else None,
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": {name: package_version(name) for name in packages},
        "wrk": wrk_version(),
        "git": git_state(),
        "load_average_at_start": list(os.getloadavg()),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def git_state() -> dict:
    """The commit and the changed files of the checkout being measured (read-only git)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                # No optional locks: never contend with a commit someone makes meanwhile.
                ["git", "--no-optional-locks", "-C", str(REPO_DIR), *args],
                check=False, capture_output=True, text=True, timeout=10,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit.strip() if commit else None,
        "changed_files": [line[3:] for line in status.splitlines()] if status else [],
    }


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def print_conditions(conditions: dict, parameters: dict) -> None:
    print("== conditions")
    for key, value in conditions.items():
        print(f"  {key:24} {value}")
    print("== parameters")
    for key, value in parameters.items():
        print(f"  {key:24} {value}")
    sys.stdout.flush()


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def merged_results(path: Path, benchmark: str, case_name: str, case: dict) -> dict:
    """The results file at `path` with this case replaced, so runs of other sizes stay beside it."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        document = {}
    cases = document.get("cases") if isinstance(document.get("cases"), dict) else {}
    cases[case_name] = case
    return {"benchmark": benchmark, "cases": dict(sorted(cases.items()))}


# --- network ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (racy, but fine for one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_request(
    method: str,
    url: str,
    body: bytes | dict | None = None,
    token: str | None = None,
    timeout_s: float = 5.0,
) -> tuple[int, bytes]:
    """One HTTP request; returns (status, body) for any status, raises on transport errors."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_for_http(
    url: str,
    timeout_s: float,
    expect_status: int = 200,
    server: ServerProcess | None = None,
) -> float:
    """Poll ``url`` until it answers ``expect_status``; returns the seconds it took.

    Raises BenchError, with the server's log tail when a server is given, if the server
    exits or the deadline passes first.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server is not None and server.proc.poll() is not None:
            raise BenchError(
                f"{server.name} exited with code {server.proc.returncode} before {url} "
                f"answered {expect_status}\n{server.log_tail()}"
            )
        try:
            status, _ = http_request("GET", url, timeout_s=1.0)
            if status == expect_status:
                return time.monotonic() - started
            last = f"status {status}"
        except (OSError, urllib.error.URLError) as error:
            last = repr(error)
        time.sleep(0.1)
    tail = f"\n{server.log_tail()}" if server is not None else ""
    raise BenchError(f"{url} did not answer {expect_status} within {timeout_s}s ({last}){tail}")


# --- server processes ---------------------------------------------------------------------


class ServerProcess:
    """A server started in its own process group, its output kept in a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO_DIR,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines_max: int = 40) -> str:
        self._log.flush()
        try:
            with open(self.log_path, "rb") as log:
                tail = deque(log, maxlen=lines_max)
        except OSError as error:
            return f"(no log: {error})"
        text = b"".join(tail).decode(errors="replace")
        return f"--- last {len(tail)} lines of {self.log_path} ---\n{text}--- end of log ---"

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGINT the group (Granian shuts down cleanly on it), then SIGTERM, then SIGKILL."""
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        # Workers left behind by a dead parent are still in the group: end them too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        return self.proc.returncode


# --- a private local stack ----------------------------------------------------------------

STACK_SCRIPT = REPO_DIR / "deploy" / "local" / "stack.py"
STACK_UP_TIMEOUT_S = 900.0  # the first `up` on a machine fetches the Kafka jars
STACK_DOWN_TIMEOUT_S = 120.0
STACK_QUERY_TIMEOUT_S = 60.0


class PrivateStack:
    """The real local stack (deploy/local/stack.py) owned by one benchmark run.

    It lives on its own base port, so it never touches a stack someone else is using.
    ``up`` starts it with ``--fresh``, which first stops and wipes whatever an earlier run
    left on that port, so the WAL topic starts empty; ``down`` stops it and wipes its
    state. Call ``down`` in a ``finally``: a stack left up keeps three JVMs running.
    Output of stack.py goes to ``log_path``.
    """

    def __init__(self, base_port: int, partitions: int, log_path: Path):
        self.base_port = base_port
        self.partitions = partitions
        self.log_path = log_path
        self.endpoints: dict = {}
        self.up_s: float | None = None
        self.started = False

    def _run(self, *args: str, timeout_s: float, ok_codes: tuple[int, ...] = (0,)) -> str:
        argv = [sys.executable, str(STACK_SCRIPT), *args, "--base-port", str(self.base_port)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            done = subprocess.run(
                argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                text=True, timeout=timeout_s, cwd=REPO_DIR, check=False,
            )  # fmt: skip
        if done.returncode not in ok_codes:
            with open(self.log_path, "rb") as log:
                tail = b"".join(deque(log, maxlen=30)).decode(errors="replace")
            raise BenchError(
                f"`stack.py {args[0]}` exited {done.returncode}; last lines of "
                f"{self.log_path}:\n{tail}"
            )
        return done.stdout

    def up(self) -> dict:
        """Start the stack with an empty WAL topic of ``partitions`` partitions."""
        started = time.monotonic()
        self.started = True  # from here on, down() has something to clean up
        out = self._run(
            "up", "--fresh", "--partitions", str(self.partitions), timeout_s=STACK_UP_TIMEOUT_S
        )
        self.up_s = time.monotonic() - started
        self.endpoints = json.loads(out)
        found = self.endpoints.get("kafka", {}).get("partitions")
        if found != self.partitions:
            raise BenchError(f"the stack came up with {found} partitions, not {self.partitions}")
        return self.endpoints

    def write_engine_config(self, path: Path) -> Path:
        """The `votes serve --config` TOML for this stack (Kafka WAL, S3 snapshots)."""
        path.write_text(self._run("engine-config", timeout_s=STACK_QUERY_TIMEOUT_S))
        return path

    def pids(self) -> list[int]:
        """Pids of the stack's running services (brokers, S3, Redis), for CPU sampling."""
        # `status` exits 3 when a service is not running; the caller sees fewer pids.
        out = self._run("status", "--json", timeout_s=STACK_QUERY_TIMEOUT_S, ok_codes=(0, 3))
        services = json.loads(out)["services"]
        return [service["pid"] for service in services.values() if service["alive"]]

    def down(self) -> float:
        """Stop the stack and delete its state; returns the seconds it took."""
        started = time.monotonic()
        self._run("down", "--wipe", timeout_s=STACK_DOWN_TIMEOUT_S)
        self.started = False
        return time.monotonic() - started


# --- CPU sampling -------------------------------------------------------------------------


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


# --- wrk ----------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """Path of wrk, installing Debian's package (apt-get update first) if it is missing."""
    path = shutil.which("wrk")
    if path:
        return path
    if not shutil.which("apt-get"):
        raise BenchError("wrk is not installed and apt-get is not available to install it")
    print("wrk not found: installing it with apt-get (update, then install -y wrk)", flush=True)
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    path = shutil.which("wrk")
    if not path:
        raise BenchError("apt-get installed wrk but it is not on PATH")
    return path


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
    output: str = ""

    @property
    def created(self) -> int:
        return self.statuses.get(201, 0)

    @property
    def created_per_s(self) -> float:
        return self.created / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def server_cpu_us_per_created(self) -> float | None:
        """Server CPU time per 201, in µs: CPU contention shifts it far less than it
        shifts the rate, since a starved server mostly loses time, not work per vote."""
        if self.cpu is None or not self.created:
            return None
        return self.cpu.cpu_percent["server"] / 100 * 1e6 / self.created_per_s

    @property
    def not_created(self) -> dict[int, int]:
        return {status: n for status, n in sorted(self.statuses.items()) if status != 201}

    def to_json(self) -> dict:
        document = asdict(self)
        document.pop("output")
        document["statuses"] = {str(k): v for k, v in sorted(self.statuses.items())}
        document["created"] = self.created
        document["created_per_s"] = round(self.created_per_s, 1)
        cost = self.server_cpu_us_per_created
        document["server_cpu_us_per_created"] = round(cost, 2) if cost is not None else None
        return document


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
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
        text=True,
        errors="replace",
    )
    stdout_lines: list[str] = []
    stderr_lines: list[str] = []
    ready = threading.Event()
    readers = [
        threading.Thread(target=_drain, args=(proc.stdout, stdout_lines, None, 0), daemon=True),
        threading.Thread(
            target=_drain, args=(proc.stderr, stderr_lines, ready, parameters.threads), daemon=True
        ),
    ]
    for reader in readers:
        reader.start()
    sampler = None
    try:
        if not ready.wait(load_timeout_s):
            raise BenchError(f"wrk threads did not load their tokens within {load_timeout_s:g}s")
        if cpu_roots is not None and proc.poll() is None:
            sampler = CpuSampler({**cpu_roots, "wrk": proc.pid}).start()
        deadline_s = parameters.duration_s + parameters.timeout_s + 60
        try:
            proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"wrk did not finish within {deadline_s:g}s: {' '.join(argv)}")
    finally:
        cpu = sampler.stop() if sampler is not None else None
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for reader in readers:
            reader.join(timeout=10)
    stdout, stderr = "".join(stdout_lines), "".join(stderr_lines)
    output = stdout + (f"\n[stderr]\n{stderr}" if stderr.strip() else "")
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with {proc.returncode}: {' '.join(argv)}\n{output}")
    if stderr.strip():
        # The Lua script's errors (bad token file, ...) go to stderr while wrk carries on.
        raise BenchError(f"wrk reported errors: {' '.join(argv)}\n{output}")
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
        output=output,
    )


def format_us(value_us: float | None) -> str:
    """A latency for a table: µs below 1 ms, ms below 1 s, else s."""
    if value_us is None:
        return "-"
    if value_us < 1000:
        return f"{value_us:.0f}us"
    if value_us < 1e6:
        return f"{value_us / 1e3:.2f}ms"
    return f"{value_us / 1e6:.2f}s"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    line = "  ".join(f"{h:>{w}}" for h, w in zip(headers, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(f"{c!s:>{w}}" for c, w in zip(row, widths)))
    sys.stdout.flush()
