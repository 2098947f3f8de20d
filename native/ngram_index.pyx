# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Prompt-lookup drafts: an incremental n-gram index over one sequence's tokens.

    tokens[n_tokens]     int32   the sequence so far (prompt, then accepted output)
    keys[capacity]       uint64  open-addressing map (linear probing, capacity a
                                 power of two, load <= 1/2): an n-gram's hash, 0 = empty
    lens[capacity]       uint8   that n-gram's length n
    ends[capacity]       int32   where its most recent indexed occurrence ends

Every n-gram with min_n <= n <= max_n that ends at position e is indexed once a
token follows e (so a hit always has a continuation), and a later occurrence
overwrites an earlier one: a lookup finds the most recent earlier occurrence.
Appending T tokens costs O(T * max_n); a proposal O(max_n^2 + k), whatever the
length of the history: the sequence is never rescanned.

propose(k): the longest n (max_n down to min_n) whose last n tokens occurred
before proposes the k tokens that followed that occurrence. Where the copy runs
into the present it goes on from the draft itself (a period-3 loop drafts
a b c a b c ..., not just a b c). A hit is confirmed token by token, so a hash
collision never proposes a wrong continuation.

Only one thread may use an index (the engine loop); the history only grows.
"""
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memcmp, memset

cdef enum:
    MAX_N = 64                           # the longest n an index takes
MAX_NGRAM = MAX_N
cdef uint64_t FNV_OFFSET = 0xcbf29ce484222325ULL
cdef uint64_t FNV_PRIME = 0x100000001b3ULL


cdef inline uint64_t _mix(uint64_t z) noexcept nogil:
    """SplitMix64 finalizer: spreads FNV's weak low bits over the whole word."""
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL
    return z ^ (z >> 31)


cdef inline uint64_t _key(uint64_t h, int n) noexcept nogil:
    """The table key of an n-gram whose running FNV hash is h; never 0 (empty)."""
    cdef uint64_t k = _mix(h + <uint64_t>n)
    return k if k != 0 else 1


cdef class NgramIndex:
    cdef readonly int min_n
    cdef readonly int max_n
    cdef int32_t *tokens
    cdef Py_ssize_t n_tokens, tok_cap
    cdef uint64_t *keys
    cdef uint8_t *lens
    cdef int32_t *ends
    cdef Py_ssize_t capacity, used
    cdef Py_ssize_t n_indexed             # end positions 0 .. n_indexed - 1 are in the table

    def __cinit__(self, int min_n, int max_n):
        self.tokens = NULL
        self.keys = NULL
        self.lens = NULL
        self.ends = NULL
        if not 1 <= min_n <= max_n <= MAX_NGRAM:
            raise ValueError(f"n-gram lengths must satisfy 1 <= min ({min_n}) <= max ({max_n}) <= {MAX_NGRAM}")
        self.min_n, self.max_n = min_n, max_n
        self.n_tokens = self.tok_cap = self.used = self.n_indexed = 0
        self._grow_table(64)

    def __dealloc__(self):
        PyMem_Free(self.tokens)
        PyMem_Free(self.keys)
        PyMem_Free(self.lens)
        PyMem_Free(self.ends)

    def __len__(self):
        return self.n_tokens

    @property
    def num_entries(self):
        """Distinct n-grams indexed (tests)."""
        return self.used

    # -- growing ---------------------------------------------------------------
    cdef _grow_table(self, Py_ssize_t capacity):
        """Rehash into a table of `capacity` slots (a power of two)."""
        cdef uint64_t *old_keys = self.keys
        cdef uint8_t *old_lens = self.lens
        cdef int32_t *old_ends = self.ends
        cdef Py_ssize_t old_cap = self.capacity if old_keys != NULL else 0, i
        keys = <uint64_t *>PyMem_Realloc(NULL, capacity * sizeof(uint64_t))
        lens = <uint8_t *>PyMem_Realloc(NULL, capacity * sizeof(uint8_t))
        ends = <int32_t *>PyMem_Realloc(NULL, capacity * sizeof(int32_t))
        if keys == NULL or lens == NULL or ends == NULL:
            PyMem_Free(keys)
            PyMem_Free(lens)
            PyMem_Free(ends)
            raise MemoryError("n-gram index table")
        memset(keys, 0, capacity * sizeof(uint64_t))
        self.keys, self.lens, self.ends, self.capacity, self.used = keys, lens, ends, capacity, 0
        for i in range(old_cap):
            if old_keys[i] != 0:
                self._put(old_keys[i], old_lens[i], old_ends[i])
        PyMem_Free(old_keys)
        PyMem_Free(old_lens)
        PyMem_Free(old_ends)

    cdef _reserve_tokens(self, Py_ssize_t n):
        cdef Py_ssize_t cap = self.tok_cap if self.tok_cap else 256
        while cap < n:
            cap *= 2
        if cap != self.tok_cap:
            grown = <int32_t *>PyMem_Realloc(self.tokens, cap * sizeof(int32_t))
            if grown == NULL:
                raise MemoryError("n-gram index tokens")
            self.tokens, self.tok_cap = grown, cap

    # -- the table ---------------------------------------------------------------
    cdef inline bint _same(self, Py_ssize_t end_a, Py_ssize_t end_b, int n) noexcept nogil:
        return memcmp(self.tokens + end_a - n + 1, self.tokens + end_b - n + 1, n * sizeof(int32_t)) == 0

    cdef void _put(self, uint64_t key, int n, int32_t end) noexcept nogil:
        """Insert, or move an n-gram's entry to its newer occurrence `end` (the caller keeps load <= 1/2)."""
        cdef Py_ssize_t mask = self.capacity - 1, slot = <Py_ssize_t>(key & <uint64_t>mask)
        while self.keys[slot] != 0:
            if self.keys[slot] == key and self.lens[slot] == n and self._same(self.ends[slot], end, n):
                self.ends[slot] = end
                return
            slot = (slot + 1) & mask
        self.keys[slot], self.lens[slot], self.ends[slot] = key, <uint8_t>n, end
        self.used += 1

    cdef int32_t _find(self, uint64_t key, int n, Py_ssize_t end) noexcept nogil:
        """End of the indexed occurrence of the n-gram ending at `end`, or -1."""
        cdef Py_ssize_t mask = self.capacity - 1, slot = <Py_ssize_t>(key & <uint64_t>mask)
        while self.keys[slot] != 0:
            if self.keys[slot] == key and self.lens[slot] == n and self._same(self.ends[slot], end, n):
                return self.ends[slot]
            slot = (slot + 1) & mask
        return -1

    cdef _index_until(self, Py_ssize_t stop):
        """Index the n-grams ending at positions n_indexed .. stop - 1."""
        cdef Py_ssize_t e, j
        cdef uint64_t h
        cdef int n
        for e in range(self.n_indexed, stop):
            if 2 * (self.used + self.max_n) > self.capacity:
                self._grow_table(2 * self.capacity)
            h = FNV_OFFSET
            for n in range(1, min(self.max_n, e + 1) + 1):
                h = (h ^ <uint64_t>(<unsigned int>self.tokens[e - n + 1])) * FNV_PRIME
                if n >= self.min_n:
                    self._put(_key(h, n), n, <int32_t>e)
        self.n_indexed = max(self.n_indexed, stop)

    # -- the API -------------------------------------------------------------------
    def extend(self, token_ids):
        """Take the tokens of `token_ids` (the whole history: a list or array of ints)
        past the ones already held."""
        cdef Py_ssize_t total = len(token_ids), i
        if total < self.n_tokens:
            raise ValueError(f"the history shrank from {self.n_tokens} to {total} tokens; it only grows")
        if total >= (1 << 31) - 1:
            raise ValueError("histories past 2^31 tokens are not indexed")
        if total == self.n_tokens:
            return
        self._reserve_tokens(total)
        for i in range(self.n_tokens, total):
            self.tokens[i] = <int32_t>token_ids[i]
        self.n_tokens = total
        self._index_until(total - 1)      # the last token has no follower yet

    def propose(self, int k):
        """Up to k drafted tokens (a list; empty when no n-gram of the tail occurred before)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        cdef uint64_t keys[MAX_N + 1]
        cdef uint64_t h = FNV_OFFSET
        cdef Py_ssize_t last = self.n_tokens - 1, src
        cdef int n, top = min(self.max_n, self.n_tokens)
        cdef int32_t found = -1
        if k == 0 or top < self.min_n:
            return []
        for n in range(1, top + 1):
            h = (h ^ <uint64_t>(<unsigned int>self.tokens[last - n + 1])) * FNV_PRIME
            keys[n] = _key(h, n)
        for n in range(top, self.min_n - 1, -1):
            found = self._find(keys[n], n, last)
            if found >= 0:
                break
        if found < 0:
            return []
        draft = []
        for j in range(k):
            src = found + 1 + j
            draft.append(self.tokens[src] if src < self.n_tokens else draft[src - self.n_tokens])
        return draft
