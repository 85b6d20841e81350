"""The conditions of a measurement: machine, cores, kernel, versions, filesystems, git state.

Printed before every benchmark and stored with its results, so a figure can always be
read beside the machine and the commit that produced it. Read-only: /proc, /etc and git
without optional locks (never contends with a commit someone makes meanwhile).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from perf import REPO_DIR


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
