"""Scheduler on integers: token budget, chunked prefill, preemption."""
from pyforge.engine.block_manager import BlockManager
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.scheduler import Scheduler
from pyforge.engine.sequence import Sequence, SequenceStatus


def seq(n_prompt, seq_id):
    return Sequence(seq_id, list(range(10, 10 + n_prompt)), SamplingParams(max_tokens=8), 0, 10_000)


def advance(plan, new_token=1):
    """What the engine does after a forward: count computed tokens, append samples."""
    for s, n in plan:
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(new_token)


def test_long_prompt_is_chunked_and_decodes_share_the_step():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    short, long_ = seq(3, 0), seq(25, 1)
    sched.add(short)
    sched.add(long_)
    plan = sched.schedule()
    assert [(s.seq_id, n) for s, n in plan] == [(0, 3), (1, 7)]
    advance(plan)
    plan = sched.schedule()
    assert [(s.seq_id, n) for s, n in plan] == [(0, 1), (1, 9)]   # decode + next chunk
    advance(plan)
    plan = sched.schedule()
    assert [(s.seq_id, n) for s, n in plan] == [(0, 1), (1, 9)]
    advance(plan)
    assert long_.num_computed_tokens == 25 and long_.num_tokens == 26


def test_max_num_seqs_limits_admission():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(seq(2, i))
    assert [s.seq_id for s, _ in sched.schedule()] == [0, 1]
    assert len(sched.waiting) == 1


def test_newest_sequence_is_preempted_when_blocks_run_out():
    bm = BlockManager(4, 4)                       # 16 token slots
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq(8, 0), seq(7, 1)
    sched.add(a)
    sched.add(b)
    advance(sched.schedule())                     # a: 2 blocks, b: 2 blocks, pool full
    assert bm.num_free == 0
    plan = sched.schedule()                       # a needs a 3rd block: b is preempted
    assert [(s.seq_id, n) for s, n in plan] == [(0, 1)]
    assert b.status == SequenceStatus.PREEMPTED and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b]


def test_finish_releases_blocks():
    bm = BlockManager(8, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a = seq(6, 0)
    sched.add(a)
    advance(sched.schedule())
    sched.finish(a, SequenceStatus.FINISHED_ABORTED)
    assert bm.num_free == 8 and not sched.has_work and a.finish_reason == "abort"



def scheduler_with_running_and_waiting():
    """Four running sequences (two blocks each) and two still waiting (the blocks ran out)."""
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=8, max_num_batched_tokens=100)
    seqs = [seq(6, i) for i in range(6)]
    for s in seqs:
        sched.add(s)
    advance(sched.schedule())
    return sched, seqs


def test_finish_all_leaves_the_state_finish_leaves():
    ends = [(3, SequenceStatus.FINISHED_LENGTH), (0, SequenceStatus.FINISHED_STOPPED),
            (5, SequenceStatus.FINISHED_ABORTED), (2, SequenceStatus.FINISHED_LENGTH)]
    one_by_one, seqs_a = scheduler_with_running_and_waiting()
    at_once, seqs_b = scheduler_with_running_and_waiting()
    assert [s.seq_id for s in at_once.running] == [0, 1, 2, 3] and [s.seq_id for s in at_once.waiting] == [4, 5]
    for i, status in ends:
        one_by_one.finish(seqs_a[i], status)
    at_once.finish_all([(seqs_b[i], status) for i, status in ends])
    for sched, seqs in ((one_by_one, seqs_a), (at_once, seqs_b)):
        assert [s.seq_id for s in sched.running] == [1] and [s.seq_id for s in sched.waiting] == [4]
        assert sched.blocks.num_free == 6
        assert [s.finish_reason for s in seqs] == ["stop", None, "length", "length", None, "abort"]

class ScriptedBlocks:
    """A block manager whose allocate() fails for `fail_for` once: the scheduler must
    preempt; every other call succeeds (as if the victim's blocks were plenty)."""

    block_size = 4

    def __init__(self, fail_for):
        self.fail_for = fail_for

    def allocate(self, seq, n_tokens):
        if seq is self.fail_for:
            self.fail_for = None
            return False
        seq.block_table = seq.block_table or [0]
        return True

    def release(self, seq):
        seq.block_table = []

    def reuse_prefix(self, seq):
        return 0


def test_a_sequence_preempted_in_a_step_is_not_readmitted_in_that_step():
    a, b = seq(4, 0), seq(4, 1)
    sched = Scheduler(ScriptedBlocks(fail_for=None), max_num_seqs=8, max_num_batched_tokens=100)
    sched.add(a)
    sched.add(b)
    advance(sched.schedule())
    sched.blocks.fail_for = a                    # a's next block is not there: b, the newest, gives way
    plan = sched.schedule()
    assert [(s.seq_id, n) for s, n in plan] == [(0, 1)]
    assert b.status == SequenceStatus.PREEMPTED and list(sched.waiting) == [b]
    plan = sched.schedule()                      # the next step takes it back
    assert sorted(s.seq_id for s, _ in plan) == [0, 1] and b.status == SequenceStatus.RUNNING
