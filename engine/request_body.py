"""Reading a request body with a bound, shared by the RSGI apps (ingest, issuer)."""

from __future__ import annotations

from engine.errors import BadRequest, BodyTooLarge


async def read_body(scope, proto, limit_bytes: int) -> bytes:
    """The request body, refusing (413) anything over `limit_bytes` without buffering it."""
    declared = scope.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("content-length is not a number")
        if int(declared) > limit_bytes:
            raise BodyTooLarge(f"the body is over {limit_bytes} bytes")
        return await proto()
    chunks = []
    size = 0
    async for chunk in proto:
        size += len(chunk)
        if size > limit_bytes:
            raise BodyTooLarge(f"the body is over {limit_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
