"""The engine's live results (GET /v1/polls/{poll}/results), fetched with bounded waits.

The body (engine/openapi.yaml, `Results`): poll, counts {option: n}, total, final,
embargoed, rejected {reason: n}, as_of. While an embargoed poll is open its counts are
hidden (`{}`), so they cannot be compared.
"""

from __future__ import annotations

import urllib.parse

import httpx

from replay.errors import BadInput, Unavailable

LIVE_TIMEOUT_S = 10.0
RESULTS_BYTES_MAX = 1024 * 1024


def results_url(base_url: str, poll: str) -> str:
    return f"{base_url.rstrip('/')}/v1/polls/{urllib.parse.quote(poll, safe='')}/results"


def check_base_url(base_url: str) -> str:
    parsed = urllib.parse.urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise BadInput(f"--url {base_url!r} is not an http(s) URL such as http://127.0.0.1:8000")
    return base_url.rstrip("/")


def fetch_results(client: httpx.Client, base_url: str, poll: str) -> dict | None:
    """The results document of `poll`, or None when the engine does not know the poll."""
    url = results_url(base_url, poll)
    try:
        response = client.get(url, timeout=LIVE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise Unavailable(f"the engine at {base_url} did not answer {url} within "
                          f"{LIVE_TIMEOUT_S} s: {exc!r}") from None
    if response.status_code == 404:
        return None
    if response.status_code != 200 or len(response.content) > RESULTS_BYTES_MAX:
        raise Unavailable(f"GET {url} answered {response.status_code}: {response.text[:200]}")
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("counts"), dict):
        raise Unavailable(f"GET {url} did not answer a results document: "
                          f"{response.text[:200]}")
    return document


def live_view(document: dict | None) -> tuple | None:
    """What must stay the same between two fetches for the results to count as stable."""
    if document is None:
        return None
    return (tuple(sorted(document["counts"].items())), document.get("total"),
            document.get("final"), document.get("embargoed"))
