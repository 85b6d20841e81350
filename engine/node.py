"""One worker process: the fencing groups it owns, and the way to every other group of this host.

A worker claims a slot (an flock on `<data>/run/slot-<i>.lock`, first free of 0..workers-1;
a respawned worker takes the slot its dead predecessor freed) and owns the fencing groups
`g` with `g mod workers == slot`, with all their shards (shard s is in group s mod groups,
so a voter's group is voter_id mod groups). Each owned group is fenced by its own log lock,
so even a stale process still holding a slot could not append. Requests for other groups
go to their owner over the private forwarding socket; results and poll changes fan out to
all slots.

This class is the single-host router; engine/cluster_node.py `ClusterNode` is the
multi-host one (Redis leases, HTTP relay), chosen once at start-up by `make_node` there.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from engine import signing
from engine.config import Config
from engine.errors import NotReady, PollNotFound, VotesError
from engine.forwarding import ForwardServer, PeerClient, socket_path
from engine.keys import KeyRing
from engine.metrics import BUFFERED, SHARDS_READY, group_owned, group_ready
from engine.receipt_lookup import NOT_COUNTED, owner_receipt_status
from engine.receipts import Receipt, decode_receipt
from engine.results_view import poll_results
from engine.snapshot_requests import watch_snapshot_requests
from engine.ownership import (
    ForwardedRequest,
)
from shards.backends import choose_backends
from shards.commit import GroupCommitter
from shards.group_owner import GroupOwner
from shards.records import PollCreated

# Failure reasons /readyz lists at most (one per group that cannot start, the first ones).
READINESS_FAILURES_MAX = 16

log = logging.getLogger("votes.node")

SLOT_RETRY_S = 0.2
DRAIN_POLL_S = 0.01
ADMIN_TOKEN_TTL_S = 300


class Node:
    def __init__(self, config: Config, keyring: KeyRing) -> None:
        self.config = config
        self.keyring = keyring
        self.data_dir = config.data_path
        self.hasher = signing.VoterHasher(keyring.voter_hash_secret)
        self.slot: int | None = None
        self.owners: dict[int, GroupOwner] = {}  # group -> its owner
        self.peers: dict[int, PeerClient] = {}
        # Per-poll rejection counters are kept only for polls that exist, so garbage poll ids
        # in rejected requests cannot grow memory.
        self.rejected: dict[str, Counter] = {}
        self._slot_descriptor: int | None = None
        self._server: ForwardServer | None = None
        self._tasks: list[asyncio.Task] = []
        self.backends = choose_backends(config)

    # Start-up --------------------------------------------------------------------------------

    async def start(self) -> None:
        self.slot = await self._claim_slot()
        workers = self.config.workers
        for peer in range(workers):
            if peer != self.slot:
                self.peers[peer] = PeerClient(socket_path(self.data_dir, peer),
                                              self.config.forward_timeout_s,
                                              self.config.forward_connections_max)
        self._server = ForwardServer(socket_path(self.data_dir, self.slot), {
            "vote": self._local_vote,
            "create": self._local_create,
            "close": self._local_close,
            "summary": self._local_summary,
            "ready": self._local_ready,
            "shard_summaries": self._local_shard_summaries,
            "receipt": self._local_receipt,
        })
        await self._server.start()
        metrics = BUFFERED
        self.metrics = metrics
        self.committer = GroupCommitter(self.config, self.keyring, self.hasher, metrics)
        self._tasks.append(asyncio.create_task(self.committer.run(), name="group-commit"))
        self._start_groups()
        self._tasks.append(asyncio.create_task(watch_snapshot_requests(self),
                                               name="snapshot-requests"))

    def _start_groups(self) -> None:
        """Own the groups of this slot (`group mod workers == slot`) for good."""
        slot = self._own_slot()
        for group in range(slot, self.config.groups, self.config.workers):
            self.owners[group] = self._new_owner(group)
        for owner in self.owners.values():
            self._tasks.append(asyncio.create_task(self._start_owner(owner)))

    def _own_slot(self) -> int:
        if self.slot is None:
            raise NotReady("this worker is still starting")
        return self.slot

    def _new_owner(self, group: int) -> GroupOwner:
        stores = {shard: self.backends.snapshot_store(shard)
                  for shard in self.config.shards_of_group(group)}
        return GroupOwner(group, self.config, self.backends.wal(group), stores, self.keyring,
                          self.hasher, self.metrics, self.committer)

    async def _start_owner(self, owner: GroupOwner) -> None:
        try:
            await owner.start()
        except Exception:  # noqa: BLE001 - the owner logged and recorded why; /readyz says it
            return
        SHARDS_READY.inc(len(owner.shards))
        group_owned(owner.group, True)
        group_ready(owner.group, True)
        log.info("group %d ready: %d shards (log offset %d)", owner.group, len(owner.shards),
                 owner.wal_offset_next)

    async def _claim_slot(self) -> int:
        run_dir = self.data_dir / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            for slot in range(self.config.workers):
                descriptor = os.open(run_dir / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(descriptor)
                    continue
                self._slot_descriptor = descriptor
                return slot
            await asyncio.sleep(SLOT_RETRY_S)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for owner in self.owners.values():
            await owner.stop()
        await self._owners_stopped()
        if self._server is not None:
            await self._server.stop()
        for peer in self.peers.values():
            await peer.close()

    async def _owners_stopped(self) -> None:
        """What to release once every owner stopped (the multi-host node's leases)."""

    # Routing to owners -----------------------------------------------------------------------

    def _slot_of(self, group: int) -> int:
        return group % self.config.workers

    def vote(self, poll: str, voter_id: int, option: str,
             request: ForwardedRequest | None = None, country: str = "") -> Awaitable[bytes]:
        """The vote's 201 body, to await: the owner's own coroutine when this worker owns the
        voter's group (not wrapped in one more coroutine: a frame less per vote), else a
        forward. The voter's group: (voter_id mod shards) mod groups = voter_id mod groups,
        since groups divides shards."""
        slot = self._slot_of(voter_id % self.config.groups)
        if slot == self.slot:
            return self._local_vote(poll, voter_id, option, country)
        if self.slot is None:
            raise NotReady("this worker is still starting")
        return self.peers[slot].call("vote", poll, voter_id, option, country,
                                     unknown_on_timeout=True)

    async def receipt_state(self, receipt_text: str, receipt: Receipt,
                            request: ForwardedRequest | None = None) -> str:
        """counted / not-counted / pending, from the owner of the receipt's group
        (engine/receipt_lookup.py); the receipt's signature is checked already."""
        if receipt.shard >= self.config.shards or \
                receipt.group != self.config.group_of(receipt.shard):
            return NOT_COUNTED  # signed, but not of this deployment's layout
        slot = self._slot_of(self.config.group_of(receipt.shard))
        if slot == self.slot:
            return await self._local_receipt(receipt_text)
        if self.slot is None:
            raise NotReady("this worker is still starting")
        status: str = await self.peers[slot].call("receipt", receipt_text)
        return status

    async def _everywhere(self, operation: str, *arguments: Any) -> list[Any]:
        """Run an operation on every slot (this one locally); the first error wins."""
        if self.slot is None:
            raise NotReady("this worker is still starting")
        operations: dict[str, Callable[..., Awaitable[Any]]] = {
            "create": self._local_create, "close": self._local_close,
            "summary": self._local_summary, "ready": self._local_ready,
            "shard_summaries": self._local_shard_summaries}
        local = operations[operation]
        calls = [local(*arguments)]
        calls += [peer.call(operation, *arguments) for peer in self.peers.values()]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    # Operations on this worker's own groups ------------------------------------------------

    def _local_vote(self, poll: str, voter_id: int, option: str,
                    country: str = "") -> Awaitable[bytes]:
        owner = self.owners.get(voter_id % self.config.groups)
        if owner is None:
            raise NotReady("this worker does not own the voter's group")
        return owner.submit_vote(poll, voter_id, option, country)

    async def _local_receipt(self, receipt_text: str) -> str:
        receipt = decode_receipt(receipt_text)
        owner = self.owners.get(self.config.group_of(receipt.shard))
        if owner is None:
            raise NotReady("this worker does not own the receipt's group")
        return await owner_receipt_status(owner, receipt)

    async def _local_create(self, definition: list) -> bool:
        record = PollCreated(*definition)
        results = await asyncio.gather(*(owner.create_poll(record) for owner in self.owners.values()),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return any(results)

    async def _local_close(self, poll: str) -> None:
        if not self.knows_poll(poll):
            raise PollNotFound("no poll with this id")
        results = await asyncio.gather(*(owner.close_poll(poll) for owner in self.owners.values()
                                         if owner.knows_poll(poll)),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _local_summary(self, poll: str) -> dict | None:
        """This worker's part of a poll's results: summed tallies, closed shard count and
        the country tallies summed too (the breakdown's, else {})."""
        definition = None
        tallies: list[int] = []
        countries: dict[str, list[int]] = {}
        closed_shards = 0
        for owner in self.owners.values():
            for part in owner.poll_summaries(poll):
                if definition is None:
                    definition, tallies = part.definition, [0] * len(part.tallies)
                tallies = add_counts(tallies, part.tallies)
                for country, counts in part.country_tallies.items():
                    countries[country] = add_counts(countries.get(country, [0] * len(counts)),
                                                    counts)
                closed_shards += part.closed
        if definition is None:
            return None
        return {"definition": fields_of(definition), "tallies": tallies,
                "closed_shards": closed_shards, "rejected": dict(self.rejected.get(poll, {})),
                "countries": countries}

    async def _local_shard_summaries(self, poll: str) -> dict:
        """Per shard (ready ones only): [definition fields, tallies, closed] or None."""
        shards: dict[str, list | None] = {}
        for owner in self.owners.values():
            if not owner.ready:
                continue
            summaries = {part.shard: [fields_of(part.definition), part.tallies, part.closed,
                                      part.country_tallies]
                         for part in owner.poll_summaries(poll)}
            for shard in owner.shards:
                shards[str(shard)] = summaries.get(shard)
        return {"shards": shards, "rejected": dict(self.rejected.get(poll, {}))}

    async def _local_ready(self) -> list:
        """[shards ready, shards held, failures]: a group's shards serve together."""
        ready = sum(len(owner.shards) for owner in self.owners.values() if owner.ready)
        held = sum(len(owner.shards) for owner in self.owners.values())
        failures = [owner.failure for owner in self.owners.values() if owner.failure]
        return [ready, held, failures]

    def knows_poll(self, poll: str) -> bool:
        return any(owner.knows_poll(poll) for owner in self.owners.values())

    # Fleet-wide views ----------------------------------------------------------------------

    async def create_poll(self, record: PollCreated, request: ForwardedRequest | None = None) -> bool:
        return any(await self._everywhere("create", fields_of(record)))

    async def close_poll(self, poll: str, request: ForwardedRequest | None = None) -> bool:
        await self._everywhere("close", poll)
        return True

    async def cluster_summary(self, poll: str) -> dict:
        """This node's per-shard parts (what another node of a cluster asks for) of a poll (ready shards only) and its rejections."""
        shards: dict[str, list | None] = {}
        rejected: Counter = Counter()
        for part in await self._everywhere("shard_summaries", poll):
            shards.update(part["shards"])
            rejected.update(part["rejected"])
        return {"shards": shards, "rejected": dict(rejected)}

    async def _result_parts(self, poll: str) -> list[dict]:
        """Every part of a poll's results: here, one per worker slot of this host."""
        return [part for part in await self._everywhere("summary", poll) if part is not None]

    async def results(self, poll: str) -> dict:
        parts = await self._result_parts(poll)
        definitions = [part["definition"] for part in parts if part["definition"] is not None]
        if not definitions:
            raise PollNotFound("no poll with this id")
        definition = PollCreated(*definitions[0])
        tallies = [0] * len(definition.options)
        countries: dict[str, list[int]] = {}
        rejected: Counter = Counter()
        closed_shards = 0
        for part in parts:
            if part["tallies"]:
                tallies = add_counts(tallies, part["tallies"])
            for country, counts in part.get("countries", {}).items():
                countries[country] = add_counts(countries.get(country, [0] * len(counts)), counts)
            closed_shards += part["closed_shards"]
            rejected.update(part["rejected"])
        final = closed_shards == self.config.shards
        embargoed = definition.embargo and not final
        counts = {} if embargoed else dict(zip(definition.options, tallies, strict=True))
        document = poll_results(poll, counts, final, embargoed, rejected)
        if definition.by_country:
            document["countries"] = {} if embargoed else {
                country: dict(zip(definition.options, countries[country], strict=True))
                for country in sorted(countries)}
        return document

    async def readiness(self) -> dict:
        return (await self._readiness_parts())[0]

    async def _readiness_parts(self) -> tuple[dict, int, bool, list[str]]:
        """The readiness document; the shards held, whether every slot's leases settled and
        the failures, which the multi-host node reads too."""
        ready = total = 0
        failures: list[str] = []
        settled = self.slot is not None
        if self.slot is not None:
            try:
                for part_ready, part_total, part_failures, *part_settled in await self._everywhere("ready"):
                    ready += part_ready
                    total += part_total
                    failures += part_failures
                    settled = settled and all(part_settled)
            except VotesError as exc:
                failures.append(str(exc))
        readiness = {
            "ready": ready == self.config.shards and not failures,
            "durability": self.backends.durability,
            "shards_total": self.config.shards,
            "shards_ready": ready,
            "groups_total": self.config.groups,
            "workers": self.config.workers,
        }
        if failures:
            # Why groups cannot start, so an operator sees it without reading the logs.
            readiness["failures"] = failures[:READINESS_FAILURES_MAX]
        return readiness, total, settled, failures

    def count_rejection(self, poll: str, reason: str) -> None:
        counts = self.rejected.get(poll)
        if counts is None:  # the poll's first rejection: only a known poll gets counts
            if not self.knows_poll(poll):
                return
            counts = self.rejected[poll] = Counter()
        counts[reason] += 1


def add_counts(left: list[int], right: list[int]) -> list[int]:
    return [total + count for total, count in zip(left, right, strict=True)]


def fields_of(record: PollCreated) -> list:
    return [getattr(record, name) for name in record.__struct_fields__]
