"""Native block pool on integers: LRU order, ref counts, collisions, no leaks.

The random test drives the pool and a small pure-Python reference model of the
same rules side by side and compares every observable after each operation.
"""
import random
from collections import OrderedDict

import pytest

from pyforge.native.block_pool import BlockPool


def toks(pool, *values):
    """One full block per value, every token equal to it."""
    return [v for v in values for _ in range(pool.block_size)]


def test_free_list_pops_lru_first_and_release_appends_last_first():
    pool = BlockPool(6, 2)
    assert pool.free_blocks() == [0, 1, 2, 3, 4, 5]
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 3
    pool.release(a)                     # last block first: 2, 1, 0 join the tail
    assert pool.free_blocks() == [3, 4, 5, 2, 1, 0]
    assert pool.allocate(4) == [3, 4, 5, 2]
    assert pool.allocate(3) is None and pool.num_free == 2   # too few: nothing taken


def test_ref_counts_and_revived_free_blocks_leave_the_free_list():
    pool = BlockPool(4, 2)
    t = toks(pool, 7, 8)
    blocks = pool.allocate(2)
    hashes = pool.hash_blocks(t, 0, 2, 0)
    assert pool.register(blocks, t, hashes, 0, 2) == 2
    assert pool.match_prefix(t, hashes) == blocks
    assert list(pool.ref_count) == [2, 2, 0, 0]
    pool.release(blocks)
    pool.release(blocks)
    assert pool.num_free == 4 and pool.free_blocks() == [2, 3, 1, 0]
    assert pool.match_prefix(t, hashes) == blocks     # cached blocks come back off the free list
    assert pool.free_blocks() == [2, 3] and list(pool.ref_count) == [1, 1, 0, 0]
    with pytest.raises(ValueError):
        pool.release([2])                               # not held
    with pytest.raises(ValueError):
        pool.release([9])
    with pytest.raises(ValueError):
        pool.ref_count[0] = 5                           # read-only view


def test_hashes_chain_on_the_parent():
    pool = BlockPool(4, 2)
    h = pool.hash_blocks([1, 2, 3, 4], 0, 2, 0)
    assert pool.hash_blocks([1, 2, 3, 4], 1, 2, h[0]) == h[1:]
    assert pool.hash_blocks([9, 9, 3, 4], 0, 2, 0)[1] != h[1]


def test_reused_block_drops_its_cached_key():
    pool = BlockPool(1, 2)
    t = toks(pool, 5)
    h = pool.hash_blocks(t, 0, 1, 0)
    b = pool.allocate(1)
    pool.register(b, t, h, 0, 1)
    pool.release(b)
    assert pool.cached_block(h[0]) == 0
    assert pool.allocate(1) == [0]                      # evicted: its key is gone
    assert pool.cached_block(h[0]) == -1 and pool.match_prefix(t, h) == []


def test_hash_collision_is_not_a_hit():
    # a 1-bit hash: at most two hashes exist, so different blocks collide
    pool = BlockPool(16, 2, hash_mask=1)
    seen = {}
    for v in range(10):
        t = toks(pool, v)
        (h,) = pool.hash_blocks(t, 0, 1, 0)
        if h in seen:
            break
        seen[h] = t
    else:
        pytest.fail("no collision under a 1-bit mask")
    first = seen[h]
    b = pool.allocate(1)
    assert pool.register(b, first, [h], 0, 1) == 1
    assert pool.match_prefix(t, [h]) == []              # same hash, other tokens: miss
    other = pool.allocate(1)
    assert pool.register(other, t, [h], 0, 1) == 0      # hash taken: not registered
    assert pool.match_prefix(first, [h]) == b


def test_same_tokens_under_another_parent_is_not_a_hit():
    pool = BlockPool(8, 2)
    a = toks(pool, 1, 2)
    chain = pool.hash_blocks(a, 0, 2, 0)
    blocks = pool.allocate(2)
    pool.register(blocks, a, chain, 0, 2)
    assert pool.cached_block(chain[1]) == blocks[1]
    # as if [2, 2] as a first block collided with the chain's second block:
    # hash and tokens match, the parent hash (0, not chain[0]) does not
    assert pool.match_prefix(toks(pool, 2), [chain[1]]) == []
    assert pool.match_prefix(a, chain) == blocks


def test_tiny_table_with_deletions_keeps_every_entry_findable():
    rng = random.Random(3)
    pool = BlockPool(32, 1, hash_mask=0x3F, table_capacity=32)   # full table, many collisions
    held = {}
    for step in range(3000):
        if held and (rng.random() < 0.5 or pool.num_free == 0):
            b = rng.choice(list(held))
            del held[b]
            pool.release([b])
        else:
            (b,) = pool.allocate(1)
            v = rng.randrange(1000)
            h = pool.hash_blocks([v], 0, 1, 0)
            if pool.register([b], [v], h, 0, 1):
                held[b] = (v, h[0])
            else:
                held[b] = None
        # every registered block still cached is found by its hash
        for blk, key in held.items():
            if key is not None:
                assert pool.cached_block(key[1]) == blk


class ReferencePool:
    """The rules, written plainly: dict map, OrderedDict LRU, tuple keys."""

    def __init__(self, n, bs):
        self.bs, self.ref = bs, [0] * n
        self.free = OrderedDict.fromkeys(range(n))
        self.key = [None] * n                   # (hash, parent, tokens)
        self.cached = {}

    def allocate(self, n):
        if n > len(self.free):
            return None
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            if self.key[b] is not None:
                del self.cached[self.key[b][0]]
                self.key[b] = None
            self.ref[b] = 1
            out.append(b)
        return out

    def match_prefix(self, tokens, hashes):
        out, parent = [], 0
        for i, h in enumerate(hashes):
            b = self.cached.get(h)
            if b is None or self.key[b] != (h, parent, tuple(tokens[i * self.bs:(i + 1) * self.bs])):
                break
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
            out.append(b)
            parent = h
        return out

    def register(self, blocks, tokens, hashes, first, stop):
        parent, added = hashes[first - 1] if first else 0, 0
        for i in range(first, stop):
            b, h = blocks[i], hashes[i]
            if self.key[b] is None and h not in self.cached:
                self.key[b] = (h, parent, tuple(tokens[i * self.bs:(i + 1) * self.bs]))
                self.cached[h] = b
                added += 1
            parent = h
        return added

    def release(self, blocks):
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None


@pytest.mark.parametrize("mask", [0xFFFFFFFFFFFFFFFF, 0x7])
def test_random_sequences_match_the_reference_and_leak_nothing(mask):
    rng = random.Random(mask & 0xFF)
    n, bs = 24, 3
    pool, ref = BlockPool(n, bs, hash_mask=mask), ReferencePool(n, bs)
    prompts = [[rng.randrange(4) for _ in range(bs * rng.randrange(1, 7))] for _ in range(6)]
    tables = []                                          # (tokens, blocks, hashes)
    for step in range(2000):
        op = rng.random()
        if tables and op < 0.35:
            tokens, blocks, _ = tables.pop(rng.randrange(len(tables)))
            pool.release(blocks)
            ref.release(blocks)
        else:
            tokens = rng.choice(prompts)
            m = len(tokens) // bs
            hashes = pool.hash_blocks(tokens, 0, m, 0)
            got = pool.match_prefix(tokens, hashes)
            assert got == ref.match_prefix(tokens, hashes)
            more = pool.allocate(m - len(got))
            assert more == ref.allocate(m - len(got))
            if more is None:
                pool.release(got)
                ref.release(got)
                continue
            blocks = got + more
            first = rng.randrange(m + 1)                  # register in two pieces
            for a, b in ((0, first), (first, m)):
                assert pool.register(blocks, tokens, hashes, a, b) == ref.register(blocks, tokens, hashes, a, b)
            tables.append((tokens, blocks, hashes))
        assert list(pool.ref_count) == ref.ref
        assert pool.free_blocks() == list(ref.free)
        assert pool.num_free == len(ref.free)
        assert pool.num_cached() == len(ref.cached)
    for _, blocks, _ in tables:
        pool.release(blocks)
    assert pool.num_free == n and not any(pool.ref_count)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        BlockPool(0, 4)
    with pytest.raises(ValueError):
        BlockPool(8, 4, table_capacity=6)
    pool = BlockPool(4, 2)
    with pytest.raises(ValueError):
        pool.allocate(-1)
    with pytest.raises(ValueError):
        pool.register([0], [1, 2], [5], 0, 1)              # block 0 not allocated
    with pytest.raises(ValueError):
        pool.hash_blocks([1, 2], 0, 2, 0)                  # only one block of tokens
