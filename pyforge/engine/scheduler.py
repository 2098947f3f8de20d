"""One scheduling rule for every phase (as vLLM v1): each sequence's
`num_computed_tokens` catches up with its `num_tokens` under one token budget
per step. That gives chunked prefill, prefix reuse and decode in one batch.

Pure bookkeeping over integers; the engine turns the plan into a ForwardBatch.
"""
from collections import deque

from pyforge.engine.sequence import SequenceStatus
from pyforge.native import step_core


class Scheduler:
    def __init__(self, block_manager, max_num_seqs, max_num_batched_tokens):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # the logits rows a step's activation memory is sized for (model_runner.size_kv_cache): a
        # sequence whose prompt logprobs are due (logits at every row) is chunked to that many
        self.max_logits_rows = min(max_num_seqs, max_num_batched_tokens)
        self.waiting = deque()
        self.running = []
        self.num_preemptions = 0    # since start (a counter for /metrics)

    def add(self, seq):
        self.waiting.append(seq)

    @property
    def has_work(self):
        return bool(self.waiting or self.running)

    def schedule(self):
        """[(sequence, n_new_tokens)] for this step."""
        budget = self.max_num_batched_tokens
        plan = []
        preemptions = self.num_preemptions
        budget = self._schedule_running(plan, budget)
        if self.num_preemptions == preemptions:     # a sequence preempted now must not come straight back
            self._schedule_waiting(plan, budget)
        return plan

    def _schedule_running(self, plan, budget):
        # the plain sequences (preemption included) run natively; the loop stops at each one that
        # is not (drafts, prompt logprobs, pooling) for _schedule_special_running: same rule, same order
        i, budget = step_core.schedule_running(self, plan, 0, budget)
        while i < len(self.running) and budget > 0:
            left = self._schedule_special_running(self.running[i], plan, budget)
            if left is None:            # it was preempted itself: nothing after it runs
                break
            i, budget = step_core.schedule_running(self, plan, i + 1, left)
        return budget

    def _schedule_special_running(self, seq, plan, budget):
        """The rule for one running sequence: its chunk and the blocks for it; when blocks
        run out its drafts go first, then the newest running sequence is preempted. The
        budget left, or None when `seq` itself was preempted."""
        n = self._chunk(seq, budget)
        while not self.blocks.allocate(seq, seq.num_computed_tokens + n):
            if seq.draft_tokens:
                seq.draft_tokens = []
                n = 1
                continue
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return None
        plan.append((seq, n))
        return budget - n

    def _schedule_waiting(self, plan, budget):
        # plain heads are admitted natively; one that is not (prompt logprobs, pooling) here
        budget, special = step_core.schedule_waiting(self, plan, budget)
        while special:
            left = self._admit_special(plan, budget)
            if left is None:            # it stays at the head: nothing behind it runs
                break
            budget, special = step_core.schedule_waiting(self, plan, left)

    def _admit_special(self, plan, budget):
        """The rule for the head of the queue: its cached prefix (when it may reuse one), its
        chunk and the blocks for it. The budget left, or None when its blocks are not there."""
        seq = self.waiting[0]
        if not seq.block_table and seq.reuses_prefix:
            seq.num_computed_tokens = self.blocks.reuse_prefix(seq)
            seq.num_cached_prompt_tokens = seq.num_computed_tokens
        n = self._chunk(seq, budget)
        if not self.blocks.allocate(seq, seq.num_computed_tokens + n):
            if not self.running:
                step_core.release_claims(self.waiting, self.blocks)
            return None
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        plan.append((seq, n))
        return budget - n

    def _chunk(self, seq, budget):
        """Tokens of `seq` to compute this step: its drafts (engine/speculative.py) count
        too, and those past the budget are dropped."""
        n = min(seq.num_tokens + len(seq.draft_tokens) - seq.num_computed_tokens, budget)
        if seq.draft_tokens:
            del seq.draft_tokens[n - 1:]
        return min(n, self.max_logits_rows) if seq.needs_prompt_logits else n

    def preempt(self, seq):
        """Free the newest sequence's blocks; it is recomputed from scratch later."""
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

    def finish_all(self, ended):
        """finish() for many (seq, status) pairs at once: one pass over each queue however
        many end (finish's `in` / remove would be quadratic when a batch ends together)."""
        gone = {id(seq) for seq, _ in ended}
        before = len(self.running)
        self.running[:] = [seq for seq in self.running if id(seq) not in gone]
        if before - len(self.running) < len(gone):      # some were waiting (preempted)
            kept = [seq for seq in self.waiting if id(seq) not in gone]
            self.waiting.clear()
            self.waiting.extend(kept)
        for seq, status in ended:
            self.blocks.release(seq)
            seq.status = status
