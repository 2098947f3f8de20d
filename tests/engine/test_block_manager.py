"""Block manager on integers: ref counts, prefix reuse, LRU eviction, no leaks."""
import pytest

from pyforge.engine.block_manager import BlockManager
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.sequence import Sequence


def seq(ids, seq_id=0):
    return Sequence(seq_id, list(ids), SamplingParams(max_tokens=4), 0, 10_000)


def compute_all(bm, s):
    assert bm.allocate(s, s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.register_full_blocks(s)


def test_allocate_and_release_return_every_block():
    bm = BlockManager(8, 4)
    a = seq(range(10))
    assert bm.allocate(a, 10)
    assert len(a.block_table) == 3 and bm.num_free == 5
    assert bm.allocate(a, 12) and len(a.block_table) == 3
    assert bm.allocate(a, 13) and len(a.block_table) == 4
    bm.release(a)
    assert bm.num_free == 8 and a.block_table == []


def test_allocation_fails_cleanly_when_blocks_run_out():
    bm = BlockManager(2, 4)
    a = seq(range(12))
    assert not bm.allocate(a, 12)
    assert a.block_table == [] and bm.num_free == 2


def test_shared_prefix_reuses_full_blocks_but_not_the_last_token():
    bm = BlockManager(16, 4)
    a = seq(range(100, 110))           # 2 full blocks + 2 tokens
    compute_all(bm, a)
    b = seq(list(range(100, 108)) + [7, 8, 9])
    assert bm.reuse_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert bm.ref_count[a.block_table[0]] == 2
    # a prompt equal to a cached prefix still recomputes its last block's token
    c = seq(range(100, 108))
    assert bm.reuse_prefix(c) == 4
    assert bm.prefix_hits == 12 and bm.prefix_queries == 11 + 8


def test_reuse_requires_the_same_parent_chain():
    bm = BlockManager(16, 4)
    compute_all(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = seq([9, 9, 9, 9, 5, 6, 7, 8, 1])   # second block equal, first differs
    assert bm.reuse_prefix(other) == 0


def test_freed_cached_blocks_are_found_until_evicted_oldest_first():
    bm = BlockManager(4, 2)
    a = seq([1, 2, 3, 4, 5])
    compute_all(bm, a)
    bm.release(a)
    assert bm.num_free == 4
    b = seq([1, 2, 3, 4, 9])
    assert bm.reuse_prefix(b) == 4     # both cached blocks come back from the free list
    assert bm.num_free == 2
    bm.release(b)
    # fill the pool with other tokens: the cached blocks are evicted, LRU first
    c = seq([7] * 8)
    assert bm.allocate(c, 8)
    bm.release(c)
    assert bm.reuse_prefix(seq([1, 2, 3, 4, 9])) == 0


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
