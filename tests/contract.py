"""Validate HTTP responses against the OpenAPI document engine/openapi.yaml.

The document is loaded once. `validate_response` checks, for one response: that its status
is documented for the operation (or, for unmatched routes, under
`x-unmatched-route-responses`), that its media type is one the response documents, that
documented required headers are present, and that the body validates against the schema
(JSON Schema Draft 2020-12, `$ref`s resolved inside the document, `date-time` checked).
Problem bodies must also repeat the HTTP status in `status`. Any mismatch raises
AssertionError naming the request and what differed.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

OPENAPI_PATH = Path(__file__).resolve().parents[1] / "engine" / "openapi.yaml"
DOCUMENT_URI = "urn:votes-engine:openapi"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
)


@functools.cache
def load_document() -> dict[str, Any]:
    """The parsed OpenAPI document (cached: loaded once per process)."""
    with OPENAPI_PATH.open(encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    if not isinstance(document, dict):
        raise AssertionError(f"{OPENAPI_PATH} does not hold a mapping")
    return document


@functools.cache
def _registry() -> Registry:
    resource = Resource.from_contents(load_document(), default_specification=DRAFT202012)
    return Registry().with_resource(DOCUMENT_URI, resource)


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())

    @checker.checks("date-time", raises=ValueError)
    def is_rfc3339(value: object) -> bool:
        if not isinstance(value, str):
            return True
        if not _RFC3339.match(value):
            return False
        datetime.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        return True

    return checker


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _follow(pointer: str) -> Any:
    """The document node at a local JSON pointer like `#/components/responses/X`."""
    node: Any = load_document()
    for token in pointer.removeprefix("#/").split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        node = node[token]
    return node


def _resolve(node: Any, pointer: str) -> tuple[Any, str]:
    """Follow `$ref`s of OpenAPI objects (not schemas), returning the node and its pointer."""
    seen = set()
    while isinstance(node, dict) and "$ref" in node:
        pointer = node["$ref"]
        if not pointer.startswith("#/") or pointer in seen:
            raise AssertionError(f"unsupported or cyclic $ref {pointer!r} in the document")
        seen.add(pointer)
        node = _follow(pointer)
    return node, pointer


@functools.cache
def _path_patterns() -> tuple[tuple[re.Pattern[str], str], ...]:
    patterns = []
    for template in load_document()["paths"]:
        regex = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        patterns.append((re.compile(f"^{regex}$"), template))
    return tuple(patterns)


def path_template_for(path: str) -> str | None:
    """The document's path template a concrete request path matches, or None."""
    for pattern, template in _path_patterns():
        if pattern.match(path):
            return template
    return None


def media_type(response: httpx.Response) -> str:
    """The response's media type without parameters, lower-cased ('' when absent)."""
    return response.headers.get("content-type", "").split(";")[0].strip().lower()


@functools.cache
def _validator(schema_pointer: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": DOCUMENT_URI + schema_pointer}
    return jsonschema.Draft202012Validator(
        schema, registry=_registry(), format_checker=_format_checker()
    )


def _responses_for(method: str, path_template: str | None) -> tuple[dict[str, Any], str, str]:
    """The responses object that applies, its pointer, and a label for messages."""
    document = load_document()
    unmatched_pointer = "#/x-unmatched-route-responses"
    if path_template is None:
        return document["x-unmatched-route-responses"], unmatched_pointer, "unmatched route"
    if path_template not in document["paths"]:
        raise AssertionError(f"path template {path_template!r} is not in {OPENAPI_PATH.name}")
    path_item = document["paths"][path_template]
    operation = path_item.get(method.lower())
    if operation is None:
        unmatched = document["x-unmatched-route-responses"]
        return {"405": unmatched["405"]}, unmatched_pointer, f"{path_template} (no {method})"
    pointer = f"#/paths/{_escape(path_template)}/{method.lower()}/responses"
    return operation["responses"], pointer, f"{method.upper()} {path_template}"


def _describe(response: httpx.Response) -> str:
    body = response.text
    if len(body) > 600:
        body = body[:600] + "..."
    return f"status {response.status_code}, content-type {media_type(response)!r}, body {body!r}"


def validate_response(method: str, path_template: str | None, response: httpx.Response) -> None:
    """Raise AssertionError unless `response` is documented for (method, path_template).

    `path_template` is a key of the document's `paths` (e.g. `/v1/polls/{poll}/votes`), or
    None for a request path no template matches. A HEAD answer has no body to check.
    """
    responses, pointer, label = _responses_for(method, path_template)
    status = str(response.status_code)
    if status not in responses:
        documented = ", ".join(sorted(k for k in responses if k[:1].isdigit()))
        raise AssertionError(
            f"{label}: status {status} is not documented (documented: {documented}); "
            f"{_describe(response)}"
        )
    response_object, response_pointer = _resolve(responses[status], f"{pointer}/{status}")

    for name, header in (response_object.get("headers") or {}).items():
        header, _ = _resolve(header, "")
        if header.get("required") and name.lower() not in response.headers:
            raise AssertionError(f"{label}: header {name!r} is required; {_describe(response)}")

    content = response_object.get("content") or {}
    if not content:
        if response.content:
            raise AssertionError(f"{label}: no body is documented; {_describe(response)}")
        return
    actual_type = media_type(response)
    if actual_type not in content:
        raise AssertionError(
            f"{label}: content type {actual_type!r} is not documented "
            f"(documented: {', '.join(content)}); {_describe(response)}"
        )
    if "schema" not in content[actual_type] or method.upper() == "HEAD":
        return
    schema_pointer = f"{response_pointer}/content/{_escape(actual_type)}/schema"
    body = _decode_body(label, actual_type, response)
    errors = sorted(_validator(schema_pointer).iter_errors(body), key=lambda e: list(e.path))
    if errors:
        reasons = "; ".join(
            f"at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in errors[:5]
        )
        raise AssertionError(f"{label}: body does not match the schema: {reasons}; "
                             f"{_describe(response)}")
    if actual_type == "application/problem+json" and body.get("status") != response.status_code:
        raise AssertionError(f"{label}: problem status differs from HTTP status; "
                             f"{_describe(response)}")


def _decode_body(label: str, actual_type: str, response: httpx.Response) -> Any:
    if actual_type == "application/json" or actual_type.endswith("+json"):
        try:
            return json.loads(response.content)
        except ValueError as error:
            raise AssertionError(
                f"{label}: body is not JSON ({error}); {_describe(response)}"
            ) from None
    return response.text
