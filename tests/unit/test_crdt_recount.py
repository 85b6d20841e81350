"""Proves the CRDT-vs-recount comparison (engine.crdt.recount_disagreements), which the ingest
workers' close check and `votes replay verify --crdt-redis-url` both use: a CRDT built from
exactly the shards' counts (per option and per country) gives no finding, open or closed;
any one counter of this region raised is found, open or closed; one lowered is found once
the shard is closed and allowed (a publication lagging) while it is open; another region's
counters and shards not compared are ignored. The replay tool's copy of the publisher's key
format is held equal to it.

Failures reproduce with the seed printed in the session header (`--hypothesis-seed=N`).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine import crdt, results_publisher
from replay import crdt_check

REGION = "eu"
POLL = "p"
OPTIONS = ["a", "b"]

shard_counts = st.builds(
    lambda counts, countries, closed: crdt.ShardCounts(
        dict(zip(OPTIONS, counts, strict=True)),
        {country: dict(zip(OPTIONS, per_option, strict=True))
         for country, per_option in countries.items()}, closed),
    st.lists(st.integers(0, 50), min_size=2, max_size=2),
    st.dictionaries(st.sampled_from(["DE", "FR"]),
                    st.lists(st.integers(0, 50), min_size=2, max_size=2), max_size=2),
    st.booleans())
shards = st.dictionaries(st.integers(0, 3), shard_counts, min_size=1, max_size=4)


def counters_of(parts: dict[int, crdt.ShardCounts], region: str = REGION) -> crdt.Counters:
    state = crdt.Counters()
    for shard, part in parts.items():
        for option, count in part.counts.items():
            state.tallies[(region, shard, POLL, option)] = count
        for country, counts in part.countries.items():
            for option, count in counts.items():
                state.countries[(region, shard, POLL, country, option)] = count
        if part.closed:
            state.closed.add((region, shard, POLL))
    return state


@given(shards)
def test_the_same_counts_agree(parts) -> None:
    assert crdt.recount_disagreements(counters_of(parts), REGION, POLL, parts) == []


@given(shards, st.data())
def test_a_raised_counter_is_found_open_or_closed(parts, data) -> None:
    state = counters_of(parts)
    keys = list(state.tallies) + list(state.countries)
    key = data.draw(st.sampled_from(keys))
    target = state.tallies if key in state.tallies else state.countries
    target[key] += data.draw(st.integers(1, 5))  # type: ignore[index]
    found = crdt.recount_disagreements(state, REGION, POLL, parts)
    assert len(found) == 1
    assert found[0].shard == key[1] and found[0].option == key[-1]
    assert found[0].country == (key[3] if len(key) == 5 else None)
    assert found[0].crdt > found[0].log


@given(shards, st.data())
def test_a_lower_counter_is_found_only_once_the_shard_closed(parts, data) -> None:
    state = counters_of(parts)
    shard = data.draw(st.sampled_from(sorted(parts)))
    key = (REGION, shard, POLL, "a")
    state.tallies[key] = 0
    found = crdt.recount_disagreements(state, REGION, POLL, parts)
    lowered = parts[shard].counts["a"] > 0
    assert len(found) == (1 if lowered and parts[shard].closed else 0)


def test_a_missing_publication_of_a_closed_shard_is_found() -> None:
    parts = {0: crdt.ShardCounts({"a": 3, "b": 0}, {"DE": {"a": 3, "b": 0}}, True)}
    found = crdt.recount_disagreements(crdt.Counters(), REGION, POLL, parts)
    assert [(item.option, item.country, item.crdt, item.log) for item in found] == [
        ("a", None, 0, 3), ("a", "DE", 0, 3)]


def test_other_regions_and_shards_not_compared_are_ignored() -> None:
    parts = {0: crdt.ShardCounts({"a": 1, "b": 0}, {}, True)}
    state = counters_of(parts)
    state.tallies[("us", 0, POLL, "a")] = 99
    state.tallies[(REGION, 5, POLL, "a")] = 99
    assert crdt.recount_disagreements(state, REGION, POLL, parts) == []


def test_the_replay_tool_reads_the_key_the_publisher_writes() -> None:
    assert crdt_check.merged_key("poll-1") == results_publisher.merged_key("poll-1")
