"""A server with an OTLP endpoint configured exports the spans of a sampled vote over
OTLP/HTTP: the receiver here decodes the protobuf ExportTraceServiceRequest with the OTLP
proto package, as a collector does, and finds the vote's root span and its children.

Not a full OpenTelemetry Collector (Debian packages none; its binary would be a download
from outside the package registries): a minimal OTLP/HTTP receiver on a local port.
"""

from __future__ import annotations

import http.server
import threading
import time

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.support.vote_client import bearer

EXPORT_WAIT_S = 30.0
REQUEST_BYTES_MAX = 4 * 1024 * 1024


class Receiver(http.server.BaseHTTPRequestHandler):
    spans: list[tuple[str, bytes, bytes, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 (the http.server API)
        length = int(self.headers.get("content-length", "0"))
        if self.path != "/v1/traces" or length > REQUEST_BYTES_MAX:
            self.send_response(400)
            self.end_headers()
            return
        request = ExportTraceServiceRequest.FromString(self.rfile.read(length))
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: a.value for a in span.attributes}
                    Receiver.spans.append((span.name, span.span_id, span.parent_span_id,
                                           attributes))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def receiver():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    server.shutdown()
    server.server_close()


def test_a_sampled_vote_reaches_the_otlp_receiver(server_factory, receiver) -> None:
    engine = server_factory(workers=1, env={"VOTES_TRACE_OTLP_ENDPOINT": receiver,
                                            "VOTES_TRACE_SAMPLE_RATIO": "1.0"})
    client = engine.client()
    admin = bearer(engine.admin_token())
    assert client.post("/v1/polls", headers=admin,
                       json={"id": "traced", "options": ["a"]}).status_code == 201
    token = engine.voter_tokens(0, 1, poll="traced")[0]
    answer = client.post("/v1/polls/traced/votes", headers=bearer(token), json={"option": "a"})
    assert answer.status_code == 201
    deadline = time.monotonic() + EXPORT_WAIT_S
    while time.monotonic() < deadline and not any(s[0] == "vote" for s in Receiver.spans):
        time.sleep(0.2)
    by_name = {name: (span_id, parent, attributes)
               for name, span_id, parent, attributes in Receiver.spans}
    assert {"vote", "verify-voter-token", "node.vote"} <= set(by_name), sorted(by_name)
    root_id = by_name["vote"][0]
    assert by_name["node.vote"][1] == by_name["verify-voter-token"][1] == root_id
    assert by_name["vote"][2]["http.response.status_code"].int_value == 201
    # No token and no voter id on the span.
    assert not any(token in str(attributes) for *_, attributes in Receiver.spans)
