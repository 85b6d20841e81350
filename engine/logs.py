"""Structured JSON logs on stderr, one object per line, so log shippers need no parsing rules.

Every line written while a request is handled carries that request's id (`request_id`), kept
in a context variable that `engine/app.py` sets per request: asyncio copies the context into
each task, so concurrent requests on one event loop never see each other's ids. Lines
identify a voter by the voter id alone, never by token, address or header contents.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import re
import secrets
import time

REQUEST_ID_HEADER = "x-request-id"
# An incoming id is taken as is only when it is short and plain: it is echoed in a header
# and written into logs, so anything else (long, control characters, JSON) is replaced.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID_GENERATED_BYTES = 8

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class RequestIds:
    """Fresh request ids: a random prefix per process and a counter, "<16 hex>-<hex>".

    Unique across workers, hosts and restarts by the prefix (64 random bits, drawn again in
    a forked child, whose counter would otherwise repeat its parent's), and cheap: a
    secrets.token_hex per request was a tenth of a rejected request's CPU. The ids only
    correlate lines and answers, so nothing needs them unpredictable."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = secrets.token_hex(REQUEST_ID_GENERATED_BYTES) + "-"
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


_request_ids = RequestIds()


def request_id_of(incoming: str | None) -> str:
    """The incoming X-Request-Id when well-formed and bounded, else a fresh one."""
    if incoming is not None and REQUEST_ID_PATTERN.fullmatch(incoming):
        return incoming
    return _request_ids.next()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            document["request_id"] = current
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)


def configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("votes")
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("VOTES_LOG_LEVEL", "INFO").upper())
    root.propagate = False
