"""Tracing (engine/tracing.py): off, nothing is sampled; on, a sampled request produces a
root span named by its route with child spans, and the sample ratio is honoured."""

from __future__ import annotations

import random

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine import tracing


@pytest.fixture
def exporter():
    memory = InMemorySpanExporter()
    yield memory
    tracing.configure(0.0)


def test_off_without_an_endpoint_samples_nothing() -> None:
    tracing.configure(1.0, endpoint="")
    assert tracing.start_request("POST") is None


def test_a_sampled_vote_has_a_root_span_and_children(exporter) -> None:
    tracing.configure(1.0, exporter=exporter)
    span = tracing.start_request("POST")
    assert span is not None
    with tracing.child(span, "verify-voter-token"):
        pass
    with tracing.child(span, "node.vote"):
        pass
    tracing.finish_request(span, "vote", 201, "poll-1")
    spans = {finished.name: finished for finished in exporter.get_finished_spans()}
    assert set(spans) == {"vote", "verify-voter-token", "node.vote"}
    root = spans["vote"]
    assert dict(root.attributes) == {"http.request.method": "POST", "http.route": "vote",
                                     "http.response.status_code": 201, "vote.poll": "poll-1"}
    for name in ("verify-voter-token", "node.vote"):
        assert spans[name].parent.span_id == root.context.span_id
        assert spans[name].context.trace_id == root.context.trace_id


def test_the_sample_ratio_is_honoured(exporter, monkeypatch) -> None:
    rng = random.Random(14)
    monkeypatch.setattr(tracing, "_random", rng.random)
    tracing.configure(0.01, exporter=exporter)
    sampled = sum(tracing.start_request("POST") is not None for _ in range(20_000))
    assert 140 <= sampled <= 260  # 200 expected; binomial sd ~14


def test_a_child_whose_block_raises_is_an_error_span_without_the_message(exporter) -> None:
    tracing.configure(1.0, exporter=exporter)
    span = tracing.start_request("POST")
    with pytest.raises(ValueError, match="bearer secret"), tracing.child(span, "verify-voter-token"):
        raise ValueError("bearer secret")
    tracing.finish_request(span, "vote", 401, "poll-1")
    spans = {finished.name: finished for finished in exporter.get_finished_spans()}
    failed = spans["verify-voter-token"]
    assert failed.status.status_code.name == "ERROR"
    assert failed.status.description == "ValueError"  # the class, never the message
    assert failed.parent.span_id == spans["vote"].context.span_id
    assert spans["vote"].status.status_code.name == "UNSET"

