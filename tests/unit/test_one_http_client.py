"""The functional, integration and chaos suites talk HTTP to the engine only through
tests/support/http_client.py, so every response they see is validated against
engine/openapi.yaml. This fails if a module there (or a helper of tests/support they use)
builds a plain httpx client or calls httpx's module-level request functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.isolated import call_isolated

TESTS_ROOT = Path(__file__).resolve().parents[1]
CHECKED_FOLDERS = ("functional", "integration", "chaos", "support")
# tests/support/http_client.py is where the validating clients are built on httpx.
EXEMPT = {TESTS_ROOT / "support" / "http_client.py"}
FORBIDDEN = frozenset({"Client", "AsyncClient", "get", "post", "put", "patch", "delete",
                       "head", "options", "request", "stream"})


def plain_httpx_uses(source: str) -> list[tuple[int, str]]:
    """(line, name) of every call of httpx.<FORBIDDEN> and every FORBIDDEN name imported
    from httpx (`from httpx import Client`), however httpx itself was imported."""
    tree = ast.parse(source)
    httpx_names = {"httpx"}
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            httpx_names |= {alias.asname or alias.name for alias in node.names
                            if alias.name == "httpx"}
        elif isinstance(node, ast.ImportFrom) and node.module == "httpx":
            uses += [(node.lineno, f"from httpx import {alias.name}") for alias in node.names
                     if alias.name in FORBIDDEN]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id in httpx_names
                and node.func.attr in FORBIDDEN):
            uses.append((node.lineno, f"{node.func.value.id}.{node.func.attr}(...)"))
    return sorted(uses)


def checked_modules() -> list[Path]:
    return sorted(path for folder in CHECKED_FOLDERS
                  for path in (TESTS_ROOT / folder).rglob("*.py") if path not in EXEMPT)


def plain_httpx_uses_everywhere() -> dict[str, list[tuple[int, str]]]:
    modules = checked_modules()
    if not any(path.parent.name == "functional" for path in modules):
        return {"(no functional test module found: the check would pass on nothing)": []}
    return {str(path.relative_to(TESTS_ROOT.parent)): uses for path in modules
            if (uses := plain_httpx_uses(path.read_text("utf-8")))}


def test_no_test_module_talks_plain_httpx() -> None:
    # In a fresh interpreter: see tests/support/isolated.py for the CPython bug it avoids.
    found = call_isolated("tests.unit.test_one_http_client:plain_httpx_uses_everywhere")
    assert not found, ("use tests/support/http_client.py (ValidatingClient, "
                       f"ValidatingAsyncClient, client_for, get/post) instead of: {found}")


@pytest.mark.parametrize("source", [
    "import httpx\nclient = httpx.Client(base_url='x')\n",
    "import httpx\nasync def f():\n    async with httpx.AsyncClient() as c:\n        pass\n",
    "import httpx\nhttpx.get('http://x/readyz')\n",
    "import httpx as h\nh.post('http://x/v1/polls')\n",
    "from httpx import Client\n",
])
def test_the_check_catches_plain_httpx(source: str) -> None:
    assert plain_httpx_uses(source)


def test_the_check_lets_types_and_errors_through() -> None:
    source = ("import httpx\n"
              "def f(client: httpx.Client) -> httpx.Response:\n"
              "    try:\n        return client.get('/x')\n"
              "    except httpx.TransportError:\n        raise\n"
              "limits = httpx.Limits(max_connections=1)\n")
    assert plain_httpx_uses(source) == []
