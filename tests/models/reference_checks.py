"""Checks every family's transformers test runs the same way: a flattened batch after
cached prefixes, and greedy tokens from the reference's own argmax. `logits_of(ids)`
is the reference's logits [len(ids), vocab] for one prompt."""
import numpy as np

from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.sequence import Sequence


def rel_err(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def prompts(vocab, seed=0):
    """Random prompts of 1, 7, 40 and 100 tokens (ids from 3: past the special ones)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in (1, 7, 40, 100)]


def new_sequence(engine, ids, seq_id):
    return Sequence(seq_id, ids, SamplingParams(max_tokens=1), 0, engine.max_model_len)


def check_cached_prefix_batch(engine, logits_of, rel_tol):
    """Three sequences in one varlen batch: a prefill from scratch (23 tokens), a 17-token
    chunk after a cached prefix of 33, a decode row after 17; their blocks scattered in the
    pool by a filler claimed first. The logits equal the reference's; every block comes back."""
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(3, engine.config.vocab_size, n).tolist() for n in (23, 50, 18))
    seqs = [new_sequence(engine, ids, i) for i, ids in enumerate((a, b, c))]
    bm, runner = engine.block_manager, engine.runner
    filler = new_sequence(engine, list(range(3, 3 + 64)), 99)
    bm.allocate(filler, 64)
    try:
        for seq, n in ((seqs[1], 33), (seqs[2], 17)):
            bm.allocate(seq, n)
        runner.run([(seqs[1], 33), (seqs[2], 17)])
        seqs[1].num_computed_tokens, seqs[2].num_computed_tokens = 33, 17
        plan = [(seqs[0], 23), (seqs[1], 17), (seqs[2], 1)]
        for seq, n in plan:
            bm.allocate(seq, seq.num_computed_tokens + n)
        logits, _ = runner.run(plan, all_logits=True)
        expected = np.concatenate([logits_of(a), logits_of(b)[33:], logits_of(c)[17:]])
        assert rel_err(logits, expected) < rel_tol
    finally:
        for seq in (*seqs, filler):
            bm.release(seq)
    assert bm.num_free == bm.n_blocks


def reference_greedy(logits_of, ids, n_tokens):
    """The reference's greedy continuation of `ids`, one full forward per token."""
    out, context = [], list(ids)
    for _ in range(n_tokens):
        token = int(np.argmax(logits_of(context)[-1]))
        out.append(token)
        context.append(token)
    return out
