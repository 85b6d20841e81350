"""Session-wide test settings: hypothesis profiles and a printed seed, so every failure reproduces.

Profiles: "ci" (chosen when CI=true) sets explicit bounds on examples and stateful steps,
measured to keep the unit suite well under a minute, and skips the slow explain phase; "dev"
(the default) runs fewer examples and keeps the explain phase. Neither has a deadline (these
tests do file I/O) and both print the failing example's reproduction blob.

Unless `--hypothesis-seed` is given, a fresh seed is drawn and forced for the run; the session
header prints it with the command line option that replays the same examples.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, Phase, settings

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
