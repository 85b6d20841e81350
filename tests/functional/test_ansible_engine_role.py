"""The Ansible `engine` role, applied for real: deploy/ansible/site.yml with the `local`
inventory on localhost (connection local) into a temporary prefix.

The role installs a wheel of this checkout into `<prefix>/<version>` with `<prefix>/current`
pointing at it, templates the TOML config (validated by the engine's own loader) and the
systemd unit, and, with `votes_service_supervisor: direct` (no systemd in CI), runs the unit's own
ExecStartPre and ExecStart in the background. The engine's keys come the local inventory's
way, from local files (`$VOTES_LOCAL_SECRETS_DIR/engine-keys/*.json`), as production's come
from Secrets Manager. The test then talks to that engine: /healthz, a poll created with an
admin token from the CLI in the prefix, one vote (201) with a voter token signed by the
distributed keys outside the prefix, the vote in /metrics. A broken role (a config template
the engine refuses, a unit systemd cannot parse, a missing task, a wrong path) fails the
playbook or one of these checks.

Slow (a wheel build and a virtualenv install, ~1-2 min); the Ansible tooling is installed by
`deploy/check.sh install` (the `deploy` extra), like the lint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.http_client import ValidatingClient

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "deploy" / "ansible"
VENV_BIN = Path(sys.executable).parent
INSTALL_TIMEOUT_S = 900.0
WHEEL_TIMEOUT_S = 600.0
PLAYBOOK_TIMEOUT_S = 600.0
CLI_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 30.0
OUTPUT_TAIL_CHARS = 6000
NEWER_SYSTEMD_KEYS = ("RestartSteps", "RestartMaxDelaySec")
ENSURE_KEYS_CODE = ("import sys; from pathlib import Path; from engine.keys import ensure_keys; "
                    "ensure_keys(Path(sys.argv[1]))")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _run(argv: list[str], timeout_s: float, **kwargs) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                               check=False, stdin=subprocess.DEVNULL, **kwargs)
    if completed.returncode != 0:
        pytest.fail(f"`{' '.join(argv)}` exited {completed.returncode}\n"
                    f"stdout: {completed.stdout[-OUTPUT_TAIL_CHARS:]}\n"
                    f"stderr: {completed.stderr[-OUTPUT_TAIL_CHARS:]}")
    return completed


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _base_python() -> str:
    """The interpreter this venv was made from: the role makes its own venv with it."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


@pytest.fixture(scope="module")
def engine_wheel(tmp_path_factory) -> Path:
    _run(["bash", str(REPO / "deploy" / "check.sh"), "install"], INSTALL_TIMEOUT_S)
    wheels = tmp_path_factory.mktemp("wheels")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
         WHEEL_TIMEOUT_S)
    (wheel,) = wheels.glob("votes_engine-*.whl")
    return wheel


def _stop(pid_file: Path) -> None:
    """SIGTERM the engine's process group (setsid made it the leader), then SIGKILL."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().strip())
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    pytest.fail(f"the engine (pid {pid}) did not stop within {STOP_TIMEOUT_S} s of SIGTERM")


def _local_secrets(secrets_dir: Path) -> Path:
    """Key files made by the engine's own code in a scratch data dir, laid out as the local
    inventory reads them; returns that scratch data dir (for minting tokens outside the
    prefix)."""
    issuer_dir = secrets_dir / "issuer-data"
    _run([sys.executable, "-c", ENSURE_KEYS_CODE, str(issuer_dir)], CLI_TIMEOUT_S)
    keys_dir = secrets_dir / "engine-keys"
    keys_dir.mkdir(parents=True)
    for key_file in (issuer_dir / "keys").glob("*.json"):
        (keys_dir / key_file.name).write_bytes(key_file.read_bytes())
    return issuer_dir


def _votes(prefix: Path, *args: str) -> str:
    return _run([str(prefix / "current" / "bin" / "votes"), *args], CLI_TIMEOUT_S).stdout.strip()


def test_engine_role_installs_configures_and_starts_a_serving_engine(engine_wheel, tmp_path):
    prefix = tmp_path / "opt-votes"
    port = _free_port()
    extra_vars = {
        "votes_service_version": _wheel_version(engine_wheel),
        "votes_service_prefix_root": str(prefix),
        "votes_service_wheel_path": str(engine_wheel),
        "votes_service_python": _base_python(),
        "engine_port": port,
        "engine_shards": 4,
    }
    environment = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
                   "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                   "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"),
                   "VOTES_LOCAL_SECRETS_DIR": str(tmp_path / "secrets")}
    issuer_dir = _local_secrets(tmp_path / "secrets")
    pid_file = prefix / "run" / "votes-engine.pid"
    try:
        _run([str(VENV_BIN / "ansible-playbook"), "-i", "inventories/local/hosts.yml",
              "site.yml", "-e", json.dumps(extra_vars)],
             PLAYBOOK_TIMEOUT_S, cwd=ANSIBLE_DIR, env=environment)
        _check_layout(prefix, engine_wheel)
        _check_keys(prefix, tmp_path / "secrets" / "engine-keys")
        _check_running_from_prefix(prefix, pid_file)
        _check_serving(prefix, port, issuer_dir)
    finally:
        _stop(pid_file)


def _wheel_version(engine_wheel: Path) -> str:
    return engine_wheel.name.split("-")[1]


def _check_layout(prefix: Path, engine_wheel: Path) -> None:
    version = _wheel_version(engine_wheel)
    assert (prefix / "current").resolve() == (prefix / version).resolve()
    assert (prefix / version / "wheels" / engine_wheel.name).is_file()
    unit = (prefix / "etc" / "votes-engine.service").read_text()
    for line in ("Restart=always", "StartLimitIntervalSec=", "StartLimitBurst=", "ExecStartPre=",
                 f"ExecStart={prefix}/current/bin/votes serve --config {prefix}/etc/engine.toml"):
        assert line in unit, f"the unit lacks {line!r}:\n{unit}"
    _verify_unit(prefix / "etc" / "votes-engine.service")
    config = (prefix / "etc" / "engine.toml").read_text()
    assert 'data_dir = "' + str(prefix / "data") + '"' in config, config


def _verify_unit(unit_file: Path) -> None:
    """systemd's own parser on the unit (its commands exist: they are in the prefix). Not
    every machine has systemd-analyze; the substring checks above hold everywhere."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    verified = subprocess.run([analyze, "verify", str(unit_file)], capture_output=True,
                              text=True, timeout=CLI_TIMEOUT_S, check=False)
    output = verified.stdout + verified.stderr
    assert verified.returncode == 0, output
    # systemd only warns about a value it cannot parse ("..., ignoring"); the keys a systemd
    # older than 254 does not know are the one expected warning.
    ignored = [line for line in output.splitlines() if "ignoring" in line
               and not any(key in line for key in NEWER_SYSTEMD_KEYS)]
    assert not ignored, output


def _check_keys(prefix: Path, secret_keys_dir: Path) -> None:
    """The role wrote every local secret key file, byte for byte, readable by its owner only."""
    secret_files = sorted(secret_keys_dir.glob("*.json"))
    assert secret_files
    for secret_file in secret_files:
        installed = prefix / "data" / "keys" / secret_file.name
        assert installed.read_bytes() == secret_file.read_bytes(), installed
        assert installed.stat().st_mode & 0o777 == 0o600, oct(installed.stat().st_mode)


def _check_running_from_prefix(prefix: Path, pid_file: Path) -> None:
    pid = int(pid_file.read_text().strip())
    command_line = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert str(prefix / "current" / "bin" / "votes").encode() in command_line, command_line


def _check_serving(prefix: Path, port: int, issuer_dir: Path) -> None:
    admin = _votes(prefix, "admin-token", "--data-dir", str(prefix / "data"))
    # Minted outside the prefix with the secret keys: the engine must be using those.
    (voter,) = _votes(prefix, "token", "--data-dir", str(issuer_dir), "--voter", "7").split()
    with ValidatingClient(base_url=f"http://127.0.0.1:{port}", timeout=HTTP_TIMEOUT_S) as client:
        assert client.get("/healthz").status_code == 200
        created = client.post("/v1/polls", json={"id": "ops", "options": ["yes", "no"]},
                              headers={"authorization": f"Bearer {admin}"})
        assert created.status_code == 201, created.text
        vote = client.post("/v1/polls/ops/votes", json={"option": "yes"},
                           headers={"authorization": f"Bearer {voter}"})
        assert vote.status_code == 201, vote.text
        results = client.get("/v1/polls/ops/results")
        assert results.status_code == 200 and results.json()["total"] == 1, results.text
        metrics = client.get("/metrics").text
    counted = [line for line in metrics.splitlines()
               if line.startswith("vote_requests_total{") and 'route="vote"' in line
               and 'status="201"' in line]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) == 1.0, metrics[-OUTPUT_TAIL_CHARS:]
