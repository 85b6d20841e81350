"""Shard snapshots in S3: the same objects and manifest as the directory store, in a bucket.

Layout, per shard: `<s3_prefix>/shard-<4 digits>/snapshot-<20-digit offset>.bin` (a frozen
ShardState, see shards/snapshots.py) and `<s3_prefix>/shard-<4 digits>/MANIFEST.json`, which
lists the kept snapshots newest first with their SHA-256, in the directory store's format.
A snapshot object is self-contained: it carries the receipt locator runs it relies on (12
bytes per counted vote, shards/snapshots.py), so any host recovers from it alone and no
other object needs uploading, listing or pruning beside it.

Rules a caller can rely on:
- `save` uploads the object first (S3 checks its SHA-256 on arrival), then replaces the
  manifest with one PUT, which readers see whole or not at all; only then it deletes objects
  the manifest no longer lists. A failure before the manifest PUT leaves the previous
  manifest, and every snapshot it names, in use.
- `load` walks the manifest newest first and returns the first snapshot whose object exists,
  has the listed size and SHA-256, and decodes; a missing or damaged object is logged and
  skipped. No manifest: None. A transport failure raises instead of skipping, because an
  unreachable object may be a good one, and replaying from an older point than necessary
  is only safe while the log still holds it.
- Every S3 call has a deadline (connect and read timeouts, a bounded number of attempts,
  and an overall deadline that grows with the object's size). Failures raise
  `SnapshotStoreUnavailable`, which is both a VotesError and an OSError, so the shard
  owner's snapshot writer logs it and start-up reports it as the shard's failure.
- One aiobotocore client per store, created on first use on the running event loop;
  `close()` releases it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import msgspec
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from engine import failpoints
from engine.config import Config
from engine.errors import VotesError
from shards.snapshots import Manifest, ManifestEntry, snapshot_name, thaw
from shards.state import ShardState

if TYPE_CHECKING:  # the types-aiobotocore stubs (the lint extra); aiobotocore has none
    from aiobotocore.session import ClientCreatorContext
    from types_aiobotocore_s3 import S3Client

_Result = TypeVar("_Result")
# An S3 operation's response, as botocore parses it (called by name in `_call`).
_Response = dict[str, Any]

log = logging.getLogger("votes.s3_snapshots")

S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 30.0
S3_ATTEMPTS_MAX = 3
# Overall deadline of one call, all attempts included: a base plus the time the object takes
# at a pessimistic transfer rate, so a large snapshot is not cut off while it still moves.
S3_CALL_DEADLINE_S = 60.0
S3_TRANSFER_BYTES_PER_S_MIN = 8 * 1024 * 1024
MANIFEST_BYTES_MAX = 1024 * 1024
MANIFEST_NAME = "MANIFEST.json"
SNAPSHOT_PREFIX = "snapshot-"
SNAPSHOT_SUFFIX = ".bin"
# S3 error codes that mean "this key holds nothing" rather than "S3 did not answer".
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})

_manifest_decoder = msgspec.json.Decoder(Manifest)


class SnapshotStoreUnavailable(VotesError, OSError):
    """S3 did not answer in time or refused a request; the previous snapshot stays in use."""


class ObjectMissing(Exception):
    """The key holds no object (S3 answered 404)."""


class ObjectDamaged(Exception):
    """The object is larger than the manifest (or the manifest bound) allows."""


class S3SnapshotStore:
    """Snapshots of one shard in an S3 bucket (production; SeaweedFS locally)."""

    def __init__(self, config: Config, shard: int) -> None:
        self.config = config
        self.shard = shard
        self.kept = config.snapshots_kept
        self.bucket = config.s3_bucket
        parts = [part for part in config.s3_prefix.strip("/").split("/") if part]
        self.prefix = "/".join([*parts, f"shard-{shard:04d}"]) + "/"
        self._client: S3Client | None = None
        self._client_stack: contextlib.AsyncExitStack | None = None
        self._client_lock = asyncio.Lock()

    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def manifest_key(self) -> str:
        return self.prefix + MANIFEST_NAME

    def object_key(self, name: str) -> str:
        return self.prefix + name

    # Saving -----------------------------------------------------------------------------------

    async def save(self, data: bytes, wal_offset_next: int) -> ManifestEntry:
        """Object first, then the manifest in one PUT; then prune what fell out of it."""
        digest = await asyncio.to_thread(_sha256, data)
        name = snapshot_name(wal_offset_next)
        await self._call(
            "put_object", len(data), Key=self.object_key(name), Body=data,
            ChecksumSHA256=base64.b64encode(digest).decode(),
        )
        # A test holds here to fail S3 between the upload and the manifest swap.
        await failpoints.pause("s3-snapshot-before-manifest")
        entry = ManifestEntry(
            name=name,
            wal_offset_next=wal_offset_next,
            sha256=digest.hex(),
            size_bytes=len(data),
            created_ms=int(time.time() * 1000),
        )
        previous = await self.read_manifest()
        manifest = merged_manifest(self.shard, previous, entry, self.kept)
        await self.write_manifest(manifest)
        await self._prune(manifest)
        return entry

    async def write_manifest(self, manifest: Manifest) -> None:
        body = msgspec.json.encode(manifest)
        await self._call(
            "put_object", len(body), Key=self.manifest_key, Body=body,
            ChecksumSHA256=base64.b64encode(_sha256(body)).decode(),
            ContentType="application/json",
        )

    async def _prune(self, manifest: Manifest) -> None:
        """Delete snapshot objects the manifest does not list and that are older than its
        newest entry. Newer unlisted objects may be another writer's upload in flight (an
        old owner not yet stopped); a later save removes them. A failure here is logged:
        the new snapshot is already in use."""
        kept_names = {entry.name for entry in manifest.snapshots}
        newest_offset = manifest.snapshots[0].wal_offset_next
        try:
            names = await self.list_snapshot_names()
            for name in names:
                offset = snapshot_offset(name)
                if name not in kept_names and offset is not None and offset < newest_offset:
                    await self._call("delete_object", 0, Key=self.object_key(name))
        except SnapshotStoreUnavailable as exc:
            log.warning("pruning snapshots of shard %d failed: %s (retried on the next save)",
                        self.shard, exc)

    async def list_snapshot_names(self) -> list[str]:
        names: list[str] = []
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = await self._call("list_objects_v2", 0, Prefix=self.prefix + SNAPSHOT_PREFIX,
                                    **extra)
            names.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if token is None:
                return names

    # Loading ----------------------------------------------------------------------------------

    async def read_manifest(self) -> Manifest:
        try:
            body = await self._get(self.manifest_key, MANIFEST_BYTES_MAX)
        except ObjectMissing:
            return Manifest(shard=self.shard, snapshots=[])
        except ObjectDamaged as exc:
            raise SnapshotStoreUnavailable(f"s3://{self.bucket}/{exc}") from exc
        try:
            return _manifest_decoder.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            # The manifest is written in one PUT with a checksum, so this is not a torn write:
            # refuse to guess (and to overwrite it) rather than lose the snapshots it lists.
            raise SnapshotStoreUnavailable(
                f"s3://{self.bucket}/{self.manifest_key} does not decode: {exc}") from exc

    async def load(self) -> ShardState | None:
        """The newest snapshot that checks out, or None when the shard has none."""
        for entry in (await self.read_manifest()).snapshots:
            key = self.object_key(entry.name)
            try:
                data = await self._get(key, entry.size_bytes)
            except (ObjectMissing, ObjectDamaged) as exc:
                log.warning("snapshot s3://%s/%s unusable (%s: %s); trying an older one",
                            self.bucket, key, type(exc).__name__, exc)
                continue
            state = await asyncio.to_thread(_checked_thaw, data, entry)
            if state is not None:
                return state
            log.warning("snapshot s3://%s/%s fails its size, checksum or decoding; trying an "
                        "older one", self.bucket, key)
        return None

    async def _get(self, key: str, size_bytes_max: int) -> bytes:
        """The object's bytes; ObjectMissing on 404, ObjectDamaged when it is larger than
        `size_bytes_max` (not read, so a damaged object cannot exhaust memory)."""

        async def read() -> bytes:
            client = await self._s3()
            try:
                response = await client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _error_code(exc) in MISSING_CODES:
                    raise ObjectMissing(key) from exc
                raise
            async with response["Body"] as stream:
                if response.get("ContentLength", 0) > size_bytes_max:
                    raise ObjectDamaged(f"{key} holds {response['ContentLength']} bytes, "
                                        f"more than the {size_bytes_max} expected")
                return await stream.read()

        return await self._deadline(f"get_object {key}", size_bytes_max, read())

    # The client -------------------------------------------------------------------------------

    async def _call(self, operation: str, size_bytes: int, **arguments: object) -> _Response:
        async def run() -> _Response:
            client = await self._s3()
            response: _Response = await getattr(client, operation)(Bucket=self.bucket,
                                                                   **arguments)
            return response

        target = arguments.get("Key") or arguments.get("Prefix")
        return await self._deadline(f"{operation} {target}", size_bytes, run())

    async def _deadline(self, what: str, size_bytes: int, call: Awaitable[_Result]) -> _Result:
        deadline_s = S3_CALL_DEADLINE_S + size_bytes / S3_TRANSFER_BYTES_PER_S_MIN
        try:
            async with asyncio.timeout(deadline_s):
                return await call
        except (ObjectMissing, ObjectDamaged, SnapshotStoreUnavailable):
            raise
        # Before TimeoutError: the client's own read timeout is a BotoCoreError and a
        # TimeoutError at once, and says more than the overall deadline would.
        except (BotoCoreError, ClientError, aiohttp.ClientError) as exc:
            raise SnapshotStoreUnavailable(f"{what} on s3://{self.bucket} failed: {exc}") from exc
        except TimeoutError as exc:  # the overall deadline (TimeoutError is an OSError too)
            raise SnapshotStoreUnavailable(
                f"{what} on s3://{self.bucket} took longer than {deadline_s:.0f} s") from exc
        except OSError as exc:
            raise SnapshotStoreUnavailable(f"{what} on s3://{self.bucket} failed: {exc}") from exc

    async def _s3(self) -> S3Client:
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                stack = contextlib.AsyncExitStack()
                self._client = await stack.enter_async_context(self._create_client())
                self._client_stack = stack
        return self._client

    def _create_client(self) -> ClientCreatorContext[S3Client]:
        config = self.config
        return get_session().create_client(
            "s3",
            endpoint_url=config.s3_endpoint_url or None,
            region_name=config.s3_region,
            aws_access_key_id=config.s3_access_key_id or None,
            aws_secret_access_key=config.s3_secret_access_key or None,
            config=AioConfig(
                s3={"addressing_style": "path"},
                connect_timeout=S3_CONNECT_TIMEOUT_S,
                read_timeout=S3_READ_TIMEOUT_S,
                retries={"max_attempts": S3_ATTEMPTS_MAX, "mode": "standard"},
            ),
        )

    async def close(self) -> None:
        stack, self._client_stack, self._client = self._client_stack, None, None
        if stack is not None:
            await stack.aclose()


def merged_manifest(shard: int, previous: Manifest, entry: ManifestEntry, kept: int) -> Manifest:
    """The new entry among the previous ones, newest (highest offset) first, `kept` at most.
    Ordering by offset rather than by arrival keeps a late save of an older snapshot (an old
    owner not yet stopped) from hiding a newer one."""
    entries = [item for item in previous.snapshots if item.name != entry.name]
    entries.append(entry)
    entries.sort(key=lambda item: item.wal_offset_next, reverse=True)
    return Manifest(shard=shard, snapshots=entries[:kept])


def snapshot_offset(name: str) -> int | None:
    stem = name[len(SNAPSHOT_PREFIX):-len(SNAPSHOT_SUFFIX)]
    if name.startswith(SNAPSHOT_PREFIX) and name.endswith(SNAPSHOT_SUFFIX) and stem.isdigit():
        return int(stem)
    return None


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _checked_thaw(data: bytes, entry: ManifestEntry) -> ShardState | None:
    if len(data) != entry.size_bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        return None
    try:
        return thaw(data)
    except (msgspec.DecodeError, ValueError):
        return None


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
