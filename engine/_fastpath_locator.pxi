# Included by _fastpath.pyx: the open run of the receipt locator and the sort of a run. Their
# pure-Python twins are Locator and sort_run in engine/fastpath_py.py;
# tests/unit/test_fastpath_parity.py compares them entry for entry.

from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcpy

cdef enum:
    # The open run's voters grow in steps of this many entries when a group does not fit.
    LOCATOR_GROWTH_ENTRIES_MIN = 1024


cdef class Locator:
    """The open run of one poll's receipt locator in one shard: (voter index, value) pairs in
    the order they were counted, where value is the log offset of the record that counted
    the vote + 1. A voter is counted once per poll, so a voter appears at most once in the
    locator as a whole; should it appear twice, the newest entry wins (`get`, `take_sorted`).

    A group's counted votes share one value (their record's offset), so values are kept per
    segment of consecutive entries, not per entry: 4 bytes per entry plus 12 per record
    (~4.1 bytes per entry with a shard's ~128 votes per record, not 12). Capacity grows when
    a group does not fit and is kept when the run is taken: shards/locator_runs.py takes the
    run as soon as it holds `locator_run_entries`, sorts it and writes it to a run file."""

    cdef uint32_t* _voters
    cdef Py_ssize_t _capacity
    cdef readonly Py_ssize_t entries
    # Segment i holds the entries from _segment_starts[i] up to the next segment's start.
    cdef uint32_t* _segment_starts
    cdef uint64_t* _segment_values
    cdef Py_ssize_t _segment_capacity
    cdef Py_ssize_t _segments

    def __dealloc__(self):
        free(self._voters)
        free(self._segment_starts)
        free(self._segment_values)

    cdef int _reserve(self, Py_ssize_t count) except -1:
        """Room for `count` more entries and one more segment, before anything changes
        (allocation may fail)."""
        cdef Py_ssize_t needed = self.entries + count
        cdef Py_ssize_t capacity
        cdef void* grown
        if needed >= 2**32:
            raise MemoryError("an open run holds fewer than 2**32 entries")
        if needed > self._capacity:
            # Rounded up, not doubled: a run is taken at locator_run_entries, so the capacity
            # settles just above it instead of up to twice it.
            capacity = ((needed + LOCATOR_GROWTH_ENTRIES_MIN - 1) // LOCATOR_GROWTH_ENTRIES_MIN
                        * LOCATOR_GROWTH_ENTRIES_MIN)
            grown = realloc(self._voters, capacity * sizeof(uint32_t))
            if grown == NULL:
                raise MemoryError()
            self._voters = <uint32_t*>grown
            self._capacity = capacity
        if self._segments + 1 > self._segment_capacity:
            capacity = self._segment_capacity + max(self._segment_capacity // 2, 16)
            grown = realloc(self._segment_starts, capacity * sizeof(uint32_t))
            if grown == NULL:
                raise MemoryError()
            self._segment_starts = <uint32_t*>grown
            grown = realloc(self._segment_values, capacity * sizeof(uint64_t))
            if grown == NULL:
                raise MemoryError()
            self._segment_values = <uint64_t*>grown
            self._segment_capacity = capacity
        return 0

    cdef inline void _open_segment(self, uint64_t value) noexcept:
        """Entries appended next get `value` (room for a segment reserved)."""
        if self._segments == 0 or self._segment_values[self._segments - 1] != value:
            self._segment_starts[self._segments] = <uint32_t>self.entries
            self._segment_values[self._segments] = value
            self._segments += 1

    cdef void _fill(self, const uint32_t* voters, Py_ssize_t count, uint64_t value) noexcept:
        """Append every voter with one value (room reserved)."""
        if count == 0:
            return
        self._open_segment(value)
        memcpy(self._voters + self.entries, voters, count * sizeof(uint32_t))
        self.entries += count

    cdef inline void _set(self, uint32_t voter, uint64_t value) noexcept:
        """Append one entry (room reserved: one segment per group's value)."""
        self._open_segment(value)
        self._voters[self.entries] = voter
        self.entries += 1

    cdef uint64_t _value_at(self, Py_ssize_t position) noexcept:
        """The value of entry `position`: the last segment starting at or before it."""
        cdef Py_ssize_t low = 0, high = self._segments - 1, middle
        while low < high:
            middle = (low + high + 1) // 2
            if self._segment_starts[middle] <= position:
                low = middle
            else:
                high = middle - 1
        return self._segment_values[low]

    def get(self, Py_ssize_t index) -> int:
        """The newest entry of voter index `index` (0: none): a scan, newest first, of a run
        bounded by locator_run_entries (~2 us for 4096 entries)."""
        if index < 0:
            raise IndexError("voter index is negative")
        if index >= 2**32:
            return 0
        cdef uint32_t voter = <uint32_t>index
        cdef Py_ssize_t position = self.entries - 1
        while position >= 0:
            if self._voters[position] == voter:
                return self._value_at(position)
            position -= 1
        return 0

    def set(self, Py_ssize_t index, uint64_t value) -> None:
        """Append an entry for voter index `index`."""
        if not 0 <= index < 2**32:
            raise IndexError("voter index is outside 0..2**32-1")
        self._reserve(1)
        self._set(<uint32_t>index, value)

    def entries_bytes(self) -> tuple:
        """(voters, values): copies of the entries in the order they were appended, as packed
        little-endian uint32 and uint64 (what a snapshot carries)."""
        values = bytearray(self.entries * sizeof(uint64_t))
        cdef uint64_t[::1] values_view
        cdef Py_ssize_t segment, position, end
        if self.entries:
            values_view = memoryview(values).cast("Q")
            for segment in range(self._segments):
                end = (self._segment_starts[segment + 1] if segment + 1 < self._segments
                       else self.entries)
                for position in range(self._segment_starts[segment], end):
                    values_view[position] = self._segment_values[segment]
        return (bytes((<char*>self._voters)[:self.entries * sizeof(uint32_t)]), bytes(values))

    def take_sorted(self) -> tuple:
        """(voters, values) sorted by voter, one entry per voter (the newest), and empty the
        run; its capacity stays allocated for the next run."""
        voters, values = self.entries_bytes()
        self.entries = 0
        self._segments = 0
        return sort_run(voters, values)

    @staticmethod
    def from_entries(voters_bytes, values_bytes) -> Locator:
        """A run holding the given entries (packed uint32 voters, uint64 values), in order."""
        cdef const uint32_t[::1] voters = memoryview(voters_bytes).cast("B").cast("I")
        cdef const uint64_t[::1] values = memoryview(values_bytes).cast("B").cast("Q")
        if voters.shape[0] != values.shape[0]:
            raise ValueError("a run needs one uint64 value per uint32 voter")
        cdef Locator locator = Locator()
        cdef Py_ssize_t index
        for index in range(voters.shape[0]):
            locator._reserve(1)
            locator._set(voters[index], values[index])
        return locator

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the entries (capacity, not only what is used)."""
        return (self._capacity * sizeof(uint32_t)
                + self._segment_capacity * (sizeof(uint32_t) + sizeof(uint64_t)))


cdef int _compare_keys(const void* left, const void* right) noexcept nogil:
    cdef uint64_t a = (<const uint64_t*>left)[0]
    cdef uint64_t b = (<const uint64_t*>right)[0]
    return (a > b) - (a < b)


def sort_run(voters_bytes, values_bytes) -> tuple:
    """(voters, values) of packed uint32 voters and uint64 values, sorted by voter, keeping for
    a voter given more than once its last entry (entries are in the order they were counted,
    so the last is the newest). The sort runs without the GIL: run files are merged on a
    thread beside the event loop."""
    cdef const uint32_t[::1] voters = memoryview(voters_bytes).cast("B").cast("I")
    cdef const uint64_t[::1] values = memoryview(values_bytes).cast("B").cast("Q")
    cdef Py_ssize_t count = voters.shape[0]
    if values.shape[0] != count:
        raise ValueError("a run needs one uint64 value per uint32 voter")
    if count >= 2**32:
        raise ValueError("a run holds fewer than 2**32 entries")
    if count == 0:
        return b"", b""
    # Filled in place before anyone sees them: merges of large runs make no second copy.
    sorted_voters = PyBytes_FromStringAndSize(NULL, count * sizeof(uint32_t))
    sorted_values = PyBytes_FromStringAndSize(NULL, count * sizeof(uint64_t))
    cdef uint32_t* voters_out = <uint32_t*>PyBytes_AS_STRING(sorted_voters)
    cdef uint64_t* values_out = <uint64_t*>PyBytes_AS_STRING(sorted_values)
    # Key = voter in the high half, position in the low: one qsort of uint64 sorts by voter,
    # then by position, so the newest entry of a voter is the last of its kind.
    cdef uint64_t* keys = <uint64_t*>malloc(count * sizeof(uint64_t))
    if keys == NULL:
        raise MemoryError()
    cdef Py_ssize_t index, kept = 0
    cdef uint32_t voter
    try:
        with nogil:
            for index in range(count):
                keys[index] = (<uint64_t>voters[index] << 32) | <uint64_t>index
            qsort(keys, count, sizeof(uint64_t), _compare_keys)
            for index in range(count):
                voter = <uint32_t>(keys[index] >> 32)
                if index + 1 < count and <uint32_t>(keys[index + 1] >> 32) == voter:
                    continue  # a newer entry of this voter follows
                voters_out[kept] = voter
                values_out[kept] = values[<Py_ssize_t>(keys[index] & 0xFFFFFFFFu)]
                kept += 1
    finally:
        free(keys)
    if kept == count:
        return sorted_voters, sorted_values
    return sorted_voters[:kept * sizeof(uint32_t)], sorted_values[:kept * sizeof(uint64_t)]
