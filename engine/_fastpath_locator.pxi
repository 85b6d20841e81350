# Included by _fastpath.pyx: the open run of the receipt locator and the sort of a run. Their
# pure-Python twins are Locator and sort_run in engine/fastpath_py.py;
# tests/unit/test_fastpath_parity.py compares them entry for entry.

from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcpy

cdef enum:
    # The open run's arrays grow by half again (at least this many entries) when a group
    # does not fit: a few reallocations per run, no doubling past what a run needs.
    LOCATOR_GROWTH_ENTRIES_MIN = 1024


cdef class Locator:
    """The open run of one poll's receipt locator in one shard: (voter index, value) pairs in
    the order they were counted, where value is the log offset of the record that counted
    the vote + 1. A voter is counted once per poll, so a voter appears at most once in the
    locator as a whole; should it appear twice, the newest entry wins (`get`, `take_sorted`).

    It costs 12 bytes per entry up to its capacity, which grows when a group does not fit and
    is kept when the run is taken: shards/locator_runs.py takes the run as soon as it holds
    `locator_run_entries`, sorts it and writes it to a run file."""

    cdef uint32_t* _voters
    cdef uint64_t* _values
    cdef Py_ssize_t _capacity
    cdef readonly Py_ssize_t entries

    def __dealloc__(self):
        free(self._voters)
        free(self._values)

    cdef int _reserve(self, Py_ssize_t count) except -1:
        """Room for `count` more entries, before anything changes (allocation may fail)."""
        cdef Py_ssize_t needed = self.entries + count
        if needed <= self._capacity:
            return 0
        cdef Py_ssize_t capacity = max(needed, self._capacity + self._capacity // 2,
                                       <Py_ssize_t>LOCATOR_GROWTH_ENTRIES_MIN)
        cdef uint32_t* voters = <uint32_t*>realloc(self._voters, capacity * sizeof(uint32_t))
        if voters == NULL:
            raise MemoryError()
        self._voters = voters
        cdef uint64_t* values = <uint64_t*>realloc(self._values, capacity * sizeof(uint64_t))
        if values == NULL:
            raise MemoryError()
        self._values = values
        self._capacity = capacity
        return 0

    cdef void _fill(self, const uint32_t* voters, Py_ssize_t count, uint64_t value) noexcept:
        """Append every voter with one value (room reserved)."""
        cdef Py_ssize_t index, base = self.entries
        memcpy(self._voters + base, voters, count * sizeof(uint32_t))
        for index in range(count):
            self._values[base + index] = value
        self.entries = base + count

    cdef inline void _set(self, uint32_t voter, uint64_t value) noexcept:
        """Append one entry (room reserved)."""
        self._voters[self.entries] = voter
        self._values[self.entries] = value
        self.entries += 1

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
                return self._values[position]
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
        return (bytes((<char*>self._voters)[:self.entries * sizeof(uint32_t)]),
                bytes((<char*>self._values)[:self.entries * sizeof(uint64_t)]))

    def take_sorted(self) -> tuple:
        """(voters, values) sorted by voter, one entry per voter (the newest), and empty the
        run; its capacity stays allocated for the next run."""
        voters, values = self.entries_bytes()
        self.entries = 0
        return sort_run(voters, values)

    @staticmethod
    def from_entries(voters_bytes, values_bytes) -> Locator:
        """A run holding the given entries (packed uint32 voters, uint64 values), in order."""
        cdef const uint32_t[::1] voters = memoryview(voters_bytes).cast("B").cast("I")
        cdef const uint64_t[::1] values = memoryview(values_bytes).cast("B").cast("Q")
        if voters.shape[0] != values.shape[0]:
            raise ValueError("a run needs one uint64 value per uint32 voter")
        cdef Locator locator = Locator()
        cdef Py_ssize_t count = voters.shape[0]
        if count:
            locator._reserve(count)
            memcpy(locator._voters, &voters[0], count * sizeof(uint32_t))
            memcpy(locator._values, &values[0], count * sizeof(uint64_t))
            locator.entries = count
        return locator

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the entries (capacity, not only what is used)."""
        return self._capacity * (sizeof(uint32_t) + sizeof(uint64_t))


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
    sorted_voters = bytearray(count * sizeof(uint32_t))
    sorted_values = bytearray(count * sizeof(uint64_t))
    if count == 0:
        return bytes(sorted_voters), bytes(sorted_values)
    cdef uint32_t[::1] voters_out = memoryview(sorted_voters).cast("I")
    cdef uint64_t[::1] values_out = memoryview(sorted_values).cast("Q")
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
    return (bytes(memoryview(sorted_voters)[:kept * sizeof(uint32_t)]),
            bytes(memoryview(sorted_values)[:kept * sizeof(uint64_t)]))
