"""A private PostgreSQL cluster on 127.0.0.1, for the perf harness's PostgreSQL peers.

Nothing else in the project uses PostgreSQL: it is the "what a team would build instead"
baseline in perf/. This script installs Debian's ``postgresql`` package when its binaries
are missing (apt-get update, then install; root only), creates a cluster with ``initdb``
in a directory of the caller's choosing (so the caller can put it on the same filesystem
as the engine's data), and starts it with ``pg_ctl`` on a private port, listening on
127.0.0.1 only, with its Unix socket inside the data directory.

Durability settings are explicit, not left to defaults: ``fsync=on``,
``synchronous_commit=on``, ``full_page_writes=on``; a commit returns only after its WAL is
flushed to disk. Authentication is ``trust`` for the ``postgres`` user from 127.0.0.1:
the cluster is private to one benchmark run on one machine and is wiped afterwards.

PostgreSQL refuses to run as root, so when run as root the cluster's files belong to the
``postgres`` system user (created by the Debian package) and every server command runs as
that user.

    python -m deploy.local.postgres up --data-dir /var/tmp/pg --port 19950   # prints JSON
    python -m deploy.local.postgres createdb --data-dir /var/tmp/pg --port 19950 NAME
    python -m deploy.local.postgres down --data-dir /var/tmp/pg [--wipe]

Python API: ``PostgresCluster(data_dir, port).up()`` → dict, ``.createdb(name)``,
``.query(sql, database)``, ``.postmaster_pid()``, ``.down(wipe=False)``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

from deploy.local.installer import InstallError, ensure_debian_package

POSTGRES_PACKAGE = "postgresql"
SERVER_USER = "postgres"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 60
QUERY_TIMEOUT_S = 60
# Settings written into postgresql.conf; each one is shown back (SHOW) by `up`.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "wal_sync_method": "fdatasync",
    "shared_buffers": "'256MB'",
    "max_connections": "200",
    "logging_collector": "off",
}
SHOWN = ("server_version", "fsync", "synchronous_commit", "full_page_writes",
         "wal_sync_method", "shared_buffers", "max_connections", "commit_delay")  # fmt: skip


class PostgresError(RuntimeError):
    """The cluster could not be installed, created, started or stopped; says why."""


def _log(message: str) -> None:
    print(f"[postgres] {message}", file=sys.stderr, flush=True)


def _find_initdb() -> str | None:
    bin_dir = find_bin_dir()
    return str(bin_dir / "initdb") if bin_dir is not None else None


def find_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb, or initdb's PATH dir."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parent.parent.name) if Path(path).parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def ensure_postgres() -> Path:
    """The server binaries' directory, installing Debian's postgresql package if needed."""
    try:
        # initdb is not on PATH in Debian's layout: look in the versioned bin directory.
        initdb = ensure_debian_package("initdb", POSTGRES_PACKAGE, find=_find_initdb, log=_log)
    except InstallError as error:
        raise PostgresError(str(error)) from error
    return Path(initdb).parent


class PostgresCluster:
    """One private cluster: its data directory, port and server binaries."""

    def __init__(self, data_dir: Path, port: int, bin_dir: Path | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.bin_dir = bin_dir or ensure_postgres()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                self.server_user = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise PostgresError(f"running as root needs the {SERVER_USER!r} user, which "
                                    "Debian's postgresql package creates") from None  # fmt: skip
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    # --- helpers --------------------------------------------------------------------------

    def _run(self, tool: str, *args: str, timeout_s: float, check: bool = True):
        argv = [str(self.bin_dir / tool), *args]
        kwargs = {}
        if self.as_root:
            kwargs = {"user": self.server_user.pw_uid, "group": self.server_user.pw_gid,
                      "extra_groups": []}  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, check=False, cwd="/", **kwargs)  # fmt: skip
        if check and done.returncode != 0:
            raise PostgresError(f"`{' '.join(argv)}` exited {done.returncode}:\n"
                                f"{done.stdout[-3000:]}{done.stderr[-3000:]}{self._log_tail()}")  # fmt: skip
        return done

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(text)

    def _chown(self, path: Path) -> None:
        if self.as_root:
            os.chown(path, self.server_user.pw_uid, self.server_user.pw_gid)

    @property
    def dsn(self) -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/postgres"

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    # --- lifecycle --------------------------------------------------------------------------

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data_dir), "status",
                         timeout_s=QUERY_TIMEOUT_S, check=False).returncode == 0  # fmt: skip

    def init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.data_dir)
        os.chmod(self.data_dir, 0o700)
        self._run("initdb", "-D", str(self.data_dir), "--username", SERVER_USER, "--auth", "trust",
                  "--encoding", "UTF8", "--locale", "C", timeout_s=START_TIMEOUT_S)  # fmt: skip
        settings = {**SETTINGS, "port": str(self.port),
                    "unix_socket_directories": f"'{self.data_dir}'"}  # fmt: skip
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# perf harness: a private cluster on 127.0.0.1 (deploy/local/postgres.py)\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def start(self) -> None:
        self.log_path.touch()
        self._chown(self.log_path)
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-w",
                  "-t", str(START_TIMEOUT_S), "start", timeout_s=START_TIMEOUT_S + 10)  # fmt: skip

    def up(self) -> dict:
        """Create the cluster if needed, start it if it is not running; its description."""
        started = time.monotonic()
        if not self.initialised():
            self.init()
        if not self.running():
            self.start()
        return {**self.describe(), "up_s": round(time.monotonic() - started, 2)}

    def down(self, wipe: bool = False) -> None:
        if self.initialised() and self.running():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w",
                      "-t", str(STOP_TIMEOUT_S), "stop", timeout_s=STOP_TIMEOUT_S + 10)  # fmt: skip
        if wipe:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)

    # --- queries ---------------------------------------------------------------------------

    def query(self, sql: str, database: str = "postgres") -> str:
        done = self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", SERVER_USER,
                         "-d", database, "-v", "ON_ERROR_STOP=1", "-Atc", sql,
                         timeout_s=QUERY_TIMEOUT_S)  # fmt: skip
        return done.stdout.strip()

    def createdb(self, name: str, fresh: bool = True) -> str:
        """Create database ``name`` (dropping an older one when ``fresh``); its DSN."""
        if not name.replace("_", "").isalnum():
            raise PostgresError(f"database names here are [A-Za-z0-9_]: {name!r}")
        if fresh:
            self.query(f"DROP DATABASE IF EXISTS {name}")
        self.query(f"CREATE DATABASE {name}")
        return self.dsn_for(name)

    def settings(self) -> dict:
        return {name: self.query(f"SHOW {name}") for name in SHOWN}

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def describe(self) -> dict:
        return {
            "dsn": self.dsn,
            "port": self.port,
            "data_dir": str(self.data_dir),
            "bin_dir": str(self.bin_dir),
            "pid": self.postmaster_pid(),
            "settings": self.settings(),
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "down", "status", "createdb"))
    parser.add_argument("name", nargs="?", help="database name (createdb)")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=19950)
    parser.add_argument("--wipe", action="store_true", help="down: delete the data directory")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cluster = PostgresCluster(args.data_dir, args.port)
        if args.command == "up":
            print(json.dumps(cluster.up(), indent=2))
        elif args.command == "down":
            cluster.down(wipe=args.wipe)
        elif args.command == "status":
            running = cluster.initialised() and cluster.running()
            print(json.dumps({"running": running, **(cluster.describe() if running else {})}, indent=2))
            return 0 if running else 3
        elif args.command == "createdb":
            if not args.name:
                raise PostgresError("createdb needs a database name")
            print(cluster.createdb(args.name))
    except (PostgresError, subprocess.TimeoutExpired, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
