"""Proves the code keeps its shape: no file over 600 lines and no function over 70 lines in
engine/, shards/, replay/, perf/ and deploy/ (docs/architecture.md "Layers"; the project's
code habits). The test names every file and function over its bound, so one run lists all
the work, and it checks itself on a file made to break both bounds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.isolated import call_isolated

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("engine", "shards", "replay", "perf", "deploy")
FILE_LINES_MAX = 600
FUNCTION_LINES_MAX = 70


def shape_violations(path: Path, relative_to: Path) -> list[str]:
    """Every bound `path` breaks, one line each: the file's length, then each function's
    (decorators included, from its first line to its last)."""
    source = path.read_text("utf-8")
    name = path.relative_to(relative_to).as_posix()
    found = []
    lines = len(source.splitlines())
    if lines > FILE_LINES_MAX:
        found.append(f"{name}: {lines} lines (at most {FILE_LINES_MAX})")
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            length = (node.end_lineno or node.lineno) - first + 1
            if length > FUNCTION_LINES_MAX:
                found.append(f"{name}:{node.lineno} {node.name}(): {length} lines "
                             f"(at most {FUNCTION_LINES_MAX})")
    return found


def python_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*.py") if ".venv" not in path.parts)


def folder_violations(folder: str) -> list[str]:
    files = python_files(ROOT / folder)
    if not files:
        return [f"{folder}/ holds no Python file: the check would pass on nothing"]
    return [line for path in files for line in shape_violations(path, ROOT)]


@pytest.mark.parametrize("folder", FOLDERS)
def test_files_and_functions_stay_within_their_bounds(folder: str) -> None:
    # In a fresh interpreter: see tests/support/isolated.py for the CPython bug it avoids.
    violations = call_isolated("tests.unit.test_code_shape:folder_violations", folder)
    assert not violations, "over the bounds:\n" + "\n".join(violations)


def test_the_check_names_a_long_file_and_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_LINES_MAX))
    short = "def short():\n    return 1\n"
    source = f"@staticmethod\ndef long_one():\n{body}\n\n" + short + "\n" * FILE_LINES_MAX
    path = tmp_path / "sample.py"
    path.write_text(source)
    found = shape_violations(path, tmp_path)
    assert found[0].startswith("sample.py: ") and "(at most 600)" in found[0]
    assert found[1:] == [f"sample.py:2 long_one(): {FUNCTION_LINES_MAX + 2} lines (at most 70)"]


@pytest.mark.parametrize("length", [FUNCTION_LINES_MAX - 1, FUNCTION_LINES_MAX])
def test_a_function_at_the_bound_passes(tmp_path: Path, length: int) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(length - 1))
    path = tmp_path / "sample.py"
    path.write_text(f"def fits():\n{body}\n")
    assert shape_violations(path, tmp_path) == []
