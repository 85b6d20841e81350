"""Private local sockets between the worker processes of one host.

Granian workers share one listening socket, so a vote can land on a worker that does not
own its shard; that worker forwards it here to the owner and relays the answer, and never
counts it itself. The same channel carries poll creation/closing (which touch every shard)
and the per-worker result summaries.

Wire format: frames of `[u32 length][msgpack]`; a request is (request id, operation,
arguments), a response is (request id, ok, result or error). Requests are multiplexed on
one connection per peer, each served in its own task, with at most `inflight_max` waiting
per peer. Sockets live in a 0700 directory private to this data dir.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from engine.errors import NotReady, OutcomeUnknown, VotesError

LENGTH = struct.Struct("<I")
FRAME_BYTES_MAX = 8 * 1024 * 1024


class Request(msgspec.Struct, array_like=True):
    request_id: int
    operation: str
    arguments: list[Any]


class Response(msgspec.Struct, array_like=True):
    request_id: int
    ok: bool
    result: Any = None
    # The error's class and its bases, nearest first, by qualified name: the receiver raises
    # the nearest one it knows, so a class only the sender imported still answers as its base.
    error_classes: list[str] = []
    detail: str = ""
    extra: dict[str, Any] = {}


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_response_decoder = msgspec.msgpack.Decoder(Response)


def runtime_directory(data_dir: Path) -> Path:
    """A private directory for this data dir's sockets and metrics files, in memory.

    Not inside the data dir: unix socket paths are limited to ~107 bytes, and
    prometheus-client's mmap'd metrics files must not share a filesystem that can fill up
    with the log (a write to a new page of an mmap on a full disk is a SIGBUS)."""
    digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:16]
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    directory = base / f"votes-{digest}"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


def socket_path(data_dir: Path, slot: int) -> Path:
    return runtime_directory(data_dir) / f"worker-{slot}.sock"


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _error_names(error: VotesError) -> list[str]:
    return [_class_name(cls) for cls in type(error).__mro__ if issubclass(cls, VotesError)]


def _error_classes() -> dict[str, type[VotesError]]:
    classes: dict[str, type[VotesError]] = {}
    pending: list[type[VotesError]] = [VotesError]
    while pending:
        cls = pending.pop()
        classes[_class_name(cls)] = cls
        pending.extend(cls.__subclasses__())
    return classes


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    if length > FRAME_BYTES_MAX:
        raise ConnectionError(f"forwarded frame of {length} bytes exceeds the limit")
    return await reader.readexactly(length)


def _write_frame(writer: asyncio.StreamWriter, message: msgspec.Struct) -> None:
    payload = _encoder.encode(message)
    writer.write(LENGTH.pack(len(payload)) + payload)


Handler = Callable[..., Awaitable[Any]]


class ForwardServer:
    """Serves this worker's operations to its peers."""

    def __init__(self, path: Path, operations: dict[str, Handler]) -> None:
        self.path = path
        self.operations = operations
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # a dead predecessor's socket; we hold the slot
        self._server = await asyncio.start_unix_server(self._serve_connection, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def _serve_connection(self, reader, writer) -> None:
        try:
            while True:
                request = _request_decoder.decode(await _read_frame(reader))
                task = asyncio.create_task(self._answer(request, writer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError,
                UnicodeDecodeError):
            pass
        finally:
            writer.close()

    async def _answer(self, request: Request, writer) -> None:
        operation = self.operations.get(request.operation)
        try:
            if operation is None:
                raise VotesError(f"unknown forwarded operation {request.operation!r}")
            response = Response(request.request_id, True, await operation(*request.arguments))
        except VotesError as exc:
            response = Response(request.request_id, False, None, _error_names(exc), exc.detail,
                                exc.extra)
        if not writer.is_closing():
            _write_frame(writer, response)


class PeerClient:
    """One multiplexed connection to a peer worker, reopened on demand."""

    def __init__(self, path: Path, timeout_s: float, inflight_max: int) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(inflight_max)
        self._connect_lock = asyncio.Lock()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._waiting: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self._error_classes = _error_classes()

    async def call(self, operation: str, *arguments: Any, unknown_on_timeout: bool = False) -> Any:
        """Run `operation` on the peer. A peer that cannot be reached answers NotReady; a
        timeout is OutcomeUnknown for votes (`unknown_on_timeout`), NotReady otherwise."""
        async with self._slots:
            try:
                writer = await self._connection()
            except OSError as exc:
                raise NotReady(f"the owner worker is unreachable ({exc.strerror})")
            self._next_id += 1
            request_id = self._next_id
            future = asyncio.get_running_loop().create_future()
            self._waiting[request_id] = future
            try:
                _write_frame(writer, Request(request_id, operation, list(arguments)))
                response = await asyncio.wait_for(future, self.timeout_s)
            except (TimeoutError, ConnectionError) as exc:
                if unknown_on_timeout:
                    raise OutcomeUnknown(f"the owner worker did not answer in time ({exc!r})")
                raise NotReady(f"the owner worker did not answer ({exc!r})")
            finally:
                self._waiting.pop(request_id, None)
        if response.ok:
            return response.result
        known = (self._error_classes.get(name) for name in response.error_classes)
        error_class = next((cls for cls in known if cls is not None), VotesError)
        raise error_class(response.detail, **response.extra)

    async def _connection(self) -> asyncio.StreamWriter:
        async with self._connect_lock:
            if self._writer is None or self._writer.is_closing():
                reader, self._writer = await asyncio.open_unix_connection(str(self.path))
                self._reader_task = asyncio.create_task(self._read_responses(reader, self._writer))
            return self._writer

    async def _read_responses(self, reader: asyncio.StreamReader, writer) -> None:
        try:
            while True:
                response = _response_decoder.decode(await _read_frame(reader))
                future = self._waiting.get(response.request_id)
                if future is not None and not future.done():
                    future.set_result(response)
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError,
                UnicodeDecodeError):
            pass
        finally:
            writer.close()  # this connection's own writer; a newer one may exist already
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError("peer connection closed"))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
