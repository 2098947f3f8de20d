"""The scheduler, whose loops are native (step_core.schedule_running / schedule_waiting)
for plain sequences, against a pure-Python reference model of the rule: randomized
traces (arrivals, prompt lengths and shared prefixes, budgets, block sizes and pool
sizes, prefix caching on and off, drafts, prompt logprobs, embeddings, finishes,
aborts, preemption under a small pool, prefix claims released when nothing runs) must
give the same plan, block tables, statuses and preemptions at every step."""
from collections import deque

import numpy as np
import pytest

from pyforge.engine.block_manager import BlockManager
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.scheduler import Scheduler
from pyforge.engine.sequence import Sequence, SequenceStatus

N_CASES = 60
N_STEPS = 160


class ReferenceScheduler:
    """The rule in plain Python, written apart from the scheduler. Running sequences, in
    order, each get their uncomputed tokens (drafts included, past the budget dropped;
    prompt-logits rows capped) within the budget, and the blocks for them; when blocks
    run out the sequence's drafts go first, then the newest running sequence is
    preempted (itself last). Unless someone was preempted this step, the waiting queue's
    head is admitted the same way (after taking its cached prefix) while the budget and
    max_num_seqs allow; when its blocks are not there and nothing runs, every waiting
    sequence drops its blocks."""

    def __init__(self, blocks, max_num_seqs, max_num_batched_tokens):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting = deque()
        self.running = []
        self.num_preemptions = 0

    def add(self, seq):
        self.waiting.append(seq)

    def schedule(self):
        plan = []
        budget, preempted = self._run(plan)
        if not preempted:
            self._admit(plan, budget)
        return plan

    def _run(self, plan):
        budget, preempted, i = self.max_num_batched_tokens, False, 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            while not self.blocks.allocate(seq, seq.num_computed_tokens + n):
                if seq.draft_tokens:
                    seq.draft_tokens = []
                    n = 1
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    return budget, preempted
            plan.append((seq, n))
            budget -= n
            i += 1
        return budget, preempted

    def _admit(self, plan, budget):
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table and not seq.needs_prompt_logits and seq.params.pooling is None:
                seq.num_computed_tokens = seq.num_cached_prompt_tokens = self.blocks.reuse_prefix(seq)
            n = self._chunk(seq, budget)
            if not self.blocks.allocate(seq, seq.num_computed_tokens + n):
                if not self.running:
                    for queued in self.waiting:
                        self.blocks.release(queued)
                        queued.num_computed_tokens = 0
                return
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            plan.append((seq, n))
            budget -= n

    def _chunk(self, seq, budget):
        n = min(seq.num_tokens + len(seq.draft_tokens) - seq.num_computed_tokens, budget)
        del seq.draft_tokens[n - 1:]
        if seq.needs_prompt_logits:
            n = min(n, self.max_num_seqs, self.max_num_batched_tokens)
        return n

    def _preempt(self, seq):
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_computed_tokens = 0
        seq.draft_tokens = []
        seq.status = SequenceStatus.PREEMPTED
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq, status):
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = status


class World:
    """One scheduler and its sequences, driven by the trace's decisions."""

    def __init__(self, scheduler_class, case):
        self.blocks = BlockManager(case.n_blocks, case.block_size, prefix_caching=case.prefix_caching)
        self.scheduler = scheduler_class(self.blocks, case.max_num_seqs, case.budget)
        self.max_model_len = case.n_blocks * case.block_size
        self.seqs = {}
        self.claims_released = 0        # steps that dropped a waiting sequence's prefix claim

    def add(self, seq_id, prompt, params):
        seq = Sequence(seq_id, list(prompt), params, 0, self.max_model_len)
        self.seqs[seq_id] = seq
        self.scheduler.add(seq)

    def draft(self, seq_id, tokens):
        seq = self.seqs[seq_id]
        if (seq.status == SequenceStatus.RUNNING and seq.params.pooling is None
                and seq.num_computed_tokens + 1 == seq.num_tokens):
            seq.draft_tokens = list(tokens)

    def schedule(self):
        claims = [s for s in self.scheduler.waiting if s.block_table]
        plan = self.scheduler.schedule()
        self.claims_released += any(not s.block_table and s.status != SequenceStatus.RUNNING for s in claims)
        return plan

    def advance(self, plan, token, accept, stops):
        """The engine's bookkeeping after a forward pass, with the trace's token, the
        number of drafts accepted and the sequences that stop; finished ones leave."""
        for seq, n in plan:
            drafts, seq.draft_tokens = seq.draft_tokens, []
            seq.num_computed_tokens += n - len(drafts)
            if seq.needs_prompt_logits:
                seq.prompt_logprobs.extend([None] * n)
            self.blocks.register_full_blocks(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                continue
            if seq.params.pooling is not None:      # an embedding is done with its prompt
                self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
                continue
            for t in drafts[:min(accept, len(drafts))] + [token]:
                seq.token_ids.append(t)
                if seq.seq_id in stops:
                    self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
                    break
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

    def snapshot(self, plan):
        seqs = {i: (list(s.block_table), s.num_computed_tokens, s.num_cached_prompt_tokens, int(s.status),
                    list(s.draft_tokens)) for i, s in self.seqs.items()}
        return ([(seq.seq_id, n) for seq, n in plan], seqs, [s.seq_id for s in self.scheduler.waiting],
                [s.seq_id for s in self.scheduler.running], self.scheduler.num_preemptions, self.blocks.num_free)


class Case:
    """One trace's sizes, drawn from its seed."""

    def __init__(self, rng):
        self.block_size = int(rng.choice([1, 2, 4, 8]))
        self.n_blocks = int(rng.integers(48, 160)) // self.block_size
        self.max_num_seqs = int(rng.integers(1, 9))
        self.budget = int(rng.integers(1, 48))
        self.prefix_caching = bool(rng.random() < 0.8)


def random_params(rng):
    kind = rng.random()
    max_tokens = int(rng.integers(1, 16))
    if kind < 0.1:
        return SamplingParams(pooling="mean")
    if kind < 0.25:
        return SamplingParams(max_tokens=max_tokens, prompt_logprobs=0)
    return SamplingParams(max_tokens=max_tokens)


def run_trace(seed):
    """Both schedulers over one random trace, compared at every step; the worlds."""
    rng = np.random.default_rng(seed)
    case = Case(rng)
    worlds = [World(cls, case) for cls in (Scheduler, ReferenceScheduler)]
    prefixes = [rng.integers(0, 50, int(rng.integers(1, 4)) * case.block_size).tolist() for _ in range(3)]
    longest = worlds[0].max_model_len - 1
    next_id = 0
    for _ in range(N_STEPS):
        for _ in range(int(rng.poisson(0.6))):
            prompt = rng.integers(0, 50, int(rng.integers(1, 24))).tolist()
            if rng.random() < 0.5:
                prompt = prefixes[int(rng.integers(0, 3))] + prompt
            params = random_params(rng)
            for w in worlds:
                w.add(next_id, prompt[:longest], params)
            next_id += 1
        for seq_id in range(next_id):
            if rng.random() < 0.2:
                drafts = rng.integers(0, 50, int(rng.integers(1, 5))).tolist()
                for w in worlds:
                    w.draft(seq_id, drafts)
        plans = [w.schedule() for w in worlds]
        assert worlds[0].snapshot(plans[0]) == worlds[1].snapshot(plans[1])
        token, accept = int(rng.integers(0, 50)), int(rng.integers(0, 3))
        stops = {seq_id for seq_id in range(next_id) if rng.random() < 0.03}
        for w, plan in zip(worlds, plans):
            w.advance(plan, token, accept, stops)
        if next_id and rng.random() < 0.05:
            victim = int(rng.integers(0, next_id))
            for w in worlds:
                w.abort(victim)
    assert worlds[0].claims_released == worlds[1].claims_released
    return worlds


@pytest.mark.parametrize("seed", range(N_CASES))
def test_the_scheduler_follows_the_reference_rule(seed):
    run_trace(seed)


def test_the_traces_reach_every_branch_of_the_rule():
    """The comparison means something only if the traces preempt, release claims, chunk
    and finish: count them over a few traces."""
    worlds = [run_trace(seed)[0] for seed in range(12)]
    assert sum(w.scheduler.num_preemptions for w in worlds) > 0
    assert sum(w.claims_released for w in worlds) > 0
    assert sum(w.blocks.prefix_hits for w in worlds) > 0
    statuses = {s.status for w in worlds for s in w.seqs.values()}
    assert {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
            SequenceStatus.FINISHED_ABORTED} <= statuses
