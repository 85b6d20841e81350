"""The skip gate of tests/conftest.py: under CI=true a skip fails the session unless its reason
is allowed; outside CI skips are only listed. Each case runs a small pytest session of its
own (pytester) with the gate registered as tests/conftest.py registers it."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

ALLOWED_FOR_THE_TEST = "allowed here: "

CONFTEST = f"""
import os
from tests.conftest import SkipGate

def pytest_configure(config):
    config.pluginmanager.register(
        SkipGate(({ALLOWED_FOR_THE_TEST!r},), enforced=os.environ.get("CI") == "true"),
        "votes-skip-gate")
"""

TESTS = """
import pytest

def test_passes():
    pass

def test_skips():
    pytest.skip(REASON)
"""


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *, ci: bool,
        reason: str) -> pytest.RunResult:
    monkeypatch.setenv("CI", "true" if ci else "false")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_gated=TESTS.replace("REASON", repr(reason)))
    return pytester.runpytest("-rs", "-p", "no:cacheprovider")


def test_a_disallowed_skip_fails_the_session_under_ci(pytester, monkeypatch) -> None:
    result = run(pytester, monkeypatch, ci=True, reason="the service is not there")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "SKIP NOT ALLOWED under CI=true: test_gated.py::test_skips: the service is not there*"])


def test_an_allowed_skip_passes_under_ci(pytester, monkeypatch) -> None:
    result = run(pytester, monkeypatch, ci=True, reason=ALLOWED_FOR_THE_TEST + "no GPU")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.no_fnmatch_line("*SKIP NOT ALLOWED*")


def test_a_skip_outside_ci_is_listed_and_passes(pytester, monkeypatch) -> None:
    result = run(pytester, monkeypatch, ci=False, reason="the service is not there")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["SKIPPED*the service is not there*"])


def test_a_module_skipped_at_collection_fails_under_ci(pytester, monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_gone="import pytest\npytest.importorskip('no_such_module_here')\n")
    pytester.makepyfile(test_other="def test_passes():\n    pass\n")
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["SKIP NOT ALLOWED under CI=true: test_gone.py: *no_such_module*"])


def test_a_failure_keeps_its_own_exit_status(pytester, monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_both="import pytest\n\ndef test_fails():\n    assert False\n\n"
                                  "def test_skips():\n    pytest.skip('gone')\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=1, skipped=1)

