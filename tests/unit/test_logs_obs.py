"""JSON log lines carry the request id of the request being handled, each concurrent
request its own (context variables copied per asyncio task), and none outside a request;
incoming ids are taken only when well-formed and bounded."""

from __future__ import annotations

import os
import re

import asyncio
import json
import logging

from engine.logs import JsonFormatter, request_id, request_id_of


def line(message: str) -> dict:
    record = logging.LogRecord("votes.test", logging.INFO, __file__, 1, message, None, None)
    return json.loads(JsonFormatter().format(record))


def test_concurrent_requests_log_their_own_ids() -> None:
    async def handle(incoming: str) -> dict:
        request_id.set(request_id_of(incoming))
        await asyncio.sleep(0.01)  # the other request runs and sets its id meanwhile
        return line(f"handling {incoming}")

    async def both() -> list[dict]:
        return await asyncio.gather(handle("first-1"), handle("second-2"))

    first, second = asyncio.run(both())
    assert (first["request_id"], second["request_id"]) == ("first-1", "second-2")
    assert "request_id" not in line("outside any request")


def test_malformed_or_long_ids_are_replaced() -> None:
    assert request_id_of("abc.DEF_1:2-3") == "abc.DEF_1:2-3"
    for bad in (None, "", "x" * 129, "a\nb", '{"json": 1}'):
        generated = request_id_of(bad)
        assert generated != bad and re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]+", generated)
    assert request_id_of(None) != request_id_of(None)


def test_a_forked_worker_draws_its_own_prefix() -> None:
    # Granian forks its workers: with the parent's prefix and counter they would hand out
    # the same ids as each other.
    parent_prefix = request_id_of(None).split("-")[0]
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(writer, request_id_of(None).encode())
        os._exit(0)
    os.close(writer)
    child_id = os.read(reader, 256).decode()
    os.close(reader)
    os.waitpid(child, 0)
    assert child_id.split("-")[0] != parent_prefix
