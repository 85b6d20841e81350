"""OpenTelemetry traces of the vote path, sampled, exported over OTLP/HTTP.

Off unless `trace_otlp_endpoint` is set (or a test installs an exporter with `configure`);
opentelemetry-sdk is the optional `tracing` extra and is imported only when tracing is on.
The sampling decision is taken here, before any OpenTelemetry call, with one random()
against `trace_sample_ratio`: an unsampled request costs a function call and a float
compare, not a NonRecordingSpan. A sampled request costs about 200 us of CPU (four spans
and their OTLP export), so the share of requests sampled sets the cost: the default 0.1 %
keeps it well within the 2 % budget (perf/bench_tracing.py measures both). A sampled
request records a root span with child spans for the token check, the defences and the
node's vote (which waits for the commit).
Spans carry the route, the status and the poll id, never a token or the voter id.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

_tracer: Any = None
_provider: Any = None
_sample_ratio = 0.0
_random = random.random
# The provider's batch processor bounds its own queue (max_queue_size, default 2048) and
# drops spans beyond it, so a slow collector cannot grow a worker's memory.
SPAN_QUEUE_MAX = 2048


def configure(sample_ratio: float, endpoint: str = "", exporter: Any = None) -> None:
    """Turn tracing on for this process: OTLP to `endpoint`, or `exporter` (tests)."""
    global _tracer, _sample_ratio, _provider
    if not endpoint and exporter is None:
        _tracer, _sample_ratio = None, 0.0
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "votes"}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint), max_queue_size=SPAN_QUEUE_MAX))
    _tracer = provider.get_tracer("votes.engine")
    _sample_ratio = sample_ratio
    _provider = provider


def shutdown() -> None:
    """Export what is queued (called when the worker stops)."""
    if _provider is not None:
        _provider.shutdown()


def start_request(method: str) -> Any:
    """A started root span for this request if it is sampled, else None."""
    if _tracer is None or _random() >= _sample_ratio:
        return None
    span = _tracer.start_span("request")
    span.set_attribute("http.request.method", method)
    return span


def finish_request(span: Any, route: str, status: int, poll: str | None) -> None:
    # Named by route, not path: a path holds the poll id, which would make names unbounded.
    span.update_name(route)
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if poll is not None:
        span.set_attribute("vote.poll", poll)
    span.end()


@contextlib.contextmanager
def child(parent: Any, name: str):
    """A child span of `parent` around the block (only called when `parent` is a span).

    Started with an explicit parent rather than made current: nothing inside the vote path
    reads the current span, and attaching and detaching a context per child cost about a
    fifth of a child's CPU (perf/bench_tracing.py). A block that raises marks the span as
    an error by the exception's class only: its message is not the span's to carry.
    """
    from opentelemetry.trace import StatusCode, set_span_in_context

    span = _tracer.start_span(name, context=set_span_in_context(parent))
    try:
        yield
    except BaseException as exc:
        span.set_status(StatusCode.ERROR, type(exc).__name__)
        raise
    finally:
        span.end()
