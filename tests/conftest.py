"""Session-wide test settings: hypothesis profiles and a printed seed, so every failure reproduces.

Profiles: "ci" (chosen when CI=true) sets explicit bounds on examples and stateful steps,
measured to keep the unit suite well under a minute, and skips the slow explain phase; "dev"
(the default) runs fewer examples and keeps the explain phase. Neither has a deadline (these
tests do file I/O) and both print the failing example's reproduction blob.

Unless `--hypothesis-seed` is given, a fresh seed is drawn and forced for the run; the session
header prints it with the command line option that replays the same examples.

Skips cannot hide: every skip is listed at the end of the run with its reason, and under
CI=true a skip (of a test or of a whole module at collection) fails the session unless its
reason starts with one of ALLOWED_SKIP_REASONS. A test that cannot run in CI is a test CI
does not have, so the list says which such gaps are accepted and why.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, Phase, settings

# Skip reasons accepted under CI=true (a reason must start with one of these), each with why.
# Empty: `make test` sets VOTES_REQUIRE_CYTHON=1, so the only skips in the suite today (the
# fast-path parity tests without the compiled module, tests/unit/test_fastpath*_parity.py)
# never happen there, and nothing else skips.
ALLOWED_SKIP_REASONS: tuple[str, ...] = ()

# The shared helpers assert too: their failures get pytest's detailed messages like a test's.
pytest.register_assert_rewrite("tests.support")

settings.register_profile(
    "ci",
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
    # The explain phase replays a failure many more times; CI reports the shrunk failure and
    # its reproduction blob without it.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
# No deadline: these tests do file I/O, and a slow disk must not turn into a flaky failure.
settings.register_profile("dev", max_examples=100, stateful_step_count=50, deadline=None,
                          print_blob=True)
settings.load_profile("ci" if os.environ.get("CI", "").lower() == "true" else "dev")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Runs before hypothesis' own pytest_configure, which forces the seed it finds here.
    if config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(random.SystemRandom().randrange(2**32))
    config.pluginmanager.register(
        SkipGate(ALLOWED_SKIP_REASONS, enforced=os.environ.get("CI", "").lower() == "true"),
        "votes-skip-gate")


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The reason a skipped report gives, without pytest's "Skipped: " prefix."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


class SkipGate:
    """Collects every skip of a session; when `enforced`, a skip whose reason does not start
    with one of `allowed` fails the session (exit status 1) and is named in the summary."""

    def __init__(self, allowed: tuple[str, ...], enforced: bool) -> None:
        self.allowed = allowed
        self.enforced = enforced
        self.skips: list[tuple[str, str]] = []  # (node id, reason)

    def _record(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        # An xfail is reported as skipped too; it is a decided expectation, not a gap.
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skips.append((report.nodeid, skip_reason(report)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def disallowed(self) -> list[tuple[str, str]]:
        return [(node, reason) for node, reason in self.skips
                if not reason.startswith(self.allowed)]

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.enforced and self.disallowed() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        disallowed = self.disallowed() if self.enforced else []
        for node, reason in disallowed:
            terminalreporter.write_line(
                f"SKIP NOT ALLOWED under CI=true: {node}: {reason} (allowed reasons start "
                f"with one of {list(self.allowed)}, tests/conftest.py ALLOWED_SKIP_REASONS)",
                red=True)
        if disallowed:
            terminalreporter.write_line(f"{len(disallowed)} skip(s) not allowed: session failed",
                                        red=True, bold=True)


def pytest_report_header(config: pytest.Config) -> list[str]:
    current = settings.default
    return [
        f"hypothesis: profile={settings.get_current_profile_name()} "
        f"max_examples={current.max_examples} stateful_step_count={current.stateful_step_count} "
        f"deadline={current.deadline}",
        f"hypothesis: seed={config.option.hypothesis_seed} "
        f"(reproduce with --hypothesis-seed={config.option.hypothesis_seed})",
    ]


@pytest.fixture(scope="session")
def local_stack():
    """The running LocalStack of deploy/local/stack.py, one per session (tests/support/stack.py)."""
    from tests.support.stack import running_local_stack

    yield from running_local_stack()


@pytest.fixture(scope="session")
def stack_endpoints(local_stack):
    """The endpoints dict (same content as <state_dir>/stack.json)."""
    return local_stack.endpoints()


@pytest.fixture(scope="session")
def redis_cluster():
    """A three-master Redis Cluster (deploy/local/redis_cluster.py) on the stack's base port
    (VOTES_STACK_BASE_PORT), started fresh once per session and stopped at its end."""
    from deploy.local.processes import StackError
    from deploy.local.redis_cluster import LocalRedisCluster

    cluster = LocalRedisCluster()
    try:
        cluster.down()  # fresh: no limiter state from an earlier session
        cluster.up()
    except StackError as exc:
        cluster.down()
        pytest.fail(f"redis cluster did not come up:\n{exc}", pytrace=False)
    yield cluster
    cluster.down()
