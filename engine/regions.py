"""Home-region forwarding: a vote is counted only in the region its voter token names.

Each region deduplicates its own voters (its shards' bitmaps), so "vote once" holds across
regions only if a voter's votes all reach one region. The token's `region` claim is signed,
so every region agrees which one that is; a vote that arrives elsewhere is sent on, with the
same body and Authorization, and the home region's answer (status, content type, body) is
relayed as it is.

Rules (config `region_urls`, `region_forward_timeout_s`, `region_forward_connections_max`):
- `region_urls` empty: a single-region deployment; the claim is not checked (as before).
- The claim names this region: the vote is ours.
- It names another region listed in `region_urls`: forwarded there.
- It names a region not listed, or the request was already forwarded by another region
  (two regions whose configs disagree would otherwise bounce it between them): 403
  `token-forbidden`. 403, not 422: the body is fine, the token is not good here.
- Failures: a connection that could not be opened, or no free pooled connection in time,
  means the home region never saw the vote: 503 `not-ready` (safe to retry). A timeout or
  broken connection after the request was written: 503 `outcome-unknown` (the home region may
  have counted it; a retry is answered 201 or 409 there, never counted twice).
Bounds: one client per worker process, at most `region_forward_connections_max` connections,
each phase (pool wait, connect, write, read) at most `region_forward_timeout_s`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import httpx

from engine.config import Config, parse_region_urls
from engine.errors import NotReady, OutcomeUnknown
from engine.logs import REQUEST_ID_HEADER
from engine.tokens import TokenForbidden

# Set on a vote one region sends to another; a vote carrying it is never sent on again.
REGION_FORWARDED_HEADER = "x-votes-region-forwarded"

# Before the request was written: the home region cannot have counted the vote.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


class RegionAnswer(NamedTuple):
    status: int
    content_type: str
    body: bytes


class RegionForwarder:
    """One worker's view of the other regions, and its pooled client to them."""

    def __init__(self, config: Config) -> None:
        self.region = config.region
        self.urls = parse_region_urls(config.region_urls)
        self.timeout_s = config.region_forward_timeout_s
        self.connections_max = config.region_forward_connections_max
        self._client: httpx.AsyncClient | None = None  # made on first use, in the worker's loop

    def home_url(self, token_region: str, headers: Any) -> str | None:
        """The base URL to forward to, or None when the vote is this region's to count."""
        if not self.urls or token_region == self.region:
            return None
        if headers.get(REGION_FORWARDED_HEADER) is not None:
            raise TokenForbidden("this region received a vote forwarded for another region: "
                                 "the regions' region_urls disagree")
        url = self.urls.get(token_region)
        if url is None:
            raise TokenForbidden("the token's home region is not served here")
        return url

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                limits=httpx.Limits(max_connections=self.connections_max,
                                    max_keepalive_connections=self.connections_max))
        return self._client

    async def forward(self, url: str, poll: str, body: bytes, authorization: str | None,
                      request_id: str | None) -> RegionAnswer:
        headers = {"content-type": "application/json", REGION_FORWARDED_HEADER: self.region}
        if authorization is not None:
            headers["authorization"] = authorization
        if request_id is not None:  # one id across both regions' logs
            headers[REQUEST_ID_HEADER] = request_id
        try:
            response = await self.client().post(f"{url}/v1/polls/{poll}/votes", content=body,
                                                headers=headers)
        except _NOT_SENT as exc:
            raise NotReady(f"home region at {url} not reachable ({type(exc).__name__}); "
                           "nothing was counted") from None
        except httpx.HTTPError as exc:  # written, then timed out or cut: it may have counted
            raise OutcomeUnknown(f"home region at {url} did not answer "
                                 f"({type(exc).__name__})") from None
        return RegionAnswer(response.status_code,
                            response.headers.get("content-type", "application/json"),
                            response.content)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
