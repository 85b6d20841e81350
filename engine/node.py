"""One worker process: the shards it owns, and the way to every other shard of this host.

A worker claims a slot (an flock on `<data>/run/slot-<i>.lock`, first free of 0..workers-1;
a respawned worker takes the slot its dead predecessor freed) and owns the shards
`s` with `s mod workers == slot`. Each owned shard is fenced by its own log lock, so even a
stale process still holding a slot could not append. Requests for other shards go to their
owner over the private forwarding socket; results and poll changes fan out to all slots.

Cluster mode (Kafka WAL and `redis_url` set, engine/ownership.py): a worker still considers
only the shards `s mod workers == slot`, but holds the ones its LeaseManager leases, started
and stopped as leases come and go. A vote for a shard held by another node is forwarded over
HTTP to the lease holder's advertised URL and its answer relayed; it is never counted where
it landed. Poll creation and closing are forwarded to every other holder; results sum each
shard's part from its holder (`GET /internal/v1/polls/{poll}/summary`).
"""

from __future__ import annotations

import asyncio
import datetime
import fcntl
import logging
import os
from collections import Counter
from collections.abc import Awaitable
from typing import Any

from engine import signing
from engine.config import Config
from engine.errors import NotReady, OutcomeUnknown, PollNotFound, VotesError
from engine.forwarding import ForwardServer, PeerClient, socket_path
from engine.keys import KeyRing
from engine.metrics import BUFFERED, SHARDS_READY
from engine.ownership import (
    ForwardedRequest,
    LeaseManager,
    Relayed,
    lease_holders,
    lease_key,
    parse_lease,
    redis_client,
)
from shards.backends import durability, make_snapshot_store, make_wal
from shards.commit import GroupCommitter
from shards.owner import ShardOwner
from shards.records import PollCreated

log = logging.getLogger("votes.node")

SLOT_RETRY_S = 0.2
DRAIN_POLL_S = 0.01
ADMIN_TOKEN_TTL_S = 300
# Per-poll rejection counters are kept only for polls that exist, so garbage poll ids in
# rejected requests cannot grow memory.
REJECTION_REASONS = ("duplicate", "bad-token", "closed-poll", "not-open", "unknown-option")


class Node:
    def __init__(self, config: Config, keyring: KeyRing) -> None:
        self.config = config
        self.keyring = keyring
        self.data_dir = config.data_path
        self.hasher = signing.VoterHasher(keyring.voter_hash_secret)
        self.slot: int | None = None
        self.owners: dict[int, ShardOwner] = {}
        self.peers: dict[int, PeerClient] = {}
        self.rejected: dict[str, Counter] = {}
        self._slot_descriptor: int | None = None
        self._server: ForwardServer | None = None
        self._tasks: list[asyncio.Task] = []
        self.leases: LeaseManager | None = None
        self._starting: dict[int, asyncio.Task] = {}
        self._admin_token: tuple[float, str] | None = None

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
        })
        await self._server.start()
        metrics = BUFFERED
        self.metrics = metrics
        self.committer = GroupCommitter(self.config, self.keyring, self.hasher, metrics)
        self._tasks.append(asyncio.create_task(self.committer.run(), name="group-commit"))
        if self.config.uses_cluster:
            self._start_cluster()
            return
        for shard in range(self.slot, self.config.shards, workers):
            wal = make_wal(self.config, shard)
            store = make_snapshot_store(self.config, shard)
            self.owners[shard] = ShardOwner(shard, self.config, wal, store, self.keyring,
                                            self.hasher, metrics, self.committer)
        for owner in self.owners.values():
            self._tasks.append(asyncio.create_task(self._start_owner(owner)))

    async def _start_owner(self, owner: ShardOwner) -> None:
        try:
            await owner.start()
        except VotesError:
            return  # the owner recorded why; /readyz reports it
        SHARDS_READY.inc()
        log.info("shard %d ready (log offset %d)", owner.shard, owner.state.wal_offset_next)

    # Cluster mode: owners come and go with leases ---------------------------------------------

    def _start_cluster(self) -> None:
        import httpx

        config = self.config
        self.redis = redis_client(config)
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(config.forward_timeout_s, connect=min(1.0, config.forward_timeout_s)),
            limits=httpx.Limits(max_connections=config.forward_connections_max))
        self.leases = LeaseManager(config, self.redis, slot=self.slot, start_shard=self._gain_shard,
                                   stop_shard=self._drop_shard, shard_ready=self._shard_ready)
        self._tasks.append(asyncio.create_task(self.leases.run(), name="leases"))

    def _shard_ready(self, shard: int) -> bool:
        owner = self.owners.get(shard)
        return owner is not None and owner.ready

    def _gain_shard(self, shard: int) -> None:
        """Begin serving a leased shard: fence + replay in the background; until it is done
        the shard answers not-ready."""
        owner = ShardOwner(shard, self.config, make_wal(self.config, shard),
                           make_snapshot_store(self.config, shard), self.keyring, self.hasher,
                           self.metrics, self.committer)
        self.owners[shard] = owner
        self._starting[shard] = asyncio.create_task(self._start_owner(owner), name=f"start-{shard}")

    async def _drop_shard(self, shard: int) -> None:
        """Stop serving a shard: refuse new votes at once, let votes already queued or in an
        append finish (bounded by append_timeout_s), then close the shard's WAL producer."""
        owner = self.owners.pop(shard, None)
        starting = self._starting.pop(shard, None)
        if owner is None:
            return
        was_ready = owner.ready
        owner.ready = False
        if starting is not None and not starting.done():
            starting.cancel()
            try:
                await starting
            except (asyncio.CancelledError, VotesError):
                pass
        deadline = asyncio.get_running_loop().time() + self.config.append_timeout_s
        while (owner.has_queued() or owner.has_votes_in_flight()) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        owner.fail_unwritten(owner.take_items(), NotReady(f"shard {shard} moved to another owner"))
        self.committer.remove(owner)
        await owner.stop()
        if was_ready:
            SHARDS_READY.dec()
        log.info("shard %d stopped", shard)

    async def _holder(self, shard: int) -> tuple[str, str] | None:
        try:
            return parse_lease(await self.redis.get(lease_key(self.config, shard)))
        except Exception as exc:  # noqa: BLE001 - any Redis failure: the holder is unknown
            raise NotReady(f"cannot find the owner of shard {shard}: {exc!r}") from None

    async def _remote_holders(self) -> set[str]:
        """Advertise URLs of the other nodes holding shards; NotReady if a shard has none."""
        try:
            holders = await lease_holders(self.config, self.redis)
        except Exception as exc:  # noqa: BLE001
            raise NotReady(f"cannot read the shard leases: {exc!r}") from None
        missing = [shard for shard in range(self.config.shards) if shard not in holders]
        if missing:
            raise NotReady(f"shards {missing} have no owner yet")
        return {url for node_id, url in holders.values() if node_id != self.config.node_name}

    async def _send(self, method: str, url: str, *, headers: dict[str, str],
                    body: bytes | None = None, outcome_unknown: bool = False):
        import httpx

        try:
            return await self.http.request(method, url, headers=headers, content=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise NotReady(f"the owner at {url} cannot be reached: {exc!r}") from None
        except httpx.HTTPError as exc:
            if outcome_unknown:
                raise OutcomeUnknown(f"no answer from the owner at {url}: {exc!r}") from None
            raise NotReady(f"no answer from {url}: {exc!r}") from None

    def _internal_headers(self) -> dict[str, str]:
        from engine.tokens import issue_admin_token

        now = asyncio.get_running_loop().time()
        if self._admin_token is None or now - self._admin_token[0] > ADMIN_TOKEN_TTL_S / 2:
            self._admin_token = (now, issue_admin_token(self.keyring, ttl_s=ADMIN_TOKEN_TTL_S))
        return {"authorization": f"Bearer {self._admin_token[1]}", "x-votes-forwarded": "1"}

    async def _cluster_vote(self, poll: str, voter_id: int, option: str,
                            request: ForwardedRequest | None) -> bytes:
        shard = voter_id % self.config.shards
        owner = self.owners.get(shard)
        if owner is not None:
            return await owner.submit_vote(poll, voter_id, option)
        holder = await self._holder(shard)
        if holder is None:
            raise NotReady(f"shard {shard} has no owner yet")
        node_id, url = holder
        if node_id == self.config.node_name:
            slot = self._slot_of(shard)
            if slot != self.slot:
                return await self.peers[slot].call("vote", poll, voter_id, option, unknown_on_timeout=True)
            raise NotReady(f"shard {shard} is being handed over")
        if request is None or request.forwarded:
            raise NotReady(f"shard {shard} is held by {node_id}, not by this node")
        answer = await self._send("POST", f"{url}/v1/polls/{poll}/votes", headers=request.headers(),
                                  body=request.body, outcome_unknown=True)
        raise Relayed(answer.status_code, answer.headers.get("content-type", "application/json"),
                      answer.content)

    async def _fan_out(self, path: str, request: ForwardedRequest | None, ok: tuple[int, ...]) -> list:
        """POST the request to every other holder; the answers whose status is in `ok`."""
        if request is None or request.forwarded:
            return []
        urls = await self._remote_holders()
        answers = await asyncio.gather(*(self._send("POST", url + path, headers=request.headers(),
                                                    body=request.body) for url in sorted(urls)))
        for answer in answers:
            if answer.status_code not in ok:
                raise Relayed(answer.status_code, answer.headers.get("content-type", "application/json"),
                              answer.content)
        return answers

    async def cluster_summary(self, poll: str) -> dict:
        """This node's per-shard parts of a poll (ready shards only) and its rejections."""
        shards: dict[str, list | None] = {}
        rejected: Counter = Counter()
        for part in await self._everywhere("shard_summaries", poll):
            shards.update(part["shards"])
            rejected.update(part["rejected"])
        return {"shards": shards, "rejected": dict(rejected)}

    async def _cluster_parts(self, poll: str) -> list[dict]:
        merged = await self.cluster_summary(poll)
        parts_by_shard = dict(merged["shards"])
        parts = [{"definition": None, "tallies": [], "closed_shards": 0, "rejected": merged["rejected"]}]
        for url in sorted(await self._remote_holders()):
            answer = await self._send("GET", f"{url}/internal/v1/polls/{poll}/summary",
                                      headers=self._internal_headers())
            if answer.status_code != 200:
                raise NotReady(f"{url} did not give its part of the results ({answer.status_code})")
            remote = answer.json()
            for shard, part in remote["shards"].items():
                parts_by_shard.setdefault(shard, part)
            parts.append({"definition": None, "tallies": [], "closed_shards": 0,
                          "rejected": remote["rejected"]})
        missing = [shard for shard in range(self.config.shards) if str(shard) not in parts_by_shard]
        if missing:
            raise NotReady(f"shards {missing} have no ready owner")
        for part in parts_by_shard.values():
            if part is not None:
                definition, tallies, closed = part
                parts.append({"definition": definition, "tallies": tallies,
                              "closed_shards": int(closed), "rejected": {}})
        return parts

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
        if self.leases is not None:
            await self.leases.release_all()
            await self.redis.aclose()
            await self.http.aclose()
        if self._server is not None:
            await self._server.stop()
        for peer in self.peers.values():
            await peer.close()

    # Routing to owners -----------------------------------------------------------------------

    def _slot_of(self, shard: int) -> int:
        return shard % self.config.workers

    def vote(self, poll: str, voter_id: int, option: str,
             request: ForwardedRequest | None = None) -> Awaitable[bytes]:
        """The vote's 201 body, to await: the owner's own coroutine when this worker owns the
        shard (not wrapped in one more coroutine: a frame less per vote), else a forward."""
        if self.leases is not None:
            return self._cluster_vote(poll, voter_id, option, request)
        slot = self._slot_of(voter_id % self.config.shards)
        if slot == self.slot:
            return self._local_vote(poll, voter_id, option)
        if self.slot is None:
            raise NotReady("this worker is still starting")
        return self.peers[slot].call("vote", poll, voter_id, option, unknown_on_timeout=True)

    async def _everywhere(self, operation: str, *arguments: Any) -> list[Any]:
        """Run an operation on every slot (this one locally); the first error wins."""
        if self.slot is None:
            raise NotReady("this worker is still starting")
        local = {"create": self._local_create, "close": self._local_close,
                 "summary": self._local_summary, "ready": self._local_ready,
                 "shard_summaries": self._local_shard_summaries}[operation]
        calls = [local(*arguments)]
        calls += [peer.call(operation, *arguments) for peer in self.peers.values()]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    # Operations on this worker's own shards ------------------------------------------------

    def _local_vote(self, poll: str, voter_id: int, option: str) -> Awaitable[bytes]:
        owner = self.owners.get(voter_id % self.config.shards)
        if owner is None:
            raise NotReady("this worker does not own the voter's shard")
        return owner.submit_vote(poll, voter_id, option)

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
            raise PollNotFound(f"poll {poll!r} does not exist")
        results = await asyncio.gather(*(owner.close_poll(poll) for owner in self.owners.values()
                                         if owner.state and poll in owner.state.polls),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _local_summary(self, poll: str) -> dict | None:
        """This worker's part of a poll's results: summed tallies, closed shard count."""
        definition = None
        tallies: list[int] = []
        closed_shards = 0
        for owner in self.owners.values():
            summary = owner.poll_summary(poll)
            if summary is None:
                continue
            shard_definition, shard_tallies, closed = summary
            if definition is None:
                definition, tallies = shard_definition, [0] * len(shard_tallies)
            tallies = [total + count for total, count in zip(tallies, shard_tallies, strict=True)]
            closed_shards += closed
        if definition is None:
            return None
        return {"definition": _fields(definition),
                "tallies": tallies, "closed_shards": closed_shards,
                "rejected": dict(self.rejected.get(poll, {}))}

    async def _local_shard_summaries(self, poll: str) -> dict:
        """Per shard (ready ones only): [definition fields, tallies, closed] or None."""
        shards: dict[str, list | None] = {}
        for shard, owner in self.owners.items():
            if not owner.ready:
                continue
            summary = owner.poll_summary(poll)
            shards[str(shard)] = None if summary is None else [
                _fields(summary[0]), summary[1], summary[2]]
        return {"shards": shards, "rejected": dict(self.rejected.get(poll, {}))}

    async def _local_ready(self) -> list:
        ready = sum(owner.ready for owner in self.owners.values())
        failures = [owner.failure for owner in self.owners.values() if owner.failure]
        if self.leases is not None:
            return [ready, len(self.owners), failures, self.leases.settled()]
        return [ready, len(self.owners), failures]

    def knows_poll(self, poll: str) -> bool:
        return any(owner.state is not None and poll in owner.state.polls
                   for owner in self.owners.values())

    # Fleet-wide views ----------------------------------------------------------------------

    async def create_poll(self, record: PollCreated, request: ForwardedRequest | None = None) -> bool:
        if self.leases is not None and (request is None or not request.forwarded):
            await self._remote_holders()  # every shard must have an owner before any writes
        created = any(await self._everywhere("create", _fields(record)))
        if self.leases is not None:
            answers = await self._fan_out("/v1/polls", request, ok=(201, 409))
            created = created or any(answer.status_code == 201 for answer in answers)
        return created

    async def close_poll(self, poll: str, request: ForwardedRequest | None = None) -> bool:
        await self._everywhere("close", poll)
        if self.leases is not None:
            await self._fan_out(f"/v1/polls/{poll}/close", request, ok=(200,))
        return True

    async def results(self, poll: str) -> dict:
        if self.leases is not None:
            parts = await self._cluster_parts(poll)
        else:
            parts = [part for part in await self._everywhere("summary", poll) if part is not None]
        definitions = [part["definition"] for part in parts if part["definition"] is not None]
        if not definitions:
            raise PollNotFound(f"poll {poll!r} does not exist")
        definition = PollCreated(*definitions[0])
        tallies = [0] * len(definition.options)
        rejected: Counter = Counter()
        closed_shards = 0
        for part in parts:
            if part["tallies"]:
                tallies = [total + count
                           for total, count in zip(tallies, part["tallies"], strict=True)]
            closed_shards += part["closed_shards"]
            rejected.update(part["rejected"])
        final = closed_shards == self.config.shards
        embargoed = definition.embargo and not final
        counts = {} if embargoed else dict(zip(definition.options, tallies, strict=True))
        return {
            "poll": poll,
            "counts": counts,
            "total": sum(counts.values()),
            "final": final,
            "embargoed": embargoed,
            "rejected": {reason: rejected.get(reason, 0) for reason in REJECTION_REASONS},
            "as_of": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }

    async def readiness(self) -> dict:
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
            "durability": durability(self.config),
            "shards_total": self.config.shards,
            "shards_ready": ready,
            "workers": self.config.workers,
        }
        if self.leases is not None:
            # A node is ready when it holds every shard it prefers and all it holds serve.
            readiness.update(ready=settled and ready == total and not failures,
                             node_id=self.config.node_name, shards_held=total)
        return readiness

    def count_rejection(self, poll: str, reason: str) -> None:
        if self.knows_poll(poll):
            self.rejected.setdefault(poll, Counter())[reason] += 1


def _fields(record: PollCreated) -> list:
    return [getattr(record, name) for name in record.__struct_fields__]
