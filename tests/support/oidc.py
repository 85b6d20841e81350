"""Getting real ID tokens from the local OIDC provider (deploy/local/oidc/provider.js).

- `login_id_token`: a person's login, the real authorization-code flow driven with httpx:
  /auth, the provider's login form (development interactions: any login name, any
  password), its consent form, the redirect with the code, then the token endpoint with the
  client's secret. Every step is one request; at most FLOW_STEPS_MAX of them.
- `granted_id_token`: the provider's test-only grant (client-authenticated), which signs
  an ID token for any subject, optionally already expired: quick, for many identities.
"""

from __future__ import annotations

import secrets
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx

from deploy.local.oidc_provider import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

FLOW_STEPS_MAX = 12
REQUEST_TIMEOUT_S = 5.0
TEST_GRANT = "urn:votes:test:id-token"


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
                    assert query["state"] == [state], query
                    return _exchange(client, issuer_url, query["code"][0], redirect_uri,
                                     client_id, client_secret)
                response = client.get(location)
            elif response.status_code == 200 and 'name="prompt" value="login"' in response.text:
                response = client.post(str(response.url), data={
                    "prompt": "login", "login": login, "password": "any"})
            elif response.status_code == 200 and 'name="prompt" value="consent"' in response.text:
                response = client.post(str(response.url), data={"prompt": "consent"})
            else:
                raise AssertionError(f"unexpected answer {response.status_code} at "
                                     f"{response.url}: {response.text[:500]}")
    raise AssertionError(f"the login flow did not end within {FLOW_STEPS_MAX} steps")


def _exchange(client: httpx.Client, issuer_url: str, code: str, redirect_uri: str,
              client_id: str, client_secret: str) -> str:
    answer = client.post(f"{issuer_url}/token", auth=(client_id, client_secret), data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri})
    assert answer.status_code == 200, answer.text
    return answer.json()["id_token"]


def granted_id_token(issuer_url: str, subject: str, *, client_id: str = DEFAULT_CLIENT_ID,
                        client_secret: str = DEFAULT_CLIENT_SECRET,
                        expires_in_s: int | None = None) -> str:
    data = {"grant_type": TEST_GRANT, "subject": subject}
    if expires_in_s is not None:
        data["expires_in_s"] = str(expires_in_s)
    answer = httpx.post(f"{issuer_url}/token", auth=(client_id, client_secret), data=data,
                        timeout=REQUEST_TIMEOUT_S)
    assert answer.status_code == 200, answer.text
    return answer.json()["id_token"]
