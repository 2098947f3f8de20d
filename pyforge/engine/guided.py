"""Guided decoding in the engine: one llguidance matcher per constrained sequence,
their allowed-token masks computed while the forward pass runs, and the sampled
token fed back to each matcher.

    start(seqs)   the step's sampling rows -> a PendingMasks (None: no row is constrained);
                  llguidance fills the masks on its own threads, without the GIL
    masks.wait()  -> (bits uint32[n_masks, words], mask_of int32[n_rows]) for Sampler.sample
    advance(seq, token)  after sampling; ValueError if the matcher refuses it

Sequences without a grammar cost nothing: no matcher, no mask row, and a step with
no constrained row starts no work at all.
"""
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pyforge.structured import ConstraintError, llg_tokenizer

COMPILED_GRAMMARS = 64      # grammars kept compiled: a served schema is usually sent again and again


class PendingMasks:
    """The masks of one step, being computed."""

    def __init__(self, future, bits, mask_of):
        self._future, self.bits, self.mask_of = future, bits, mask_of

    def wait(self):
        self._future.result()
        return self.bits, self.mask_of


class GuidedDecoding:
    def __init__(self, tokenizer, n_threads=None):
        self.tokenizer = tokenizer
        self.n_threads = n_threads
        self._llg = None
        self._executor = None       # llguidance's thread pool for masks
        self._thread = None         # runs the batch call, so the engine thread can start the forward pass
        self._compiled = OrderedDict()   # grammar -> a fresh matcher to deep-copy

    def matcher(self, grammar):
        """A new matcher at the start of `grammar`; ConstraintError if it does not compile."""
        import llguidance
        template = self._compiled.get(grammar)
        if template is None:
            template = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
            if template.is_error():
                raise ConstraintError(f"the grammar does not compile: {template.get_error()}")
            self._compiled[grammar] = template
            if len(self._compiled) > COMPILED_GRAMMARS:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(grammar)
        return template.deep_copy()

    def start(self, seqs):
        """Begin computing the masks of the constrained sequences among `seqs` (the
        step's sampling rows, in order); None when none is constrained."""
        rows = [(seq.matcher, i) for i, seq in enumerate(seqs) if seq.matcher is not None]
        if not rows:
            return None
        import llguidance.numpy as llg_np
        bits = llg_np.allocate_token_bitmask(len(rows), self._tokenizer().vocab_size)
        mask_of = np.full(len(seqs), -1, dtype=np.int32)
        targets = []
        for k, (matcher, i) in enumerate(rows):
            mask_of[i] = k
            targets.append((matcher, k))
        future = self._pool().submit(llg_np.fill_next_token_bitmask_par, self._executor, targets, bits)
        return PendingMasks(future, bits.view(np.uint32), mask_of)

    @staticmethod
    def advance(seq, token_id):
        """Feed the sampled token to the sequence's matcher (if it has one)."""
        if seq.matcher is None:
            return
        if token_id < 0:            # the sampler's answer to a mask that allowed nothing
            raise ValueError("the grammar allows no token of the model's vocabulary here")
        if not seq.matcher.consume_token(token_id) or seq.matcher.is_error():   # an errored one consumes anything
            raise ValueError(f"the grammar refused token {token_id}: {seq.matcher.get_error()}")

    def _tokenizer(self):
        if self._llg is None:
            self._llg = llg_tokenizer(self.tokenizer)
        return self._llg

    def _pool(self):
        if self._thread is None:
            import llguidance
            self._executor = llguidance.LLExecutor(self.n_threads or None)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="pyforge-masks")
        return self._thread
