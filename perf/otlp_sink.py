"""A minimal OTLP/HTTP trace receiver for perf/bench_tracing.py, in its own process so its
decoding does not count against the engine's CPU: `python -m perf.otlp_sink PORT`.

It decodes each ExportTraceServiceRequest with the OTLP proto package, as a collector
does, counts the spans, and answers `GET /spans` with that count, so the benchmark can check
that every span it made was exported rather than dropped (a dropped span costs nothing, and
would make tracing look cheaper than it is).
"""

from __future__ import annotations

import http.server
import sys

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

REQUEST_BYTES_MAX = 16 * 1024 * 1024


class Sink(http.server.BaseHTTPRequestHandler):
    spans = 0

    def do_POST(self) -> None:  # noqa: N802 (the http.server API)
        length = int(self.headers.get("content-length", "0"))
        if self.path != "/v1/traces" or not 0 < length <= REQUEST_BYTES_MAX:
            self._answer(400, b"")
            return
        request = ExportTraceServiceRequest.FromString(self.rfile.read(length))
        Sink.spans += sum(len(scope.spans) for resource in request.resource_spans
                          for scope in resource.scope_spans)
        self._answer(200, b"")

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/spans":
            self._answer(200, str(Sink.spans).encode())
        else:
            self._answer(404, b"")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    # One thread: requests are handled in order, so a count read after a flush is complete.
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()


if __name__ == "__main__":
    main()
