"""A ForwardBatch on the device: its int32 fields packed back to back on the host,
uploaded as one array, and viewed field by field there. Shared by the CUDA
backend (every step) and the CUDA graph runner (its static batch buffer)."""
from dataclasses import dataclass

import numpy as np

BATCH_FIELDS = ("token_ids", "positions", "slot_mapping", "block_tables", "context_lens", "query_start_loc",
                "logits_rows")


@dataclass
class DeviceBatch:
    """A ForwardBatch with its arrays on the device (int32 views of one upload)."""
    token_ids: object
    positions: object
    slot_mapping: object
    block_tables: object
    context_lens: object
    query_start_loc: object
    logits_rows: object
    n_tokens: int
    n_seqs: int
    max_query_len: int      # 1: every sequence decodes one token (split-K decode attention)
    max_context_len: int


def pack_fields(host):
    """The BATCH_FIELDS host arrays back to back, one flat int32 array (one upload)."""
    return np.concatenate([h.ravel() for h in host])


def field_views(flat, host):
    """{field: the part of flat (pack_fields' layout, on the device) shaped as its host array}."""
    views, at = {}, 0
    for field, h in zip(BATCH_FIELDS, host):
        views[field] = flat[at:at + h.size].reshape(h.shape)
        at += h.size
    return views
