"""The batch plan a forward pass runs: a flattened varlen batch of sequences.

Built by the scheduler from integers only; the model never sees Sequence objects.
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class ForwardBatch:
    token_ids: np.ndarray        # int32 [n_tok]   all sequences' new tokens, back to back
    positions: np.ndarray        # int32 [n_tok]   position of each token in its sequence
    slot_mapping: np.ndarray     # int32 [n_tok]   flat KV slot (block * block_size + offset) to write
    block_tables: np.ndarray     # int32 [n_seq, max_blocks]  (unused entries: 0)
    context_lens: np.ndarray     # int32 [n_seq]   tokens in cache after this step
    query_start_loc: np.ndarray  # int32 [n_seq+1] sequence s owns rows qsl[s]:qsl[s+1]
    logits_rows: np.ndarray      # int32 [n_out]   rows whose logits are wanted

    @property
    def n_tokens(self):
        return len(self.token_ids)

    @property
    def n_seqs(self):
        return len(self.context_lens)


def single_sequence_batch(token_ids, start_pos, block_table, block_size, all_logits=False):
    """A batch of one sequence whose first `start_pos` tokens are already cached."""
    token_ids = np.asarray(token_ids, dtype=np.int32)
    n = len(token_ids)
    positions = np.arange(start_pos, start_pos + n, dtype=np.int32)
    table = np.asarray(block_table, dtype=np.int32)
    slots = table[positions // block_size] * block_size + positions % block_size
    return ForwardBatch(
        token_ids=token_ids,
        positions=positions,
        slot_mapping=slots.astype(np.int32),
        block_tables=table.reshape(1, -1),
        context_lens=np.array([start_pos + n], dtype=np.int32),
        query_start_loc=np.array([0, n], dtype=np.int32),
        logits_rows=np.arange(n, dtype=np.int32) if all_logits else np.array([n - 1], dtype=np.int32),
    )
