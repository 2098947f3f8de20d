"""Owns the device side: backend, model weights, the paged KV pool, and the
step from a scheduler plan to a ForwardBatch. Everything upstream passes ints."""
import numpy as np

from pyforge.models.batch import ForwardBatch


class KVCache:
    """One block pool per layer, K and V: [n_layers][n_blocks, block_size, n_kv, head_dim]."""

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
        return 2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype_bytes


class ModelRunner:
    def __init__(self, model, kv_cache):
        self.model = model
        self.kv_cache = kv_cache

    def build_batch(self, plan, all_logits=False):
        """plan: [(sequence, n_new_tokens)] -> ForwardBatch, and which plan entries sample."""
        bs = self.kv_cache.block_size
        max_blocks = max(len(seq.block_table) for seq, _ in plan)
        n_tok = sum(n for _, n in plan)
        token_ids = np.empty(n_tok, dtype=np.int32)
        positions = np.empty(n_tok, dtype=np.int32)
        block_tables = np.zeros((len(plan), max_blocks), dtype=np.int32)
        context_lens = np.empty(len(plan), dtype=np.int32)
        qsl = np.zeros(len(plan) + 1, dtype=np.int32)
        logits_rows, sampling = [], []
        row = 0
        for i, (seq, n) in enumerate(plan):
            start = seq.num_computed_tokens
            token_ids[row:row + n] = seq.token_ids[start:start + n]
            positions[row:row + n] = np.arange(start, start + n)
            block_tables[i, :len(seq.block_table)] = seq.block_table
            context_lens[i] = start + n
            qsl[i + 1] = row + n
            if all_logits:
                logits_rows.extend(range(row, row + n))
            if start + n == seq.num_tokens:   # caught up: this step yields a token
                if not all_logits:
                    logits_rows.append(row + n - 1)
                sampling.append(i)
            row += n
        seq_of_row = np.repeat(np.arange(len(plan)), np.diff(qsl))
        slots = block_tables[seq_of_row, positions // bs] * bs + positions % bs
        batch = ForwardBatch(
            token_ids=token_ids,
            positions=positions,
            slot_mapping=slots.astype(np.int32),
            block_tables=block_tables,
            context_lens=context_lens,
            query_start_loc=qsl,
            logits_rows=np.asarray(logits_rows, dtype=np.int32),
        )
        return batch, sampling

    def run(self, plan, all_logits=False):
        batch, sampling = self.build_batch(plan, all_logits)
        return self.model.forward(batch, self.kv_cache), sampling
