"""The one HTTP client of the test suites: every response is validated against the OpenAPI
document engine/openapi.yaml (tests/contract.py) before the test sees it.

Functional, integration and chaos tests all build their clients here, so "tests validate
every response against the contract" holds wherever a test talks to the engine over HTTP.
A response that the document does not allow raises AssertionError naming the request.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests import contract


def _check(response: httpx.Response) -> None:
    request = response.request
    template = contract.path_template_for(request.url.path)
    contract.validate_response(request.method, template, response)


class ValidatingClient(httpx.Client):
    """An httpx.Client that validates every response against the OpenAPI document."""

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = super().send(request, **kwargs)
        if not kwargs.get("stream"):
            response.read()
            _check(response)
        return response


class ValidatingAsyncClient(httpx.AsyncClient):
    """An httpx.AsyncClient that validates every response against the OpenAPI document."""

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = await super().send(request, **kwargs)
        if not kwargs.get("stream"):
            await response.aread()
            _check(response)
        return response


# The suites' default bound on one request (connect, each read and write); a test that needs
# another passes its own.
REQUEST_TIMEOUT_S = 15.0


def client_for(base_url: str = "", *, timeout_s: float = REQUEST_TIMEOUT_S,
               **kwargs: Any) -> ValidatingClient:
    """A validating client for `base_url` with the suite's request timeout."""
    return ValidatingClient(base_url=base_url, timeout=timeout_s, **kwargs)


def async_client_for(base_url: str = "", *, timeout_s: float = REQUEST_TIMEOUT_S,
                     **kwargs: Any) -> ValidatingAsyncClient:
    """A validating async client for `base_url` with the suite's request timeout."""
    return ValidatingAsyncClient(base_url=base_url, timeout=timeout_s, **kwargs)


def request_once(method: str, url: str, *, timeout_s: float = REQUEST_TIMEOUT_S,
                 **kwargs: Any) -> httpx.Response:
    """One validated request on a client of its own (in place of `httpx.get`/`httpx.post`)."""
    with ValidatingClient(timeout=timeout_s) as client:
        return client.request(method, url, **kwargs)


def get(url: str, **kwargs: Any) -> httpx.Response:
    return request_once("GET", url, **kwargs)


def post(url: str, **kwargs: Any) -> httpx.Response:
    return request_once("POST", url, **kwargs)
