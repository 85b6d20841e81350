"""Proves that the compiled engine._fastpath.apply_group and its pure-Python twin give the same
(counted, flags), bitmaps, tallies and receipt locators on the same random inputs (duplicates in
a group, voters already counted, option indexes past the option count, empty groups), that
re-applying a group changes nothing, and that a run demanding the compiled module
(VOTES_REQUIRE_CYTHON=1) fails when it did not load.

Voter indexes stay below ten million: the locator grows to (highest voter + 1) * 8 bytes, so
ids near 2**32 - 1 would allocate 16 GiB per call; they are deliberately not generated.
"""

from __future__ import annotations

import array
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroaring import BitMap

from engine import fastpath, fastpath_py

if os.environ.get("VOTES_REQUIRE_CYTHON") == "1":
    from engine import _fastpath as compiled  # an ImportError here fails the run
else:
    compiled = pytest.importorskip("engine._fastpath", reason="the Cython extension is not built")

VOTER_INDEX_MAX = 10_000_000
IMPLEMENTATIONS = {"cython": compiled.apply_group, "python": fastpath_py.apply_group}


class GroupState:
    """One poll's state as apply_group sees it; copies are independent."""

    def __init__(self, voters: BitMap, tallies: array.array, locator: array.array) -> None:
        self.voters = voters
        self.tallies = tallies
        self.locator = locator

    def copy(self) -> "GroupState":
        return GroupState(BitMap(self.voters), array.array("Q", self.tallies),
                          array.array("Q", self.locator))

    def snapshot(self) -> tuple[list[int], list[int], bytes]:
        return list(self.voters), self.tallies.tolist(), self.locator.tobytes()


def voter_indexes() -> st.SearchStrategy[int]:
    # A dense low range, so repeats are common, and a wider one that grows the locator.
    return st.one_of(st.integers(0, 300), st.integers(0, 70_000))


@st.composite
def group_states(draw: st.DrawFn) -> GroupState:
    option_count = draw(st.integers(1, 6))
    voters = BitMap(draw(st.lists(st.integers(0, 5000), max_size=200)))
    tallies = array.array("Q", draw(st.lists(st.integers(0, 2**40), min_size=option_count,
                                             max_size=option_count)))
    locator = array.array("Q", draw(st.lists(st.integers(0, 2**64 - 1), max_size=50)))
    if draw(st.booleans()):
        locator.frombytes(bytes(8 * draw(st.integers(0, 6000))))
    return GroupState(voters, tallies, locator)


@st.composite
def groups(draw: st.DrawFn, state: GroupState) -> tuple[bytes, bytes]:
    """Packed (voters, options) with repeats inside the group and voters already counted."""
    already = list(state.voters)
    pool = draw(st.lists(voter_indexes(), min_size=1, max_size=40))
    if draw(st.integers(0, 7)) == 0:  # now and then one far out: a locator of up to 40 MB
        pool.append(draw(st.integers(0, VOTER_INDEX_MAX)))
    if already:
        pool += draw(st.lists(st.sampled_from(already), max_size=20))
    voters = draw(st.lists(st.sampled_from(pool), max_size=120))
    option_count = len(state.tallies)
    option = st.one_of(st.integers(0, option_count - 1), st.integers(0, option_count + 2),
                       st.just(65535))
    options = draw(st.lists(option, min_size=len(voters), max_size=len(voters)))
    return array.array("I", voters).tobytes(), array.array("H", options).tobytes()


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[GroupState, list[tuple[bytes, bytes, int]]]:
    state = draw(group_states())
    applied = []
    for _ in range(draw(st.integers(1, 4))):
        voters, options = draw(groups(state))
        applied.append((voters, options, draw(st.integers(1, 2**64 - 1))))
    return state, applied


def reference_outcome(state: GroupState, voters: bytes, options: bytes) -> tuple[int, bytearray]:
    """Test-and-set, spelled out: a vote counts iff its option exists and its voter is new."""
    seen = set(state.voters)
    flags = bytearray()
    for voter, option in zip(array.array("I", voters), array.array("H", options)):
        counts = option < len(state.tallies) and voter not in seen
        if counts:
            seen.add(voter)
        flags.append(int(counts))
    return sum(flags), flags


@given(scenarios())
def test_both_implementations_agree_group_after_group(scenario) -> None:
    initial, applied = scenario
    states = {name: initial.copy() for name in IMPLEMENTATIONS}
    for voters, options, locator_value in applied:
        expected = reference_outcome(states["python"], voters, options)
        results = {}
        for name, apply_group in IMPLEMENTATIONS.items():
            state = states[name]
            results[name] = apply_group(state.voters, state.tallies, state.locator, voters,
                                        options, locator_value)
        assert results["cython"] == results["python"] == expected
        assert states["cython"].snapshot() == states["python"].snapshot()
        flags = expected[1]
        for voter in [voter for voter, flag in zip(array.array("I", voters), flags) if flag]:
            assert states["python"].locator[voter] == locator_value


@given(scenarios())
def test_reapplying_a_group_changes_nothing(scenario) -> None:
    initial, applied = scenario
    for name, apply_group in IMPLEMENTATIONS.items():
        state = initial.copy()
        for voters, options, locator_value in applied:
            apply_group(state.voters, state.tallies, state.locator, voters, options, locator_value)
            before = state.snapshot()
            counted, flags = apply_group(state.voters, state.tallies, state.locator, voters,
                                         options, locator_value + 1 if locator_value < 2**64 - 1
                                         else 1)
            assert (counted, flags) == (0, bytearray(len(voters) // 4)), name
            assert state.snapshot() == before, name


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_a_fresh_unique_group_counts_every_vote_once(name: str) -> None:
    # The compiled bulk path (unique voters, none counted yet) against hand-computed numbers.
    state = GroupState(BitMap([7]), array.array("Q", [10, 0, 0]), array.array("Q"))
    voters = array.array("I", [3, 1_000_000, 8, 0]).tobytes()
    options = array.array("H", [2, 0, 2, 1]).tobytes()
    counted, flags = IMPLEMENTATIONS[name](state.voters, state.tallies, state.locator, voters,
                                           options, 41)
    assert (counted, flags) == (4, bytearray(b"\x01\x01\x01\x01"))
    assert list(state.voters) == [0, 3, 7, 8, 1_000_000]
    assert state.tallies.tolist() == [11, 1, 2]
    assert len(state.locator) >= 1_000_001
    assert [state.locator[i] for i in (0, 3, 7, 8, 1_000_000)] == [41, 41, 0, 41, 41]


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_an_empty_group_changes_nothing(name: str) -> None:
    state = GroupState(BitMap([1, 2]), array.array("Q", [1, 1]), array.array("Q", [0, 5, 5]))
    before = state.snapshot()
    assert IMPLEMENTATIONS[name](state.voters, state.tallies, state.locator, b"", b"", 9) == (
        0, bytearray())
    assert state.snapshot() == before


@pytest.mark.parametrize(
    ("voters", "options"),
    [
        (array.array("I", [1, 2]).tobytes(), array.array("H", [0]).tobytes()),
        (b"\x01\x00\x00", b"\x00\x00"),
        (b"\x01\x00\x00\x00", b"\x00"),
    ],
    ids=["counts-differ", "voters-not-whole-uint32", "options-not-whole-uint16"],
)
def test_malformed_groups_raise_the_same_error(voters: bytes, options: bytes) -> None:
    raised = {}
    for name, apply_group in IMPLEMENTATIONS.items():
        with pytest.raises(Exception) as caught:
            apply_group(BitMap(), array.array("Q", [0, 0]), array.array("Q"), voters, options, 1)
        raised[name] = caught.type
    assert raised["cython"] is raised["python"] is ValueError


def test_the_compiled_module_is_in_use_when_required() -> None:
    if os.environ.get("VOTES_REQUIRE_CYTHON") != "1":
        pytest.skip("VOTES_REQUIRE_CYTHON=1 is not set")
    assert fastpath.IMPLEMENTATION == "cython"
    assert fastpath.apply_group is compiled.apply_group
