"""The fan-out bench's Go subscriber client (perf/sse_client/main.go): finding Go and building it.

The client is built into build/sse_client from the bench, once per change of its source
(the binary is rebuilt when main.go or go.mod is newer). It uses the standard library only,
so the build needs no module download; Go comes from PATH, /usr/local/go, or Debian's
golang-go through the project's one installer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from deploy.local.installer import ensure_debian_package
from perf import REPO_DIR, BenchError

SOURCE_DIR = REPO_DIR / "perf" / "sse_client"
BINARY = REPO_DIR / "build" / "sse_client"
GO_LOCATIONS = ("/usr/local/go/bin/go", "/usr/lib/go/bin/go")
BUILD_TIMEOUT_S = 300


def ensure_go() -> str:
    def find() -> str | None:
        return shutil.which("go") or next((path for path in GO_LOCATIONS if os.access(path, os.X_OK)), None)

    return ensure_debian_package("go", "golang-go", find=find)


def ensure_sse_client() -> Path:
    """Path of the built client, building it when missing or older than its source."""
    sources = [SOURCE_DIR / "main.go", SOURCE_DIR / "go.mod"]
    newest = max(path.stat().st_mtime for path in sources)
    if BINARY.exists() and BINARY.stat().st_mtime >= newest:
        return BINARY
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "GOFLAGS": "-buildvcs=false", "CGO_ENABLED": "0"}
    done = subprocess.run([ensure_go(), "build", "-o", str(BINARY), "."], cwd=SOURCE_DIR,
                          env=environment, capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise BenchError(f"go build of {SOURCE_DIR} failed:\n{done.stderr[-2000:]}")
    return BINARY


def go_version() -> str:
    done = subprocess.run([ensure_go(), "version"], capture_output=True, text=True, timeout=30,
                          check=False)
    return done.stdout.strip()
