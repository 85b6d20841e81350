"""The buffered request and commit metrics expose exactly what plain prometheus calls would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from engine.metrics import BufferedCounter, BufferedHistogram

BOUNDS = (0.0005, 0.001, 0.002, 5.0)
# Values on, between, below and above the bounds (a value equal to a bound is in its bucket).
VALUES = [0.0, 1e-9, 0.0005, 0.0007, 0.001, 0.0010001, 0.002, 3.0, 5.0, 7.5, 120.0]


def _exposition(registry: CollectorRegistry) -> list[str]:
    """Sample lines with values to 9 significant digits: the buffered sum adds the same
    values in another grouping, so it may differ in the last bits. `_created` lines (each
    metric's creation time) differ between the two registries and are left out."""
    lines = []
    for line in generate_latest(registry).decode().splitlines():
        if "_created" in line:
            continue
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            line = f"{name} {float(value):.9g}"
        lines.append(line)
    return lines


def test_buffered_histogram_after_flush_equals_plain_observe() -> None:
    plain_registry, buffered_registry = CollectorRegistry(), CollectorRegistry()
    plain = Histogram("latency_seconds", "t", ["route"], buckets=BOUNDS, registry=plain_registry)
    target = Histogram("latency_seconds", "t", ["route"], buckets=BOUNDS, registry=buffered_registry)
    buffered = BufferedHistogram(target.labels("vote"), BOUNDS)
    for value in VALUES:
        plain.labels("vote").observe(value)
        buffered.observe(value)
    assert _exposition(buffered_registry) != _exposition(plain_registry)  # nothing flushed yet
    buffered.flush()
    assert _exposition(buffered_registry) == _exposition(plain_registry)
    # A second round adds to the first, and an empty flush changes nothing.
    for value in VALUES[:4]:
        plain.labels("vote").observe(value)
        buffered.observe(value)
    buffered.flush()
    buffered.flush()
    assert _exposition(buffered_registry) == _exposition(plain_registry)


def test_buffered_counter_after_flush_equals_plain_inc() -> None:
    plain_registry, buffered_registry = CollectorRegistry(), CollectorRegistry()
    plain = Counter("requests", "r", ["route", "status"], registry=plain_registry)
    target = Counter("requests", "r", ["route", "status"], registry=buffered_registry)
    buffered = BufferedCounter(target.labels("vote", "201"))
    for _ in range(7):
        plain.labels("vote", "201").inc()
        buffered.inc()
    buffered.flush()
    assert _exposition(buffered_registry) == _exposition(plain_registry)


def test_buffered_histogram_refuses_other_bounds() -> None:
    histogram = Histogram("h_seconds", "h", buckets=BOUNDS, registry=CollectorRegistry())
    with pytest.raises(ValueError):
        BufferedHistogram(histogram, BOUNDS[:-1])
