"""The contract between a model definition and a backend: the primitives a model may
call, and what the engine asks of a backend around them. A new backend implements
all of it (tests/backends/test_backend_protocol.py checks the cpu and cuda ones,
and that the models call nothing else).

Arrays are the backend's own (numpy on cpu, CuPy on cuda); `out` arguments are
written in place; shapes are in the shape comments of models/llama.py.
"""
from typing import Protocol


class Backend(Protocol):
    name: str                       # "cpu" | "cuda"
    n_threads: int                  # CPU threads (the sampler's too)
    kv_dtype: str                   # KV cache element type (backends/kv_dtype.py)
    kv_dtype_bytes: float           # bytes per KV cache element (q8_0: 34 / 32)
    activation_dtype_bytes: int     # bytes per activation element
    samples_on_device: bool         # the engine hands all-greedy steps to greedy_tokens

    # -- weights, buffers, the KV cache
    def prepare_weight(self, tensor): """A matmul weight, kept in its stored format where a kernel exists."""
    def prepare_embedding(self, tensor): """The embedding table (rows looked up by embed)."""
    def prepare_vector(self, tensor): """Norm weights and biases."""
    def empty(self, shape): """An uninitialised float activation buffer."""
    def allocate_kv_pool(self, n_blocks, block_size, n_kv_heads, head_dim): """(K, V) pools of one layer."""
    def kv_cache_budget_bytes(self, default_bytes, activation_bytes=0): """Bytes the KV cache may take."""

    # -- one forward pass
    def prepare_batch(self, batch): """The ForwardBatch's metadata where the kernels read it."""
    def run_forward(self, forward, batch, kv_cache): """forward(batch, kv_cache) -> logits, run here."""
    def to_host(self, x): """A result as a numpy array."""
    def greedy_tokens(self, logits):
        """(tokens int32 [n], logprobs float32 [n]), host numpy: each row's argmax and its raw
        logprob, as the host sampler picks a greedy row (NaN skipped, ties to the lower id)."""

    # -- the primitives
    def embed(self, token_ids, table, out): """out[i] = table[token_ids[i]]."""
    def matmul(self, x, weight, out): """out = x @ weight.T."""
    def rmsnorm(self, x, weight, eps, out): """out = x / rms(x) * weight, per row."""
    def add_rmsnorm(self, x, y, weight, eps, out): """x += y, then out = rmsnorm(x)."""
    def layernorm(self, x, weight, bias, eps, out): """out = (x - mean(x)) / std(x) * weight + bias, per row."""
    def add_layernorm(self, x, y, weight, bias, eps, out): """x += y, then out = layernorm(x)."""
    def rope(self, x, positions, n_rot, theta, neox, freq_factors, mscale=1.0):
        """Rotary embedding, in place; the rotated dims multiplied by mscale (longrope's attention factor)."""
    def add_bias(self, x, bias): """x += bias, per row."""
    def add_inplace(self, x, y): """x += y."""
    def scale(self, x, factor): """x *= factor, in place (x contiguous)."""
    def silu_mul(self, gate, up, out): """out = silu(gate) * up."""
    def gelu_tanh_mul(self, gate, up, out): """out = gelu_tanh(gate) * up (GeGLU)."""
    def softcap(self, x, cap): """x = cap * tanh(x / cap), in place (logit soft-capping)."""
    def kv_store(self, k, v, k_cache, v_cache, slot_mapping): """Write this step's K, V into their slots."""
    def attention(self, q, k_cache, v_cache, meta, scale, out, window=0, softcap=0.0):
        """Paged causal attention over the batch; window > 0: each query sees its last `window`
        positions only; softcap > 0: scores soft-capped (cap * tanh(s / cap))."""

    # -- mixture of experts (models/moe.py)
    def prepare_experts(self, router, gate, up, down):
        """One MoE layer: its router [n_experts, d] and lists of per-expert matmul weights."""
    def moe_route(self, x, experts, k, normalize):
        """(ids int32 [n, k], weights float32 [n, k]) of each row's top-k experts (routing.py), host
        numpy; router logits in float32 on both backends, so the picks are transformers'."""
    def moe_ffn(self, x, ids, weights, experts, out):
        """out[t] = sum_j weights[t, j] * FFN of expert ids[t, j] (silu-gated) of x[t]; tokens grouped by
        expert, so each expert's weights are read once."""
