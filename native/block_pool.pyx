# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The KV block pool's integer state in C arrays; `BlockManager` is the Python face.

    ref[n_blocks]                    int32   references; 0 <=> on the free list
    prev[n_blocks], next[n_blocks]   int32   intrusive doubly-linked LRU free list
                                             (pop from the head, freed blocks go to the tail)
    keyed[n_blocks]                  uint8   1 if the block holds a registered full block
    key_hash[n_blocks]               uint64  its chained hash
    key_parent[n_blocks]             uint64  its parent's hash (0 for a first block)
    key_tokens[n_blocks, block_size] int32   its token ids, to confirm a hit
    table[capacity]                  int32   open-addressing map hash -> block id
                                             (linear probing, backward-shift deletion,
                                             capacity a power of two >= 2 * n_blocks, so
                                             the load stays <= 1/2; -1 marks an empty slot)

A block's hash covers its parent's hash and its own tokens (FNV-1a over 32-bit
words, then a SplitMix64 finalizer). A hit needs the hash, the parent hash and
every token to match, so a hash collision is never taken for a hit. At most one
block holds a given hash: a second block with the same hash is simply not
registered (exactly like the Python dict this replaces).

Arguments are checked with the GIL; the loops then run without it when there is
enough work to be worth a GIL release (`_NOGIL_MIN` tokens or blocks), with it otherwise,
since releasing and retaking the GIL costs more than a handful of integer ops and
may wait on other threads. Only one thread may use a pool (the engine loop).
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport int32_t, uint8_t, uint64_t
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.string cimport memcmp, memcpy

cnp.import_array()

cdef int32_t NIL = -1
cdef Py_ssize_t _NOGIL_MIN = 256          # elements (tokens or blocks) before we drop the GIL
cdef uint64_t FNV_OFFSET = 0xcbf29ce484222325ULL
cdef uint64_t FNV_PRIME = 0x100000001b3ULL


cdef inline uint64_t _mix(uint64_t z) noexcept nogil:
    """SplitMix64 finalizer: spreads FNV's weak low bits over the whole word."""
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL
    return z ^ (z >> 31)


cdef inline uint64_t _hash_block(uint64_t parent, const int32_t *tokens, Py_ssize_t n,
                                 uint64_t mask) noexcept nogil:
    cdef uint64_t h = FNV_OFFSET
    cdef uint64_t w
    cdef Py_ssize_t i
    cdef int k
    w = parent
    for k in range(8):                    # the parent hash, byte by byte
        h = (h ^ (w & 0xff)) * FNV_PRIME
        w >>= 8
    for i in range(n):                    # then each token as one 32-bit word
        h = (h ^ <uint64_t>(<unsigned int>tokens[i])) * FNV_PRIME
    return _mix(h) & mask


cdef class BlockPool:
    cdef readonly int n_blocks
    cdef readonly int block_size
    cdef readonly int num_free
    cdef int32_t head, tail
    cdef uint64_t hash_mask
    cdef Py_ssize_t capacity              # of the hash table, a power of two
    cdef object _ref, _prev, _next, _keyed, _key_hash, _key_parent, _key_tokens, _table
    cdef int32_t *ref
    cdef int32_t *prev
    cdef int32_t *next
    cdef uint8_t *keyed
    cdef uint64_t *key_hash
    cdef uint64_t *key_parent
    cdef int32_t *key_tokens
    cdef int32_t *table
    cdef int32_t *_tok                    # scratch: tokens of one call
    cdef int32_t *_blk                    # scratch: block ids of one call
    cdef uint64_t *_hsh                   # scratch: hashes of one call
    cdef Py_ssize_t _tok_cap, _blk_cap

    def __init__(self, int n_blocks, int block_size, uint64_t hash_mask=0xffffffffffffffffULL,
                 Py_ssize_t table_capacity=0):
        """hash_mask and table_capacity are test hooks: a narrow mask forces hash
        collisions, a tiny table forces long probe chains (it must still hold
        n_blocks entries)."""
        if n_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        cdef Py_ssize_t cap = 1
        while cap < 2 * <Py_ssize_t>n_blocks:
            cap <<= 1
        if table_capacity:
            if table_capacity < n_blocks or table_capacity & (table_capacity - 1):
                raise ValueError("table_capacity must be a power of two >= n_blocks")
            cap = table_capacity
        self.n_blocks, self.block_size, self.hash_mask, self.capacity = n_blocks, block_size, hash_mask, cap
        self._ref = np.zeros(n_blocks, np.int32)
        self._prev = np.arange(-1, n_blocks - 1, dtype=np.int32)
        self._next = np.arange(1, n_blocks + 1, dtype=np.int32)
        self._next[n_blocks - 1] = NIL
        self._keyed = np.zeros(n_blocks, np.uint8)
        self._key_hash = np.zeros(n_blocks, np.uint64)
        self._key_parent = np.zeros(n_blocks, np.uint64)
        self._key_tokens = np.zeros((n_blocks, block_size), np.int32)
        self._table = np.full(cap, NIL, np.int32)
        self.ref = <int32_t *>cnp.PyArray_DATA(self._ref)
        self.prev = <int32_t *>cnp.PyArray_DATA(self._prev)
        self.next = <int32_t *>cnp.PyArray_DATA(self._next)
        self.keyed = <uint8_t *>cnp.PyArray_DATA(self._keyed)
        self.key_hash = <uint64_t *>cnp.PyArray_DATA(self._key_hash)
        self.key_parent = <uint64_t *>cnp.PyArray_DATA(self._key_parent)
        self.key_tokens = <int32_t *>cnp.PyArray_DATA(self._key_tokens)
        self.table = <int32_t *>cnp.PyArray_DATA(self._table)
        self.head, self.tail, self.num_free = 0, n_blocks - 1, n_blocks

    # -- read-only views (tests and stats) ------------------------------------
    @property
    def ref_count(self):
        """int32 [n_blocks], read-only view."""
        v = self._ref.view()
        v.flags.writeable = False
        return v

    def free_blocks(self):
        """The free list, LRU first (for tests)."""
        out = []
        cdef int32_t b = self.head
        while b != NIL:
            out.append(b)
            b = self.next[b]
        return out

    def cached_block(self, uint64_t h):
        """Block registered under hash h, or -1."""
        return self._find(h)

    def num_cached(self):
        cdef Py_ssize_t i, n = 0
        for i in range(self.capacity):
            n += self.table[i] != NIL
        return n

    # -- free list -------------------------------------------------------------
    cdef inline void _unlink(self, int32_t b) noexcept nogil:
        cdef int32_t p = self.prev[b], q = self.next[b]
        if p != NIL:
            self.next[p] = q
        else:
            self.head = q
        if q != NIL:
            self.prev[q] = p
        else:
            self.tail = p
        self.prev[b] = NIL
        self.next[b] = NIL
        self.num_free -= 1

    cdef inline void _append(self, int32_t b) noexcept nogil:
        self.prev[b] = self.tail
        self.next[b] = NIL
        if self.tail != NIL:
            self.next[self.tail] = b
        else:
            self.head = b
        self.tail = b
        self.num_free += 1

    # -- hash table --------------------------------------------------------------
    cdef inline Py_ssize_t _slot(self, uint64_t h) noexcept nogil:
        return <Py_ssize_t>(_mix(h) & <uint64_t>(self.capacity - 1))

    cdef inline int32_t _find(self, uint64_t h) noexcept nogil:
        cdef Py_ssize_t i = self._slot(h)
        cdef int32_t b
        while True:
            b = self.table[i]
            if b == NIL or self.key_hash[b] == h:
                return b
            i = (i + 1) & (self.capacity - 1)

    cdef inline void _insert(self, uint64_t h, int32_t b) noexcept nogil:
        cdef Py_ssize_t i = self._slot(h)
        while self.table[i] != NIL:
            i = (i + 1) & (self.capacity - 1)
        self.table[i] = b

    cdef void _erase(self, int32_t b) noexcept nogil:
        """Drop block b (keyed, present) from the table; shift the probe run back."""
        cdef Py_ssize_t mask = self.capacity - 1
        cdef Py_ssize_t i = self._slot(self.key_hash[b]), j, home
        while self.table[i] != b:
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            if self.table[j] == NIL:
                break
            home = self._slot(self.key_hash[self.table[j]])
            # move table[j] into the hole at i unless its home lies in (i, j] (cyclically)
            if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
                self.table[i] = self.table[j]
                i = j
        self.table[i] = NIL

    cdef inline void _uncache(self, int32_t b) noexcept nogil:
        if self.keyed[b]:
            self._erase(b)
            self.keyed[b] = 0

    # -- the loops (no Python objects: callable with or without the GIL) --------------
    cdef void _hash_loop(self, const int32_t *t, Py_ssize_t m, uint64_t parent, uint64_t *o) noexcept nogil:
        cdef Py_ssize_t i, bs = self.block_size
        for i in range(m):
            parent = _hash_block(parent, t + i * bs, bs, self.hash_mask)
            o[i] = parent

    cdef void _alloc_loop(self, Py_ssize_t n, int32_t *o) noexcept nogil:
        cdef Py_ssize_t i
        cdef int32_t b
        for i in range(n):
            b = self.head
            self._unlink(b)
            self._uncache(b)
            self.ref[b] = 1
            o[i] = b

    cdef Py_ssize_t _match_loop(self, const int32_t *t, const uint64_t *h, Py_ssize_t m,
                                int32_t *o) noexcept nogil:
        cdef Py_ssize_t i, bs = self.block_size
        cdef int32_t b
        cdef uint64_t parent = 0
        for i in range(m):
            b = self._find(h[i])
            if (b == NIL or self.key_parent[b] != parent
                    or memcmp(self.key_tokens + <Py_ssize_t>b * bs, t + i * bs, bs * sizeof(int32_t)) != 0):
                return i
            if self.ref[b] == 0:
                self._unlink(b)
            self.ref[b] += 1
            o[i] = b
            parent = h[i]
        return m

    cdef Py_ssize_t _register_loop(self, const int32_t *bl, const int32_t *t, const uint64_t *h,
                                   Py_ssize_t m, uint64_t parent) noexcept nogil:
        cdef Py_ssize_t i, bs = self.block_size, added = 0
        cdef int32_t b
        for i in range(m):
            b = bl[i]
            if not self.keyed[b] and self._find(h[i]) == NIL:
                self.keyed[b] = 1
                self.key_hash[b] = h[i]
                self.key_parent[b] = parent
                memcpy(self.key_tokens + <Py_ssize_t>b * bs, t + i * bs, bs * sizeof(int32_t))
                self._insert(h[i], b)
                added += 1
            parent = h[i]
        return added

    cdef void _release_loop(self, const int32_t *bl, Py_ssize_t m) noexcept nogil:
        cdef Py_ssize_t i
        cdef int32_t b
        for i in range(m - 1, -1, -1):
            b = bl[i]
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self._append(b)

    cdef int _check_held(self, const int32_t *bl, Py_ssize_t m) except -1:
        cdef Py_ssize_t i
        for i in range(m):
            if not 0 <= bl[i] < self.n_blocks or self.ref[bl[i]] == 0:
                raise ValueError(f"block {bl[i]} is not allocated")
        return 0

    # -- scratch buffers (refilled from Python lists with the GIL) ------------------
    cdef int32_t *_tokens(self, list src, Py_ssize_t start, Py_ssize_t n) except NULL:
        """src[start:start+n] as int32 in the token scratch buffer."""
        cdef Py_ssize_t i
        if start < 0 or start + n > len(src):
            raise ValueError("token range outside the list")
        if n > self._tok_cap:
            self._tok = <int32_t *>PyMem_Realloc(self._tok, max(n, 1) * sizeof(int32_t))
            if self._tok == NULL:
                self._tok_cap = 0
                raise MemoryError()
            self._tok_cap = n
        for i in range(n):
            self._tok[i] = src[start + i]
        return self._tok

    cdef int _reserve(self, Py_ssize_t n) except -1:
        """Room for n block ids and n hashes in the block scratch buffers."""
        if n > self._blk_cap:
            self._blk = <int32_t *>PyMem_Realloc(self._blk, max(n, 1) * sizeof(int32_t))
            self._hsh = <uint64_t *>PyMem_Realloc(self._hsh, max(n, 1) * sizeof(uint64_t))
            if self._blk == NULL or self._hsh == NULL:
                self._blk_cap = 0
                raise MemoryError()
            self._blk_cap = n
        return 0

    # -- the operations (arguments checked with the GIL; big loops run without it) ----
    def hash_blocks(self, list tokens, Py_ssize_t first, Py_ssize_t stop, uint64_t parent):
        """Chained hashes (list of ints) of full blocks first..stop-1 of `tokens`;
        `parent` is block first-1's hash (0 before the first block)."""
        cdef Py_ssize_t bs = self.block_size, m = stop - first, i
        if m <= 0:
            return []
        cdef int32_t *t = self._tokens(tokens, first * bs, m * bs)
        self._reserve(m)
        if m * bs >= _NOGIL_MIN:
            with nogil:
                self._hash_loop(t, m, parent, self._hsh)
        else:
            self._hash_loop(t, m, parent, self._hsh)
        return [self._hsh[i] for i in range(m)]

    def allocate(self, Py_ssize_t n):
        """Pop n blocks off the LRU head (dropping their cached keys), ref 1 each.
        Returns them as a list, or None (nothing changed) if too few are free."""
        cdef Py_ssize_t i
        if n < 0:
            raise ValueError("negative block count")
        if n > self.num_free:
            return None
        self._reserve(n)
        if n >= _NOGIL_MIN:
            with nogil:
                self._alloc_loop(n, self._blk)
        else:
            self._alloc_loop(n, self._blk)
        return [self._blk[i] for i in range(n)]

    def match_prefix(self, list tokens, list hashes):
        """Take a reference on each leading block of the chain found cached: hash,
        parent hash and tokens must all match. tokens covers at least len(hashes)
        full blocks. Returns the matched block ids (a prefix of the chain)."""
        cdef Py_ssize_t bs = self.block_size, m = len(hashes), i, n
        if m == 0:
            return []
        cdef int32_t *t = self._tokens(tokens, 0, m * bs)
        self._reserve(m)
        for i in range(m):
            self._hsh[i] = hashes[i]
        if m * bs >= _NOGIL_MIN:
            with nogil:
                n = self._match_loop(t, self._hsh, m, self._blk)
        else:
            n = self._match_loop(t, self._hsh, m, self._blk)
        return [self._blk[i] for i in range(n)]

    def register(self, list blocks, list tokens, list hashes, Py_ssize_t first, Py_ssize_t stop):
        """Offer full blocks first..stop-1 to the prefix cache: blocks[i] holds
        tokens[i*bs:(i+1)*bs] and has hash hashes[i] (chained from hashes[i-1]).
        A block already keyed, or a hash already held by another block, is left as
        it is. Returns how many were added."""
        cdef Py_ssize_t bs = self.block_size, m = stop - first, i, added
        if m <= 0:
            return 0
        if first < 0 or stop > len(blocks) or stop > len(hashes):
            raise ValueError("block range outside the table or the hashes")
        cdef uint64_t parent = hashes[first - 1] if first else 0
        cdef int32_t *t = self._tokens(tokens, first * bs, m * bs)
        self._reserve(m)
        for i in range(m):
            self._blk[i] = blocks[first + i]
            self._hsh[i] = hashes[first + i]
        self._check_held(self._blk, m)
        if m * bs >= _NOGIL_MIN:
            with nogil:
                added = self._register_loop(self._blk, t, self._hsh, m, parent)
        else:
            added = self._register_loop(self._blk, t, self._hsh, m, parent)
        return added

    def release(self, list blocks):
        """Drop one reference on each block, last first; blocks reaching 0 go to
        the LRU tail (so a table's leading blocks stay cached longest)."""
        cdef Py_ssize_t m = len(blocks), i
        if m == 0:
            return
        self._reserve(m)
        for i in range(m):
            self._blk[i] = blocks[i]
        self._check_held(self._blk, m)
        if m >= _NOGIL_MIN:
            with nogil:
                self._release_loop(self._blk, m)
        else:
            self._release_loop(self._blk, m)

    def __dealloc__(self):
        PyMem_Free(self._tok)
        PyMem_Free(self._blk)
        PyMem_Free(self._hsh)
