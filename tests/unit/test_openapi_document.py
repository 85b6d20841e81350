"""The OpenAPI document is a valid OpenAPI 3.1 document, closed where the server answers,
and tests/contract.py both accepts bodies that follow it and rejects bodies that drift."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator

from tests import contract

RECEIPT = {
    "receipt": "r2.eyJwIjoicG9sbCJ9.c2lnbmF0dXJl",
    "poll": "best-song",
    "shard": 3,
    "group": 3,
    "offset": 4096,
    "index": 7,
    "batch_seq": 12,
    "voter_hash": "9f86d081884c7d65",
    "time_ms": 1767225600000,
}
RESULTS = {
    "poll": "best-song",
    "counts": {"a": 2, "b": 1},
    "total": 3,
    "final": False,
    "embargoed": False,
    "rejected": {"duplicate": 1},
    "as_of": "2026-01-01T00:00:00.123Z",
}
POLL = {
    "id": "best-song",
    "options": ["a", "b"],
    "opens_at": None,
    "closes_at": "2026-01-01T20:00:00+01:00",
    "embargo": False,
}


def json_response(status: int, body: Any, media_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> httpx.Response:
    all_headers = {"content-type": media_type, **(headers or {})}
    return httpx.Response(status, content=json.dumps(body).encode(), headers=all_headers)


def problem(status: int, slug: str, **extra: Any) -> httpx.Response:
    body = {"type": f"/problems/{slug}", "title": slug, "status": status, "detail": "x", **extra}
    return json_response(status, body, "application/problem+json")


def test_document_is_valid_openapi_3_1() -> None:
    document = contract.load_document()
    assert document["openapi"].startswith("3.1.")
    errors = [str(e.message) for e in OpenAPIV31SpecValidator(document).iter_errors()]
    assert errors == []


def test_every_contract_operation_is_documented() -> None:
    operations = {
        (method, path)
        for path, item in contract.load_document()["paths"].items()
        for method in item
        if method in contract.HTTP_METHODS
    }
    assert operations == {
        ("post", "/v1/polls"),
        ("post", "/v1/polls/{poll}/close"),
        ("post", "/v1/polls/{poll}/votes"),
        ("get", "/v1/polls/{poll}/results"),
        ("get", "/v1/polls/{poll}/results/stream"),
        ("get", "/v1/receipts/{receipt}"),
        ("get", "/polls/{poll}"),
        ("get", "/polls/static/{file}"),
        ("get", "/v1/challenge"),
        ("post", "/v1/voter-tokens"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    }


def _schemas_with_object_type(node: Any, where: str = "#"):
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield where, node
        for key, value in node.items():
            yield from _schemas_with_object_type(value, f"{where}/{key}")
    elif isinstance(node, list):
        for position, value in enumerate(node):
            yield from _schemas_with_object_type(value, f"{where}/{position}")


def test_returned_objects_are_closed() -> None:
    # A returned object that accepts any extra field would let server drift pass silently.
    # Open maps (counts, rejected) constrain their values with a schema instead of `false`.
    document = contract.load_document()
    open_objects = [
        where
        for where, schema in _schemas_with_object_type(document["components"]["schemas"],
                                                       "#/components/schemas")
        if "additionalProperties" not in schema and where != "#/components/schemas/Problem"
    ]
    assert open_objects == []
    problem_responses = [
        name
        for name, response in document["components"]["responses"].items()
        if "application/problem+json" in response.get("content", {})
        and response["content"]["application/problem+json"]["schema"].get(
            "unevaluatedProperties") is not False
    ]
    assert problem_responses == []


def test_every_error_status_answers_problem_json() -> None:
    document = contract.load_document()
    offenders = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in contract.HTTP_METHODS:
                continue
            for status, response in operation["responses"].items():
                response, _ = contract._resolve(response, "")
                media_types = set(response.get("content", {}))
                if int(status) >= 400 and path != "/readyz" \
                        and media_types != {"application/problem+json"}:
                    offenders.append((method, path, status))
    assert offenders == []


@pytest.mark.parametrize(
    ("method", "path", "response"),
    [
        ("POST", "/v1/polls/{poll}/votes", json_response(201, RECEIPT)),
        ("POST", "/v1/polls/{poll}/votes", problem(409, "already-voted", receipt=RECEIPT)),
        ("POST", "/v1/polls/{poll}/votes", problem(422, "poll-not-open")),
        ("POST", "/v1/polls/{poll}/votes", problem(503, "outcome-unknown")),
        ("POST", "/v1/polls/{poll}/votes", json_response(
            429, {"type": "/problems/rate-limited", "title": "t", "status": 429, "detail": ""},
            "application/problem+json", {"retry-after": "1"})),
        ("POST", "/v1/polls", json_response(201, POLL)),
        ("POST", "/v1/polls", problem(401, "token-invalid")),
        ("POST", "/v1/polls/{poll}/close", json_response(
            200, {"poll": "p", "closed": True, "final": True})),
        ("GET", "/v1/polls/{poll}/results", json_response(200, RESULTS)),
        ("GET", "/v1/polls/{poll}/results", json_response(
            200, {**RESULTS, "counts": {}, "total": 0, "embargoed": True})),
        ("GET", "/readyz", json_response(200, {
            "ready": True, "durability": "embedded-fsync", "shards_total": 8,
            "shards_ready": 8, "workers": 1})),
        ("GET", "/readyz", json_response(503, {
            "ready": False, "durability": "embedded-fsync", "shards_total": 8,
            "shards_ready": 3, "workers": 1})),
        ("GET", "/healthz", json_response(200, {"status": "ok"})),
        ("GET", "/metrics", httpx.Response(
            200, text="vote_requests_total 1\n",
            headers={"content-type": "text/plain; version=0.0.4; charset=utf-8"})),
        ("GET", None, problem(404, "not-found")),
        ("DELETE", "/v1/polls", problem(405, "method-not-allowed")),
        ("HEAD", "/healthz", httpx.Response(
            405, headers={"content-type": "application/problem+json"})),
    ],
)
def test_validator_accepts_documented_responses(method, path, response) -> None:
    contract.validate_response(method, path, response)


@pytest.mark.parametrize(
    ("method", "path", "response", "reason"),
    [
        ("POST", "/v1/polls/{poll}/votes",
         json_response(201, {k: v for k, v in RECEIPT.items() if k != "receipt"}), "receipt"),
        ("POST", "/v1/polls/{poll}/votes", json_response(201, {**RECEIPT, "extra": 1}),
         "extra"),
        ("POST", "/v1/polls/{poll}/votes", json_response(201, {**RECEIPT, "shard": "3"}),
         "shard"),
        ("POST", "/v1/polls/{poll}/votes", json_response(201, {**RECEIPT, "receipt": "x1.ab"}),
         "receipt"),
        ("POST", "/v1/polls/{poll}/votes", json_response(201, RECEIPT, "text/plain"),
         "content type"),
        ("POST", "/v1/polls/{poll}/votes", json_response(200, RECEIPT), "not documented"),
        ("POST", "/v1/polls/{poll}/votes", problem(409, "already-voted"), "receipt"),
        ("POST", "/v1/polls/{poll}/votes", problem(422, "poll-exists"), "type"),
        ("POST", "/v1/polls/{poll}/votes", json_response(
            429, {"type": "/problems/rate-limited", "title": "t", "status": 429, "detail": ""},
            "application/problem+json"), "Retry-After"),
        ("POST", "/v1/polls/{poll}/votes", json_response(
            400, {"type": "/problems/bad-request", "title": "t", "status": 400, "detail": ""}),
         "content type"),
        ("POST", "/v1/polls/{poll}/votes", problem(400, "bad-request", trace="x"), "trace"),
        ("POST", "/v1/polls", json_response(201, {**POLL, "opens_at": "tomorrow"}),
         "opens_at"),
        ("POST", "/v1/polls", problem(409, "already-voted"), "type"),
        ("GET", "/v1/polls/{poll}/results", json_response(
            200, {**RESULTS, "counts": {"a": -1}}), "counts"),
        ("GET", "/v1/polls/{poll}/results", json_response(
            200, {k: v for k, v in RESULTS.items() if k != "embargoed"}), "embargoed"),
        ("GET", "/v1/polls/{poll}/results", json_response(
            200, {**RESULTS, "as_of": "2026-13-01T00:00:00Z"}), "as_of"),
        ("GET", "/readyz", json_response(200, {
            "ready": False, "durability": "embedded-fsync", "shards_total": 8,
            "shards_ready": 3, "workers": 1}), "ready"),
        ("GET", "/healthz", json_response(500, {"status": "ok"}), "not documented"),
        ("GET", None, problem(404, "poll-not-found"), "type"),
        ("GET", None, json_response(
            404, {"type": "/problems/not-found", "title": "t", "status": 400, "detail": ""},
            "application/problem+json"), "status"),
        ("DELETE", "/v1/polls", problem(404, "not-found"), "not documented"),
    ],
)
def test_validator_rejects_drift(method, path, response, reason) -> None:
    with pytest.raises(AssertionError) as raised:
        contract.validate_response(method, path, response)
    # The message ends with the response itself; the reason must be named before it.
    explanation = str(raised.value).rpartition("; status ")[0]
    assert reason in explanation


def test_validator_refuses_unknown_path_templates() -> None:
    with pytest.raises(AssertionError, match="not in openapi.yaml"):
        contract.validate_response("GET", "/v1/poll/{poll}", json_response(200, {}))


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/v1/polls", "/v1/polls"),
        ("/v1/polls/abc/votes", "/v1/polls/{poll}/votes"),
        ("/v1/polls/abc/results", "/v1/polls/{poll}/results"),
        ("/v1/polls/abc/results/stream", "/v1/polls/{poll}/results/stream"),
        ("/v1/polls/abc/close", "/v1/polls/{poll}/close"),
        ("/v1/polls/abc", None),
        ("/v1/polls/a/b/votes", None),
        ("/nope", None),
    ],
)
def test_path_template_matching(path, template) -> None:
    assert contract.path_template_for(path) == template
