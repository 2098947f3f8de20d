"""Guided decoding in the engine: one llguidance matcher per constrained sequence,
their allowed-token masks computed while the forward pass runs, and the sampled
token fed back to each matcher.

    start(seqs, overlap)  the step's sampling sequences -> a PendingMasks (None: no row is
                  constrained); llguidance fills the masks without the GIL, on the mask
                  thread while the forward pass runs (or at once where it is too short)
    masks.wait()  -> (bits uint32[n_masks, words], mask_of int32[n_rows]) for Sampler.sample
    valid_drafts(seq, drafts)  the prefix of speculative drafts the grammar allows
    advance(seq, token)  after sampling; ValueError if the matcher refuses it

Sequences without a grammar cost nothing: no matcher, no mask row, and a step with
no constrained row starts no work at all. A sequence with drafts (engine/speculative.py)
has a sampling row per draft more; row i's mask is the grammar's after drafts[:i]:
the mask thread consumes the drafts one by one, masking after each, then rolls the
matcher back, so it is where it was when the step's tokens are fed to it.
"""
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pyforge.structured import ConstraintError, llg_tokenizer

COMPILED_GRAMMARS = 64      # grammars kept compiled: a served schema is usually sent again and again
TIMINGS_KEPT = 4096


class PendingMasks:
    """The masks of one step, computed on the mask thread or, when there is no forward
    pass worth hiding them behind, right away; `wait` records (seconds computing,
    seconds the engine waited for them, whether the thread computed them) in
    `timings`, for benchmarks."""

    def __init__(self, rows, bits, mask_of, timings, pool=None):
        self.bits, self.mask_of, self._rows, self._timings = bits, mask_of, rows, timings
        self._compute_s = None
        self._future = pool.submit(self._fill) if pool is not None else None
        self._blocked_s = 0.0       # computed in line: the engine waited all of it
        if pool is None:
            self._fill()
            self._blocked_s = self._compute_s

    def _fill(self):
        # one matcher after another: llguidance drops the GIL in each, and a few
        # microseconds a row do not need its own thread pool beside the forward pass's.
        # Straight to the row's address: llguidance.numpy's helper costs 4x the mask
        # itself in slicing and ctypes look-ups
        start = time.perf_counter()
        base, row_bytes = self.bits.ctypes.data, self.bits.strides[0]
        for matcher, k, drafts in self._rows:
            matcher.unsafe_compute_mask_ptr(base + k * row_bytes, row_bytes)
            for j, token in enumerate(drafts, 1):
                matcher.consume_token(token)        # valid: valid_drafts kept only what the grammar allows
                matcher.unsafe_compute_mask_ptr(base + (k + j) * row_bytes, row_bytes)
            if drafts:
                matcher.rollback(len(drafts))
        self._compute_s = time.perf_counter() - start

    def wait(self):
        start = time.perf_counter()
        if self._future is not None and self._future.cancel():    # the thread never got a core: do it here
            self._fill()
        elif self._future is not None:
            self._future.result()
        self._timings.append((self._compute_s, self._blocked_s + time.perf_counter() - start, self._future is not None))
        return self.bits.view(np.uint32), self.mask_of


class GuidedDecoding:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._llg = None
        self._thread = None         # the mask thread: masks compute while the engine runs the forward pass
        self._compiled = OrderedDict()   # grammar -> a fresh matcher to deep-copy
        self.timings = deque(maxlen=TIMINGS_KEPT)   # (compute s, wait s, threaded) of recent steps' masks

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

    def start(self, seqs, overlap=True):
        """Begin computing the masks of the constrained sequences among `seqs` (the
        step's sampling sequences, in order; one row each, and one per draft more): on
        the mask thread when `overlap` (a forward pass long enough to hide them follows),
        else at once. None when no row is constrained."""
        if all(seq.matcher is None for seq in seqs):
            return None
        mask_of, targets, n_masks = [], [], 0
        for seq in seqs:
            n_rows = 1 + len(seq.draft_tokens)
            if seq.matcher is None:
                mask_of.extend([-1] * n_rows)
                continue
            mask_of.extend(range(n_masks, n_masks + n_rows))
            targets.append((seq.matcher, n_masks, list(seq.draft_tokens)))
            n_masks += n_rows
        return PendingMasks(targets, self._bits(n_masks), np.array(mask_of, dtype=np.int32), self.timings,
                            self._pool() if overlap else None)

    @staticmethod
    def valid_drafts(seq, drafts):
        """The leading drafts the sequence's grammar allows (all of them without one)."""
        if seq.matcher is None or not drafts:
            return drafts
        return drafts[:seq.matcher.validate_tokens(drafts)]

    def _bits(self, n_rows):
        return np.zeros((n_rows, (self._tokenizer().vocab_size + 31) // 32), dtype=np.int32)

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
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="pyforge-masks")
        return self._thread
