# cython: language_level=3
"""Compiled hot loops of the vote path and of replay.

`apply_group` applies one poll's group of votes from a WAL batch to that poll's state with
test-and-set semantics: a voter counts only if their bit was not yet set, earlier votes in
the group win over later ones, and re-applying a group changes nothing. The pure-Python
twin in engine/fastpath_py.py is the reference; tests/unit/test_fastpath_parity.py runs
both on the same inputs.

Why it is fast: votes arrive as packed little-endian uint32 voters and uint16 options. The
common case (a live batch: no voter twice, none already voted) is detected with bulk
roaring operations on a sorted copy (building a roaring bitmap from sorted ids is ~5x
cheaper than from random ones; a radix sort makes the sorted copy in linear time),
then the tallies and the receipt locator's open run are updated in C loops. Only mixed groups
(replay overlap, duplicates) take the per-vote path.

The receipt locator's open run and the sort of a run (_fastpath_locator.pxi) and the receipt and token loops
(_fastpath_crypto.pxi) are included below, each with its twin in engine/fastpath_py.py.
"""

from cpython.bytearray cimport PyByteArray_FromStringAndSize
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memset

import array

from cpython cimport array as carray
from pyroaring import BitMap

include "_fastpath_locator.pxi"
include "_fastpath_crypto.pxi"


# Radix digits of at most 11 bits: 2048 counters (16 KiB) stay in L1.
cdef enum:
    RADIX_DIGIT_BITS_MAX = 11


cdef uint32_t* _radix_sort_uint32(uint32_t* values, uint32_t* scratch, Py_ssize_t count,
                                  uint32_t value_max) noexcept nogil:
    """LSD radix sort of values <= value_max: O(n), far cheaper than qsort's callbacks here.
    As few passes as the values' width needs (a shard's voter indexes are dense, so ~19 bits:
    two passes of 10), with every pass's counts taken in one read. Returns the buffer that
    holds the sorted values (`values` or `scratch`)."""
    cdef int bits = 0
    while bits < 32 and (value_max >> bits) != 0:
        bits += 1
    if bits == 0:
        return values
    cdef int passes = (bits + RADIX_DIGIT_BITS_MAX - 1) // RADIX_DIGIT_BITS_MAX
    cdef int digit_bits = (bits + passes - 1) // passes
    cdef uint32_t digit_mask = (1u << digit_bits) - 1
    cdef uint32_t counts[3][1 << RADIX_DIGIT_BITS_MAX]
    cdef Py_ssize_t index
    cdef uint32_t total, bucket_count
    cdef int level
    cdef uint32_t value
    for level in range(passes):
        memset(counts[level], 0, (digit_mask + 1) * sizeof(uint32_t))
    if passes == 2:  # the common width (dense shards): both digits counted in one read
        for index in range(count):
            value = values[index]
            counts[0][value & digit_mask] += 1
            counts[1][(value >> digit_bits) & digit_mask] += 1
    else:
        for index in range(count):
            value = values[index]
            for level in range(passes):
                counts[level][(value >> (level * digit_bits)) & digit_mask] += 1
    cdef uint32_t* source = values
    cdef uint32_t* target = scratch
    cdef uint32_t* swap
    cdef uint32_t* offsets
    for level in range(passes):
        offsets = counts[level]
        total = 0
        for index in range(digit_mask + 1):
            bucket_count = offsets[index]
            offsets[index] = total
            total += bucket_count
        for index in range(count):
            value = source[index]
            target[offsets[(value >> (level * digit_bits)) & digit_mask]] = value
            offsets[(value >> (level * digit_bits)) & digit_mask] += 1
        swap = source
        source = target
        target = swap
    return source


# Groups of at most this many votes take the per-vote path: the bulk path's fixed cost
# (sort, a BitMap of the group) is ~5 us, the per-vote path's ~70 ns a vote.
# `python -m perf.bench_fastpath --voters-eligible 2000000 --batch-votes N`: 8 votes 1.7M ->
# 4.7M votes/s, 32 votes 4.5M -> 10.6M, 64 (bulk either way) ~12-13M.
APPLY_EACH_VOTES_MAX = 32


def apply_group(voters_bitmap, tallies, Locator locator not None, voters_bytes, options_bytes,
                uint64_t locator_value):
    """Apply one group; return (counted, flags) where flags[i] == 1 iff vote i counted.

    voters_bitmap: pyroaring BitMap of voter indexes that already voted in this poll.
    tallies: array('Q') with one counter per option; locator: the open run of the poll's
    receipt locator, which gets an entry (voter, locator_value) for every vote that counts
    (the engine stores record offset + 1).
    voters_bytes / options_bytes: packed little-endian uint32 / uint16, same length n.
    An option index outside the tallies marks the vote as not counted.
    """
    if len(voters_bytes) % 4 or len(options_bytes) % 2:
        raise ValueError("voters and options must be whole uint32 / uint16 arrays")
    cdef const uint32_t[::1] voters = memoryview(voters_bytes).cast("B").cast("I")
    cdef const uint16_t[::1] options = memoryview(options_bytes).cast("B").cast("H")
    cdef Py_ssize_t count = voters.shape[0]
    if options.shape[0] != count:
        raise ValueError("voters and options differ in length")
    flags = PyByteArray_FromStringAndSize(NULL, count)
    cdef unsigned char[::1] flag_view = flags
    if count == 0:
        return 0, flags
    memset(&flag_view[0], 0, count)

    cdef Py_ssize_t option_count = len(tallies)
    cdef uint64_t[::1] tally_view = tallies
    if count <= APPLY_EACH_VOTES_MAX:
        # A small group (a shard's part of a cycle, often one or two votes at many shards per
        # worker): per-vote test-and-set costs less than the sort and the group's BitMap,
        # which cost ~5 us whatever the count. Same outcome as the bulk path below.
        locator._reserve(count)
        return _apply_each(voters_bitmap, tally_view, locator, voters, options,
                           flag_view, option_count, locator_value), flags
    cdef Py_ssize_t index
    cdef uint32_t voter_max = 0
    cdef bint options_valid = True
    for index in range(count):
        if voters[index] > voter_max:
            voter_max = voters[index]
        if options[index] >= option_count:
            options_valid = False

    sorted_voters = array.array("I", voters_bytes)
    scratch = carray.clone(sorted_voters, count, False)  # the sort's second buffer: no copy
    cdef uint32_t[::1] sorted_view = sorted_voters
    cdef uint32_t[::1] scratch_view = scratch
    cdef uint32_t* sorted_values = _radix_sort_uint32(&sorted_view[0], &scratch_view[0], count,
                                                      voter_max)
    if sorted_values != &sorted_view[0]:
        sorted_voters, scratch = scratch, sorted_voters
    # Room for every vote in the locator's open run before anything changes (allocation
    # may fail).
    locator._reserve(count)
    cdef bint unique = True
    for index in range(1, count):
        if sorted_values[index] == sorted_values[index - 1]:
            unique = False
            break

    cdef uint64_t option_counts[64]
    if unique and options_valid:
        group_bitmap = BitMap(sorted_voters)
        if not group_bitmap.intersection_cardinality(voters_bitmap):
            voters_bitmap |= group_bitmap
            # Counts per option first (a local array), so the tallies' array is touched once
            # per option, not once per vote.
            if option_count <= 64:
                memset(option_counts, 0, option_count * sizeof(uint64_t))
                for index in range(count):
                    option_counts[options[index]] += 1
                for index in range(option_count):
                    tally_view[index] += option_counts[index]
            else:
                for index in range(count):
                    tally_view[options[index]] += 1
            locator._fill(sorted_values, count, locator_value)
            memset(&flag_view[0], 1, count)
            return count, flags

    return _apply_each(voters_bitmap, tally_view, locator, voters, options,
                       flag_view, option_count, locator_value), flags


cdef Py_ssize_t _apply_each(voters_bitmap, uint64_t[::1] tally_view, Locator locator,
                            const uint32_t[::1] voters, const uint16_t[::1] options,
                            unsigned char[::1] flag_view, Py_ssize_t option_count,
                            uint64_t locator_value):
    """Per-vote test-and-set, in log order: the slow path for mixed groups."""
    cdef Py_ssize_t index, counted = 0
    cdef uint32_t voter
    add_checked = voters_bitmap.add_checked
    for index in range(voters.shape[0]):
        if options[index] >= option_count:
            continue
        voter = voters[index]
        try:
            add_checked(voter)
        except KeyError:
            continue
        tally_view[options[index]] += 1
        locator._set(voter, locator_value)
        flag_view[index] = 1
        counted += 1
    return counted
