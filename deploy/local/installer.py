"""Installs a missing Debian package with apt-get, once, for the local stack and the perf harness.

Every service the project runs on these machines comes from a package registry (see
deploy/local/README.md); this is the one place that turns "command not found" into
`apt-get update` + `apt-get install -y PACKAGE`, so a fresh machine and CI get the same
tools without a hand-installed step. Only root may install; anyone else gets a message that
says which package to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

APT_TIMEOUT_S = 900.0  # one apt-get step on a slow mirror; a hung apt-get fails after this


class InstallError(RuntimeError):
    """A package could not be installed, or its command is still missing afterwards."""


def ensure_debian_package(
    command: str,
    package: str,
    *,
    find: Callable[[], str | None] | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """The path of `command`, installing Debian's `package` first when it is missing.

    `find` locates the command when it is not on PATH (for example PostgreSQL's versioned
    bin directory); by default `shutil.which(command)`.
    """
    locate = find or (lambda: shutil.which(command))
    found = locate()
    if found:
        return found
    if os.geteuid() != 0:
        raise InstallError(f"{command} is not installed and this is not root: "
                           f"apt-get install -y {package}")
    log(f"{command} not found: apt-get update && apt-get install -y {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=APT_TIMEOUT_S, env=env, check=False)
        if done.returncode != 0:
            raise InstallError(f"{' '.join(argv)} failed:\n{done.stdout[-2000:]}"
                               f"{done.stderr[-2000:]}")
    found = locate()
    if not found:
        raise InstallError(f"apt-get installed {package} but {command} is still missing")
    return found
