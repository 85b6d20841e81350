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
