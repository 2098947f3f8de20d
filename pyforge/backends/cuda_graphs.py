"""CUDA graphs for decode steps (`--cuda-graphs`): one launch for a whole forward pass.

A decode step of a small batch launches ~15 kernels per layer, each costing
microseconds of Python and CuPy on the host; for a small model, or one
sequence of a large one, the host then sets the pace, not the GPU. Here the
forward pass of a decode batch is captured once per batch size in
GRAPH_BATCH_SIZES (a batch is padded up to the next one) and replayed:

- The batch metadata lives in one static device buffer, laid out as
  CudaBackend.prepare_batch lays out its upload; each step writes the padded
  host arrays into it, then launches the graph, all on the backend's stream.
  Padding rows have context length 0 and KV slot -1: kv_store skips them,
  decode attention writes zeros for them, and their logits are dropped.
- The static batch claims the longest context (max_model_len), so the split-K
  decode attention is captured with enough partitions for any sequence; those
  past a sequence's length return at once.
- Everything a capture allocates comes from one memory pool of the graphs'
  own, which nothing else allocates from afterwards, so the addresses the
  graphs recorded stay theirs. Graphs share it: they run one at a time, and
  what one leaves (its logits) is read before the next runs.
- CuPy refuses cuBLAS calls while capturing, so the captured batch sizes stop
  at MATVEC_MAX_ROWS, where every matmul is one of our matvec kernels (fp16
  weights included; the backend switches while `capturing`). Larger batches
  and every prefill run eagerly, as without graphs.
- Before its capture, each size runs once eagerly on padding (nothing written
  to the KV cache): the kernels get compiled, the rope constants and the
  dequant scratch get uploaded and allocated outside the capture.
- The engine captures every size at start-up (capture_all), as vLLM does, so
  no request waits for a capture; a size not captured yet is captured on use.
"""
from dataclasses import dataclass

import numpy as np

from pyforge.backends.cuda_batch import DeviceBatch, field_views, pack_fields

GRAPH_BATCH_SIZES = (1, 2, 4, 8)


@dataclass
class CapturedStep:
    graph: object
    flat: object        # the static metadata buffer (device int32)
    batch: object       # DeviceBatch of views into flat
    logits: object      # device [size, vocab], written by each replay
    forward: object     # what was captured, and over which KV cache
    kv_cache: object


class DecodeGraphs:
    def __init__(self, backend, max_model_len, block_size, sizes=GRAPH_BATCH_SIZES):
        cp = backend.cupy
        self.backend, self.cupy = backend, cp
        self.sizes = tuple(s for s in sizes if s <= backend.matvec_max_rows)
        self.max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.pool = cp.cuda.MemoryPool()
        self.steps = {}
        self.replays = 0

    def handles(self, batch):
        """Whether batch (a host ForwardBatch) is a decode step a graph can run."""
        n = len(batch.context_lens)
        if not self.sizes or not 0 < n <= self.sizes[-1]:
            return False
        every_row = np.arange(n + 1)
        return (len(batch.token_ids) == n and batch.block_tables.shape[1] <= self.max_blocks
                and np.array_equal(batch.query_start_loc, every_row)
                and np.array_equal(batch.logits_rows, every_row[:n]))

    def capture_all(self, forward, kv_cache):
        for size in self.sizes:
            if size not in self.steps:
                try:
                    self._capture(size, forward, kv_cache)
                except Exception as e:      # a CUDA or CuPy refusal: say what to do instead
                    raise ValueError(f"capturing the CUDA graph of a {size}-sequence decode step failed "
                                     f"({type(e).__name__}: {e}); run without --cuda-graphs") from e

    def run(self, forward, batch, kv_cache):
        """Device logits [n_seqs, vocab] of the decode batch, by a graph replay."""
        n = len(batch.context_lens)
        size = next(s for s in self.sizes if s >= n)
        step = self.steps.get(size) or self._capture(size, forward, kv_cache)
        if step.forward != forward or step.kv_cache is not kv_cache:
            raise RuntimeError("a CUDA graph replays the forward pass and KV cache it was captured with")
        self._write(step, self._host_fields(size, batch))
        step.graph.launch(self.backend.stream)
        self.replays += 1
        return step.logits[:n]

    # -- the static batch -----------------------------------------------------
    def _host_fields(self, size, batch=None):
        """The padded host arrays of prepare_batch's fields, in BATCH_FIELDS order."""
        n = 0 if batch is None else len(batch.context_lens)
        token_ids = np.zeros(size, np.int32)
        positions = np.zeros(size, np.int32)
        slots = np.full(size, -1, np.int32)
        tables = np.zeros((size, self.max_blocks), np.int32)
        context_lens = np.zeros(size, np.int32)
        if batch is not None:
            token_ids[:n], positions[:n], slots[:n] = batch.token_ids, batch.positions, batch.slot_mapping
            tables[:n, :batch.block_tables.shape[1]] = batch.block_tables
            context_lens[:n] = batch.context_lens
        return [token_ids, positions, slots, tables, context_lens, np.arange(size + 1, dtype=np.int32),
                np.arange(size, dtype=np.int32)]

    def _write(self, step, host):

        self.cupy.copyto(step.flat, self.cupy.asarray(pack_fields(host)))

    def _capture(self, size, forward, kv_cache):

        cp, backend = self.cupy, self.backend
        host = self._host_fields(size)
        flat = cp.empty(sum(h.size for h in host), dtype=cp.int32)
        batch = DeviceBatch(**field_views(flat, host), n_tokens=size, n_seqs=size, max_query_len=1,
                            max_context_len=self.max_model_len)
        step = CapturedStep(None, flat, batch, None, forward, kv_cache)
        self._write(step, host)                 # all padding: the warm-up writes nothing to the KV cache
        backend.capturing = True                # the same kernels as the capture will use
        try:
            forward(batch, kv_cache)
            with cp.cuda.using_allocator(self.pool.malloc):
                backend.stream.begin_capture()
                try:
                    step.logits = forward(batch, kv_cache)
                finally:
                    step.graph = backend.stream.end_capture()
        finally:
            backend.capturing = False
        self.steps[size] = step
        return step
