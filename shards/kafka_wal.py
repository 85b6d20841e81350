"""Kafka as a fencing group's write-ahead log: group `g` is partition `g` of `config.wal_topic`.

Every shard of the group writes into that one partition (records name their shard), in
the group's one transaction per commit cycle: one partition per group, not one per shard,
because a transaction's cost grows with the partitions it touches (docs/performance.md
"Kafka layout").

Rules this module keeps (docs/design.md "Shards and ownership", "The vote path", "Durability"):
- The fence is Kafka's own. Each group has one transactional producer with the stable
  transactional_id `wal-g<group>`; starting it (InitProducerId) bumps the epoch, which fences
  every older producer of that id and makes the coordinator finish or abort the transaction
  that producer left open. Nothing in the engine checks ownership before an append.
- After taking the fence, `acquire` commits one owner marker: a record with the header
  `votes-owner` (this instance's id) and an empty value. Replay and every reader skip such
  records (`is_owner_marker`). Markers let an owner whose producer lost its epoch tell "another
  owner took the group" (a committed record it did not write, after the offset it knows) from
  "the coordinator timed out my transaction" (nothing foreign): only in the second case does
  it take the fence again, so a resumed zombie never fences the owner that replaced it.
- One append is one transaction; readers are `read_committed`. Offsets come from the broker
  and `next_offset = offset + 1`; transaction markers take offsets too, so offsets have gaps.
- Every append is settled before it answers. It fails before its commit was requested: the
  transaction is aborted, or (if the abort does not finish) it can never commit, because
  only this producer could commit it and it never will; the answer is WalUnavailable. Its
  commit was requested but not confirmed: the append stays pending until the log decides:
  recovery takes the fence again (which finishes or aborts the transaction) and reads the
  partition; the append then returns its offsets or raises WalUnavailable. The group owner
  answers the waiting voters outcome-unknown after `append_timeout_s` and applies the
  decision when it comes. When another owner has written, the group is lost for good:
  WalFenced (a NotReady), and the owner stops serving it.
- After any failed append the producer is replaced (recovery, in the background): aiokafka
  keeps no usable sequence numbers after a failed batch. An append waits for a recovery
  within its own deadline (`kafka_append_timeout_s` for waiting, sending and committing),
  else answers WalUnavailable without sending anything. A settled failure answers within
  `kafka_append_timeout_s + kafka_abort_timeout_s`.
- The WAL topic must have `config.groups` partitions, replication factor 3,
  `min.insync.replicas=2` and unclean leader election off (shards/kafka_topic.py
  `validate_wal_topic`, checked before the fence is taken).
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import aiokafka.producer.sender
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import ConsumerStoppedError, KafkaError, ProducerClosed, ProducerFenced

from engine.config import Config
from engine.errors import (
    LogCorrupt,
    NotReady,
    OutcomeUnknown,
    VotesError,
    WalUnavailable,
)
from shards.kafka_topic import validate_wal_topic
from shards.wal import ApplyRecord, Positions

log = logging.getLogger("votes.kafka_wal")

OWNER_HEADER = "votes-owner"
RETRY_BACKOFF_S_MIN = 0.1
READ_POLL_MS = 200
READ_RECORDS_MAX = 2000
# Records kept for read_at (receipts of repeat votes), per group; neighbours are read along.
RECORDS_CACHED_BYTES_MAX = 4 * 1024 * 1024
READ_AHEAD_RECORDS_MAX = 64
PRODUCER_CANCEL_ROUNDS_MAX = 50
PRODUCER_CANCEL_POLL_S = 0.05
CLOSE_TIMEOUT_S = 5.0


class WalFenced(NotReady):
    """Another owner took this group's fence: this process must stop serving the group."""


class CommittedRecord(Protocol):
    """What this module reads of an aiokafka ConsumerRecord (aiokafka ships no type
    information). Every record of the WAL topic has a value; an owner marker's is empty."""

    offset: int
    value: bytes
    headers: Sequence[tuple[str, bytes]]


# The positions of an unconfirmed append if the log holds it, None if it does not.
_Decision = Positions | None


def is_owner_marker(headers: Sequence[tuple[str, bytes]] | None) -> bool:
    return any(key == OWNER_HEADER for key, _ in headers or ())


# Producers ---------------------------------------------------------------------------------------


async def _close_producer(producer: AIOKafkaProducer) -> None:
    """Stop a producer within a bound, whatever its transaction's state.

    A plain stop() flushes pending batches first, and idempotent batches never expire, so it
    never ends while the partition cannot take writes. Cancel the sender first, fail what it
    still holds, then stop to close the connections. aiokafka has no public way to do this,
    so this function (and only this one) uses its internals, as of aiokafka 0.14."""
    sender_task = producer._sender.sender_task
    for _ in range(PRODUCER_CANCEL_ROUNDS_MAX):
        if sender_task is None or sender_task.done():
            break
        # Each cancel interrupts one request the sender is finishing; repeat until it ends.
        sender_task.cancel()
        await asyncio.wait({sender_task}, timeout=PRODUCER_CANCEL_POLL_S)
    accumulator = producer._message_accumulator
    for batches in accumulator._batches.values():
        for batch in batches:
            if batch.retry_count:  # queued again for a retry: its done callback expects it
                accumulator._pending_batches.add(batch)  # among the pending ones
    accumulator.fail_all(ProducerClosed())
    # The failed batches' and transaction's futures hold errors nobody waits for any more;
    # mark them seen, or asyncio logs "exception was never retrieved" for each.
    futures = [future for batches in accumulator._batches.values() for batch in batches
               for future in (batch.future, batch._drain_waiter)]
    futures.append(producer._txn_manager._transaction_waiter)
    for future in futures:
        if future is not None and future.done() and not future.cancelled():
            future.exception()
    try:
        await asyncio.wait_for(producer.stop(), CLOSE_TIMEOUT_S)
    except (KafkaError, OSError, TimeoutError) as exc:
        log.warning("closing a WAL producer: %r", exc)


def set_transaction_retry(retry_ms: float) -> None:
    """How soon aiokafka asks again when AddPartitionsToTxn answers CONCURRENT_TRANSACTIONS
    (the previous transaction's markers are still being written). aiokafka has no option for
    it: it is the module constant BACKOFF_OVERRIDE (20 ms, KAFKA-5477), process-wide like
    every producer of this worker. tests/unit/test_kafka_tuning.py fails if an aiokafka
    upgrade drops it."""
    aiokafka.producer.sender.BACKOFF_OVERRIDE = retry_ms / 1000


def committed_reader(config: Config, client_id: str) -> AIOKafkaConsumer:
    """An unstarted consumer that sees only committed WAL records, has no group and commits
    no offsets (the engine's replay and the replay tool both read this way)."""
    return AIOKafkaConsumer(
        bootstrap_servers=config.kafka_bootstrap_servers,
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        # A position outside the log is an error, never a silent jump.
        auto_offset_reset="none",
        fetch_max_wait_ms=100,
        request_timeout_ms=int(config.kafka_request_timeout_s * 1000),
    )


class KafkaWal:
    """The WAL interface of shards/wal.py on one partition of the Kafka WAL topic."""

    durability = "kafka-acks-all"
    # One transaction at a time per fenced producer: an append starts when the last one ended.
    appends_in_flight_max = 1

    def __init__(self, config: Config, group: int) -> None:
        self.config = config
        self.group = group
        self.topic_partition = TopicPartition(config.wal_topic, group)
        self.transactional_id = f"wal-g{group}"
        self.owner_id = uuid.uuid4().hex.encode()
        self._producer: AIOKafkaProducer | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._reader_lock = asyncio.Lock()
        self._append_lock = asyncio.Lock()
        # Every committed record below this offset is known to the owner (replayed or
        # appended by us); a record above it that we did not write means another owner.
        self._known_end = 0
        self._recovery: asyncio.Task[_Decision] | None = None
        self._recovery_error: BaseException | None = None
        self._fenced: str | None = None
        self._records_cached: OrderedDict[int, bytes] = OrderedDict()
        self._records_cached_bytes = 0

    def __repr__(self) -> str:
        return f"KafkaWal({self.topic_partition.topic}/{self.group})"

    def location(self) -> str:
        return f"topic {self.topic_partition.topic} partition {self.topic_partition.partition}"

    def _new_producer(self) -> AIOKafkaProducer:
        config = self.config
        set_transaction_retry(config.kafka_transaction_retry_ms)
        return AIOKafkaProducer(
            bootstrap_servers=config.kafka_bootstrap_servers,
            client_id=f"votes-wal-{self.group}",
            transactional_id=self.transactional_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=config.kafka_linger_ms,
            max_batch_size=config.kafka_batch_bytes_max,
            request_timeout_ms=int(config.kafka_request_timeout_s * 1000),
            transaction_timeout_ms=int(config.kafka_transaction_timeout_s * 1000),
        )

    async def _start_producer(self) -> AIOKafkaProducer:
        """A started producer: InitProducerId done, so the fence is ours."""
        producer = self._new_producer()
        try:
            await asyncio.wait_for(producer.start(), self.config.kafka_request_timeout_s)
        except BaseException:
            await _close_producer(producer)
            raise
        return producer

    async def _backoff(self, attempt: int) -> None:
        delay = min(RETRY_BACKOFF_S_MIN * 2 ** attempt, self.config.kafka_retry_backoff_s_max)
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    # Fence ---------------------------------------------------------------------------------------

    async def acquire(self) -> None:
        """Validate the topic, take the fence and commit our owner marker; retry while Kafka
        cannot be reached (the group stays not-ready meanwhile)."""
        attempt = 0
        while True:
            try:
                await validate_wal_topic(self.config)
                producer = await self._start_producer()
            except (WalUnavailable, KafkaError, OSError, TimeoutError) as exc:
                log.warning("%r: cannot take the fence yet: %r", self, exc)
                await self._backoff(attempt)
                attempt += 1
                continue
            try:
                async with asyncio.timeout(self.config.kafka_append_timeout_s):
                    await self._commit_owner_marker(producer)
            except (KafkaError, OSError, TimeoutError) as exc:
                # Uncommitted: the next InitProducerId aborts it.
                await _close_producer(producer)
                log.warning("%r: cannot commit the owner marker yet: %r", self, exc)
                await self._backoff(attempt)
                attempt += 1
                continue
            self._producer = producer
            log.info("%r: fence taken (transactional id %s)", self, self.transactional_id)
            return

    async def _commit_owner_marker(self, producer: AIOKafkaProducer) -> None:
        await producer.begin_transaction()
        batch = producer.create_batch()
        batch.append(key=None, value=b"", timestamp=None, headers=[(OWNER_HEADER, self.owner_id)])
        await (await producer.send_batch(batch, self.topic_partition.topic, partition=self.group))
        await producer.commit_transaction()

    # Reading ---------------------------------------------------------------------------------------

    async def _reader_started(self) -> AIOKafkaConsumer:
        if self._reader is None:
            config = self.config
            reader = committed_reader(config, f"votes-wal-reader-{self.group}")
            try:
                await asyncio.wait_for(reader.start(), config.kafka_request_timeout_s)
            except BaseException:
                await reader.stop()
                raise
            reader.assign([self.topic_partition])
            self._reader = reader
        return self._reader

    async def _stable_end(self, reader: AIOKafkaConsumer) -> int:
        """The last stable offset: read_committed readers see nothing at or above it."""
        ends = await asyncio.wait_for(reader.end_offsets([self.topic_partition]),
                                      self.config.kafka_request_timeout_s)
        end: int = ends[self.topic_partition]
        return end

    async def _read_range(self, reader: AIOKafkaConsumer, start: int, end: int,
                          on_record: Callable[[CommittedRecord], None]) -> None:
        """Call on_record(record) for every committed record in [start, end), in order;
        WalUnavailable after kafka_read_stall_s without progress."""
        partition = self.topic_partition
        loop = asyncio.get_running_loop()
        reader.seek(partition, start)
        position = start
        progress_s = loop.time()
        while position < end:
            fetched = await reader.getmany(partition, timeout_ms=READ_POLL_MS,
                                           max_records=READ_RECORDS_MAX)
            for record in fetched.get(partition, ()):
                if record.offset >= end:
                    return
                on_record(record)
            now_position = await reader.position(partition)
            if now_position > position:
                position, progress_s = now_position, loop.time()
            elif loop.time() - progress_s > self.config.kafka_read_stall_s:
                raise WalUnavailable(f"{self!r}: no progress reading at offset {position} for "
                                     f"{self.config.kafka_read_stall_s} s (log end {end})")

    async def replay(self, from_offset: int, apply: ApplyRecord) -> int:
        def apply_record(record: CommittedRecord) -> None:
            if not is_owner_marker(record.headers):
                apply(record.offset, record.offset + 1, record.value)

        try:
            async with self._reader_lock:
                reader = await self._reader_started()
                # Taken after the fence: every transaction of an older owner is decided.
                end = await self._stable_end(reader)
                if from_offset < end:
                    await self._read_range(reader, from_offset, end, apply_record)
        except (KafkaError, OSError, TimeoutError, ConsumerStoppedError) as exc:
            raise WalUnavailable(f"{self!r}: replay failed: {exc!r}") from exc
        self._known_end = end
        return end

    async def read_at(self, offset: int) -> bytes:
        value = self._records_cached.get(offset)
        if value is not None:
            self._records_cached.move_to_end(offset)
            return value
        try:
            async with self._reader_lock:
                value = await self._read_around(await self._reader_started(), offset)
        # ConsumerStoppedError: close() stopped the reader meanwhile (the group was handed
        # over while a repeat vote read its receipt); it is not a KafkaError.
        except (KafkaError, OSError, TimeoutError, ConsumerStoppedError) as exc:
            raise WalUnavailable(f"{self!r}: cannot read offset {offset}: {exc!r}") from exc
        if value is None:
            raise LogCorrupt(f"{self!r}: no committed record at offset {offset}")
        return value

    async def _read_around(self, reader: AIOKafkaConsumer, offset: int) -> bytes | None:
        """Cache the record at `offset` and the ones fetched with it (repeat votes of one
        batch, or of neighbouring batches, tend to come together)."""
        partition = self.topic_partition
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + self.config.kafka_read_stall_s
        reader.seek(partition, offset)
        while True:
            fetched = await reader.getmany(partition, timeout_ms=READ_POLL_MS,
                                           max_records=READ_AHEAD_RECORDS_MAX)
            records: list[CommittedRecord] = fetched.get(partition, [])
            for record in records:
                if not is_owner_marker(record.headers):
                    self._remember(record.offset, record.value)
            if records and records[-1].offset >= offset:
                return next((record.value for record in records if record.offset == offset
                             and not is_owner_marker(record.headers)), None)
            if loop.time() > deadline_s:
                raise WalUnavailable(f"{self!r}: offset {offset} not readable within "
                                     f"{self.config.kafka_read_stall_s} s")

    def _remember(self, offset: int, value: bytes) -> None:
        cached = self._records_cached
        if offset in cached:
            return
        cached[offset] = value
        self._records_cached_bytes += len(value)
        while self._records_cached_bytes > RECORDS_CACHED_BYTES_MAX and len(cached) > 1:
            self._records_cached_bytes -= len(cached.popitem(last=False)[1])

    async def _committed_since_known(self) -> tuple[list[CommittedRecord], int]:
        """The committed records from the offset we know up to the last stable offset."""
        records: list[CommittedRecord] = []
        async with self._reader_lock:
            reader = await self._reader_started()
            end = await self._stable_end(reader)
            if self._known_end < end:
                await self._read_range(reader, self._known_end, end, records.append)
        return records, end

    # Appending ------------------------------------------------------------------------------------

    async def append(self, payloads: list[bytes]) -> list[tuple[int, int]]:
        # Appends of one group are sequential; a second one (a control record queued while
        # the owner waits out a stalled append) waits here for the first.
        async with self._append_lock:
            # One deadline for waiting out a recovery, sending and committing.
            deadline = asyncio.get_running_loop().time() + self.config.kafka_append_timeout_s
            producer = await self._usable_producer(deadline)
            commit_requested = False
            try:
                async with asyncio.timeout_at(deadline):
                    await producer.begin_transaction()
                    delivered = await self._send(producer, payloads)
                    commit_requested = True
                    await producer.commit_transaction()
            except (KafkaError, OSError, TimeoutError, AssertionError) as exc:
                # AssertionError: aiokafka's transaction state machine refusing a step.
                return await self._settle(producer, payloads, commit_requested, exc)
            self._known_end = delivered[-1][1]
            return delivered

    async def _send(self, producer: AIOKafkaProducer, payloads: list[bytes]) -> list[tuple[int, int]]:
        """Send the payloads in as few record batches as fit; their (offset, next) pairs."""
        batches = []
        builder = None
        for payload in payloads:
            if builder is None or builder.append(key=None, value=payload, timestamp=None) is None:
                builder = producer.create_batch()
                builder.append(key=None, value=payload, timestamp=None)  # a first one always fits
                batches.append(builder)
        sent = []
        for builder in batches:
            sent.append(await producer.send_batch(builder, self.topic_partition.topic,
                                                  partition=self.group))
        positions = []
        for builder, metadata in zip(batches, await asyncio.gather(*sent), strict=True):
            if metadata is None or metadata.offset < 0:
                raise KafkaError(f"the broker did not return an offset ({metadata!r})")
            positions += [(metadata.offset + index, metadata.offset + index + 1)
                          for index in range(builder.record_count())]
        return positions

    async def _usable_producer(self, deadline: float) -> AIOKafkaProducer:
        if self._fenced is not None:
            raise WalFenced(self._fenced)
        if self._recovery is not None:
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(self._recovery)
            except TimeoutError:
                cause = repr(self._recovery_error) if self._recovery_error else "first attempt"
                raise WalUnavailable(f"{self!r}: still taking the fence again ({cause}); "
                                     "nothing was written") from None
        if self._producer is None:
            raise WalUnavailable(f"{self!r}: the fence is not held")
        return self._producer

    async def _settle(self, producer: AIOKafkaProducer, payloads: list[bytes],
                      commit_requested: bool, exc: BaseException) -> Positions:
        """Decide a failed append before answering (see the module docstring)."""
        if commit_requested:
            log.warning("%r: commit unconfirmed (%r); deciding it from the log", self, exc)
            recovery = self._start_recovery(payloads)
            try:
                positions = await asyncio.shield(recovery)
            except asyncio.CancelledError:
                if not recovery.cancelled():
                    raise
                # The WAL is closing: the next owner's fence decides this transaction.
                raise OutcomeUnknown(f"{self!r}: closed before the log decided the append "
                                     f"({exc!r})") from None
            if positions is None:
                raise WalUnavailable(f"{self!r}: the append failed ({exc!r}) and the log "
                                     "aborted it; nothing was written")
            return positions
        aborted = False
        try:
            async with asyncio.timeout(self.config.kafka_abort_timeout_s):
                if not isinstance(exc, ProducerFenced):
                    aborted = await self._abort(producer)
                # aiokafka keeps no usable sequence numbers after a failed batch (the next
                # send would be out of order), so the producer is always replaced. Fencing
                # shows up here when another owner has written: then say so at once.
                await asyncio.shield(self._start_recovery(None))
        except TimeoutError:
            self._start_recovery(None)
        outcome = "was aborted" if aborted else "can never commit (its producer is replaced)"
        raise WalUnavailable(f"{self!r}: the append failed ({exc!r}); its transaction {outcome}")

    async def _abort(self, producer: AIOKafkaProducer) -> bool:
        try:
            await producer.abort_transaction()
        except (KafkaError, OSError, AssertionError) as exc:
            log.warning("%r: abort failed: %r", self, exc)
            return False
        return True

    # Recovery: take the fence again, unless another owner has written ----------------------------

    def _start_recovery(self, unresolved: list[bytes] | None) -> asyncio.Task[_Decision]:
        if self._recovery is None:
            self._recovery = asyncio.create_task(self._recover(unresolved),
                                                 name=f"wal-recovery-{self.group}")
            self._recovery.add_done_callback(self._recovery_done)
        return self._recovery

    def _recovery_done(self, task: asyncio.Task[_Decision]) -> None:
        self._recovery = None
        self._recovery_error = None
        if task.cancelled():
            return
        error = task.exception()  # seen here even when no append waits for the task
        if error is not None and not isinstance(error, WalFenced):
            log.error("%r: recovery ended: %r", self, error)

    async def _recover(self, unresolved: list[bytes] | None) -> _Decision:
        """Replace the producer; return the positions of `unresolved` if the log holds them."""
        old, self._producer = self._producer, None
        if old is not None:
            await _close_producer(old)
        attempt = 0
        while True:
            try:
                return await self._recover_once(unresolved)
            except (WalUnavailable, KafkaError, OSError, TimeoutError) as exc:
                self._recovery_error = exc
                log.warning("%r: recovery attempt %d: %r", self, attempt + 1, exc)
            await self._backoff(attempt)
            attempt += 1

    async def _recover_once(self, unresolved: list[bytes] | None) -> _Decision:
        # Look first without fencing anyone: if another owner wrote, it keeps the group.
        positions = self._only_ours(*await self._committed_since_known(), unresolved)
        if self._fenced is not None:
            return positions
        producer = await self._start_producer()
        try:
            # Our fence decided our last transaction; read what it left.
            records, end = await self._committed_since_known()
            positions = self._only_ours(records, end, unresolved)
        except BaseException:
            await _close_producer(producer)
            raise
        if self._fenced is not None:
            await _close_producer(producer)
            return positions
        self._producer = producer
        self._known_end = end
        log.warning("%r: fence taken again%s", self, "" if unresolved is None else (
            "; the unconfirmed append is " + ("in the log" if positions else "not in the log")))
        return positions

    def _classify(self, records: list[CommittedRecord], end: int,
                  unresolved: list[bytes] | None) -> tuple[_Decision, int | None]:
        """(positions of `unresolved` among the records or None, offset of the first record
        of another owner or None)."""
        expected = unresolved or []
        found: Positions = []
        foreign: int | None = None
        for record in records:
            if is_owner_marker(record.headers):
                if dict(record.headers)[OWNER_HEADER] != self.owner_id and foreign is None:
                    foreign = record.offset
            elif len(found) < len(expected) and record.value == expected[len(found)]:
                found.append((record.offset, record.offset + 1))
            elif foreign is None:
                foreign = record.offset
        if found and len(found) != len(expected):
            raise LogCorrupt(f"{self!r}: only {len(found)} of {len(expected)} records of one "
                             f"transaction are in the log below offset {end}")
        return found or None, foreign

    def _only_ours(self, records: list[CommittedRecord], end: int,
                   unresolved: list[bytes] | None) -> _Decision:
        """Positions of `unresolved` in the log (None if absent). If another owner wrote,
        the group is lost: WalFenced, unless our records are in the log (then they stand,
        and the next append raises WalFenced)."""
        positions, foreign = self._classify(records, end, unresolved)
        if foreign is not None:
            self._fenced = (f"group {self.group}: another owner wrote to "
                            f"{self.topic_partition.topic}/{self.group} at offset {foreign}")
            log.error("%r: %s; this process stops serving the group", self, self._fenced)
            if positions is None:
                raise WalFenced(self._fenced)
        return positions

    async def close(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
            try:
                await self._recovery
            except (asyncio.CancelledError, VotesError):
                pass
        if self._producer is not None:
            await _close_producer(self._producer)
            self._producer = None
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader.stop(), CLOSE_TIMEOUT_S)
            except (KafkaError, OSError, TimeoutError) as exc:
                log.warning("%r: closing the reader: %r", self, exc)
            self._reader = None
