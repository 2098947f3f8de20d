"""Scheduler on integers: a waiting sequence's prefix claim (cached blocks it took while at
the head of the queue) never starves the sequence queued in front of it once nothing runs."""
from pyforge.engine.block_manager import BlockManager
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.scheduler import Scheduler
from pyforge.engine.sequence import Sequence


def test_a_claim_behind_the_head_is_dropped_when_nothing_runs():
    blocks = BlockManager(6, 4)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    cached = Sequence(0, list(range(100, 109)), SamplingParams(max_tokens=1), 0, 10_000)
    assert blocks.allocate(cached, 9)
    cached.num_computed_tokens = 9
    blocks.register_full_blocks(cached)             # two full blocks, findable by their tokens
    blocks.release(cached)

    head = Sequence(1, list(range(0, 20)), SamplingParams(max_tokens=4), 0, 10_000)    # needs 5 blocks
    behind = Sequence(2, list(range(100, 109)), SamplingParams(max_tokens=4), 0, 10_000)
    # the state a preemption leaves: `behind` took its cached blocks while at the head of the queue
    # (and could not run on), then a running sequence was preempted in front of it; nothing runs
    behind.num_computed_tokens = blocks.reuse_prefix(behind)
    assert len(behind.block_table) == 2
    sched.add(head)
    sched.add(behind)
    assert sched.schedule() == []                  # head does not fit beside the claim: every claim goes
    assert behind.block_table == [] and behind.num_computed_tokens == 0 and blocks.num_free == 6
    assert [(s.seq_id, n) for s, n in sched.schedule()] == [(1, 20)]
