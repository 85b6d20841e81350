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
then the tallies and the receipt locator are updated in C loops. Only mixed groups
(replay overlap, duplicates) take the per-vote path.
"""

from cpython.bytearray cimport PyByteArray_FromStringAndSize
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.string cimport memset

import array

from pyroaring import BitMap

include "_fastpath_crypto.pxi"


cdef void _radix_sort_uint32(uint32_t* values, uint32_t* scratch, Py_ssize_t count) noexcept nogil:
    """LSD radix sort, four 8-bit digits: O(n), far cheaper than qsort's callbacks here."""
    cdef Py_ssize_t buckets[256]
    cdef Py_ssize_t index, total, bucket_count
    cdef int shift
    cdef uint32_t* source = values
    cdef uint32_t* target = scratch
    cdef uint32_t* swap
    for shift in range(0, 32, 8):
        memset(buckets, 0, sizeof(buckets))
        for index in range(count):
            buckets[(source[index] >> shift) & 0xFF] += 1
        total = 0
        for index in range(256):
            bucket_count = buckets[index]
            buckets[index] = total
            total += bucket_count
        for index in range(count):
            target[buckets[(source[index] >> shift) & 0xFF]] = source[index]
            buckets[(source[index] >> shift) & 0xFF] += 1
        swap = source
        source = target
        target = swap


def grow_locator(locator, Py_ssize_t size_needed):
    """Grow the receipt locator (array('Q')) to hold index size_needed - 1, amortised."""
    cdef Py_ssize_t current = len(locator)
    if current >= size_needed:
        return
    cdef Py_ssize_t target = max(size_needed, current + current // 2, 1024)
    locator.frombytes(bytes(8 * (target - current)))


def apply_group(voters_bitmap, tallies, locator, voters_bytes, options_bytes,
                uint64_t locator_value):
    """Apply one group; return (counted, flags) where flags[i] == 1 iff vote i counted.

    voters_bitmap: pyroaring BitMap of voter indexes that already voted in this poll.
    tallies: array('Q') with one counter per option; locator: array('Q') indexed by voter,
    set to locator_value for every vote that counts (the engine stores record offset + 1).
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
    cdef Py_ssize_t index
    cdef uint32_t voter_max = 0
    cdef bint options_valid = True
    for index in range(count):
        if voters[index] > voter_max:
            voter_max = voters[index]
        if options[index] >= option_count:
            options_valid = False
    grow_locator(locator, <Py_ssize_t>voter_max + 1)
    cdef uint64_t[::1] tally_view = tallies
    cdef uint64_t[::1] locator_view = locator

    # Four passes leave the sorted result back in sorted_voters.
    sorted_voters = array.array("I", voters_bytes)
    scratch = array.array("I", voters_bytes)
    cdef uint32_t[::1] sorted_view = sorted_voters
    cdef uint32_t[::1] scratch_view = scratch
    _radix_sort_uint32(&sorted_view[0], &scratch_view[0], count)
    cdef bint unique = True
    for index in range(1, count):
        if sorted_view[index] == sorted_view[index - 1]:
            unique = False
            break

    if unique and options_valid:
        group_bitmap = BitMap(sorted_voters)
        if not group_bitmap.intersection_cardinality(voters_bitmap):
            voters_bitmap |= group_bitmap
            for index in range(count):
                tally_view[options[index]] += 1
                locator_view[voters[index]] = locator_value
                flag_view[index] = 1
            return count, flags

    return _apply_each(voters_bitmap, tally_view, locator_view, voters, options,
                       flag_view, option_count, locator_value), flags


cdef Py_ssize_t _apply_each(voters_bitmap, uint64_t[::1] tally_view, uint64_t[::1] locator_view,
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
        locator_view[voter] = locator_value
        flag_view[index] = 1
        counted += 1
    return counted
