"""Embeddings (OpenAI's /v1/embeddings): a sequence whose params set `pooling` is a
prefill-only request. It is never sampled: the model runner returns its rows of the
final hidden state (after the final RMSNorm, before lm_head; `LlamaModel.hidden`),
in a forward pass of their own, and this module pools them as its prefill chunks
compute them:

  mean  the mean of every prompt row: their float64 sum kept across chunks
        (seq.pooled_sum), so only one chunk's rows are held at a time
  last  the last prompt row (decoder embedding models such as e5-mistral and
        gte-Qwen are trained for it: only the last token has seen the whole input)

then L2-normalised, as OpenAI's embeddings are (a zero vector stays zero). Such a
sequence computes its whole prompt (no prefix reuse: the result does not depend
on what is cached) and finishes when its prefill does, its KV blocks freed.
A sequence preempted and recomputed does not add a row twice (seq.pooled_rows).
"""
import numpy as np


def hidden_rows(plan):
    """Per plan entry of an embedding step, whether it needs every row of its chunk
    (mean) rather than its last row once caught up (last): build_batch's all_logits."""
    return [seq.params.pooling == "mean" for seq, _ in plan]


def split_rows(hidden, plan):
    """Per plan entry, its rows of `hidden` (the batch's rows in hidden_rows' order):
    every row of a mean entry; the last row of a last entry that catches up, else none."""
    out, row = [], 0
    for seq, n in plan:
        catches_up = seq.num_computed_tokens + n == len(seq.token_ids)
        take = n if seq.params.pooling == "mean" else int(catches_up)
        out.append(hidden[row:row + take])
        row += take
    return out


def add_rows(seq, rows):
    """Pool `rows` (of this step's new tokens of seq, the first at seq.num_computed_tokens,
    before the step counts them); the normalised embedding (float32) once the prompt is done,
    else None."""
    if seq.params.pooling == "last":
        return normalise(rows[-1]) if len(rows) else None
    start = seq.num_computed_tokens
    fresh = rows[max(seq.pooled_rows - start, 0):]
    if len(fresh):
        total = fresh.sum(axis=0, dtype=np.float64)
        seq.pooled_sum = total if seq.pooled_sum is None else seq.pooled_sum + total
        seq.pooled_rows = start + len(rows)
    if seq.pooled_rows < seq.num_prompt_tokens:
        return None
    return normalise(seq.pooled_sum / seq.num_prompt_tokens)


def normalise(vector):
    v = np.asarray(vector, dtype=np.float64)
    norm = np.sqrt(np.dot(v, v))
    return (v / norm if norm > 0 else v).astype(np.float32)
