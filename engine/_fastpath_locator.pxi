# Included by _fastpath.pyx: the receipt locator. Its pure-Python twin is Locator in
# engine/fastpath_py.py; tests/unit/test_fastpath_parity.py compares them entry for entry.

from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_READ
from libc.stdlib cimport calloc, realloc

cdef enum:
    # Pages of 4096 entries (32 KiB): a shard's dense voter indexes fill them, and a few
    # voters with very high ids cost a page each instead of a locator up to their index.
    LOCATOR_PAGE_BITS = 12
    LOCATOR_PAGE_ENTRIES = 1 << LOCATOR_PAGE_BITS
    LOCATOR_PAGE_MASK = LOCATOR_PAGE_ENTRIES - 1
    # How far ahead the locator fill prefetches: enough misses in flight to hide their latency.
    LOCATOR_PREFETCH_AHEAD = 16

PAGE_ENTRIES = LOCATOR_PAGE_ENTRIES

cdef extern from *:
    void __builtin_prefetch(const void* address, int write, int locality) nogil


cdef class Locator:
    """The receipt locator of one poll in one shard: voter index -> (log offset of the record
    that counted the vote) + 1, 0 for none. Entries live in pages allocated zeroed when first
    written and never freed before the locator, so a page's memory stays where it is
    (page_view may hand it out while the locator lives). Growing never copies."""

    cdef uint64_t** _pages
    cdef Py_ssize_t _page_slots
    cdef readonly Py_ssize_t pages  # pages allocated

    def __dealloc__(self):
        cdef Py_ssize_t number
        if self._pages != NULL:
            for number in range(self._page_slots):
                free(self._pages[number])
            free(self._pages)

    cdef uint64_t* _page(self, Py_ssize_t number) except NULL:
        """Page `number`, allocated (zeroed) if it was not yet."""
        cdef Py_ssize_t slots
        cdef uint64_t** grown
        cdef uint64_t* page
        if number >= self._page_slots:
            slots = max(number + 1, 2 * self._page_slots, 16)
            grown = <uint64_t**>realloc(self._pages, slots * sizeof(uint64_t*))
            if grown == NULL:
                raise MemoryError()
            memset(grown + self._page_slots, 0, (slots - self._page_slots) * sizeof(uint64_t*))
            self._pages = grown
            self._page_slots = slots
        page = self._pages[number]
        if page == NULL:
            page = <uint64_t*>calloc(LOCATOR_PAGE_ENTRIES, sizeof(uint64_t))
            if page == NULL:
                raise MemoryError()
            self._pages[number] = page
            self.pages += 1
        return page

    cdef int _reserve(self, const uint32_t* sorted_voters, Py_ssize_t count) except -1:
        """Allocate every page these voters (in order) fall in, before anything changes."""
        cdef Py_ssize_t index, number, last = -1
        for index in range(count):
            number = sorted_voters[index] >> LOCATOR_PAGE_BITS
            if number != last:
                self._page(number)
                last = number
        return 0

    cdef void _fill(self, const uint32_t* sorted_voters, Py_ssize_t count,
                    uint64_t value) noexcept:
        """Set every voter's entry (pages reserved): in voter order, prefetching ahead. Votes
        of a batch are spread over the shard, so nearly every entry is its own cache line;
        the misses overlap instead of coming one after another (apply 55 -> 63M votes/s)."""
        cdef Py_ssize_t index
        cdef uint32_t voter, ahead
        for index in range(count):
            if index + LOCATOR_PREFETCH_AHEAD < count:
                ahead = sorted_voters[index + LOCATOR_PREFETCH_AHEAD]
                __builtin_prefetch(&self._pages[ahead >> LOCATOR_PAGE_BITS][ahead & LOCATOR_PAGE_MASK], 1, 0)
            voter = sorted_voters[index]
            self._pages[voter >> LOCATOR_PAGE_BITS][voter & LOCATOR_PAGE_MASK] = value

    cdef inline void _set(self, uint32_t voter, uint64_t value) noexcept:
        """One entry whose page is reserved."""
        self._pages[voter >> LOCATOR_PAGE_BITS][voter & LOCATOR_PAGE_MASK] = value

    def get(self, Py_ssize_t index) -> int:
        """The entry of voter index `index` (0: none)."""
        if index < 0:
            raise IndexError("voter index is negative")
        cdef Py_ssize_t number = index >> LOCATOR_PAGE_BITS
        if number >= self._page_slots or self._pages[number] == NULL:
            return 0
        return self._pages[number][index & LOCATOR_PAGE_MASK]

    def set(self, Py_ssize_t index, uint64_t value) -> None:
        if not 0 <= index < 2**32:
            raise IndexError("voter index is outside 0..2**32-1")
        self._page(index >> LOCATOR_PAGE_BITS)[index & LOCATOR_PAGE_MASK] = value

    def page_numbers(self) -> list:
        """The allocated pages' numbers, ascending."""
        cdef Py_ssize_t number
        return [number for number in range(self._page_slots) if self._pages[number] != NULL]

    def page_view(self, Py_ssize_t number):
        """A read-only memoryview of page `number`'s bytes (little-endian uint64 entries),
        without a copy. It must not outlive this locator (snapshots encode it at once)."""
        if not 0 <= number < self._page_slots or self._pages[number] == NULL:
            raise IndexError(f"page {number} is not allocated")
        return PyMemoryView_FromMemory(<char*>self._pages[number],
                                       LOCATOR_PAGE_ENTRIES * sizeof(uint64_t), PyBUF_READ)

    @staticmethod
    def from_pages(pages) -> Locator:
        """A locator holding the given (page number, page bytes) pairs."""
        cdef Locator locator = Locator()
        cdef const unsigned char[::1] data
        for number, page_bytes in pages:
            data = page_bytes
            if data.shape[0] != LOCATOR_PAGE_ENTRIES * sizeof(uint64_t) or not 0 <= number < 2**20:
                raise ValueError(f"locator page {number!r} is not one whole page")
            memcpy(locator._page(number), &data[0], data.shape[0])
        return locator

    def count_set(self) -> int:
        """How many entries are not 0."""
        cdef Py_ssize_t number, index, total = 0
        cdef uint64_t* page
        for number in range(self._page_slots):
            page = self._pages[number]
            if page != NULL:
                for index in range(LOCATOR_PAGE_ENTRIES):
                    if page[index]:
                        total += 1
        return total

    @property
    def nbytes(self) -> int:
        return self.pages * LOCATOR_PAGE_ENTRIES * sizeof(uint64_t)
