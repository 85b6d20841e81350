"""The multi-host node: fencing groups held by Redis leases, votes relayed to the lease holder.

Chosen once at start-up instead of `Node` when the config names a Kafka WAL and a
`redis_url` (`make_node`). A worker still considers only the groups `g mod workers == slot`,
but holds the ones its LeaseManager (engine/ownership.py) leases, started and stopped as
leases come and go; a group moves as a whole, with all its shards. A vote for a group held
by another node is forwarded over HTTP to the
lease holder's advertised URL and its answer relayed; it is never counted where it landed
(docs/design.md "Shards and ownership"). Poll creation and closing are forwarded to every
other holder; results sum each shard's part from its holder
(`GET /internal/v1/polls/{poll}/summary`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

import httpx

from engine.config import Config
from engine.errors import InvariantViolation, NotReady, OutcomeUnknown, VotesError
from engine.keys import KeyRing
from engine.metrics import SHARDS_READY, group_owned, group_ready
from engine.node import DRAIN_POLL_S, Node
from engine.ownership import (
    ForwardedRequest,
    LeaseManager,
    Relayed,
    lease_holders,
    lease_key,
    parse_lease,
    redis_client,
)
from engine.receipt_lookup import COUNTED, NOT_COUNTED, PENDING
from engine.receipts import Receipt
from engine.tokens import issue_admin_token
from shards.records import PollCreated

log = logging.getLogger("votes.node")

ADMIN_TOKEN_TTL_S = 300


class ClusterNode(Node):
    def __init__(self, config: Config, keyring: KeyRing) -> None:
        super().__init__(config, keyring)
        self._starting: dict[int, asyncio.Task] = {}
        self._admin_token: tuple[float, str] | None = None

    def _start_groups(self) -> None:
        """Hold the groups the leases give this node, started and stopped as they move."""
        config = self.config
        self.redis = redis_client(config)
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(config.forward_timeout_s, connect=min(1.0, config.forward_timeout_s)),
            limits=httpx.Limits(max_connections=config.forward_connections_max))
        self.leases = LeaseManager(config, self.redis, slot=self._own_slot(), start_group=self._gain_group,
                                   stop_group=self._drop_group, group_ready=self._group_ready)
        self._tasks.append(asyncio.create_task(self.leases.run(), name="leases"))

    def _group_ready(self, group: int) -> bool:
        owner = self.owners.get(group)
        return owner is not None and owner.ready

    def _gain_group(self, group: int) -> None:
        """Begin serving a leased group: fence + replay in the background; until it is done
        its shards answer not-ready."""
        owner = self._new_owner(group)
        self.owners[group] = owner
        self._starting[group] = asyncio.create_task(self._start_owner(owner), name=f"start-g{group}")

    async def _drop_group(self, group: int) -> None:
        """Stop serving a group: refuse new votes at once, let votes already queued or in an
        append finish (bounded by append_timeout_s), then close the group's WAL producer."""
        owner = self.owners.pop(group, None)
        starting = self._starting.pop(group, None)
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
        owner.fail_unwritten(owner.take_items(), NotReady(f"group {group} moved to another owner"))
        self.committer.remove(owner)
        await owner.stop()
        if was_ready:
            SHARDS_READY.dec(len(owner.shards))
            group_owned(group, False)
            group_ready(group, False)
        log.info("group %d stopped", group)

    async def _holder(self, group: int) -> tuple[str, str] | None:
        try:
            return parse_lease(await self.redis.get(lease_key(self.config, group)))
        except Exception as exc:  # noqa: BLE001 - any Redis failure: the holder is unknown
            raise NotReady(f"cannot find the owner of group {group}: {exc!r}") from None

    async def _remote_holders(self) -> set[str]:
        """Advertise URLs of the other nodes holding groups; NotReady if a group has none."""
        try:
            holders = await lease_holders(self.config, self.redis)
        except Exception as exc:  # noqa: BLE001
            raise NotReady(f"cannot read the group leases: {exc!r}") from None
        missing = [group for group in range(self.config.groups) if group not in holders]
        if missing:
            raise NotReady(f"groups {missing} have no owner yet")
        return {url for node_id, url in holders.values() if node_id != self.config.node_name}

    async def _send(self, method: str, url: str, *, headers: dict[str, str],
                    body: bytes | None = None, outcome_unknown: bool = False):
        try:
            return await self.http.request(method, url, headers=headers, content=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise NotReady(f"the owner at {url} cannot be reached: {exc!r}") from None
        except httpx.HTTPError as exc:
            if outcome_unknown:
                raise OutcomeUnknown(f"no answer from the owner at {url}: {exc!r}") from None
            raise NotReady(f"no answer from {url}: {exc!r}") from None

    def _internal_headers(self) -> dict[str, str]:
        now = asyncio.get_running_loop().time()
        if self._admin_token is None or now - self._admin_token[0] > ADMIN_TOKEN_TTL_S / 2:
            self._admin_token = (now, issue_admin_token(self.keyring, ttl_s=ADMIN_TOKEN_TTL_S))
        return {"authorization": f"Bearer {self._admin_token[1]}", "x-votes-forwarded": "1"}

    async def _route_to_holder(self, group: int, request: ForwardedRequest | None) -> int | str:
        """Where a request for a group this worker does not own goes: another worker of this
        node (its slot) or another node (its URL; a request already forwarded never is
        again). NotReady when the group has no holder or is being handed over."""
        holder = await self._holder(group)
        if holder is None:
            raise NotReady(f"group {group} has no owner yet")
        node_id, url = holder
        if node_id == self.config.node_name:
            slot = self._slot_of(group)
            if slot != self.slot:
                return slot
            raise NotReady(f"group {group} is being handed over")
        if request is None or request.forwarded:
            raise NotReady(f"group {group} is held by {node_id}, not by this node")
        return url

    async def _cluster_vote(self, poll: str, voter_id: int, option: str,
                            request: ForwardedRequest | None, country: str) -> bytes:
        group = voter_id % self.config.groups
        owner = self.owners.get(group)
        if owner is not None:
            return await owner.submit_vote(poll, voter_id, option, country)
        holder = await self._route_to_holder(group, request)
        if isinstance(holder, int):
            return await self.peers[holder].call("vote", poll, voter_id, option, country,
                                                 unknown_on_timeout=True)
        if request is None:
            raise InvariantViolation("a vote was routed to another node without its request")
        answer = await self._send("POST", f"{holder}/v1/polls/{poll}/votes", headers=request.headers(),
                                  body=request.body, outcome_unknown=True)
        raise Relayed(answer.status_code, answer.headers.get("content-type", "application/json"),
                      answer.content)

    async def receipt_state(self, receipt_text: str, receipt: Receipt,
                            request: ForwardedRequest | None = None) -> str:
        """As Node's, with the group's owner found through its lease: this worker, another
        worker of this node, or another node (the lookup relayed, once)."""
        if receipt.shard >= self.config.shards or \
                receipt.group != self.config.group_of(receipt.shard):
            return NOT_COUNTED  # signed, but not of this deployment's layout
        group = self.config.group_of(receipt.shard)
        if group in self.owners:
            return await self._local_receipt(receipt_text)
        holder = await self._route_to_holder(group, request)
        if isinstance(holder, int):
            status: str = await self.peers[holder].call("receipt", receipt_text)
            return status
        if request is None:
            raise InvariantViolation("a lookup was routed to another node without its request")
        answer = await self._send("GET", f"{holder}/v1/receipts/{receipt_text}",
                                  headers=request.headers())
        try:
            relayed = answer.json()["status"] if answer.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            relayed = None
        if relayed not in (COUNTED, NOT_COUNTED, PENDING):
            raise NotReady(f"the holder of group {group} answered {answer.status_code}")
        return str(relayed)

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

    async def _result_parts(self, poll: str) -> list[dict]:
        """This node's parts, then every other holder's (its per-shard parts, first wins)."""
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
                # A node of the release before sends no country tallies (a rolling upgrade).
                definition, tallies, closed, *countries = part
                parts.append({"definition": definition, "tallies": tallies,
                              "closed_shards": int(closed), "rejected": {},
                              "countries": countries[0] if countries else {}})
        return parts

    async def _owners_stopped(self) -> None:
        await self.leases.release_all()
        await self.redis.aclose()
        await self.http.aclose()

    def vote(self, poll: str, voter_id: int, option: str,
             request: ForwardedRequest | None = None, country: str = "") -> Awaitable[bytes]:
        return self._cluster_vote(poll, voter_id, option, request, country)

    async def _local_ready(self) -> list:
        return [*await super()._local_ready(), self.leases.settled()]

    async def create_poll(self, record: PollCreated, request: ForwardedRequest | None = None) -> bool:
        if request is None or not request.forwarded:
            await self._remote_holders()  # every group must have an owner before any writes
        created = await super().create_poll(record, request)
        answers = await self._fan_out("/v1/polls", request, ok=(201, 409))
        return created or any(answer.status_code == 201 for answer in answers)

    async def close_poll(self, poll: str, request: ForwardedRequest | None = None) -> bool:
        await super().close_poll(poll, request)
        await self._fan_out(f"/v1/polls/{poll}/close", request, ok=(200,))
        return True

    async def readiness(self) -> dict:
        readiness, held, settled, failures = await self._readiness_parts()
        # A node is ready when it holds every group it prefers and all it holds serve.
        readiness.update(ready=settled and readiness["shards_ready"] == held and not failures,
                         node_id=self.config.node_name, shards_held=held)
        return readiness


def make_node(config: Config, keyring: KeyRing) -> Node:
    """The node this process runs: multi-host when the config names a cluster, else one host."""
    return ClusterNode(config, keyring) if config.uses_cluster else Node(config, keyring)
