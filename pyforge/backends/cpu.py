"""CPU backend: the model primitives over the native C kernels (OpenMP, AVX2,
AVX-512 VNNI, AMX; each runtime-detected).

Weights stay in their stored format (memory-mapped), except Q4_K, Q5_K, Q6_K,
Q8_0 and Q4_0 matrices, and F32 ones of at most 512 columns, on CPUs with AVX2 or
AVX-512 VNNI and no AMX: those are repacked once at load, 16 rows interleaved
(quant.repack_x16), for GEMMs 1.2-3x faster on batches (F32: no horizontal sums,
which cost a narrow row's dot as much as its multiply-adds); that copy is anonymous
memory (1.06-1.11x the stored bytes), and the mapped pages are left to the page cache.
Routed experts are repacked the same way (quant.ExpertTable), but for the types kept
as stored for single tokens, which experts keep as their only copy. On VNNI hosts Q5_K and Q6_K keep
their mapped originals for single tokens too (their repacked 1-token dots, with
more bits to unpack, are ~0.83x); the AVX2 tiles win on every type. Activations
are float32; the KV cache is in the dtype chosen at construction
(backends/kv_dtype.py), converted as it is stored and
read. Every kernel call releases the GIL inside the native module.
"""
from dataclasses import dataclass

import numpy as np

from pyforge.backends import default_threads, kv_dtype
from pyforge.backends.routing import route_top_k
from pyforge.dequant import to_float32
from pyforge.ggml_types import GGMLType
from pyforge.native import ops, quant


@dataclass(frozen=True)
class RepackedWeight:
    """A matrix repacked 16 rows at a time for quant.matmul_x16."""
    ggml_type: GGMLType         # its stored type (one with an x16 layout: quant.x16_layout)
    shape: tuple                # (n_out, n_in), as the TensorRef it came from
    data: np.ndarray
    single_token: object = None  # the TensorRef to use for one token instead, if any


@dataclass(frozen=True)
class CpuExperts:
    """One MoE layer for quant.moe_ffn: the router and the experts' quant.ExpertTable (their
    matrices as stored, or repacked as the dense weights are: prepare_experts)."""
    router: object       # TensorRef [n_experts, d]
    table: object        # quant.ExpertTable


# Types whose stored layout beats their repacked one on a single token (decode), by x16 kernel
# family: the VNNI row dots beat the VNNI tiles there; the AVX2 tiles beat the AVX2 row dots on
# every type (RESULTS.md, 2026-12-07 Zen 3), so AVX2 hosts leave the mapped originals unread
SINGLE_TOKEN_ORIGINAL = {"vnni": (GGMLType.Q5_K, GGMLType.Q6_K), "avx2": ()}


def single_token_originals():
    """The types the CPU backend keeps in their stored layout for single tokens, besides repacking."""
    return SINGLE_TOKEN_ORIGINAL.get(quant.x16_kernels(), ())


def repacks_weights():
    """True where the CPU backend repacks weights at load: x16 kernels run here
    (quant.x16_kernels) and no AMX, whose batched path reads the stored layout."""
    return quant.x16_kernels() is not None and not quant.amx_available()


class CpuBackend:
    name = "cpu"
    activation_dtype_bytes = 4
    samples_on_device = False       # the logits are host memory already: the native sampler takes them

    def __init__(self, n_threads=None, kv_cache_dtype="auto", weight_type=None):
        self.n_threads = int(n_threads or default_threads())
        if self.n_threads < 1:
            raise ValueError("n_threads must be at least 1")
        self.kv_dtype = kv_dtype.resolve(kv_cache_dtype, self.name, weight_type)   # auto: by the model's weights
        self.kv_dtype_bytes = kv_dtype.BYTES_PER_VALUE[self.kv_dtype]
        self.repack = repacks_weights()
        self.single_token_originals = single_token_originals()

    # -- weights ---------------------------------------------------------
    def prepare_weight(self, tensor):
        """A matmul weight: the mapped bytes as stored (no copy), or the matrix
        repacked for the x16 GEMM where that runs."""
        if self.repack and len(tensor.shape) == 2 and quant.x16_layout(tensor.ggml_type, *tensor.shape):
            packed = quant.repack_x16(tensor.data, int(tensor.ggml_type), *tensor.shape, self.n_threads)
            if packed is not None:
                original = tensor if tensor.ggml_type in self.single_token_originals else None
                return RepackedWeight(tensor.ggml_type, tuple(tensor.shape), packed, original)
        return tensor

    def prepare_embedding(self, tensor):
        """The embedding table: rows are dequantized as they are looked up."""
        return tensor

    def prepare_vector(self, tensor):
        """Norm weights and biases: small, converted once to float32."""
        return to_float32(tensor)


    # -- buffers ---------------------------------------------------------
    @staticmethod
    def empty(shape):
        return np.empty(shape, dtype=np.float32)

    @staticmethod
    def kv_cache_budget_bytes(default_bytes, activation_bytes=0):
        """Bytes for the KV cache when the user sets no size: the engine's default."""
        return default_bytes

    @staticmethod
    def prepare_batch(batch):
        """The batch's metadata where the kernels read it: host numpy already."""
        return batch

    def run_forward(self, forward, batch, kv_cache):
        return forward(self.prepare_batch(batch), kv_cache)

    @staticmethod
    def to_host(x):
        """Logits for the sampler: already float32 numpy."""
        return x

    @staticmethod
    def greedy_tokens(logits):
        """The host sampler's greedy pick and raw logprob per row, in numpy (the engine samples
        with the native sampler here: samples_on_device is False)."""
        x = np.where(np.isnan(logits), -np.inf, logits).astype(np.float64)
        tokens = np.argmax(x, axis=1).astype(np.int32)       # the first maximum: ties to the lower id
        top = x[np.arange(len(x)), tokens]
        with np.errstate(invalid="ignore", divide="ignore"):
            lse = top + np.log(np.exp(x - top[:, None]).sum(axis=1))
        return tokens, (top - lse).astype(np.float32)

    def allocate_kv_pool(self, n_blocks, block_size, n_kv_heads, head_dim):
        # [n_blocks, n_kv_heads, block_size, row] K and V (ops.kv_store says why); row: head_dim
        # values of kv_dtype (bf16 as uint16 bits), or head_dim / 32 blocks of 34 bytes for q8_0
        shape, dtype = ops.kv_cache_shape(n_blocks, n_kv_heads, block_size, head_dim, self.kv_dtype)
        return np.zeros(shape, dtype=dtype), np.zeros(shape, dtype=dtype)

    # -- primitives ------------------------------------------------------
    def embed(self, token_ids, table, out):
        """out[i] = row token_ids[i] of the embedding table (dequantized)."""
        n_vocab, dim = table.shape
        data = table.data
        if table.ggml_type == GGMLType.F32:
            np.take(data.reshape(n_vocab, dim), token_ids, axis=0, out=out)
            return out
        rows = data.reshape(n_vocab, -1)
        for i, tok in enumerate(token_ids):
            out[i] = quant.dequantize(rows[tok], int(table.ggml_type), dim)
        return out

    def matmul(self, x, weight, out):
        """out[n, n_out] = x[n, n_in] @ W[n_out, n_in]^T."""
        if isinstance(weight, RepackedWeight) and weight.single_token is not None and len(x) == 1:
            weight = weight.single_token
        if isinstance(weight, RepackedWeight):
            quant.matmul_x16(x, weight.data, int(weight.ggml_type), weight.shape[0], out, self.n_threads)
        else:
            quant.matmul(x, weight.data, int(weight.ggml_type), weight.shape[0], out, self.n_threads)
        return out

    def rmsnorm(self, x, weight, eps, out):
        ops.rmsnorm(x, weight, eps, out, self.n_threads)
        return out

    def add_rmsnorm(self, x, y, weight, eps, out):
        """x += y, then out = rmsnorm(x) (two kernels here: one pass each, no launch cost to save)."""
        ops.add_inplace(x, y)
        return self.rmsnorm(x, weight, eps, out)

    def layernorm(self, x, weight, bias, eps, out):
        ops.layernorm(x, weight, bias, eps, out, self.n_threads)
        return out

    def add_layernorm(self, x, y, weight, bias, eps, out):
        """x += y, then out = layernorm(x) (two kernels, as add_rmsnorm)."""
        ops.add_inplace(x, y)
        return self.layernorm(x, weight, bias, eps, out)

    def rope(self, x, positions, n_rot, theta, neox, freq_factors, mscale=1.0):
        ops.rope(x, positions, n_rot, theta, neox, freq_factors, self.n_threads, mscale)

    def add_bias(self, x, bias):
        x += bias

    def add_inplace(self, x, y):
        ops.add_inplace(x, y)

    def scale(self, x, factor):
        np.multiply(x, np.float32(factor), out=x)
        return x

    def silu_mul(self, gate, up, out):
        ops.silu_mul(gate, up, out, self.n_threads)
        return out

    def gelu_tanh_mul(self, gate, up, out):
        ops.gelu_tanh_mul(gate, up, out, self.n_threads)
        return out

    def softcap(self, x, cap):
        ops.softcap(x, cap)
        return x

    def kv_store(self, k, v, k_cache, v_cache, slot_mapping):
        ops.kv_store(k, v, k_cache, v_cache, slot_mapping, self.kv_dtype)

    def attention(self, q, k_cache, v_cache, meta, scale, out, window=0, softcap=0.0):
        ops.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, meta.query_start_loc, scale,
                            out, self.n_threads, window, softcap, self.kv_dtype)
        return out

    # -- mixture of experts ----------------------------------------------
    def prepare_experts(self, router, gate, up, down):
        """TensorRefs: the router and lists of one per expert (shapes checked by the loader). The
        expert matrices are repacked where dense ones are, but for the types kept in their stored
        layout for single tokens (a routed expert mostly sees one token a step in decode): one
        copy of each expert either way."""
        matrices = [tuple((t.data, int(t.ggml_type)) for t in mats) for mats in zip(gate, up, down)]
        repack = [t for t in GGMLType if t not in self.single_token_originals] if self.repack else []
        n_ff, d = gate[0].shape
        return CpuExperts(router, quant.ExpertTable(matrices, n_ff, d, repack, self.n_threads))

    def moe_route(self, x, experts, k, normalize):
        logits = self.matmul(x, experts.router, self.empty((len(x), experts.router.shape[0])))
        return route_top_k(logits, k, normalize)

    def moe_ffn(self, x, ids, weights, experts, out):
        quant.moe_ffn(x, ids, weights, experts.table, out, self.n_threads)
        return out
