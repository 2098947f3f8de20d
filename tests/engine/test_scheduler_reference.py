"""The scheduler, whose running loop is native (step_core.schedule_running) up to the
first sequence that needs the Python loop, against a pure-Python reference model of
the rule: randomized traces (chunked prefills, prefix hits, drafts, prompt logprobs,
preemption under a small block pool, finishes and aborts) must give the same plan,
block tables and preemptions at every step."""
import numpy as np
import pytest

from pyforge.engine.block_manager import BlockManager
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.scheduler import Scheduler
from pyforge.engine.sequence import Sequence, SequenceStatus

BLOCK = 4


class ReferenceScheduler(Scheduler):
    """The rule for running sequences in plain Python: each, in order, gets its
    uncomputed tokens (drafts included; prompt-logits rows capped) within the budget,
    and the blocks for them; when blocks run out its drafts go first, then the newest
    running sequence is preempted (itself last)."""

    def _schedule_running(self, plan, budget):
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            while not self.blocks.allocate(seq, seq.num_computed_tokens + n):
                if seq.draft_tokens:
                    seq.draft_tokens = []
                    n = 1
                    continue
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    return budget
            plan.append((seq, n))
            budget -= n
            i += 1
        return budget


class World:
    """One scheduler and its sequences, driven by the trace's decisions."""

    def __init__(self, scheduler_class, n_blocks, max_num_seqs, budget):
        self.blocks = BlockManager(n_blocks, BLOCK, prefix_caching=True)
        self.scheduler = scheduler_class(self.blocks, max_num_seqs, budget)
        self.seqs = {}

    def add(self, seq_id, prompt, params):
        seq = Sequence(seq_id, list(prompt), params, 0, 10_000)
        self.seqs[seq_id] = seq
        self.scheduler.add(seq)

    def draft(self, seq_id, tokens):
        seq = self.seqs[seq_id]
        if seq.status == SequenceStatus.RUNNING and seq.num_computed_tokens + 1 == seq.num_tokens:
            seq.draft_tokens = list(tokens)

    def advance(self, plan, token, accept):
        """The engine's bookkeeping after a forward pass, with the trace's token and the
        number of drafts accepted; finished sequences leave."""
        for seq, n in plan:
            drafts, seq.draft_tokens = seq.draft_tokens, []
            seq.num_computed_tokens += n - len(drafts)
            if seq.needs_prompt_logits:
                seq.prompt_logprobs.extend([None] * n)
            self.blocks.register_full_blocks(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                continue
            emitted = drafts[:min(accept, len(drafts))] + [token]
            for t in emitted:
                seq.token_ids.append(t)
                if seq.num_output_tokens >= seq.max_tokens:
                    self.scheduler.finish(seq, SequenceStatus.FINISHED_LENGTH)
                    break
            if not seq.status.is_finished:
                seq.num_computed_tokens = seq.num_tokens - 1
                self.blocks.register_full_blocks(seq)
                self.blocks.trim(seq)

    def abort(self, seq_id):
        seq = self.seqs[seq_id]
        if not seq.status.is_finished:
            self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)


def snapshot(world, plan):
    return ([(seq.seq_id, n) for seq, n in plan],
            {i: (list(s.block_table), s.num_computed_tokens, int(s.status)) for i, s in world.seqs.items()},
            world.scheduler.num_preemptions, world.blocks.num_free)


@pytest.mark.parametrize("seed", range(12))
def test_the_scheduler_follows_the_reference_rule(seed):
    rng = np.random.default_rng(seed)
    n_blocks = int(rng.integers(12, 40))
    max_num_seqs, budget = int(rng.integers(2, 9)), int(rng.integers(4, 40))
    worlds = [World(cls, n_blocks, max_num_seqs, budget) for cls in (Scheduler, ReferenceScheduler)]
    prefixes = [rng.integers(0, 50, 2 * BLOCK).tolist() for _ in range(3)]
    next_id = 0
    for _ in range(150):
        if rng.random() < 0.4:
            prompt = rng.integers(0, 50, int(rng.integers(1, 20))).tolist()
            if rng.random() < 0.4:
                prompt = prefixes[int(rng.integers(0, 3))] + prompt
            params = SamplingParams(max_tokens=int(rng.integers(1, 12)),
                                    prompt_logprobs=0 if rng.random() < 0.15 else None)
            for w in worlds:
                w.add(next_id, prompt, params)
            next_id += 1
        for seq_id in range(next_id):
            if rng.random() < 0.2:
                drafts = rng.integers(0, 50, int(rng.integers(1, 4))).tolist()
                for w in worlds:
                    w.draft(seq_id, drafts)
        plans = [w.scheduler.schedule() for w in worlds]
        assert snapshot(worlds[0], plans[0]) == snapshot(worlds[1], plans[1])
        token, accept = int(rng.integers(0, 50)), int(rng.integers(0, 3))
        for w, plan in zip(worlds, plans):
            w.advance(plan, token, accept)
        if next_id and rng.random() < 0.05:
            victim = int(rng.integers(0, next_id))
            for w in worlds:
                w.abort(victim)
    assert worlds[0].scheduler.num_preemptions == worlds[1].scheduler.num_preemptions
