"""The ceiling peer: the fastest a vote endpoint on this stack could possibly answer.

A bare Granian RSGI app that reads each request body and answers a fixed
``201 {"receipt":"x"}`` with ``Content-Type: application/json``. It does no parsing, no
authentication, no state and no I/O beyond the socket, so the engine's throughput divided
by this one's, measured side by side with the same generator, is the fraction of the
server stack's ceiling that the engine reaches.

Run it as ``python -m perf.ceiling --port P [--workers N]``; it serves on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse

RESPONSE_STATUS = 201
RESPONSE_HEADERS = [("content-type", "application/json")]
RESPONSE_BODY = b'{"receipt":"x"}'


async def app(scope, proto):
    """RSGI entry point: drain the body like a real handler would, then answer 201."""
    if scope.proto != "http":
        return
    await proto()
    proto.response_bytes(RESPONSE_STATUS, RESPONSE_HEADERS, RESPONSE_BODY)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from granian import Granian

    # The target by module name: the workers import it as the package module it is.
    server = Granian(
        "perf.ceiling:app",
        interface="rsgi",
        address="127.0.0.1",
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        log_access=False,
    )
    server.serve()


if __name__ == "__main__":
    main()
