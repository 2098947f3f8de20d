"""Prompt logprobs (vLLM's `prompt_logprobs`; OpenAI's completions `echo` with
`logprobs`): the log-softmax of the model's logits at every prompt position,
taken at the prompt's next token.

A sequence that asks (`params.prompt_logprobs`, the number of top alternatives)
holds `seq.prompt_logprobs`, a list of PromptLogprob for prompt tokens 1..P-1
(the first token has none: nothing predicts it). While that list is short the
sequence `needs_prompt_logits`: the scheduler computes its whole prompt (no
prefix reuse: cached blocks have no logits) and the model runner returns the
logits of every row of its prefill chunks (build_batch's per-entry all_logits).
A sequence preempted and recomputed does not record a position twice.

Logprobs are of the raw model output, as the sampler's are; top alternatives
come best first, ties to the lower id (the sampler's rule).
"""
from typing import NamedTuple

import numpy as np

ROWS_AT_ONCE = 32       # log-softmax in float64 over this many rows at a time: bounded memory


class PromptLogprob(NamedTuple):
    token_id: int
    logprob: float
    top: list               # [(token_id, logprob)], best first


def split_logits(logits, plan, full):
    """The logits of the sampling entries (one row each, in plan order; every row of a
    drafted one: speculative decoding) out of a batch where entries with `full` set
    have every row; and, per full entry whose prompt logprobs are due, (its rows, the
    position of its first row)."""
    sampling_rows, full_rows, row = [], [], 0
    for (seq, n), every in zip(plan, full):
        catches_up = seq.num_computed_tokens + n == len(seq.token_ids)
        if seq.draft_tokens:
            sampling_rows.extend(range(row, row + n))
            row += n
        elif every:
            full_rows.append((seq, row, n))
            row += n
            if catches_up:
                sampling_rows.append(row - 1)
        elif catches_up:
            sampling_rows.append(row)
            row += 1
    return logits[sampling_rows], [(seq, logits[start:start + n]) for seq, start, n in full_rows]


def record(seq, rows):
    """Record the prompt logprobs `rows` (logits of this step's new tokens of `seq`, whose
    first is at position seq.num_computed_tokens) hold; True if any was new."""
    start = seq.num_computed_tokens
    first = len(seq.prompt_logprobs) - start        # rows before it were recorded already
    last = min(len(rows), seq.num_prompt_tokens - 1 - start)     # a row predicts the next token
    if first >= last:
        return False
    k = seq.params.prompt_logprobs
    for at in range(max(first, 0), last, ROWS_AT_ONCE):
        chunk = rows[at:min(at + ROWS_AT_ONCE, last)].astype(np.float64)
        targets = seq.token_ids[start + at + 1:start + at + 1 + len(chunk)]
        seq.prompt_logprobs.extend(_logprobs(chunk, targets, k))
    return True


def _logprobs(x, targets, k):
    x = x - x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    picked = x[np.arange(len(x)), targets].tolist()
    return [PromptLogprob(t, lp, _top(row, k)) for t, lp, row in zip(targets, picked, x)]


def _top(row, k):
    """The k largest entries, best first, ties to the lower id."""
    k = min(k, len(row))
    if k == 0:
        return []
    cut = np.partition(row, len(row) - k)[len(row) - k]     # the k-th largest value
    ids = np.flatnonzero(row >= cut)                        # ascending: a stable sort keeps lower ids first
    ids = ids[np.argsort(-row[ids], kind="stable")][:k]
    return list(zip(ids.tolist(), row[ids].tolist()))
