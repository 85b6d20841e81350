"""Proves the results CRDT (engine/crdt.py) converges and never goes backwards: merge is
commutative, associative and idempotent; whatever the interleaving, duplication, loss of
intermediate updates or delay of the updates replicas publish, every merged total only grows,
and once every replica's last update arrived the merged result equals the truth (the sum of
each replica's last counters). The per-country counters (a poll with the country breakdown)
are part of every state and every check. Also: the flat hash fields round-trip, and foreign
fields or negative counters are refused.

Failures reproduce with the seed printed in the session header (`--hypothesis-seed=N`).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine import crdt
from engine.crdt import Counters

REGIONS = st.sampled_from(["eu", "us"])
POLLS = st.sampled_from(["p1", "p2"])
OPTIONS = st.sampled_from(["a", "b", "c"])
REASONS = st.sampled_from(["duplicate", "bad-token"])
COUNTRIES = st.sampled_from(["DE", "FR", "ZZ"])
COUNTS = st.integers(min_value=0, max_value=1000)

tally_keys = st.tuples(REGIONS, st.integers(0, 3), POLLS, OPTIONS)
rejection_keys = st.tuples(REGIONS, st.sampled_from(["w1", "w2"]), POLLS, REASONS)
closed_keys = st.tuples(REGIONS, st.integers(0, 3), POLLS)
country_keys = st.tuples(REGIONS, st.integers(0, 3), POLLS, COUNTRIES, OPTIONS)

states = st.builds(
    Counters,
    st.dictionaries(tally_keys, COUNTS, max_size=12),
    st.dictionaries(rejection_keys, COUNTS, max_size=6),
    st.sets(closed_keys, max_size=4),
    st.dictionaries(country_keys, COUNTS, max_size=12),
)


def same(left: Counters, right: Counters) -> bool:
    return (left.tallies, left.rejected, left.closed, left.countries) == (
        right.tallies, right.rejected, right.closed, right.countries)


@given(states, states)
def test_merge_is_commutative(left: Counters, right: Counters) -> None:
    assert same(crdt.merge(left, right), crdt.merge(right, left))


@given(states, states, states)
def test_merge_is_associative(first: Counters, second: Counters, third: Counters) -> None:
    assert same(crdt.merge(crdt.merge(first, second), third),
                crdt.merge(first, crdt.merge(second, third)))


@given(states, states)
def test_merge_is_idempotent(left: Counters, right: Counters) -> None:
    once = crdt.merge(left, right)
    assert same(crdt.merge(once, right), once)
    assert same(crdt.merge(left, left), left)
    assert crdt.merge_into(once.copy(), right) is False


def replica_histories(draw) -> list[list[Counters]]:
    """Per replica (one region's shard, or one worker's rejections), the successive states
    it publishes: each one its whole counters so far, growing as votes arrive."""
    histories = []
    for replica in range(draw(st.integers(1, 4))):
        region = draw(REGIONS)
        current = Counters()
        published = []
        for _ in range(draw(st.integers(1, 6))):
            current = current.copy()
            for option in draw(st.lists(OPTIONS, max_size=3)):
                key = (region, replica, "p1", option)
                votes = draw(st.integers(1, 50))
                current.tallies[key] = current.tallies.get(key, 0) + votes
                country_key = (region, replica, "p1", draw(COUNTRIES), option)
                current.countries[country_key] = current.countries.get(country_key, 0) + votes
            for reason in draw(st.lists(REASONS, max_size=2)):
                key = (region, f"w{replica}", "p1", reason)
                current.rejected[key] = current.rejected.get(key, 0) + 1
            if draw(st.booleans()) and draw(st.booleans()):
                current.closed.add((region, replica, "p1"))
            published.append(current)
        histories.append(published)
    return histories


@st.composite
def deliveries(draw):
    """Every update of every replica, each delivered one to three times, in any order (so
    some arrive late, after newer ones of the same replica); each replica's last update is
    among them at least once."""
    histories = replica_histories(draw)
    updates = [state for history in histories for state in history
               for _ in range(draw(st.integers(1, 3)))]
    order = draw(st.permutations(updates))
    truth = Counters()
    for history in histories:
        crdt.merge_into(truth, history[-1])
    return order, truth


@given(deliveries())
def test_totals_never_decrease_and_converge_to_the_truth(case) -> None:
    order, truth = case
    merged = Counters()
    previous_totals: dict[str, int] = {}
    previous_rejected: dict[str, int] = {}
    previous_closed = 0
    previous_countries: dict[str, dict[str, int]] = {}
    for update in order:
        crdt.merge_into(merged, update)
        countries = crdt.country_totals(merged, "p1")
        assert all(countries.get(country, {}).get(option, 0) >= count
                   for country, counts in previous_countries.items()
                   for option, count in counts.items())
        previous_countries = countries
        totals = crdt.totals(merged, "p1")
        rejected = crdt.rejected_totals(merged, "p1")
        closed = sum(len(shards) for shards in crdt.closed_shards(merged, "p1").values())
        assert all(totals.get(option, 0) >= count for option, count in previous_totals.items())
        assert all(rejected.get(reason, 0) >= count
                   for reason, count in previous_rejected.items())
        assert closed >= previous_closed
        previous_totals, previous_rejected, previous_closed = totals, rejected, closed
    assert same(merged, truth)
    assert crdt.totals(merged, "p1") == crdt.totals(truth, "p1")
    assert crdt.country_totals(merged, "p1") == crdt.country_totals(truth, "p1")
    # Each replica's country counters sum to its tallies, so the merged breakdown sums to
    # the merged totals once every last update arrived.
    summed: dict[str, int] = {}
    for counts in crdt.country_totals(merged, "p1").values():
        for option, count in counts.items():
            summed[option] = summed.get(option, 0) + count
    assert summed == {option: count for option, count in crdt.totals(merged, "p1").items()}


@given(states)
def test_region_breakdown_sums_to_the_global_totals(state: Counters) -> None:
    for poll in ("p1", "p2"):
        summed: dict[str, int] = {}
        for counts in crdt.region_totals(state, poll).values():
            for option, count in counts.items():
                summed[option] = summed.get(option, 0) + count
        assert summed == crdt.totals(state, poll)


@given(states)
def test_hash_fields_round_trip(state: Counters) -> None:
    for poll in ("p1", "p2"):
        fields = crdt.poll_fields(state, poll)
        back = crdt.counters_from_fields(poll, fields.items())
        assert same(back, crdt.counters_from_fields(poll, crdt.poll_fields(back, poll).items()))
        assert crdt.totals(back, poll) == crdt.totals(state, poll)
        assert crdt.rejected_totals(back, poll) == crdt.rejected_totals(state, poll)
        assert crdt.closed_shards(back, poll) == crdt.closed_shards(state, poll)
        assert crdt.country_totals(back, poll) == crdt.country_totals(state, poll)


def test_refuses_negative_counters_and_foreign_fields() -> None:
    with pytest.raises(crdt.CounterInvalid):
        crdt.merge_into(Counters(), Counters(tallies={("eu", 0, "p1", "a"): -1}))
    for name in ("x|eu|0|a", "t|eu|zero|a", "t|eu|0", "c|eu", "k|eu|0|DE", "k|eu|x|DE|a"):
        with pytest.raises(crdt.CounterInvalid):
            crdt.counters_from_fields("p1", [(name, 1)])
