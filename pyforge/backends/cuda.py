"""CUDA backend: the model primitives over CuPy, kernels from cuda/*.cu.

Activations are float16 on the device. The fused quantized matvec, paged
attention and the KV store in cuda/ all take half, the KV cache is half (or
fp8 e4m3 with per-kv-head scales: --kv-cache-dtype fp8_e4m3, Fp8KvPool), and
cuBLAS multiplies half matrices on tensor cores with float32 accumulation, so
fp32 activations would need a conversion around each of them and double the
activation traffic of a memory-bound decode. Every kernel computes in float;
what fp16 costs is one rounding per stored activation (2^-11 relative) and
the range |x| < 65504 for the residual stream, as when transformers runs a
model in float16. Logits come back to the host as float32 numpy.

Weights are uploaded once, at load. Q8_0 / Q4_K / Q6_K stay quantized: up to
`matvec_max_rows` rows (decode) run the fused matvec over them; larger batches
dequantize them to fp16 into a scratch buffer, a chunk of rows at a time, and
multiply with cuBLAS (cupy.dot). F16 goes to cuBLAS as stored; F32 and BF16
are converted to F16 on the device; types without a CUDA kernel (Q4_0, Q5_K)
are dequantized on the host at load and run as F16.

With `--cuda-graphs` (stream=True, then use_cuda_graphs) every launch goes to
a stream of the backend's own, and small decode steps replay captured graphs
(cuda_graphs.py); F16 matmuls inside a capture use the matvec_f16 kernel,
since CuPy refuses to capture cuBLAS.

CuPy is imported only here, and only when a CudaBackend is made.
"""
from dataclasses import dataclass

import numpy as np

from pyforge.backends import kv_dtype
from pyforge.backends.cuda_batch import BATCH_FIELDS, DeviceBatch, field_views, pack_fields
from pyforge.backends.cuda_kernels import CudaKernels, cdiv, elementwise_grid, head_dim_problem
from pyforge.backends.routing import route_top_k
from pyforge.dequant import to_float32
from pyforge.ggml_types import BLOCK_LAYOUT, GGMLType

KEPT_QUANTIZED = {GGMLType.Q8_0: "q8_0", GGMLType.Q4_K: "q4_K", GGMLType.Q6_K: "q6_K"}
# Up to this many rows the fused matvec reads each quantized weight once for all of them
# (quant.cu MV_ROWS); dequantize + cuBLAS moves >= 32 bits of fp16 per weight instead of
# 4.5-8.5. A traffic estimate, not yet a GPU measurement: bench_cuda.py's batches 4, 8, 16 show it.
MATVEC_MAX_ROWS = 8
DEQUANT_SCRATCH_BYTES = 256 << 20
# Kept free of the KV cache for activations, logits and cuBLAS workspace: the larger of a floor and
# a margin times the model's estimate for the largest step (CuPy's pool caches freed blocks and rounds
# sizes up; cuBLAS and CuPy make temporaries of their own).
ACTIVATION_RESERVE_BYTES = 1 << 30
ACTIVATION_MARGIN = 2
MIN_DECODE_PARTITION = 64      # positions per split-K block of decode attention (16 per warp)
@dataclass
class DeviceWeight:
    ggml_type: GGMLType    # F16 (dense) or a KEPT_QUANTIZED type
    shape: tuple           # (n_out, n_in)
    data: object           # cupy: half [n_out, n_in], or uint8 [n_out, row bytes] of GGUF blocks


@dataclass
class DeviceExperts:
    """One MoE layer on the device: its router in float32 (routing picks as transformers' do) and the
    experts' DeviceWeights."""
    router: object           # cupy float32 [n_experts, d]
    gate: list
    up: list
    down: list


@dataclass(frozen=True)
class Fp8KvPool:
    """One layer's K or V pool in fp8 e4m3: the value of kv head j is e4m3 x scale[j].
    The scales are 1.0 (vLLM's default without calibrated ones): e4m3 then holds
    |x| <= 448 with 3 mantissa bits, down to 2^-9."""
    data: object                # uint8 [n_blocks, block_size, n_kv, head_dim]: e4m3 bytes
    scale: object               # float32 [n_kv]

    @property
    def shape(self):
        return self.data.shape

    @property
    def nbytes(self):
        return self.data.nbytes + self.scale.nbytes


class CudaBackend:
    name = "cuda"
    activation_dtype_bytes = 2
    samples_on_device = True        # all-greedy steps: greedy_tokens, no logits copied to the host

    def __init__(self, device_index=0, n_threads=None, gpu_memory_utilization=0.9,
                 matvec_max_rows=MATVEC_MAX_ROWS, dequant_scratch_bytes=DEQUANT_SCRATCH_BYTES, stream=False,
                 kv_cache_dtype="auto"):
        self.kv_dtype = kv_dtype.resolve(kv_cache_dtype, self.name)  # refuse what it cannot store before CUDA work
        self.kv_dtype_bytes = kv_dtype.BYTES_PER_VALUE[self.kv_dtype]
        import cupy

        from pyforge.backends import default_threads

        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        n_devices = cupy.cuda.runtime.getDeviceCount()
        if not 0 <= device_index < n_devices:
            raise ValueError(f"device cuda:{device_index} does not exist ({n_devices} CUDA device(s))")
        self.cupy = cupy
        self.device = cupy.cuda.Device(device_index)
        self.device.use()       # this thread's current device: the engine steps on one thread
        self.n_sm = self.device.attributes["MultiProcessorCount"]
        self.n_threads = int(n_threads or default_threads())   # the sampler's CPU threads
        self.gpu_memory_utilization = gpu_memory_utilization
        self.matvec_max_rows = matvec_max_rows
        # A stream of our own (needed to capture graphs; the null stream cannot be captured)
        self.stream = cupy.cuda.Stream(non_blocking=True) if stream else None
        if self.stream is not None:
            self.stream.use()   # current for this thread: every launch and copy below goes there
        self.graphs = None           # DecodeGraphs, after use_cuda_graphs
        self.capturing = False       # inside a graph capture (or its warm-up): no cuBLAS
        self.kernels = CudaKernels(cupy)
        self._weights = {}           # tensor name -> DeviceWeight (a tied head shares the embedding's)
        self._constants = {}         # id(host array) -> (host array, device copy)
        self._scratch_cap = max(1, dequant_scratch_bytes // 2)   # fp16 elements
        self._scratch_elems = 0      # what the largest quantized weight needs, up to the cap
        self._scratch = None

    # -- weights ---------------------------------------------------------
    def prepare_weight(self, tensor):
        """A matmul weight on the device, uploaded once per tensor name."""
        w = self._weights.get(tensor.name)
        if w is None:
            w = self._weights[tensor.name] = self.upload(tensor)
            if w.ggml_type in KEPT_QUANTIZED:
                n_out, n_in = w.shape
                self._scratch_elems = max(self._scratch_elems, min(n_out * n_in, max(n_in, self._scratch_cap)))
        return w

    prepare_embedding = prepare_weight   # rows are gathered (and dequantized) by embed

    def prepare_vector(self, tensor):
        """Norm weights and biases: float32 on the device (the kernels read float)."""

        return self.cupy.asarray(to_float32(tensor))

    def upload(self, tensor):
        """DeviceWeight of a loader TensorRef (benchmarks override this to make random weights)."""
        cp, t = self.cupy, GGMLType(tensor.ggml_type)
        if t in KEPT_QUANTIZED:
            return DeviceWeight(t, tuple(tensor.shape), cp.asarray(np.ascontiguousarray(tensor.data)))
        host = np.ascontiguousarray(tensor.data)
        if t == GGMLType.F16:
            data = cp.asarray(host)
        elif t == GGMLType.F32:
            data = cp.asarray(host).astype(cp.float16)
        elif t == GGMLType.BF16:   # bf16 bits are the top half of a float32
            data = (cp.asarray(host).astype(cp.uint32) << 16).view(cp.float32).astype(cp.float16)
        else:                      # no CUDA kernel for this type: dequantize on the host, once
    
            data = cp.asarray(to_float32(tensor).astype(np.float16))
        return DeviceWeight(GGMLType.F16, tuple(tensor.shape), data.reshape(tensor.shape))

    def _constant(self, host):
        """A device copy of a small host array the model passes every call (rope freq factors)."""
        entry = self._constants.get(id(host))
        if entry is None or entry[0] is not host:
            entry = self._constants[id(host)] = (host, self.cupy.asarray(host))
        return entry[1]

    # -- buffers and memory ----------------------------------------------
    def empty(self, shape):
        return self.cupy.empty(shape, dtype=self.cupy.float16)

    def allocate_kv_pool(self, n_blocks, block_size, n_kv_heads, head_dim):
        # [n_blocks, block_size, n_kv_heads, head_dim] float16, or fp8 e4m3 bytes with scales, K and V
        problem = head_dim_problem(head_dim)
        if problem:
            raise ValueError(f"{problem} (use --device cpu)")
        shape, cp = (n_blocks, block_size, n_kv_heads, head_dim), self.cupy
        try:
            if self.kv_dtype == "fp8_e4m3":
                return tuple(Fp8KvPool(cp.zeros(shape, cp.uint8), cp.ones(n_kv_heads, cp.float32)) for _ in "kv")
            return cp.zeros(shape, cp.float16), cp.zeros(shape, cp.float16)
        except self.cupy.cuda.memory.OutOfMemoryError:
            raise ValueError(f"out of GPU memory allocating a KV pool of {n_blocks} blocks x {block_size} tokens; "
                             "lower --kv-cache-tokens or --max-model-len") from None

    def kv_cache_budget_bytes(self, default_bytes, activation_bytes=0):
        """Bytes the KV cache may take: gpu_memory_utilization of the device's memory, less what
        is in use now (weights, other processes), the dequant scratch and an activation reserve
        (activation_bytes: the model's estimate for the largest step the scheduler may run).
        Called after the weights are uploaded; `default_bytes` (the CPU's size) is not used."""
        free, total = self.cupy.cuda.runtime.memGetInfo()
        in_use = total - free - self.cupy.get_default_memory_pool().free_bytes()
        reserve = max(ACTIVATION_RESERVE_BYTES, ACTIVATION_MARGIN * activation_bytes) + 2 * self._scratch_elems
        budget = int(self.gpu_memory_utilization * total) - in_use - reserve
        if budget <= 0:
            gib = 1 << 30
            raise ValueError(f"no GPU memory left for the KV cache: {in_use / gib:.1f} GiB in use + "
                             f"{reserve / gib:.1f} GiB reserved of {total / gib:.1f} GiB at "
                             f"gpu_memory_utilization {self.gpu_memory_utilization}")
        return budget

    def prepare_batch(self, batch):
        """The batch's int32 metadata on the device: one host-to-device copy per step."""
        host = [np.ascontiguousarray(getattr(batch, f), dtype=np.int32) for f in BATCH_FIELDS]
        views = field_views(self.cupy.asarray(pack_fields(host)), host)
        qsl, ctx = host[5], host[4]
        return DeviceBatch(**views, n_tokens=len(host[0]), n_seqs=len(ctx),
                           max_query_len=int(np.diff(qsl).max(initial=0)), max_context_len=int(ctx.max(initial=0)))

    def use_cuda_graphs(self, max_model_len, block_size):
        """Replay decode steps of up to matvec_max_rows sequences as CUDA graphs (cuda_graphs.py)."""
        from pyforge.backends.cuda_graphs import DecodeGraphs

        if self.stream is None:
            raise ValueError("CUDA graphs need the backend made with stream=True")
        self.graphs = DecodeGraphs(self, max_model_len, block_size)

    def run_forward(self, forward, batch, kv_cache):
        """forward(device batch, kv_cache) -> device logits, for a host ForwardBatch: by a graph
        replay when graphs are on and the batch is a small decode step, else directly."""
        try:
            if self.graphs is not None and self.graphs.handles(batch):
                return self.graphs.run(forward, batch, kv_cache)
            return forward(self.prepare_batch(batch), kv_cache)
        except self.cupy.cuda.memory.OutOfMemoryError:
            # the engine fails this step's requests and steps on: hand the pool's cached
            # blocks back, so that the next step does not meet the same fragments
            self.cupy.get_default_memory_pool().free_all_blocks()
            raise

    def to_host(self, x):
        """Logits for the sampler: float32 numpy (waits for the step to finish). Converted on
        the device: numpy's fp16 -> fp32 cast of a [256, 128k] batch costs more than the copy."""
        return self.cupy.asnumpy(x.astype(self.cupy.float32))

    def greedy_tokens(self, logits):
        """Each row's greedy token and raw logprob, picked on the device (cuda/sampling.cu): the
        host gets 8 bytes a row instead of the row's logits."""
        n = logits.shape[0]
        tokens, logprobs = self.cupy.empty(n, dtype=self.cupy.int32), self.cupy.empty(n, dtype=self.cupy.float32)
        self.kernels.greedy_tokens(logits, tokens, logprobs)
        return self.cupy.asnumpy(tokens), self.cupy.asnumpy(logprobs)

    # -- primitives ------------------------------------------------------
    def embed(self, token_ids, table, out):
        """out[i] = row token_ids[i] of the embedding table (a DeviceWeight; dequantized)."""
        w = table
        if w.ggml_type == GGMLType.F16:
            self.cupy.take(w.data, token_ids, axis=0, out=out)
        else:
            rows = self.cupy.take(w.data, token_ids, axis=0)    # [n, row bytes]: the rows' blocks
            self.kernels.dequant(KEPT_QUANTIZED[w.ggml_type], rows, out, out.size // BLOCK_LAYOUT[w.ggml_type][0])
        return out

    def matmul(self, x, weight, out):
        """out[n, n_out] = x[n, n_in] @ W[n_out, n_in]^T."""
        n_out, n_in = weight.shape
        if weight.ggml_type == GGMLType.F16 and self.capturing:    # CuPy cannot capture cuBLAS
            if x.shape[0] > self.matvec_max_rows or n_in % 8:
                raise ValueError(f"a CUDA graph needs <= {self.matvec_max_rows} rows and n_in % 8 == 0, "
                                 f"got {x.shape[0]} x {n_in}")
            self.kernels.matvec("f16", weight.data, x, out, n_in, n_out)
        elif weight.ggml_type == GGMLType.F16:
            self.cupy.dot(x, weight.data.T, out=out)
        elif x.shape[0] <= self.matvec_max_rows:
            self.kernels.matvec(KEPT_QUANTIZED[weight.ggml_type], weight.data, x, out, n_in, n_out)
        else:
            self._dequant_matmul(x, weight, out)
        return out

    def _dequant_matmul(self, x, weight, out):
        n_out, n_in = weight.shape
        need = min(n_out * n_in, max(n_in, self._scratch_cap))
        if self._scratch is None or self._scratch.size < need:
            self._scratch = self.cupy.empty(max(need, self._scratch_elems), dtype=self.cupy.float16)
        chunk = max(1, self._scratch.size // n_in)     # weight rows per dequantized chunk
        qtype, block = KEPT_QUANTIZED[weight.ggml_type], BLOCK_LAYOUT[weight.ggml_type][0]
        for r0 in range(0, n_out, chunk):
            r1 = min(n_out, r0 + chunk)
            w16 = self._scratch[:(r1 - r0) * n_in].reshape(r1 - r0, n_in)
            self.kernels.dequant(qtype, weight.data[r0:r1], w16, (r1 - r0) * n_in // block)
            if r1 - r0 == n_out:
                self.cupy.dot(x, w16.T, out=out)
            else:               # a column slice of out is strided: cuBLAS writes a temporary
                out[:, r0:r1] = self.cupy.dot(x, w16.T)
        return out

    def rmsnorm(self, x, weight, eps, out):
        n, d = x.shape
        self.kernels.launch("rmsnorm_f16", (n,), 256, x, weight, out, d, eps)
        return out

    def add_rmsnorm(self, x, y, weight, eps, out):
        """x += y, then out = rmsnorm(x): the residual add and the next norm in one launch."""
        n, d = x.shape
        self.kernels.launch("add_rmsnorm_f16", (n,), 256, x, y, weight, out, d, eps)
        return out

    def layernorm(self, x, weight, bias, eps, out):
        n, d = x.shape
        self.kernels.launch("layernorm_f16", (n,), 256, x, weight, bias, out, d, eps)
        return out

    def add_layernorm(self, x, y, weight, bias, eps, out):
        """x += y, then out = layernorm(x), in one launch."""
        n, d = x.shape
        self.kernels.launch("add_layernorm_f16", (n,), 256, x, y, weight, bias, out, d, eps)
        return out

    def rope(self, x, positions, n_rot, theta, neox, freq_factors, mscale=1.0):
        n_tok, n_heads, head_dim = x.shape
        ff = None if freq_factors is None else self._constant(freq_factors)
        self.kernels.launch("rope_f16", (n_tok,), 128, x, positions, n_heads, head_dim, n_rot, theta, int(neox), ff,
                            mscale)

    def add_bias(self, x, bias):
        self.kernels.launch("add_bias_f16", elementwise_grid(x.size, self.n_sm), 256, x, bias, x.size, bias.size)

    def add_inplace(self, x, y):
        self.kernels.launch("add_inplace_f16", elementwise_grid(x.size, self.n_sm), 256, x, y, x.size)

    def scale(self, x, factor):
        """x *= factor (a kernel: decode graphs capture it)."""
        self.kernels.launch("scale_f16", elementwise_grid(x.size, self.n_sm), 256, x, factor, x.size)
        return x

    def silu_mul(self, gate, up, out):
        self.kernels.launch("silu_mul_f16", elementwise_grid(gate.size, self.n_sm), 256, gate, up, out, gate.size)
        return out

    def gelu_tanh_mul(self, gate, up, out):
        self.kernels.launch("gelu_tanh_mul_f16", elementwise_grid(gate.size, self.n_sm), 256, gate, up, out, gate.size)
        return out

    def softcap(self, x, cap):
        self.kernels.launch("softcap_f16", elementwise_grid(x.size, self.n_sm), 256, x, x.size, cap)
        return x

    def kv_store(self, k, v, k_cache, v_cache, slot_mapping):
        n_tok, n_kv, head_dim = k.shape
        if isinstance(k_cache, Fp8KvPool):
            self.kernels.launch("kv_store_fp8", (n_tok,), 128, k, v, k_cache.data, v_cache.data, slot_mapping,
                                k_cache.scale, v_cache.scale, n_kv, head_dim)
            return
        self.kernels.launch("kv_store_f16", (n_tok,), 128, k, v, k_cache, v_cache, slot_mapping, n_kv * head_dim)

    @staticmethod
    def _cache_args(k_cache, v_cache):
        """(kernel name suffix, caches, extra arguments) of the attention kernels for these pools."""
        if isinstance(k_cache, Fp8KvPool):
            return "_fp8", (k_cache.data, v_cache.data), (k_cache.scale, v_cache.scale)
        return "", (k_cache, v_cache), ()

    def attention(self, q, k_cache, v_cache, meta, scale, out, window=0, softcap=0.0):
        if meta.max_query_len == 1:
            return self._decode_attention(q, k_cache, v_cache, meta, scale, out, window, softcap)
        n_tok, n_heads, head_dim = q.shape
        _, block_size, n_kv, _ = k_cache.shape
        suffix, caches, scales = self._cache_args(k_cache, v_cache)
        self.kernels.launch("paged_attention_prefill" + suffix, (cdiv(n_tok, 4), n_heads), 128,
                            q, *caches, meta.block_tables, meta.context_lens, meta.query_start_loc, out,
                            n_tok, meta.n_seqs, n_heads, n_kv, head_dim, block_size, meta.block_tables.shape[1],
                            scale, window, softcap, *scales)
        return out

    # -- mixture of experts: grouped launches of the matmul kernels, one group per expert picked
    def prepare_experts(self, router, gate, up, down):
        prep = lambda refs: [self.prepare_weight(t) for t in refs]    # noqa: E731
        return DeviceExperts(self.cupy.asarray(to_float32(router)), prep(gate), prep(up), prep(down))

    def moe_route(self, x, experts, k, normalize):
        """Router logits in float32 (cuBLAS), routed on the host: moe_ffn groups tokens there anyway."""
        if self.capturing:
            raise ValueError("a mixture-of-experts model cannot run in CUDA graphs (its tokens are grouped by "
                             "expert on the host); run it without cuda_graphs")
        logits = self.cupy.dot(x.astype(self.cupy.float32), experts.router.T)
        return route_top_k(self.cupy.asnumpy(logits), k, normalize)

    def moe_ffn(self, x, ids, weights, experts, out):
        """Per expert with tokens: gather its rows, gate/up matmuls, silu_mul, down, weighted add to
        out (a token picks an expert once, so one group's rows are distinct). Not graph-capturable:
        the grouping is the host's."""
        cp, k = self.cupy, ids.shape[1]
        flat = ids.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(len(experts.gate) + 1))
        out.fill(0)
        for e in range(len(experts.gate)):
            picks = order[bounds[e]:bounds[e + 1]]
            if not len(picks):
                continue
            rows = cp.asarray((picks // k).astype(np.int32))
            w = cp.asarray(weights.ravel()[picks].astype(np.float32))
            xs = cp.take(x, rows, axis=0)                                             # [m, d]
            n_ff, m = experts.gate[e].shape[0], len(picks)
            gate = self.matmul(xs, experts.gate[e], self.empty((m, n_ff)))
            act = self.silu_mul(gate, self.matmul(xs, experts.up[e], self.empty((m, n_ff))), gate)
            y = self.matmul(act, experts.down[e], self.empty((m, x.shape[1])))       # [m, d]
            out[rows] += y.astype(cp.float32) * w[:, None]
        return out

    def _decode_attention(self, q, k_cache, v_cache, meta, scale, out, window, softcap):
        """One query row per sequence: the context split into partitions (split-K), then merged."""
        _, n_heads, head_dim = q.shape
        _, block_size, n_kv, _ = k_cache.shape
        partition, n_parts = decode_partition(meta.max_context_len, meta.n_seqs, n_heads, self.n_sm)
        cp = self.cupy
        part_acc = cp.empty((meta.n_seqs, n_heads, n_parts, head_dim), dtype=cp.float32)
        part_ml = cp.empty((meta.n_seqs, n_heads, n_parts, 2), dtype=cp.float32)
        suffix, caches, scales = self._cache_args(k_cache, v_cache)
        self.kernels.launch("paged_attention_decode" + suffix, (n_heads, meta.n_seqs, n_parts), 128,
                            q, *caches, meta.block_tables, meta.context_lens, meta.query_start_loc,
                            part_acc, part_ml, n_heads, n_kv, head_dim, block_size, meta.block_tables.shape[1],
                            partition, scale, window, softcap, *scales)
        self.kernels.launch("paged_attention_decode_reduce", (n_heads, meta.n_seqs), 128,
                            part_acc, part_ml, meta.context_lens, meta.query_start_loc, out,
                            n_heads, head_dim, n_parts, partition)
        return out


def decode_partition(max_context_len, n_seqs, n_heads, n_sm):
    """(positions per partition, partitions): enough (head, sequence, partition) blocks to
    fill every SM twice, each partition a multiple of 64 positions and at least 64."""
    want_parts = max(1, cdiv(2 * n_sm, n_heads * n_seqs))
    per_part = cdiv(max(1, max_context_len), want_parts)
    partition = max(MIN_DECODE_PARTITION, cdiv(per_part, MIN_DECODE_PARTITION) * MIN_DECODE_PARTITION)
    return partition, cdiv(max(1, max_context_len), partition)
