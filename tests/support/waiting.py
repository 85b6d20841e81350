"""Bounded waits for a condition, in place of sleeps that guess how long something takes.

`wait_until(predicate, timeout_s, what)` polls `predicate` until it returns a truthy value
and returns that value; past `timeout_s` the test fails naming `what` it waited for and the
last value seen. `wait_until_async` is the same for coroutine predicates, without blocking
the event loop. The poll interval is short and fixed: these waits bound a condition, they
do not measure how fast it came.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

POLL_S = 0.05
T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str,
               poll_s: float = POLL_S) -> T:
    """Poll `predicate` until truthy (return it); fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what} (last: {value!r})")
        time.sleep(poll_s)


async def wait_until_async(predicate: Callable[[], Awaitable[T]], timeout_s: float, what: str,
                           poll_s: float = POLL_S) -> T:
    """Like `wait_until`, for a coroutine predicate."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(poll_s)
