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
