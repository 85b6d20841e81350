"""A real OpenID Connect provider on 127.0.0.1 (deploy/local/oidc/provider.js, npm's
`oidc-provider`) for the issuer role's tests and local runs.

Installs what it needs on first use: Node.js and npm from Debian when `node` is missing
(apt-get, root only), then `npm ci` from the committed package-lock.json into
deploy/local/oidc/node_modules when that is missing or older than the lock file. The provider
runs detached in its own session, logs to a file, and is known by a pid file (pid and start
time), so `down` never signals an unrelated process. Every wait is bounded.

    python -m deploy.local.oidc_provider up --state-dir /var/tmp/oidc --port 19950  # JSON
    python -m deploy.local.oidc_provider status --state-dir /var/tmp/oidc --port 19950
    python -m deploy.local.oidc_provider down --state-dir /var/tmp/oidc

Python API: ``OidcProvider(state_dir, port).up()`` -> dict, ``.healthy()``, ``.down()``,
``.restart()`` (a new signing key: the JWKS rotates).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from deploy.local.processes import Service, StackError, install_debian_package, terminate

PROVIDER_DIR = Path(__file__).resolve().parent / "oidc"
NPM_CI_TIMEOUT_S = 300.0
START_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 2.0
HEALTH_POLL_S = 0.1
STOP_TIMEOUT_S = 10.0
DEFAULT_PORT = 19950
DEFAULT_CLIENT_ID = "votes-issuer"
DEFAULT_CLIENT_SECRET = "local-client-secret"


def ensure_installed() -> Path:
    """The `node` executable, with the provider's npm packages installed (npm ci)."""
    node = install_debian_package("node", "nodejs")
    npm = install_debian_package("npm", "npm")
    lock = PROVIDER_DIR / "package-lock.json"
    installed = PROVIDER_DIR / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=PROVIDER_DIR,
                              capture_output=True, text=True, timeout=NPM_CI_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            raise StackError(f"npm ci in {PROVIDER_DIR} exited {done.returncode}:\n"
                             f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return Path(node)


class OidcProvider:
    """One provider process: its port, client and the files that name it."""

    def __init__(self, state_dir: Path, port: int = DEFAULT_PORT, *,
                 client_id: str = DEFAULT_CLIENT_ID,
                 client_secret: str = DEFAULT_CLIENT_SECRET, key_alg: str = "ES256",
                 test_grant: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self.port = port
        self.client_id = client_id
        self.client_secret = client_secret
        self.key_alg = key_alg
        self.test_grant = test_grant
        self.service = Service("oidc-provider", port, self.state_dir / "oidc-provider.pid",
                               self.state_dir / "oidc-provider.log")

    @property
    def issuer_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        """The discovery document answers 200 and names this provider as its issuer."""
        url = f"{self.issuer_url}/.well-known/openid-configuration"
        try:
            with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as response:
                return json.load(response).get("issuer") == self.issuer_url
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def up(self) -> dict:
        """Install if needed, start unless running, wait until healthy; its description."""
        started = time.monotonic()
        node = ensure_installed()
        argv = [str(node), str(PROVIDER_DIR / "provider.js"), "--port", str(self.port),
                "--client-id", self.client_id, "--client-secret", self.client_secret,
                "--key-alg", self.key_alg, *(["--test-grant"] if self.test_grant else [])]
        self.service.start(argv)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.healthy():
            if not self.service.alive():
                raise StackError(f"the OIDC provider exited\n{self.service.tails()}")
            if time.monotonic() > deadline:
                raise StackError(f"the OIDC provider was not healthy within {START_TIMEOUT_S:.0f}"
                                 f" s\n{self.service.tails()}")
            time.sleep(HEALTH_POLL_S)
        return {**self.describe(), "up_s": round(time.monotonic() - started, 2)}

    def down(self) -> None:
        if self.service.alive():
            terminate([self.service.pid()], timeout=STOP_TIMEOUT_S)
        self.service.pid_file.unlink(missing_ok=True)

    def restart(self) -> dict:
        """Stop and start again: the provider generates a new signing key (a key rotation)."""
        self.down()
        return self.up()

    def describe(self) -> dict:
        return {"issuer": self.issuer_url, "port": self.port, "client_id": self.client_id,
                "pid": self.service.pid() if self.service.alive() else None,
                "log": str(self.service.log_file)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--no-test-grant", action="store_true",
                        help="refuse the test-only grant that issues ID tokens without a login")
    args = parser.parse_args(argv)
    provider = OidcProvider(args.state_dir, args.port, test_grant=not args.no_test_grant)
    try:
        if args.command == "up":
            print(json.dumps(provider.up(), indent=2))
        elif args.command == "down":
            provider.down()
        else:
            healthy = provider.healthy()
            print(json.dumps({"healthy": healthy, **provider.describe()}, indent=2))
            return 0 if healthy else 3
    except (StackError, subprocess.TimeoutExpired, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
