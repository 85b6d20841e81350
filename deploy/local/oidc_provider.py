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

Real ID tokens from it, for tests and local tries:
- ``login_id_token(issuer_url, login)``: a person's login, the real authorization-code flow
  driven with httpx: /auth, the provider's login form (development interactions: any login
  name, any password), its consent form, the redirect with the code, then the token
  endpoint with the client's secret; at most FLOW_STEPS_MAX requests.
- ``granted_id_token(issuer_url, subject)``: the provider's test-only grant
  (client-authenticated), which signs an ID token for any subject, optionally already
  expired: quick, for many identities.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx

from deploy.local.processes import (
    Service,
    StackError,
    install_debian_package,
    port_open,
    terminate,
)

PROVIDER_DIR = Path(__file__).resolve().parent / "oidc"
NPM_CI_TIMEOUT_S = 300.0
START_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 2.0
HEALTH_POLL_S = 0.1
STOP_TIMEOUT_S = 10.0
DEFAULT_PORT = 19950
DEFAULT_CLIENT_ID = "votes-issuer"
DEFAULT_CLIENT_SECRET = "local-client-secret"
TEST_GRANT = "urn:votes:test:id-token"
FLOW_STEPS_MAX = 12
REQUEST_TIMEOUT_S = 5.0


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
        # The listening socket can outlive the pid's exit by a moment (seen in a test
        # session: a restart found the port still open); wait, bounded, so up() can bind.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(HEALTH_POLL_S)

    def restart(self) -> dict:
        """Stop and start again: the provider generates a new signing key (a key rotation)."""
        self.down()
        return self.up()

    def describe(self) -> dict:
        return {"issuer": self.issuer_url, "port": self.port, "client_id": self.client_id,
                "pid": self.service.pid() if self.service.alive() else None,
                "log": str(self.service.log_file)}


def login_id_token(issuer_url: str, login: str, *, client_id: str = DEFAULT_CLIENT_ID,
                   client_secret: str = DEFAULT_CLIENT_SECRET) -> str:
    redirect_uri = f"{issuer_url}/callback"
    state = secrets.token_urlsafe(16)
    with httpx.Client(timeout=REQUEST_TIMEOUT_S, follow_redirects=False) as client:
        response = client.get(f"{issuer_url}/auth", params={
            "client_id": client_id, "response_type": "code", "scope": "openid",
            "redirect_uri": redirect_uri, "state": state, "nonce": secrets.token_urlsafe(16)})
        for _ in range(FLOW_STEPS_MAX):
            if response.status_code in (302, 303):
                location = urljoin(str(response.url), response.headers["location"])
                if location.startswith(redirect_uri):
                    query = parse_qs(urlsplit(location).query)
                    if query.get("state") != [state]:
                        raise StackError(f"the login came back with another state: {query}")
                    return _exchange(client, issuer_url, query["code"][0], redirect_uri,
                                     client_id, client_secret)
                response = client.get(location)
            elif response.status_code == 200 and 'name="prompt" value="login"' in response.text:
                response = client.post(str(response.url), data={
                    "prompt": "login", "login": login, "password": "any"})
            elif response.status_code == 200 and 'name="prompt" value="consent"' in response.text:
                response = client.post(str(response.url), data={"prompt": "consent"})
            else:
                raise StackError(f"unexpected answer {response.status_code} at "
                                 f"{response.url}: {response.text[:500]}")
    raise StackError(f"the login flow did not end within {FLOW_STEPS_MAX} steps")


def _exchange(client: httpx.Client, issuer_url: str, code: str, redirect_uri: str,
              client_id: str, client_secret: str) -> str:
    answer = client.post(f"{issuer_url}/token", auth=(client_id, client_secret), data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri})
    if answer.status_code != 200:
        raise StackError(f"the token endpoint answered {answer.status_code}: {answer.text[:500]}")
    return answer.json()["id_token"]


def granted_id_token(issuer_url: str, subject: str, *, client_id: str = DEFAULT_CLIENT_ID,
                     client_secret: str = DEFAULT_CLIENT_SECRET,
                     expires_in_s: int | None = None) -> str:
    data = {"grant_type": TEST_GRANT, "subject": subject}
    if expires_in_s is not None:
        data["expires_in_s"] = str(expires_in_s)
    answer = httpx.post(f"{issuer_url}/token", auth=(client_id, client_secret), data=data,
                        timeout=REQUEST_TIMEOUT_S)
    if answer.status_code != 200:
        raise StackError(f"the token endpoint answered {answer.status_code}: {answer.text[:500]}")
    return answer.json()["id_token"]


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
