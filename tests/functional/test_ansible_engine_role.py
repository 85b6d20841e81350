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

The operators' playbooks then run against that engine, with the same inventory:
snapshot-now.yml must leave a snapshot newer than its start in the data dir's snapshot
manifests (of group 1 only with fencing_group=1; automatic snapshots are off), and
rotate-keys.yml must write a rotated voter key set to the local secret files and the data
dir (byte for byte, mode 0600) so that the running engine takes tokens of the new key and
still of the old one, refuse to retire the current key, and retire the old key so that its
tokens get 401.

Slow (a wheel build and a virtualenv install, ~1-2 min); the Ansible tooling is installed by
`deploy/check.sh install` (the `deploy` extra), like the lint.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.config import Config
from shards.backends import shard_directory
from shards.snapshots import DirectorySnapshotStore
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
SHARDS = 4
GROUPS = 4
NO_AUTOMATIC_SNAPSHOTS = {"snapshot_interval_s": 3600.0, "snapshot_votes_min": 1_000_000,
                          "snapshot_request_check_s": 0.2}
SNAPSHOT_WAIT_S = 20
SNAPSHOTS_KEPT = 3
# The engine reloads key files every token_keys_check_s (1 s); the playbook waits for that
# too, so this only covers a slow machine.
KEY_RELOAD_WAIT_S = 10.0
TOKENS_PER_KEY = 100
VOTER_KEYS_FILE = "voter-token-keys.json"
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


@dataclass(frozen=True)
class Deployed:
    """The engine site.yml started, and what a further playbook run needs."""

    prefix: Path
    port: int
    issuer_dir: Path
    secrets_dir: Path
    work_dir: Path
    environment: dict[str, str]
    wheel: Path

    @property
    def data_dir(self) -> Path:
        return self.prefix / "data"


@pytest.fixture(scope="module")
def deployed(engine_wheel, tmp_path_factory) -> Iterator[Deployed]:
    """site.yml applied with the local inventory, the engine left running for the tests."""
    work_dir = tmp_path_factory.mktemp("deployed")
    prefix = work_dir / "opt-votes"
    port = _free_port()
    extra_vars = {
        "votes_service_version": _wheel_version(engine_wheel),
        "votes_service_prefix_root": str(prefix),
        "votes_service_wheel_path": str(engine_wheel),
        "votes_service_python": _base_python(),
        "engine_port": port,
        "engine_shards": SHARDS,
        "engine_groups": GROUPS,
        # Snapshots only on request, so a newer one can only be snapshot-now.yml's.
        "engine_config_extra": NO_AUTOMATIC_SNAPSHOTS,
    }
    environment = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
                   "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                   "ANSIBLE_LOCAL_TEMP": str(work_dir / "ansible-tmp"),
                   "VOTES_LOCAL_SECRETS_DIR": str(work_dir / "secrets")}
    issuer_dir = _local_secrets(work_dir / "secrets")
    pid_file = prefix / "run" / "votes-engine.pid"
    try:
        _run([str(VENV_BIN / "ansible-playbook"), "-i", "inventories/local/hosts.yml",
              "site.yml", "-e", json.dumps(extra_vars)],
             PLAYBOOK_TIMEOUT_S, cwd=ANSIBLE_DIR, env=environment)
        yield Deployed(prefix, port, issuer_dir, work_dir / "secrets", work_dir, environment,
                       engine_wheel)
    finally:
        _stop(pid_file)


def _playbook(deployed: Deployed, playbook: str, extra_vars: dict[str, object], *,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    """An operators' playbook against the deployed engine, with the local inventory."""
    argv = [str(VENV_BIN / "ansible-playbook"), "-i", "inventories/local/hosts.yml", playbook,
            "-e", json.dumps({"votes_service_prefix_root": str(deployed.prefix), **extra_vars})]
    if check:
        return _run(argv, PLAYBOOK_TIMEOUT_S, cwd=ANSIBLE_DIR, env=deployed.environment)
    return subprocess.run(argv, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT_S,
                          check=False, stdin=subprocess.DEVNULL, cwd=ANSIBLE_DIR,
                          env=deployed.environment)


def test_engine_role_installs_configures_and_starts_a_serving_engine(deployed):
    _check_layout(deployed.prefix, deployed.wheel)
    _check_keys(deployed.prefix, deployed.secrets_dir / "engine-keys")
    _check_running_from_prefix(deployed.prefix, deployed.prefix / "run" / "votes-engine.pid")
    _check_serving(deployed.prefix, deployed.port, deployed.issuer_dir)


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


def _newest_snapshot(data_dir: Path, shard: int):
    """The shard's newest manifest entry, where the embedded default keeps its snapshot store
    (shards/backends.py), as tests/functional/test_snapshot_now.py reads it."""
    store = DirectorySnapshotStore(shard_directory(data_dir, shard) / "snapshots", shard,
                                   SNAPSHOTS_KEPT)
    manifest = store.read_manifest()
    return manifest.snapshots[0] if manifest.snapshots else None


def test_snapshot_now_playbook_snapshots_the_running_engine(deployed):
    layout = Config(shards=SHARDS, groups=GROUPS)
    before = {shard: _newest_snapshot(deployed.data_dir, shard) for shard in range(SHARDS)}
    requested_ms = time.time_ns() // 1_000_000
    one_group = _playbook(deployed, "playbooks/snapshot-now.yml",
                          {"fencing_group": "1", "wait_s": SNAPSHOT_WAIT_S})
    assert "groups 1 snapshotted" in one_group.stdout, one_group.stdout[-OUTPUT_TAIL_CHARS:]
    for shard in range(SHARDS):
        after = _newest_snapshot(deployed.data_dir, shard)
        if layout.group_of(shard) == 1:
            assert after is not None and after.created_ms >= requested_ms, (shard, after)
        else:
            assert after == before[shard], (shard, before[shard], after)

    requested_ms = time.time_ns() // 1_000_000
    every_group = _playbook(deployed, "playbooks/snapshot-now.yml", {})
    assert "groups 0 1 2 3 snapshotted" in every_group.stdout, \
        every_group.stdout[-OUTPUT_TAIL_CHARS:]
    for shard in range(SHARDS):
        after = _newest_snapshot(deployed.data_dir, shard)
        assert after is not None and after.created_ms >= requested_ms, (shard, after)

    refused = _playbook(deployed, "playbooks/snapshot-now.yml", {"fencing_group": "1,x"},
                        check=False)
    assert refused.returncode != 0 and "give -e fencing_group=N" in refused.stdout, \
        refused.stdout[-OUTPUT_TAIL_CHARS:]


def _key_set(path: Path) -> dict:
    return json.loads(path.read_text())


def _data_dir_with_keys(directory: Path, keys_from: Path) -> Path:
    """A data dir for `votes token` holding copies of the key files in `keys_from`."""
    (directory / "keys").mkdir(parents=True, mode=0o700)
    for key_file in keys_from.glob("*.json"):
        (directory / "keys" / key_file.name).write_bytes(key_file.read_bytes())
    return directory


def _voter_tokens(prefix: Path, data_dir: Path, first_voter: int) -> Iterator[str]:
    """Tokens for voters first_voter.. signed with data_dir's current voter key, each voter
    new (a voter votes once per poll)."""
    return iter(_votes(prefix, "token", "--data-dir", str(data_dir), "--voter", str(first_voter),
                       "--count", str(TOKENS_PER_KEY)).split())


def _token_key_id(token: str) -> str:
    """engine/tokens.py's wire format: v1.<key_id>.<payload>.<signature>."""
    return token.split(".")[1]


def _vote_status(client: ValidatingClient, poll: str, token: str) -> tuple[int, str]:
    answer = client.post(f"/v1/polls/{poll}/votes", json={"option": "yes"},
                         headers={"authorization": f"Bearer {token}"})
    return answer.status_code, answer.text


def _vote_status_within(client: ValidatingClient, poll: str, tokens: Iterator[str],
                        wanted: int) -> tuple[int, str]:
    """Vote with the next token until the answer is `wanted` or KEY_RELOAD_WAIT_S ran out:
    the engine's workers reload the key file on their own clock."""
    deadline = time.monotonic() + KEY_RELOAD_WAIT_S
    while True:
        status, text = _vote_status(client, poll, next(tokens))
        if status == wanted or time.monotonic() > deadline:
            return status, text
        time.sleep(0.2)


def test_rotate_keys_playbook_rotates_and_retires_the_voter_key(deployed):
    secret_file = deployed.secrets_dir / "engine-keys" / VOTER_KEYS_FILE
    installed_file = deployed.data_dir / "keys" / VOTER_KEYS_FILE
    old_secret = secret_file.read_bytes()
    old_key_id = _key_set(secret_file)["current"]
    admin = _votes(deployed.prefix, "admin-token", "--data-dir", str(deployed.data_dir))
    # issuer_dir keeps the old key set: tokens from it are signed with the old key.
    old_tokens = _voter_tokens(deployed.prefix, deployed.issuer_dir, 1000)
    with ValidatingClient(base_url=f"http://127.0.0.1:{deployed.port}",
                          timeout=HTTP_TIMEOUT_S) as client:
        created = client.post("/v1/polls", json={"id": "keys", "options": ["yes", "no"]},
                              headers={"authorization": f"Bearer {admin}"})
        assert created.status_code == 201, created.text

        _playbook(deployed, "playbooks/rotate-keys.yml", {"key_set": "voter", "action": "rotate"})
        rotated = _key_set(secret_file)
        assert secret_file.read_bytes() != old_secret
        assert rotated["current"] != old_key_id and old_key_id in rotated["keys"], rotated.keys()
        assert installed_file.read_bytes() == secret_file.read_bytes()
        assert installed_file.stat().st_mode & 0o777 == 0o600, oct(installed_file.stat().st_mode)
        new_keys_dir = _data_dir_with_keys(deployed.work_dir / "new-keys",
                                           deployed.secrets_dir / "engine-keys")
        new_tokens = _voter_tokens(deployed.prefix, new_keys_dir, 2000)
        first_new_token = next(new_tokens)
        assert _token_key_id(first_new_token) == rotated["current"]
        status, text = _vote_status_within(
            client, "keys", itertools.chain([first_new_token], new_tokens), 201)
        assert status == 201, text
        status, text = _vote_status(client, "keys", next(old_tokens))
        assert status == 201, f"a token of the old key no longer verifies: {text}"

        refused = _playbook(deployed, "playbooks/rotate-keys.yml",
                            {"key_set": "voter", "action": "retire",
                             "key_id": rotated["current"]}, check=False)
        assert refused.returncode != 0, refused.stdout[-OUTPUT_TAIL_CHARS:]
        assert "is the current voter key" in refused.stdout, refused.stdout[-OUTPUT_TAIL_CHARS:]
        assert _key_set(secret_file) == rotated

        _playbook(deployed, "playbooks/rotate-keys.yml",
                  {"key_set": "voter", "action": "retire", "key_id": old_key_id})
        retired = _key_set(secret_file)
        assert retired["current"] == rotated["current"]
        assert sorted(retired["keys"]) == sorted(set(rotated["keys"]) - {old_key_id})
        assert installed_file.read_bytes() == secret_file.read_bytes()
        status, text = _vote_status_within(client, "keys", old_tokens, 401)
        assert status == 401, f"a token of the retired key still verifies: {text}"
        status, text = _vote_status(client, "keys", next(new_tokens))
        assert status == 201, text
