"""The rate limiter's pure parts (engine/ratelimit.py) with a fake clock: GCRA admits a burst
then the steady rate, a rejection's Retry-After is whole seconds >= 1 and honest (retrying
then is admitted), memory stays within keys_max, prefixes are /24 and /56, X-Forwarded-For
is honoured only from trusted proxies, the global view is adopted, and config checks hold.
"""

from __future__ import annotations

import asyncio
import ipaddress

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import Config, load_config
from engine.errors import ConfigError
from engine.ratelimit import (
    Gcra,
    GlobalSync,
    RateLimited,
    RateLimiter,
    bucket_keys,
    bucket_tags,
    bucket_of,
    address_number,
    address_ranges,
    in_ranges,
    parse_networks,
    peer_address,
    prefix_of,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admitted(gcra: Gcra, key: str, now: float, attempts: int) -> int:
    return sum(gcra.check(key, now) == 0.0 for _ in range(attempts))


def test_burst_then_steady_rate() -> None:
    gcra = Gcra(rate_per_s=8, burst=5, keys_max=1000)  # binary fractions: exact times
    assert admitted(gcra, "k", 0.0, 20) == 5  # the burst at once, nothing more
    # Then one per interval (1/8 s): over 2 s, 16 more, whatever the attempts.
    total = sum(admitted(gcra, "k", step / 64, 3) for step in range(1, 129))
    assert total == 16


def test_retry_after_is_honest() -> None:
    gcra = Gcra(rate_per_s=0.5, burst=2, keys_max=1000)  # one per 2 s
    assert admitted(gcra, "k", 0.0, 2) == 2
    wait_s = gcra.check("k", 0.0)
    assert 1.9 < wait_s <= 2.0
    assert gcra.check("k", wait_s - 0.01) > 0.0
    assert gcra.check("k", wait_s) == 0.0


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from("ab"), st.floats(0.0, 3.0)), max_size=40),
       rate_per_s=st.sampled_from([0.5, 2.0, 8.0]), burst=st.integers(1, 4))
def test_the_read_only_look_answers_as_the_check_and_changes_nothing(steps, rate_per_s,
                                                                       burst) -> None:
    """over_s is check without its side effects: what it says is what check would do, and
    the limiter's state is the same after it (a flood refused by it leaves no trace)."""
    gcra = Gcra(rate_per_s=rate_per_s, burst=burst, keys_max=1000, syncing=True)
    now = 0.0
    for key, advance_s in steps:
        now += advance_s
        before = (dict(gcra.arrivals), dict(gcra.pending))
        looked_s = gcra.over_s(key, now)
        assert (dict(gcra.arrivals), dict(gcra.pending)) == before
        assert gcra.check(key, now) == pytest.approx(looked_s)


def test_keys_are_independent() -> None:
    gcra = Gcra(rate_per_s=1, burst=1, keys_max=1000)
    assert gcra.check("a", 0.0) == 0.0
    assert gcra.check("a", 0.0) > 0.0
    assert gcra.check("b", 0.0) == 0.0


def test_memory_is_bounded_oldest_first() -> None:
    gcra = Gcra(rate_per_s=1, burst=1, keys_max=1000)
    for index in range(5000):
        gcra.check(f"k{index}", 0.0)
        assert len(gcra.arrivals) <= 1000
    assert "k0" not in gcra.arrivals and "k4999" in gcra.arrivals
    assert gcra.evicted_live == 5000 - len(gcra.arrivals)  # every victim had a future TAT
    assert gcra.check("k4999", 0.0) > 0.0  # the newest keys keep their state


def test_expired_entries_are_dropped_before_live_ones() -> None:
    gcra = Gcra(rate_per_s=1, burst=1, keys_max=1000)
    for index in range(999):
        gcra.check(f"old{index}", 0.0)  # TAT 1.0: expired at 10.0
    gcra.check("live", 9.5)
    for index in range(10):
        gcra.check(f"new{index}", 10.0)
    assert gcra.evicted_live == 0 and "live" in gcra.arrivals
    assert len(gcra.arrivals) == 11


def test_expired_entries_carry_no_state() -> None:
    gcra = Gcra(rate_per_s=1, burst=3, keys_max=1000)
    assert admitted(gcra, "k", 0.0, 3) == 3
    assert admitted(gcra, "k", 100.0, 10) == 3  # a full burst again, as a fresh key


def test_pending_counts_for_sync_are_bounded() -> None:
    gcra = Gcra(rate_per_s=100, burst=100, keys_max=1000, syncing=True)
    for index in range(3000):
        gcra.check(f"k{index}", 0.0)
    for _ in range(5):
        gcra.check("k0", 0.0)
    pending = gcra.take_pending()
    assert len(pending) == 1000 and pending["k0"] == 6
    assert gcra.take_pending() == {}


def test_global_view_is_adopted_when_later() -> None:
    gcra = Gcra(rate_per_s=10, burst=5, keys_max=1000)
    assert gcra.check("k", 0.0) == 0.0
    gcra.apply_global("k", debt_s=0.5, now=0.0)  # other workers admitted 4 more
    assert admitted(gcra, "k", 0.0, 10) == 0
    gcra.apply_global("k", debt_s=0.0, now=0.0)  # an earlier global TAT changes nothing
    assert admitted(gcra, "k", 0.0, 10) == 0
    gcra.apply_global("new", debt_s=0.5, now=0.0)
    assert admitted(gcra, "new", 0.0, 10) == 0


@pytest.mark.parametrize(("address", "prefix"), [
    ("203.0.113.77", "203.0.113"),
    ("2001:db8:abcd:12ff:1:2:3:4", "2001:db8:abcd:1200::/56"),
    ("2001:db8:abcd:1201::9", "2001:db8:abcd:1200::/56"),
])
def test_prefix_keys(address: str, prefix: str) -> None:
    assert prefix_of(address) == prefix


def test_prefixes_of_neighbours_differ_or_match() -> None:
    assert prefix_of("198.51.100.1") == prefix_of("198.51.100.254")
    assert prefix_of("198.51.100.1") != prefix_of("198.51.101.1")
    assert prefix_of("2001:db8:0:100::1") != prefix_of("2001:db8:0:200::1")


@pytest.mark.parametrize(("client", "address"), [
    ("127.0.0.1:5000", "127.0.0.1"), ("[2001:db8::1]:443", "2001:db8::1")])
def test_peer_address(client: str, address: str) -> None:
    assert peer_address(client) == address


def test_forwarded_for_only_from_trusted_proxies() -> None:
    limiter = RateLimiter(limiter_config(trusted_proxies="10.0.0.0/8"), FakeClock())

    def client(peer: str, forwarded_for: str | None) -> str:
        return limiter.client_keys(f"{peer}:4000", forwarded_for).address

    assert client("10.1.1.1", "203.0.113.5") == "203.0.113.5"
    # A peer that is not a proxy cannot choose its address.
    assert client("198.51.100.9", "203.0.113.5") == "198.51.100.9"
    untrusting = RateLimiter(limiter_config(), FakeClock())
    assert untrusting.client_keys("10.1.1.1:4000", "203.0.113.5").address == "10.1.1.1"
    # The client may forge the left entries; the right-most untrusted hop is the client.
    assert client("10.1.1.1", "1.1.1.1, 203.0.113.5, 10.2.2.2") == "203.0.113.5"
    assert client("10.1.1.1", None) == "10.1.1.1"
    assert client("10.1.1.1", " , ") == "10.1.1.1"  # no hop at all: the peer
    keys = limiter.client_keys("10.1.1.1:4000", "203.0.113.5")
    assert (keys.peer, keys.prefix) == ("10.1.1.1", "203.0.113")


@settings(max_examples=400, deadline=None)
@given(address=st.ip_addresses(), network=st.ip_addresses().flatmap(
    lambda base: st.integers(0, base.max_prefixlen).map(
        lambda bits: ipaddress.ip_network(f"{base}/{bits}", strict=False))))
def test_address_ranges_agree_with_ipaddress(address, network) -> None:
    # The vote path's numeric check must say what ipaddress says, for either version and
    # across versions (an IPv4 address is never in an IPv6 network, nor the other way).
    ranges = address_ranges((network,))
    assert in_ranges(str(address), ranges) == (address in network
                                               if address.version == network.version else False)
    assert address_number(str(address)) == (address.version, int(address))


@pytest.mark.parametrize("text", ["", "garbage", "1.2.3", "1.2.3.4.5", "01.2.3.4", "1.2.3.256",
                                  "1.2.3.4 ", "::1::", "1.2.3.4\x00", "fe80::1%eth0", "10.0.0.0/8"])
def test_what_is_not_an_address_is_in_no_range(text: str) -> None:
    assert address_number(text) is None
    assert not in_ranges(text, address_ranges(parse_networks("0.0.0.0/0, ::/0")))


def limiter_config(**fields) -> Config:
    base = {"ratelimit_exempt_networks": "", "ratelimit_address_per_s": 1.0,
            "ratelimit_address_burst": 3, "ratelimit_prefix_per_s": 1.0,
            "ratelimit_prefix_burst": 5, "ratelimit_voter_per_s": 1.0,
            "ratelimit_voter_burst": 2}
    return msgspec.structs.replace(Config(), **{**base, **fields}).validate()


def rejections(limiter: RateLimiter, client: str, attempts: int,
               forwarded_for: str | None = None) -> list[int]:
    answers = []
    for _ in range(attempts):
        try:
            limiter.check_client(client, forwarded_for)
        except RateLimited as exc:
            answers.append(exc.extra["retry_after"])
    return answers


def test_address_then_prefix_limit_with_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(limiter_config(), clock)
    assert rejections(limiter, "198.51.100.1:1", 5) == [1, 1]  # address burst 3
    # Another address of the /24 has its own address budget but shares the prefix's 5.
    assert len(rejections(limiter, "198.51.100.2:1", 5)) == 3
    assert rejections(limiter, "198.51.101.1:1", 3) == []  # another /24


def test_exempt_networks_skip_address_limits_not_voter_limits() -> None:
    limiter = RateLimiter(limiter_config(ratelimit_exempt_networks="127.0.0.0/8"), FakeClock())
    assert rejections(limiter, "127.0.0.1:9", 100) == []
    limiter.check_voter(7)
    limiter.check_voter(7)
    with pytest.raises(RateLimited):
        limiter.check_voter(7)


def test_votes_forwarded_by_a_node_skip_the_voter_limit_unless_forged() -> None:
    limiter = RateLimiter(limiter_config(ratelimit_exempt_networks="10.9.0.0/16"), FakeClock())
    # From a node of the cluster (exempt peer): the forwarding node checked it already.
    assert limiter.check_client("10.9.0.5:1", None, node_forwarded=True) is False
    assert limiter.check_client("10.9.0.5:1", None, node_forwarded=False) is True
    # A client cannot skip the limits by sending the forwarded header itself.
    assert limiter.check_client("198.51.100.1:1", None, node_forwarded=True) is True
    assert len(rejections(limiter, "198.51.100.1:1", 5)) == 3


def test_forwarded_client_is_limited_from_trusted_proxy() -> None:
    limiter = RateLimiter(limiter_config(trusted_proxies="10.0.0.0/8"), FakeClock())
    assert len(rejections(limiter, "10.0.0.1:1", 5, "203.0.113.5")) == 2
    # The proxy's other clients are not its victims.
    assert rejections(limiter, "10.0.0.1:1", 3, "192.0.2.8") == []


def test_disabled_limiter_admits_everything() -> None:
    limiter = RateLimiter(limiter_config(ratelimit_enabled=False), FakeClock())
    assert rejections(limiter, "198.51.100.1:1", 50) == []


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="ratelimit_address_per_s"):
        limiter_config(ratelimit_address_per_s=0.0)
    with pytest.raises(ConfigError, match="trusted_proxies"):
        limiter_config(trusted_proxies="not-a-network")
    with pytest.raises(ConfigError, match="ratelimit_sync_ms"):
        limiter_config(ratelimit_sync_ms=1.0)


def test_boolean_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOTES_RATELIMIT_ENABLED", "false")
    assert load_config().ratelimit_enabled is False
    monkeypatch.setenv("VOTES_RATELIMIT_ENABLED", "maybe")
    with pytest.raises(ConfigError):
        load_config()


def test_bucket_keys_share_a_slot_and_keys_spread_over_buckets() -> None:
    from redis.crc import key_slot

    tags = bucket_tags(3)
    for tag in tags:
        tat, prune = bucket_keys(tag)
        assert key_slot(tat.encode()) == key_slot(prune.encode())
    # One bucket in each third of the slots: one per master of a three-master cluster.
    assert [key_slot(bucket_keys(tag)[0].encode()) * 3 // 16384 for tag in tags] == [0, 1, 2]
    assert {bucket_of(f"a:10.0.0.{index}", 8) for index in range(256)} == set(range(8))
    assert bucket_of("v:42", 8) == bucket_of("v:42", 8)


class FailingScript:
    async def __call__(self, keys, args):
        raise ConnectionError("store down")


def test_store_down_fails_open_and_keeps_local_limits() -> None:
    clock = FakeClock()
    config = limiter_config(ratelimit_redis_url="redis://127.0.0.1:1")
    limiter = RateLimiter(config, clock)
    sync = GlobalSync(config, limiter)
    sync.script = FailingScript()
    assert len(rejections(limiter, "198.51.100.1:1", 5)) == 2
    asyncio.run(sync.sync_once())
    assert sync.fail_open.failing_since is not None
    assert limiter.address.pending == {}  # dropped, not grown without bound
    assert len(rejections(limiter, "198.51.100.1:1", 5)) == 5  # the local limit still holds


def test_redis_cluster_ports_stay_in_the_stack_span_apart_from_its_services() -> None:
    from deploy.local.ports import STACK_PORT_SPAN, Ports

    ports = Ports(19600)
    cluster = ports.redis_cluster_all()
    assert len(set(cluster)) == 6
    assert all(19600 <= port < 19600 + STACK_PORT_SPAN for port in cluster)
    assert not set(cluster) & set(ports.all_ports())
