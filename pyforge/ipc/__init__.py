"""Shared-memory transport between the HTTP workers and the engine.

records: the contract (who writes which ring, how each side wakes the other,
record layouts); segment: the shared-memory segment (rings, worker slots,
engine state, stats); pyforge.native.ipc: the ring itself.
"""
from pyforge.ipc.records import (Abort, Admitted, Embedding, Error, Finish, PromptLogprobs, RecordType, Submit, Tokens,
                                 decode, decode_batch, encode, encode_batch, encode_token, peek_header, request_id)
from pyforge.ipc.segment import EngineStatus, Segment, cleanup_stale, process_alive
from pyforge.native.ipc import Ring, RingCorruptError

__all__ = [
    "Abort", "Admitted", "Embedding", "EngineStatus", "Error", "Finish", "PromptLogprobs", "RecordType", "Ring", "RingCorruptError", "Segment",
    "Submit", "Tokens", "cleanup_stale", "decode", "decode_batch", "encode", "encode_batch", "encode_token",
    "peek_header", "process_alive", "request_id",
]
