"""A small HTTP/1.1 keep-alive client for the attack simulation (perf/bench_attack.py).

Each bot needs its own headers per request (its token, the client address it claims
through X-Forwarded-For, a proof-of-work solution) and the status and body of every
answer, which wrk's one script per run cannot give per request class. One Connection sends
one request at a time and reads the whole answer (Content-Length bodies only: the engine
sends no chunked answers); every wait is bounded by ``timeout_s``, and a connection that
fails or times out is closed and reopened for the next request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

HEAD_BYTES_MAX = 16 * 1024  # the engine's answers have a few hundred bytes of headers
BODY_BYTES_MAX = 64 * 1024
TRANSPORT_ERROR = 0  # the status recorded when no answer came (refused, reset, timeout)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class Connection:
    """One keep-alive connection to 127.0.0.1:port; ``request`` never raises on I/O."""

    def __init__(self, port: int, timeout_s: float) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, headers: dict[str, str],
                      body: bytes = b"") -> Answer:
        try:
            return await asyncio.wait_for(self._exchange(method, path, headers, body),
                                          self.timeout_s)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as error:
            self.close()
            return Answer(TRANSPORT_ERROR, {}, repr(error).encode())

    async def _exchange(self, method: str, path: str, headers: dict[str, str],
                        body: bytes) -> Answer:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}",
                 f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if len(head) > HEAD_BYTES_MAX:
            raise ValueError("answer head too large")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        answer_headers = {}
        for line in header_lines:
            if ":" in line:
                name, _, value = line.partition(":")
                answer_headers[name.strip().lower()] = value.strip()
        length = int(answer_headers.get("content-length", "0"))
        if length > BODY_BYTES_MAX:
            raise ValueError("answer body too large")
        answer_body = await self.reader.readexactly(length)
        if answer_headers.get("connection", "").lower() == "close":
            self.close()
        return Answer(int(status_line.split(" ", 2)[1]), answer_headers, answer_body)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
