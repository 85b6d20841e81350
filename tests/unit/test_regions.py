"""Home-region forwarding (engine/regions.py) and the replicator's field selection
(engine/replicator.py), without Redis or a second engine:
- `region_urls` is parsed and checked (and must name this region);
- which votes are forwarded, and which are refused (unknown region, forwarded twice);
- against real sockets: an answer is relayed as it is; a refused connection is `not-ready`
  (nothing sent); a server that read the vote and never answered is `outcome-unknown`;
- the replicator ships its own region's fields only, refuses fields it did not write, and
  its shipments converge whatever their order or duplication (hypothesis); its lag gauge
  keeps growing while the source cannot be read, and drops once a cycle completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import crdt
from engine.config import Config, load_config, parse_region_urls
from engine.errors import ConfigError, NotReady, OutcomeUnknown
from engine.regions import REGION_FORWARDED_HEADER, RegionForwarder
from engine.metrics import REPLICATION_LAG
from engine.replicator import Replicator, poll_of_merged_key, region_fields
from engine.results_publisher import merged_key
from engine.tokens import TokenForbidden

URLS = "eu=http://127.0.0.1:8001, us=http://127.0.0.1:8002/"


def test_region_urls_parse_and_check() -> None:
    assert parse_region_urls("") == {}
    assert parse_region_urls(URLS) == {"eu": "http://127.0.0.1:8001",
                                       "us": "http://127.0.0.1:8002"}
    for broken in ("eu", "eu=", "eu=127.0.0.1:1", "e|u=http://a", "eu=http://a,eu=http://b"):
        with pytest.raises(ConfigError):
            parse_region_urls(broken)
    assert load_config(region="eu", region_urls=URLS).region_urls == URLS
    with pytest.raises(ConfigError, match="this region"):
        load_config(region="ap", region_urls=URLS)
    with pytest.raises(ConfigError):
        load_config(region_forward_timeout_s=0)


def forwarder(**fields) -> RegionForwarder:
    return RegionForwarder(Config(region="eu", region_urls=URLS, **fields))


def test_which_votes_are_forwarded() -> None:
    assert RegionForwarder(Config()).home_url("anywhere", {}) is None  # single region
    regions = forwarder()
    assert regions.home_url("eu", {}) is None
    assert regions.home_url("us", {}) == "http://127.0.0.1:8002"
    with pytest.raises(TokenForbidden, match="not served"):
        regions.home_url("ap", {})
    with pytest.raises(TokenForbidden, match="disagree"):  # never bounced a second time
        regions.home_url("us", {REGION_FORWARDED_HEADER: "us"})
    assert regions.home_url("eu", {REGION_FORWARDED_HEADER: "us"}) is None


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def serve(handler) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


def test_answer_is_relayed_with_the_same_body_and_authorization() -> None:
    seen: list[bytes] = []

    async def answer(reader, writer) -> None:
        seen.append(await read_request(reader))
        body = b'{"type":"/problems/already-voted"}'
        writer.write(b"HTTP/1.1 409 Conflict\r\ncontent-type: application/problem+json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async def scenario():
        server, url = await serve(answer)
        regions = forwarder()
        try:
            return await regions.forward(url, "p1", b'{"option":"a"}', "Bearer T", "rid-1")
        finally:
            await regions.close()
            server.close()

    relayed = asyncio.run(scenario())
    assert relayed == (409, "application/problem+json", b'{"type":"/problems/already-voted"}')
    request = seen[0].lower()
    assert request.startswith(b"post /v1/polls/p1/votes ")
    assert b"authorization: bearer t" in request and b"x-request-id: rid-1" in request
    assert request.endswith(b'{"option":"a"}') and b"x-votes-region-forwarded: eu" in request


def test_refused_connection_is_not_ready_and_silence_is_outcome_unknown() -> None:
    async def never_answer(reader, writer) -> None:
        try:
            await read_request(reader)  # the vote arrived: the home region may count it
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)
        finally:
            writer.close()

    async def scenario() -> None:
        regions = forwarder(region_forward_timeout_s=0.3)
        with pytest.raises(NotReady):
            await regions.forward(f"http://127.0.0.1:{closed_port()}", "p1", b"{}", None, None)
        server, url = await serve(never_answer)
        try:
            with pytest.raises(OutcomeUnknown):
                await regions.forward(url, "p1", b'{"option":"a"}', "Bearer T", None)
        finally:
            await regions.close()
            server.close()

    asyncio.run(scenario())


def fields_of(state: crdt.Counters, poll: str) -> dict[str, str]:
    return {name: str(value) for name, value in crdt.poll_fields(state, poll).items()}


def test_replicator_ships_its_own_region_only() -> None:
    state = crdt.Counters(
        {("eu", 0, "p", "a"): 3, ("us", 1, "p", "a"): 9, ("eu", 2, "p", "b"): 1},
        {("eu", "r1", "p", "duplicate"): 2, ("us", "r2", "p", "duplicate"): 5},
        {("eu", 0, "p"), ("us", 1, "p")})
    shipped = dict(region_fields("p", fields_of(state, "p"), "eu"))
    assert shipped == {"t|eu|0|a": 3, "t|eu|2|b": 1, "r|eu|r1|duplicate": 2, "c|eu|0": 1}
    with pytest.raises(crdt.CounterInvalid):
        region_fields("p", {"x|eu|0": "1"}, "eu")
    assert poll_of_merged_key(merged_key("poll-1")) == "poll-1"


counts = st.integers(min_value=0, max_value=50)


@given(st.lists(st.tuples(counts, counts, counts), min_size=1, max_size=6), st.data())
def test_shipments_converge_in_any_order_with_duplicates(growth, data) -> None:
    """Region eu's state grows (per shard counts only rise); each shipment is eu's whole
    state at one moment; the target also holds us's own fields. Delivered in any order,
    some twice, some late, the target ends with eu's newest state and us's untouched."""
    snapshots = []
    current = [0, 0, 0]
    for step in growth:
        current = [max(old, new) for old, new in zip(current, step, strict=True)]
        snapshots.append(crdt.Counters({("eu", shard, "p", "a"): value
                                        for shard, value in enumerate(current)}))
    shipments = [region_fields("p", fields_of(snapshot, "p"), "eu") for snapshot in snapshots]
    extra = data.draw(st.lists(st.sampled_from(range(len(shipments))), max_size=6))
    order = data.draw(st.permutations(list(range(len(shipments))) + extra))
    target = crdt.Counters({("us", 0, "p", "a"): 7})
    for index in order:
        crdt.merge_into(target, crdt.counters_from_fields("p", shipments[index]))
    assert crdt.region_totals(target, "p") == {"eu": {"a": sum(current)}, "us": {"a": 7}}


class FlakySource:
    """A source Redis that fails every call while `down`, and holds no polls."""

    def __init__(self) -> None:
        self.down = True

    async def scan_iter(self, **_):
        if self.down:
            raise ConnectionError("source Redis down")
        for key in ():
            yield key


class NoTarget:
    def register_script(self, _):
        return None


def test_lag_grows_while_the_source_is_down_and_drops_after_a_cycle() -> None:
    source = FlakySource()
    replicator = Replicator(source, NoTarget(), "eu", interval_s=0.02)

    async def run_for(seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(replicator.run(), seconds)

    asyncio.run(run_for(0.3))
    assert replicator.errors >= 3 and replicator.shipped_read_at is None
    assert REPLICATION_LAG.collect()[0].samples[0].value >= 0.3  # read at the scrape
    source.down = False
    asyncio.run(run_for(0.1))
    assert REPLICATION_LAG.collect()[0].samples[0].value < 0.1
