"""Owns the device side: backend, model weights, the paged KV pool, and the
step from a scheduler plan to a ForwardBatch. Everything upstream passes ints."""
import itertools

import numpy as np

from pyforge.models.batch import ForwardBatch
from pyforge.native.step_core import DecodeBatch


DEFAULT_KV_CACHE_BYTES = 2 << 30    # the CPU backend's pool when no size is given


def size_kv_cache(engine_config, model_config, backend, model, max_model_len):
    """The KV pool's size in blocks: the one place it is decided. kv_cache_tokens
    when given; else what the backend's budget holds (cpu: DEFAULT_KV_CACHE_BYTES;
    cuda: free memory after the weights, less room for the activations of the
    largest step the scheduler may run, drafts included), and never less than one whole context."""
    ec = engine_config
    budget = None
    if ec.kv_cache_tokens is None:
        rows = min(ec.max_num_seqs, ec.max_num_batched_tokens) + max_draft_rows(ec)
        peak = model.activation_bytes(ec.max_num_batched_tokens, min(rows, ec.max_num_batched_tokens))
        budget = backend.kv_cache_budget_bytes(DEFAULT_KV_CACHE_BYTES, peak)
    return kv_pool_blocks(ec, model_config, max_model_len, budget, backend.kv_dtype_bytes)


def max_draft_rows(engine_config):
    """The most draft rows one step verifies, all sequences together (speculative decoding;
    each returns logits, so activation memory is sized for them): 0 when it is off."""
    spec = engine_config.speculative_config
    if spec is None:
        return 0
    return min(spec.disable_by_batch_size, engine_config.max_num_seqs) * spec.num_speculative_tokens


def kv_pool_blocks(engine_config, model_config, max_model_len, budget_bytes, dtype_bytes):
    """Blocks for kv_cache_tokens when given, else for what budget_bytes holds (at
    least one whole context). The launcher's memory check asks it too."""
    tokens = engine_config.kv_cache_tokens
    if tokens is None:
        tokens = max(max_model_len, budget_bytes // KVCache.bytes_per_token(model_config, dtype_bytes))
    return -(-tokens // engine_config.block_size)


def _decoding_with_drafts(plan, all_logits):
    """Whether every plan entry decodes: its one uncomputed token and all its drafts, every row
    wanted when it has drafts (all_logits one bool per entry) and none of them for prompt logprobs."""
    for (seq, n), every in zip(plan, all_logits):
        drafts = len(seq.draft_tokens)
        if seq.num_computed_tokens + 1 != len(seq.token_ids) or n != 1 + drafts or every != (drafts > 0):
            return False
    return True


def _new_tokens(seq, n):
    """The n tokens of seq this step computes: its uncomputed tokens, then its drafts."""
    start = seq.num_computed_tokens
    if not seq.draft_tokens:
        return seq.token_ids[start:start + n]
    return (seq.token_ids[start:] + seq.draft_tokens)[:n]


class KVCache:
    """One block pool per layer, K and V, laid out as the backend wants (CPU: [n_blocks, n_kv, block_size,
    head_dim]; CUDA: [n_blocks, block_size, n_kv, head_dim])."""

    def __init__(self, backend, config, n_blocks, block_size):
        self.n_blocks, self.block_size = n_blocks, block_size
        self.pools = [
            backend.allocate_kv_pool(n_blocks, block_size, config.n_kv_heads, config.head_dim)
            for _ in range(config.n_layers)
        ]

    def layer(self, i):
        return self.pools[i]

    @staticmethod
    def bytes_per_token(config, dtype_bytes=4):
        """K and V bytes of one token, all layers (dtype_bytes: q8_0's is 34 / 32)."""
        return int(2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype_bytes)


class ModelRunner:
    def __init__(self, model, kv_cache):
        self.model = model
        self.kv_cache = kv_cache
        self.decode_batch = DecodeBatch(kv_cache.block_size)    # the steady state's persistent batch

    def build_batch(self, plan, all_logits=False):
        """plan: [(sequence, n_new_tokens)] -> ForwardBatch, and which plan entries sample.

        Logits come for each sampling entry's last row; with all_logits (True, or one
        bool per plan entry: prompt logprobs) for every row of those entries, in row order.

        A pure decode step (every entry adds its newest token) is the persistent batch's
        (native/step_core.pyx): its rows are updated by diff and are not in plan order, so
        the plan indices come back in row order. Otherwise per sequence only its integers
        are gathered (one pass each) and the rest is array arithmetic."""
        if not all_logits:
            built = self.decode_batch.build(plan)
            if built is not None:
                return ForwardBatch(*built[0]), built[1]
        self.decode_batch.reset()
        if isinstance(all_logits, list) and _decoding_with_drafts(plan, all_logits):
            return self._build_decode_with_drafts(plan), list(range(len(plan)))
        bs, n_seq = self.kv_cache.block_size, len(plan)
        # [n_seq, 4]: tokens cached, new tokens, all tokens (with drafts), blocks held
        ints = np.array([(seq.num_computed_tokens, n, len(seq.token_ids) + len(seq.draft_tokens), len(seq.block_table))
                         for seq, n in plan], dtype=np.int32).reshape(n_seq, 4)
        starts, counts, totals, n_blocks = ints.T
        qsl = np.zeros(n_seq + 1, dtype=np.int32)
        np.cumsum(counts, out=qsl[1:])
        n_tok = int(qsl[-1])
        token_ids = np.array(list(itertools.chain.from_iterable(_new_tokens(seq, n) for seq, n in plan)),
                             dtype=np.int32)
        seq_of_row = np.repeat(np.arange(n_seq), counts)
        positions = (np.arange(n_tok, dtype=np.int32) + (starts - qsl[:-1])[seq_of_row]).astype(np.int32)
        block_tables = np.zeros((n_seq, int(n_blocks.max())), dtype=np.int32)
        block_tables[np.arange(block_tables.shape[1]) < n_blocks[:, None]] = list(
            itertools.chain.from_iterable(seq.block_table for seq, _ in plan))
        context_lens = starts + counts
        caught_up = context_lens == totals      # caught up: this step yields a token
        if all_logits is True or all_logits is False:
            logits_rows = np.arange(n_tok, dtype=np.int32) if all_logits else qsl[1:][caught_up] - 1
        else:       # every row of the entries asked for, the last row of the others that sample
            last = np.zeros(n_tok, dtype=bool)
            last[qsl[1:][caught_up] - 1] = True
            logits_rows = np.flatnonzero(np.asarray(all_logits, dtype=bool)[seq_of_row] | last)
        slots = block_tables[seq_of_row, positions // bs] * bs + positions % bs
        batch = ForwardBatch(
            token_ids=token_ids,
            positions=positions,
            slot_mapping=slots.astype(np.int32),
            block_tables=block_tables,
            context_lens=context_lens,
            query_start_loc=qsl,
            logits_rows=logits_rows.astype(np.int32),
        )
        return batch, np.flatnonzero(caught_up).tolist()

    def _build_decode_with_drafts(self, plan):
        """build_batch of a step where every entry decodes (its last token, then its drafts)
        and samples every row: a few rows, gathered in Python lists (the array arithmetic
        of the general path costs more than that at this size)."""
        bs = self.kv_cache.block_size
        token_ids, slots, positions, qsl, context_lens = [], [], [], [0], []
        block_tables = np.zeros((len(plan), max(len(seq.block_table) for seq, _ in plan)), dtype=np.int32)
        for i, (seq, n) in enumerate(plan):
            start, table = seq.num_computed_tokens, seq.block_table
            block_tables[i, :len(table)] = table
            token_ids.append(seq.token_ids[start])
            token_ids.extend(seq.draft_tokens[:n - 1])
            for pos in range(start, start + n):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            qsl.append(qsl[-1] + n)
            context_lens.append(start + n)
        n_tok = qsl[-1]
        return ForwardBatch(token_ids=np.array(token_ids, dtype=np.int32), positions=np.array(positions, dtype=np.int32),
                            slot_mapping=np.array(slots, dtype=np.int32), block_tables=block_tables,
                            context_lens=np.array(context_lens, dtype=np.int32),
                            query_start_loc=np.array(qsl, dtype=np.int32),
                            logits_rows=np.arange(n_tok, dtype=np.int32))

    def run(self, plan, all_logits=False):
        batch, sampling = self.build_batch(plan, all_logits)
        return self.forward(batch), sampling

    def forward(self, batch):
        """Logits of the batch's logits_rows."""
        return self.model.forward(batch, self.kv_cache)

    def forward_greedy(self, batch):
        """(tokens, logprobs) of the batch's logits_rows, sampled greedily on the backend."""
        return self.model.forward_greedy(batch, self.kv_cache)

    def hidden(self, batch):
        """The final hidden state (after the final norm) of the batch's logits_rows: embeddings'."""
        return self.model.hidden(batch, self.kv_cache)
