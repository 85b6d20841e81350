"""The real local stack (deploy.local.stack) for tests: one per session, shared by the
integration and chaos suites (the fixtures live in tests/conftest.py).

`local_stack` (session scope) reuses a stack that is already up on the base port
(env VOTES_STACK_BASE_PORT, default 19000) or brings one up itself and stops it at the end
of the session. It never skips: if the stack cannot start, the tests fail with the reason.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from deploy.local.stack import DEFAULT_BASE_PORT, LocalStack, StackError


def running_local_stack() -> Iterator:
    """The body of the `local_stack` fixture (see the module docstring)."""
    base_port = int(os.environ.get("VOTES_STACK_BASE_PORT", DEFAULT_BASE_PORT))
    stack = LocalStack(base_port=base_port)

    if stack.is_up():
        owned = False
    elif any(s.alive() for s in stack.services()):
        # Someone else's stack, partly down (e.g. a broker killed by hand): heal it, keep it.
        owned = False
        try:
            stack.up()
        except StackError as e:
            pytest.fail(f"local stack on base port {base_port} is partly up and did not heal:\n{e}",
                        pytrace=False)
    else:
        owned = True
        try:
            stack.up(fresh=True)
        except StackError as e:
            # Leave nothing half-started behind, then fail with the reason.
            try:
                stack.down()
            except Exception as down_err:  # noqa: BLE001
                print(f"stack down after failed up also failed: {down_err!r}", file=sys.stderr)
            pytest.fail(f"local stack on base port {base_port} did not come up:\n{e}",
                        pytrace=False)

    yield stack

    if owned:
        stack.down()
    else:
        # Leave a reused stack as we found it: restart anything a fault test left dead.
        try:
            stack.up(quiet=True)
        except StackError as e:
            print(f"could not heal the reused local stack: {e}", file=sys.stderr)
