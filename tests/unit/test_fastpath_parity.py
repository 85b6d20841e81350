"""Proves that the compiled engine._fastpath.apply_group and its pure-Python twin give the same
(counted, flags), bitmaps, tallies and receipt locator open runs (their entries by meaning) on
the same random inputs (duplicates in a group, voters already counted, option indexes past the
option count, empty groups, voters far apart), that re-applying a group changes nothing, that
both sort_run give the same sorted run keeping each voter's newest entry, that both Locators
read each other's entries, and that a run demanding the compiled module
(VOTES_REQUIRE_CYTHON=1) fails when it did not load.
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

VOTER_INDEX_MAX = 2**32 - 1
MODULES = {"cython": compiled, "python": fastpath_py}


def locator_entries(locator) -> dict[int, int]:
    """The open run's entries by meaning: voter -> its newest value."""
    voters, values = locator.entries_bytes()
    return dict(zip(array.array("I", voters), array.array("Q", values), strict=True))


class GroupState:
    """One poll's state as apply_group sees it, on one implementation's Locator."""

    def __init__(self, module, voters: BitMap, tallies: array.array,
                 entries: dict[int, int]) -> None:
        self.module = module
        self.voters = voters
        self.tallies = tallies
        self.locator = module.Locator()
        for index, value in entries.items():
            self.locator.set(index, value)

    def on(self, module) -> GroupState:
        """An independent copy on `module`'s Locator."""
        return GroupState(module, BitMap(self.voters), array.array("Q", self.tallies),
                          locator_entries(self.locator))

    def apply(self, voters: bytes, options: bytes, locator_value: int):
        return self.module.apply_group(self.voters, self.tallies, self.locator, voters, options,
                                       locator_value)

    def snapshot(self) -> tuple:
        return list(self.voters), self.tallies.tolist(), locator_entries(self.locator)


def voter_indexes() -> st.SearchStrategy[int]:
    # A dense low range, so repeats are common, and wider ones over several pages.
    return st.one_of(st.integers(0, 300), st.integers(0, 70_000))


@st.composite
def group_states(draw: st.DrawFn) -> GroupState:
    option_count = draw(st.integers(1, 6))
    voters = BitMap(draw(st.lists(st.integers(0, 5000), max_size=200)))
    tallies = array.array("Q", draw(st.lists(st.integers(0, 2**40), min_size=option_count,
                                             max_size=option_count)))
    entries = draw(st.dictionaries(st.integers(0, 20_000), st.integers(1, 2**64 - 1),
                                   max_size=50))
    return GroupState(fastpath_py, voters, tallies, entries)


@st.composite
def groups(draw: st.DrawFn, state: GroupState) -> tuple[bytes, bytes]:
    """Packed (voters, options) with repeats inside the group and voters already counted."""
    already = list(state.voters)
    pool = draw(st.lists(voter_indexes(), min_size=1, max_size=40))
    if draw(st.integers(0, 7)) == 0:  # now and then one far out, up to the last index
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
    states = {name: initial.on(module) for name, module in MODULES.items()}
    for voters, options, locator_value in applied:
        expected = reference_outcome(states["python"], voters, options)
        results = {name: state.apply(voters, options, locator_value)
                   for name, state in states.items()}
        assert results["cython"] == results["python"] == expected
        assert states["cython"].snapshot() == states["python"].snapshot()
        packed = array.array("I", voters)
        for voter, flag in zip(packed, expected[1]):
            if flag:
                assert states["cython"].locator.get(voter) == locator_value
                assert states["python"].locator.get(voter) == locator_value


@given(scenarios())
def test_reapplying_a_group_changes_nothing(scenario) -> None:
    initial, applied = scenario
    for name, module in MODULES.items():
        state = initial.on(module)
        for voters, options, locator_value in applied:
            state.apply(voters, options, locator_value)
            before = state.snapshot()
            counted, flags = state.apply(voters, options, locator_value + 1
                                         if locator_value < 2**64 - 1 else 1)
            assert (counted, flags) == (0, bytearray(len(voters) // 4)), name
            assert state.snapshot() == before, name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_fresh_unique_group_counts_every_vote_once(name: str) -> None:
    # The compiled bulk path (unique voters, none counted yet) against hand-computed numbers.
    state = GroupState(MODULES[name], BitMap([7]), array.array("Q", [10, 0, 0]), {})
    voters = array.array("I", [3, 1_000_000, 8, 0, 2**32 - 1]).tobytes()
    options = array.array("H", [2, 0, 2, 1, 0]).tobytes()
    assert state.apply(voters, options, 41) == (5, bytearray(b"\x01" * 5))
    assert list(state.voters) == [0, 3, 7, 8, 1_000_000, 2**32 - 1]
    assert state.tallies.tolist() == [12, 1, 2]
    assert locator_entries(state.locator) == {0: 41, 3: 41, 8: 41, 1_000_000: 41,
                                              2**32 - 1: 41}
    # 12 bytes per entry, though the highest index is 2**32 - 1.
    assert state.locator.entries == 5
    assert [state.locator.get(i) for i in (7, 2**32, 2**40)] == [0, 0, 0]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_an_empty_group_changes_nothing(name: str) -> None:
    state = GroupState(MODULES[name], BitMap([1, 2]), array.array("Q", [1, 1]), {1: 5, 2: 5})
    before = state.snapshot()
    assert state.apply(b"", b"", 9) == (0, bytearray())
    assert state.snapshot() == before


@given(st.lists(st.tuples(st.one_of(st.integers(0, 50), st.integers(0, VOTER_INDEX_MAX)),
                          st.integers(0, 2**64 - 1)), max_size=300))
def test_both_sort_runs_keep_each_voters_newest_entry_in_voter_order(entries) -> None:
    voters = array.array("I", [voter for voter, _ in entries]).tobytes()
    values = array.array("Q", [value for _, value in entries]).tobytes()
    newest = dict(entries)
    expected = (array.array("I", sorted(newest)).tobytes(),
                array.array("Q", [newest[voter] for voter in sorted(newest)]).tobytes())
    assert compiled.sort_run(voters, values) == fastpath_py.sort_run(voters, values) == expected


@pytest.mark.parametrize("name", sorted(MODULES))
def test_locator_entries_round_trip(name: str) -> None:
    locator = MODULES[name].Locator()
    for index, value in ((4096, 3), (0, 1), (2**32 - 1, 2**64 - 1), (4095, 2), (0, 5)):
        locator.set(index, value)
    assert locator.get(0) == 5  # the newest entry of a voter wins
    entries = locator.entries_bytes()
    for module in MODULES.values():  # either implementation reads the other's entries
        copy = module.Locator.from_entries(*entries)
        assert copy.entries == 5 and copy.get(0) == 5 and copy.get(4095) == 2
        assert copy.take_sorted() == (array.array("I", [0, 4095, 4096, 2**32 - 1]).tobytes(),
                                      array.array("Q", [5, 2, 3, 2**64 - 1]).tobytes())
        assert copy.entries == 0 and copy.get(0) == 0
    with pytest.raises(ValueError):
        MODULES[name].Locator.from_entries(b"\x00" * 4, b"")
    with pytest.raises(ValueError):
        MODULES[name].sort_run(b"\x00" * 8, b"\x00" * 8)
    with pytest.raises(IndexError):
        locator.set(2**32, 1)
    with pytest.raises(IndexError):
        locator.get(-1)


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
    for name, module in MODULES.items():
        with pytest.raises(Exception) as caught:
            module.apply_group(BitMap(), array.array("Q", [0, 0]), module.Locator(), voters,
                               options, 1)
        raised[name] = caught.type
    assert raised["cython"] is raised["python"] is ValueError


def test_the_compiled_module_is_in_use_when_required() -> None:
    if os.environ.get("VOTES_REQUIRE_CYTHON") != "1":
        pytest.skip("VOTES_REQUIRE_CYTHON=1 is not set")
    assert fastpath.IMPLEMENTATION == "cython"
    assert fastpath.apply_group is compiled.apply_group
    assert fastpath.Locator is compiled.Locator
    assert fastpath.sort_run is compiled.sort_run
