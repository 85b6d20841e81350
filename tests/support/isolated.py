"""Runs a pure function in a fresh interpreter and returns its JSON-able result.

Why: CPython 3.11's AST constructor keeps a recursion-depth count that other threads of the
same process can upset (cpython gh-106905); `ast.parse` then raises "SystemError: AST
constructor recursion depth mismatch". After the chaos and integration suites, the test
process holds such threads (Kafka clients, log writers), so the source checks that parse
the whole tree run in a child interpreter of their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 120.0

_CHILD = """
import importlib, json, sys
module_name, function_name = sys.argv[1].split(":")
arguments = json.loads(sys.argv[2])
print(json.dumps(getattr(importlib.import_module(module_name), function_name)(*arguments)))
"""


def call_isolated(target: str, *arguments: Any) -> Any:
    """`target` is "package.module:function"; the arguments and the result travel as JSON."""
    done = subprocess.run([sys.executable, "-c", _CHILD, target, json.dumps(arguments)],
                          cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{target} failed in its own interpreter:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)
