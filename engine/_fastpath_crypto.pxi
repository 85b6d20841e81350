# Included by _fastpath.pyx: the receipt and token hot loops (HMAC-SHA256, batch Merkle
# trees, 201 bodies, bearer tokens). The pure-Python twin is engine/fastpath_py.py;
# tests/unit/test_fastpath_crypto_parity.py runs both on the same inputs and checks them
# against engine/receipts.py's and engine/tokens.py's reference definitions.
#
# Why OpenSSL's low-level SHA256_* calls: a commit cycle hashes ~5 SHA-256 blocks per vote
# (voter hash: two, leaf: one, tree: about two), and through hashlib each costs a Python
# object and a call (~0.5 us); here each is one compression (~60 ns with SHA-NI). They are
# deprecated in OpenSSL 3.0 in favour of EVP, whose context copies allocate, and the HMAC
# below lives on copying precomputed states. setup.py builds with OPENSSL_SUPPRESS_DEPRECATED.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy

cdef extern from "openssl/sha.h" nogil:
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX* context)
    int SHA256_Update(SHA256_CTX* context, const void* data, size_t length)
    int SHA256_Final(unsigned char* digest, SHA256_CTX* context)
    unsigned char* SHA256(const unsigned char* data, size_t length, unsigned char* digest)

cdef extern from "openssl/crypto.h" nogil:
    int CRYPTO_memcmp(const void* left, const void* right, size_t length)

cdef enum:
    HASH_BYTES = 32
    VOTER_HASH_BYTES = 16
    SHA256_BLOCK_BYTES = 64
    # Levels of a tree over at most 2**64 leaves, plus the root's.
    TREE_LEVELS_MAX = 65

cdef const char* _HEX_DIGITS = b"0123456789abcdef"
cdef const char* _B64URL_DIGITS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
cdef unsigned char _NODE_DOMAIN = 0x01


cdef class HmacSha256:
    """HMAC-SHA256 (RFC 2104) under one key of messages that all start with `prefix`: the
    inner state is pre-fed with the padded key and the prefix, the outer one with the
    padded key, so a digest costs two state copies and the message's blocks."""

    cdef SHA256_CTX _inner
    cdef SHA256_CTX _outer

    def __cinit__(self, bytes key not None, bytes prefix not None = b""):
        cdef unsigned char block[SHA256_BLOCK_BYTES]
        cdef unsigned char pad[SHA256_BLOCK_BYTES]
        cdef Py_ssize_t index
        cdef Py_ssize_t key_length = PyBytes_GET_SIZE(key)
        memset(block, 0, SHA256_BLOCK_BYTES)
        if key_length > SHA256_BLOCK_BYTES:  # longer keys are hashed first (RFC 2104)
            SHA256(<const unsigned char*>PyBytes_AS_STRING(key), key_length, block)
        else:
            memcpy(block, PyBytes_AS_STRING(key), key_length)
        for index in range(SHA256_BLOCK_BYTES):
            pad[index] = block[index] ^ 0x36
        SHA256_Init(&self._inner)
        SHA256_Update(&self._inner, pad, SHA256_BLOCK_BYTES)
        SHA256_Update(&self._inner, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix))
        for index in range(SHA256_BLOCK_BYTES):
            pad[index] = block[index] ^ 0x5C
        SHA256_Init(&self._outer)
        SHA256_Update(&self._outer, pad, SHA256_BLOCK_BYTES)

    cdef void _digest(self, const void* message, size_t length, unsigned char* digest) noexcept nogil:
        cdef SHA256_CTX context = self._inner
        cdef unsigned char inner[HASH_BYTES]
        SHA256_Update(&context, message, length)
        SHA256_Final(inner, &context)
        context = self._outer
        SHA256_Update(&context, inner, HASH_BYTES)
        SHA256_Final(digest, &context)

    def digest(self, bytes message not None) -> bytes:
        """HMAC(key, prefix + message)."""
        cdef unsigned char digest[HASH_BYTES]
        self._digest(PyBytes_AS_STRING(message), PyBytes_GET_SIZE(message), digest)
        return PyBytes_FromStringAndSize(<char*>digest, HASH_BYTES)

    def verify(self, bytes message not None, bytes expected not None) -> bool:
        """True when `expected` is HMAC(key, prefix + message), compared in constant time."""
        cdef unsigned char digest[HASH_BYTES]
        if PyBytes_GET_SIZE(expected) != HASH_BYTES:
            return False
        self._digest(PyBytes_AS_STRING(message), PyBytes_GET_SIZE(message), digest)
        return CRYPTO_memcmp(digest, PyBytes_AS_STRING(expected), HASH_BYTES) == 0


cdef inline void _voter_id_bytes(uint64_t voter, unsigned char* out) noexcept nogil:
    cdef int index
    for index in range(8):
        out[index] = <unsigned char>(voter >> (56 - 8 * index))


cdef class BatchTree:
    """One batch's leaves and every level of its Merkle tree (engine/receipts.py has the
    hash layouts): voter hashes, 16 bytes per leaf, and the nodes, 32 bytes each, level by
    level from the leaves up; an odd last node is promoted unchanged."""

    cdef readonly Py_ssize_t leaf_count
    cdef bytes _voter_hashes
    cdef bytes _nodes
    cdef Py_ssize_t _level_starts[TREE_LEVELS_MAX + 1]
    cdef int _levels

    @property
    def root(self) -> bytes:
        cdef const char* nodes = PyBytes_AS_STRING(self._nodes)
        return PyBytes_FromStringAndSize(nodes + HASH_BYTES * self._level_starts[self._levels - 1],
                                         HASH_BYTES)

    def voter_hash(self, Py_ssize_t index) -> bytes:
        self._check_index(index)
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self._voter_hashes)
                                         + VOTER_HASH_BYTES * index, VOTER_HASH_BYTES)

    def leaf(self, Py_ssize_t index) -> bytes:
        self._check_index(index)
        return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self._nodes) + HASH_BYTES * index,
                                         HASH_BYTES)

    def path(self, Py_ssize_t index) -> list:
        """Sibling hashes from leaf `index` up to the root, skipping promoted levels."""
        self._check_index(index)
        cdef const char* nodes = PyBytes_AS_STRING(self._nodes)
        cdef list path = []
        cdef int level
        cdef Py_ssize_t sibling, width
        for level in range(self._levels - 1):
            width = self._level_starts[level + 1] - self._level_starts[level]
            sibling = index ^ 1
            if sibling < width:
                path.append(PyBytes_FromStringAndSize(
                    nodes + HASH_BYTES * (self._level_starts[level] + sibling), HASH_BYTES))
            index >>= 1
        return path

    def index_of(self, Py_ssize_t first, Py_ssize_t end, bytes voter_hash not None):
        """The first leaf in [first, end) with this voter hash, or None."""
        if not 0 <= first <= end <= self.leaf_count:
            raise IndexError(f"leaves [{first}, {end}) are outside {self.leaf_count} leaves")
        if PyBytes_GET_SIZE(voter_hash) != VOTER_HASH_BYTES:
            return None
        cdef const char* hashes = PyBytes_AS_STRING(self._voter_hashes)
        cdef const char* wanted = PyBytes_AS_STRING(voter_hash)
        cdef Py_ssize_t index
        for index in range(first, end):
            if memcmp(hashes + VOTER_HASH_BYTES * index, wanted, VOTER_HASH_BYTES) == 0:
                return index
        return None

    cdef int _check_index(self, Py_ssize_t index) except -1:
        if not 0 <= index < self.leaf_count:
            raise IndexError(f"leaf {index} is outside a tree of {self.leaf_count} leaves")
        return 0

    cdef void _build_levels(self) noexcept:
        """Fill every level above the leaves (level 0 must be filled)."""
        cdef unsigned char* nodes = <unsigned char*>PyBytes_AS_STRING(self._nodes)
        cdef Py_ssize_t width = self.leaf_count, start = 0, parent, index
        cdef SHA256_CTX context
        cdef unsigned char* left
        self._levels = 1
        self._level_starts[0] = 0
        while width > 1:
            parent = start + width
            self._level_starts[self._levels] = parent
            for index in range(0, width - 1, 2):
                left = nodes + HASH_BYTES * (start + index)
                SHA256_Init(&context)
                SHA256_Update(&context, &_NODE_DOMAIN, 1)
                SHA256_Update(&context, left, 2 * HASH_BYTES)
                SHA256_Final(nodes + HASH_BYTES * (parent + index // 2), &context)
            if width & 1:
                memcpy(nodes + HASH_BYTES * (parent + width // 2),
                       nodes + HASH_BYTES * (start + width - 1), HASH_BYTES)
            start = parent
            width = (width + 1) >> 1
            self._levels += 1
        self._level_starts[self._levels] = start + 1

    def receipt_bodies(self, list groups not None, bytes batch_fields not None,
                       bytes leaf_count_field not None, bytes time_field not None,
                       bytes commit_fields not None, bytes json_batch not None,
                       bytes json_time not None) -> list:
        """The 201 body of every leaf, in leaf order (see ReceiptParts in engine/receipts.py).

        groups: per run of leaves of one poll, (first leaf, leaf count, option indexes as
        packed uint16, options as msgpack (list of bytes), receipt head (msgpack array
        header + poll), JSON up to the index). The other arguments are msgpack or JSON
        segments shared by the whole batch."""
        cdef Py_ssize_t leaf_count = self.leaf_count
        cdef list bodies = [None] * leaf_count
        cdef Py_ssize_t fixed = (PyBytes_GET_SIZE(batch_fields) + PyBytes_GET_SIZE(leaf_count_field)
                                 + PyBytes_GET_SIZE(time_field) + PyBytes_GET_SIZE(commit_fields))
        cdef Py_ssize_t scratch_bytes = 0, option_bytes_max
        cdef unsigned char* scratch
        cdef tuple group
        for group in groups:
            option_bytes_max = 0
            for option in <list>group[3]:
                option_bytes_max = max(option_bytes_max, PyBytes_GET_SIZE(<bytes>option))
            scratch_bytes = max(scratch_bytes, PyBytes_GET_SIZE(<bytes>group[4]) + option_bytes_max)
        # msgpack of one receipt: the segments, index (<= 9), voter hash (18), path (<= 3 +
        # 34 per level).
        scratch_bytes += fixed + 9 + 2 + VOTER_HASH_BYTES + 3 + (2 + HASH_BYTES) * TREE_LEVELS_MAX
        scratch = <unsigned char*>malloc(scratch_bytes)
        if scratch == NULL:
            raise MemoryError()
        cdef Py_ssize_t filled = 0
        try:
            for group in groups:
                filled += self._group_bodies(bodies, group, scratch, batch_fields,
                                             leaf_count_field, time_field, commit_fields,
                                             json_batch, json_time)
        finally:
            free(scratch)
        if filled != leaf_count:
            raise ValueError(f"groups cover {filled} of {leaf_count} leaves")
        return bodies

    cdef Py_ssize_t _group_bodies(self, list bodies, tuple group, unsigned char* scratch,
                                  bytes batch_fields, bytes leaf_count_field, bytes time_field,
                                  bytes commit_fields, bytes json_batch, bytes json_time) except -1:
        cdef Py_ssize_t first = group[0], count = group[1]
        cdef bytes option_indexes = group[2]
        cdef list options = group[3]
        cdef bytes head = group[4], json_head = group[5]
        if count < 0 or first < 0 or first + count > self.leaf_count:
            raise ValueError("a group's leaves are outside the tree")
        if PyBytes_GET_SIZE(option_indexes) != 2 * count:
            raise ValueError("a group needs one uint16 option index per leaf")
        cdef const uint16_t* option_of = <const uint16_t*>PyBytes_AS_STRING(option_indexes)
        cdef Py_ssize_t option_count = len(options), position, leaf, size, b64_size, body_size
        cdef unsigned char* cursor
        cdef char* body
        cdef bytes option, body_bytes
        cdef int digits
        cdef char decimal[24]
        for position in range(count):
            leaf = first + position
            if option_of[position] >= option_count:
                raise ValueError("an option index is outside the group's options")
            option = options[option_of[position]]
            cursor = scratch
            cursor = _put(cursor, head)
            cursor = _put(cursor, batch_fields)
            cursor = _put_uint(cursor, <uint64_t>leaf)
            cursor = _put(cursor, leaf_count_field)
            cursor[0] = 0xC4
            cursor[1] = VOTER_HASH_BYTES
            memcpy(cursor + 2, PyBytes_AS_STRING(self._voter_hashes) + VOTER_HASH_BYTES * leaf,
                   VOTER_HASH_BYTES)
            cursor += 2 + VOTER_HASH_BYTES
            cursor = _put(cursor, option)
            cursor = _put(cursor, time_field)
            cursor = self._put_path(cursor, leaf)
            cursor = _put(cursor, commit_fields)
            size = cursor - scratch
            b64_size = (4 * size + 2) // 3
            digits = _decimal(<uint64_t>leaf, decimal)
            body_size = (15 + b64_size + PyBytes_GET_SIZE(json_head) + digits
                         + PyBytes_GET_SIZE(json_batch) + 2 * VOTER_HASH_BYTES
                         + PyBytes_GET_SIZE(json_time))
            body_bytes = PyBytes_FromStringAndSize(NULL, body_size)
            body = PyBytes_AS_STRING(body_bytes)
            memcpy(body, b'{"receipt":"r2.', 15)
            body += 15
            _b64url(scratch, size, <unsigned char*>body)
            body += b64_size
            body = _put_chars(body, json_head)
            memcpy(body, decimal + 24 - digits, digits)
            body += digits
            body = _put_chars(body, json_batch)
            _hex(<const unsigned char*>PyBytes_AS_STRING(self._voter_hashes) + VOTER_HASH_BYTES * leaf,
                 VOTER_HASH_BYTES, body)
            body += 2 * VOTER_HASH_BYTES
            body = _put_chars(body, json_time)
            bodies[leaf] = body_bytes
        return count

    cdef unsigned char* _put_path(self, unsigned char* cursor, Py_ssize_t index) noexcept:
        """The leaf's path as a msgpack array of 32-byte bins."""
        cdef const char* nodes = PyBytes_AS_STRING(self._nodes)
        cdef int level, length = 0
        cdef Py_ssize_t sibling, position = index
        for level in range(self._levels - 1):
            if position ^ 1 < self._level_starts[level + 1] - self._level_starts[level]:
                length += 1
            position >>= 1
        # msgspec writes up to 15 entries as a fixarray, more as array16.
        if length <= 15:
            cursor[0] = 0x90 | length
            cursor += 1
        else:
            cursor[0] = 0xDC
            cursor[1] = length >> 8
            cursor[2] = length & 0xFF
            cursor += 3
        for level in range(self._levels - 1):
            sibling = index ^ 1
            if sibling < self._level_starts[level + 1] - self._level_starts[level]:
                cursor[0] = 0xC4
                cursor[1] = HASH_BYTES
                memcpy(cursor + 2, nodes + HASH_BYTES * (self._level_starts[level] + sibling),
                       HASH_BYTES)
                cursor += 2 + HASH_BYTES
            index >>= 1
        return cursor


def batch_tree(unsigned int shard, list groups not None) -> BatchTree:
    """Voter hashes, leaves and Merkle tree of one batch (a fencing group's, its runs of
    any of the group's shards; `shard` is not used: engine/signing.py passes the group).

    groups: per run of leaves of one shard and poll, in leaf order, (poll's HmacSha256 (the voter
    hash key), leaf head bytes (engine/receipts.py `_leaf_head`), option tails (list of
    bytes, `_leaf_tail` of each option), voter ids as packed native uint64, option indexes
    as packed native uint16). The shard is in every leaf head already."""
    cdef Py_ssize_t leaf_count = 0
    cdef tuple group
    for group in groups:
        if PyBytes_GET_SIZE(<bytes>group[3]) % 8 or \
                PyBytes_GET_SIZE(<bytes>group[4]) * 4 != PyBytes_GET_SIZE(<bytes>group[3]):
            raise ValueError("a group needs packed uint64 voters and one uint16 option each")
        leaf_count += PyBytes_GET_SIZE(<bytes>group[3]) // 8
    if leaf_count == 0:
        raise ValueError("a Merkle tree needs at least one leaf")
    cdef BatchTree tree = BatchTree.__new__(BatchTree)
    tree.leaf_count = leaf_count
    tree._voter_hashes = PyBytes_FromStringAndSize(NULL, VOTER_HASH_BYTES * leaf_count)
    # Level k holds ceil(n / 2**k) nodes: fewer than 2n + 1 per level in all.
    tree._nodes = PyBytes_FromStringAndSize(NULL, HASH_BYTES * (2 * leaf_count + TREE_LEVELS_MAX))
    cdef Py_ssize_t leaf = 0
    for group in groups:
        leaf = _group_leaves(tree, leaf, group)
    tree._build_levels()
    return tree


cdef Py_ssize_t _group_leaves(BatchTree tree, Py_ssize_t leaf, tuple group) except -1:
    cdef HmacSha256 mac = group[0]
    cdef bytes head = group[1]
    cdef list tails = group[2]
    cdef bytes voters = group[3], option_indexes = group[4]
    cdef Py_ssize_t count = PyBytes_GET_SIZE(voters) // 8, tail_count = len(tails), position
    cdef const uint64_t* voter_ids = <const uint64_t*>PyBytes_AS_STRING(voters)
    cdef const uint16_t* option_of = <const uint16_t*>PyBytes_AS_STRING(option_indexes)
    cdef unsigned char* hashes = <unsigned char*>PyBytes_AS_STRING(tree._voter_hashes)
    cdef unsigned char* nodes = <unsigned char*>PyBytes_AS_STRING(tree._nodes)
    cdef unsigned char voter_bytes[8]
    cdef unsigned char digest[HASH_BYTES]
    cdef SHA256_CTX context
    cdef bytes tail
    for position in range(count):
        if option_of[position] >= tail_count:
            raise ValueError("an option index is outside the group's options")
        tail = tails[option_of[position]]
        _voter_id_bytes(voter_ids[position], voter_bytes)
        mac._digest(voter_bytes, 8, digest)
        memcpy(hashes + VOTER_HASH_BYTES * leaf, digest, VOTER_HASH_BYTES)
        SHA256_Init(&context)
        SHA256_Update(&context, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
        SHA256_Update(&context, digest, VOTER_HASH_BYTES)
        SHA256_Update(&context, PyBytes_AS_STRING(tail), PyBytes_GET_SIZE(tail))
        SHA256_Final(nodes + HASH_BYTES * leaf, &context)
        leaf += 1
    return leaf


cdef inline unsigned char* _put(unsigned char* cursor, bytes segment) noexcept:
    cdef Py_ssize_t size = PyBytes_GET_SIZE(segment)
    memcpy(cursor, PyBytes_AS_STRING(segment), size)
    return cursor + size


cdef inline char* _put_chars(char* cursor, bytes segment) noexcept:
    cdef Py_ssize_t size = PyBytes_GET_SIZE(segment)
    memcpy(cursor, PyBytes_AS_STRING(segment), size)
    return cursor + size


cdef unsigned char* _put_uint(unsigned char* cursor, uint64_t value) noexcept nogil:
    """A msgpack unsigned integer in its shortest form, as msgspec writes it."""
    cdef int size, index
    if value < 0x80:
        cursor[0] = <unsigned char>value
        return cursor + 1
    if value <= 0xFF:
        cursor[0] = 0xCC
        size = 1
    elif value <= 0xFFFF:
        cursor[0] = 0xCD
        size = 2
    elif value <= <uint64_t>0xFFFFFFFFU:
        cursor[0] = 0xCE
        size = 4
    else:
        cursor[0] = 0xCF
        size = 8
    for index in range(size):
        cursor[1 + index] = <unsigned char>(value >> (8 * (size - 1 - index)))
    return cursor + 1 + size


cdef int _decimal(uint64_t value, char* buffer) noexcept nogil:
    """Write `value` in decimal at the end of a 24-byte buffer; return its digit count."""
    cdef int digits = 0
    while True:
        buffer[23 - digits] = <char>(48 + value % 10)
        value //= 10
        digits += 1
        if value == 0:
            return digits


cdef void _hex(const unsigned char* data, Py_ssize_t size, char* out) noexcept nogil:
    cdef Py_ssize_t index
    for index in range(size):
        out[2 * index] = _HEX_DIGITS[data[index] >> 4]
        out[2 * index + 1] = _HEX_DIGITS[data[index] & 0x0F]


cdef void _b64url(const unsigned char* data, Py_ssize_t size, unsigned char* out) noexcept nogil:
    """Unpadded base64url of `size` bytes: (4 * size + 2) // 3 characters."""
    cdef Py_ssize_t index = 0
    cdef uint32_t triple
    while index + 3 <= size:
        triple = (<uint32_t>data[index] << 16) | (<uint32_t>data[index + 1] << 8) | data[index + 2]
        out[0] = _B64URL_DIGITS[(triple >> 18) & 0x3F]
        out[1] = _B64URL_DIGITS[(triple >> 12) & 0x3F]
        out[2] = _B64URL_DIGITS[(triple >> 6) & 0x3F]
        out[3] = _B64URL_DIGITS[triple & 0x3F]
        out += 4
        index += 3
    if size - index == 1:
        triple = <uint32_t>data[index] << 16
        out[0] = _B64URL_DIGITS[(triple >> 18) & 0x3F]
        out[1] = _B64URL_DIGITS[(triple >> 12) & 0x3F]
    elif size - index == 2:
        triple = (<uint32_t>data[index] << 16) | (<uint32_t>data[index + 1] << 8)
        out[0] = _B64URL_DIGITS[(triple >> 18) & 0x3F]
        out[1] = _B64URL_DIGITS[(triple >> 12) & 0x3F]
        out[2] = _B64URL_DIGITS[(triple >> 6) & 0x3F]


# --- bearer tokens (engine/tokens.py has the format) ----------------------------------------

from cpython.unicode cimport PyUnicode_Check
from cpython.bytes cimport PyBytes_Check

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL
    bint PyUnicode_IS_ASCII(object text)

# What is wrong with a token, as token_payload returns it (engine/tokens.py maps each to
# its error); keep in step with engine/fastpath_py.py.
cdef enum:
    TOKEN_MISSING = 1
    TOKEN_NOT_ASCII = 2
    TOKEN_NOT_TEXT = 3
    TOKEN_TOO_LONG = 4
    TOKEN_MALFORMED = 5
    TOKEN_KEY_UNKNOWN = 6
    TOKEN_SIGNATURE_WRONG = 7
    TOKEN_PAYLOAD_NOT_BASE64URL = 8
    AUTHORIZATION_BYTES_MAX = 1024
    SIGNATURE_B64_CHARS = 43  # unpadded base64url of a 32-byte HMAC

cdef signed char _B64URL_VALUES[256]
for _index in range(256):
    _B64URL_VALUES[_index] = -1
for _index in range(64):
    _B64URL_VALUES[<unsigned char>_B64URL_DIGITS[_index]] = _index


cdef inline bint _is_space(unsigned char byte) noexcept nogil:
    # bytes.strip()'s ASCII whitespace.
    return byte == 32 or 9 <= byte <= 13


def token_payload(dict macs not None, object authorization):
    """The decoded claims bytes of `authorization` ("Bearer <token>" or a bare token, str or
    bytes) when the token is `v1.<key_id>.<payload>.<signature>` and the signature is
    macs[key_id] (an HmacSha256 pre-fed with `v1.<key_id>.`) of the payload, as unpadded
    base64url; otherwise an int saying what is wrong (TOKEN_* above)."""
    cdef const char* text
    cdef Py_ssize_t size
    if authorization is None:
        return TOKEN_MISSING
    if PyUnicode_Check(authorization):
        if not PyUnicode_IS_ASCII(authorization):
            return TOKEN_NOT_ASCII
        text = PyUnicode_AsUTF8AndSize(authorization, &size)
    elif PyBytes_Check(authorization):
        text = PyBytes_AS_STRING(authorization)
        size = PyBytes_GET_SIZE(authorization)
    else:
        return TOKEN_NOT_TEXT
    if size > AUTHORIZATION_BYTES_MAX:
        return TOKEN_TOO_LONG
    cdef Py_ssize_t start = 0, end = size, index
    while start < end and _is_space(text[start]):
        start += 1
    while end > start and _is_space(text[end - 1]):
        end -= 1
    # "Bearer <token>": the scheme (up to the first space) is case-insensitive; a value
    # whose first word is not "bearer" is taken whole as the token.
    index = start
    while index < end and text[index] != b" ":
        index += 1
    if index - start == 6 and _is_bearer(text + start):
        start = index
        while start < end and _is_space(text[start]):
            start += 1
    if start == end:
        return TOKEN_MISSING
    # v1.<key_id>.<payload>.<signature>: exactly three dots.
    cdef Py_ssize_t dots[3]
    cdef int dot_count = 0
    for index in range(start, end):
        if text[index] == b".":
            if dot_count == 3:
                return TOKEN_MALFORMED
            dots[dot_count] = index
            dot_count += 1
    if dot_count != 3 or dots[0] - start != 2 or text[start] != b"v" or text[start + 1] != b"1":
        return TOKEN_MALFORMED
    key_id = PyBytes_FromStringAndSize(text + dots[0] + 1, dots[1] - dots[0] - 1)
    mac = macs.get(key_id)
    if mac is None:
        return TOKEN_KEY_UNKNOWN
    cdef const char* payload = text + dots[1] + 1
    cdef Py_ssize_t payload_size = dots[2] - dots[1] - 1
    cdef unsigned char digest[HASH_BYTES]
    cdef unsigned char expected[SIGNATURE_B64_CHARS]
    (<HmacSha256?>mac)._digest(payload, payload_size, digest)
    _b64url(digest, HASH_BYTES, expected)
    if end - dots[2] - 1 != SIGNATURE_B64_CHARS or \
            CRYPTO_memcmp(expected, text + dots[2] + 1, SIGNATURE_B64_CHARS) != 0:
        return TOKEN_SIGNATURE_WRONG
    return _b64url_decode(payload, payload_size)


cdef inline bint _is_bearer(const char* scheme) noexcept nogil:
    cdef const char* bearer = b"bearer"
    cdef int index
    for index in range(6):
        if (scheme[index] | 0x20) != bearer[index]:
            return False
    return True


cdef object _b64url_decode(const char* text, Py_ssize_t size):
    """Unpadded base64url, strictly (no padding, nothing outside the alphabet, never one
    character past a multiple of four); bits past the last whole byte are ignored, as
    binascii does. Returns the bytes, or TOKEN_PAYLOAD_NOT_BASE64URL."""
    if size % 4 == 1:
        return TOKEN_PAYLOAD_NOT_BASE64URL
    cdef Py_ssize_t decoded_size = size * 3 // 4, index
    cdef bytes decoded = PyBytes_FromStringAndSize(NULL, decoded_size)
    cdef unsigned char* out = <unsigned char*>PyBytes_AS_STRING(decoded)
    cdef uint32_t bits = 0
    cdef int bit_count = 0
    cdef signed char value
    for index in range(size):
        value = _B64URL_VALUES[<unsigned char>text[index]]
        if value < 0:
            return TOKEN_PAYLOAD_NOT_BASE64URL
        bits = (bits << 6) | <uint32_t>value
        bit_count += 6
        if bit_count >= 8:
            bit_count -= 8
            out[0] = <unsigned char>(bits >> bit_count)
            out += 1
    return decoded
