"""A numpy stand-in for the part of CuPy the CUDA backend uses, with the
cuda/*.cu kernels emulated in numpy from the semantics their comments state.

It runs pyforge.backends.cuda on a machine without a GPU, so the backend's
glue is tested everywhere: weight conversion, argument order and types
(cuda_kernels.convert_args checks every launch against the kernel table),
launch grids (an emulated kernel covers only what its grid and block cover,
and `empty` buffers start as NaN, so a short grid shows), split-K decode
partitions (the partial results are indexed as the kernel indexes them),
dequantize-and-multiply chunking, and the per-step batch upload. Activations
are stored as float16 where the kernels store half, arithmetic is float32 or
better, so the numbers are close to the GPU's. The kernels themselves are
checked on a GPU by tests/cuda/test_cuda_kernels.py.
"""
import re
import types

import numpy as np

from pyforge.ggml_types import BLOCK_LAYOUT, GGMLType
from pyforge.native import quant

QTYPES = {"q8_0": GGMLType.Q8_0, "q4_K": GGMLType.Q4_K, "q6_K": GGMLType.Q6_K}
NEG_INF = -np.inf


def make_fake_cupy(total_bytes=16 << 30, free_bytes=16 << 30, n_sm=4):
    cp = types.ModuleType("cupy")
    cp.float16, cp.float32, cp.uint32, cp.int32, cp.uint8 = np.float16, np.float32, np.uint32, np.int32, np.uint8
    cp.asarray = lambda a, dtype=None: np.array(a, dtype=dtype, copy=True)   # a device copy
    cp.asnumpy = lambda a: np.array(a, copy=True)
    cp.empty = _poisoned_empty
    cp.zeros = lambda shape, dtype=float: np.zeros(shape, dtype)
    cp.ones = lambda shape, dtype=float: np.ones(shape, dtype)
    rng = np.random.default_rng(0)
    cp.random = types.SimpleNamespace(
        standard_normal=lambda size, dtype=np.float64: rng.standard_normal(size).astype(dtype),
        randint=lambda low, high, size, dtype=np.int64: rng.integers(low, high, size).astype(dtype))
    cp.take = np.take
    cp.dot = _dot
    cp.RawModule = FakeRawModule
    pool = types.SimpleNamespace(free_bytes=lambda: 0)
    cp.get_default_memory_pool = lambda: pool
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, memGetInfo=lambda: (free_bytes, total_bytes))
    device = types.SimpleNamespace(use=lambda: None, attributes={"MultiProcessorCount": n_sm})
    memory = types.SimpleNamespace(OutOfMemoryError=type("OutOfMemoryError", (MemoryError,), {}))
    cp.cuda = types.SimpleNamespace(runtime=runtime, Device=lambda index=0: device, memory=memory)
    return cp


def _poisoned_empty(shape, dtype=float):
    dtype = np.dtype(dtype)
    return np.full(shape, np.nan, dtype) if dtype.kind == "f" else np.full(shape, -1, dtype)


def _dot(a, b, out=None):
    """cuBLAS fp16 GEMM: float32 accumulation, result rounded to the output type."""
    result = (a.astype(np.float32) @ b.astype(np.float32)).astype(a.dtype)
    if out is None:
        return result
    assert out.flags.c_contiguous and out.dtype == result.dtype and out.shape == result.shape
    out[...] = result
    return out


class FakeRawModule:
    def __init__(self, code, options=()):
        assert '#include "common.cuh"' not in code, "the header must be pasted in (CuPy's cache key)"
        assert "PYFORGE_CUDA_COMMON_CUH" in code
        self.names = set(re.findall(r'extern "C" __global__ void (\w+)\(', code))

    def get_function(self, name):
        assert name in self.names, f"no kernel {name} in this module"
        emulate = KERNELS[re.sub(r"_f(16|32)$", "", name) if name.startswith(_TYPED) else name]

        def launch(grid, block, args):
            assert len(block) == 1 and 0 < block[0] <= 1024 and block[0] % 32 == 0
            assert all(g > 0 for g in grid) and len(grid) <= 3
            emulate(name, grid, block[0], *args)
        return launch


_TYPED = ("rmsnorm", "rope", "silu_mul", "add_inplace", "add_bias")


# -- quant.cu --------------------------------------------------------------
def _qtype(name):
    return QTYPES[name.split("_", 1)[1].rsplit("_f16", 1)[0]]


def _dequant_blocks(raw, ggml_type, n_blocks):
    block, size = BLOCK_LAYOUT[ggml_type]
    flat = np.ascontiguousarray(raw).reshape(-1)[:n_blocks * size]
    return quant.dequantize(flat, int(ggml_type), n_blocks * block)


def dequant(name, grid, block, src, dst, n_blocks):
    t, flat = _qtype(name), dst.reshape(-1)
    if t == GGMLType.Q8_0:                          # one thread per weight
        n = min(int(n_blocks) * 32, grid[0] * block)
        flat[:n] = _dequant_blocks(src, t, int(n_blocks))[:n]
    else:                                           # one block of 256 threads per quant block, no bound check
        assert block == 256 and grid[0] == n_blocks
        flat[:grid[0] * 256] = _dequant_blocks(src, t, grid[0])


def matvec(name, grid, block, w, x, y, n_in, n_out):
    rows = min(int(n_out), grid[0] * (block // 32))    # one warp per output row
    weights = _dequant_blocks(w, _qtype(name), rows * int(n_in) // BLOCK_LAYOUT[_qtype(name)][0])
    xs = x.reshape(-1, int(n_in))[:grid[1]].astype(np.float32)
    y.reshape(-1, int(n_out))[:grid[1], :rows] = xs @ weights.reshape(rows, int(n_in)).T


# -- norm_rope.cu ----------------------------------------------------------
def rmsnorm(name, grid, block, x, w, out, d, eps):
    rows = x.reshape(-1, int(d))[:grid[0]].astype(np.float32)
    r = 1.0 / np.sqrt((rows * rows).mean(axis=1, keepdims=True) + np.float32(eps))
    out.reshape(-1, int(d))[:grid[0]] = rows * r * w


def rope(name, grid, block, x, positions, n_heads, head_dim, n_rot, theta, neox, freq_factors):
    half = int(n_rot) // 2
    xt = x.reshape(-1, int(n_heads), int(head_dim))[:grid[0]]
    inv = float(theta) ** (-2.0 * np.arange(half) / int(n_rot))
    if freq_factors is not None and not isinstance(freq_factors, np.integer):
        inv = inv / freq_factors.astype(np.float64)
    angle = positions[:grid[0], None].astype(np.float64) * inv        # [n_tok, half]
    c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    i0 = np.arange(half) if neox else 2 * np.arange(half)
    i1 = i0 + half if neox else i0 + 1
    x0, x1 = xt[:, :, i0].astype(np.float32), xt[:, :, i1].astype(np.float32)
    xt[:, :, i0], xt[:, :, i1] = x0 * c - x1 * s, x0 * s + x1 * c


def silu_mul(name, grid, block, gate, up, out, n):      # grid-stride loops: any grid covers n
    g = gate.reshape(-1)[:n].astype(np.float32)
    with np.errstate(over="ignore"):
        out.reshape(-1)[:n] = g * up.reshape(-1)[:n].astype(np.float32) / (1.0 + np.exp(-g))


def add_inplace(name, grid, block, x, y, n):
    x.reshape(-1)[:n] = x.reshape(-1)[:n].astype(np.float32) + y.reshape(-1)[:n].astype(np.float32)


def add_bias(name, grid, block, x, bias, n, d):
    flat = x.reshape(-1)
    flat[:n] = flat[:n].astype(np.float32) + np.resize(bias, int(n))


# -- attention.cu ----------------------------------------------------------
def _context(k_cache, v_cache, table, n_ctx, kv_head):
    """Keys and values [n_ctx, head_dim] of one sequence's first n_ctx positions."""
    bs = k_cache.shape[1]
    pos = np.arange(n_ctx)
    blocks = table[pos // bs]
    return (k_cache[blocks, pos % bs, kv_head].astype(np.float32),
            v_cache[blocks, pos % bs, kv_head].astype(np.float32))


def attention_prefill(name, grid, block, q, k_cache, v_cache, tables, ctx, qs, out,
                      n_tok, n_seq, n_heads, n_kv, head_dim, block_size, max_blocks, scale):
    assert k_cache.shape[1] == block_size and tables.shape == (n_seq, max_blocks)
    group = int(n_heads) // int(n_kv)
    for row in range(min(int(n_tok), grid[0] * (block // 32))):
        s = int(np.searchsorted(qs[1:n_seq + 1], row, side="right"))
        n_q = int(qs[s + 1] - qs[s])
        n_ctx = int(ctx[s]) - n_q + (row - int(qs[s])) + 1
        for h in range(grid[1]):
            keys, vals = _context(k_cache, v_cache, tables[s], n_ctx, h // group)
            sc = keys @ (q[row, h].astype(np.float32) * np.float32(scale))
            p = np.exp(sc - sc.max())
            out[row, h] = p @ vals / p.sum()


def attention_decode(name, grid, block, q, k_cache, v_cache, tables, ctx, qs, part_acc, part_ml,
                     n_heads, n_kv, head_dim, block_size, max_blocks, partition, scale):
    assert block == 128, "paged_attention_decode needs exactly 4 warps"
    group, acc_flat, ml_flat = int(n_heads) // int(n_kv), part_acc.reshape(-1), part_ml.reshape(-1)
    for h in range(grid[0]):
        for s in range(grid[1]):
            n_ctx = int(ctx[s])
            if qs[s + 1] == qs[s]:
                continue
            keys, vals = _context(k_cache, v_cache, tables[s], n_ctx, h // group)
            sc = keys @ (q[qs[s + 1] - 1, h].astype(np.float32) * np.float32(scale))
            for z in range(grid[2]):
                p0, p1 = z * int(partition), min((z + 1) * int(partition), n_ctx)
                if p0 >= n_ctx:
                    continue
                m = sc[p0:p1].max()
                e = np.exp(sc[p0:p1] - m)
                at = (s * int(n_heads) + h) * grid[2] + z      # the kernel's index: gridDim.z partitions
                acc_flat[at * int(head_dim):(at + 1) * int(head_dim)] = e @ vals[p0:p1]
                ml_flat[2 * at:2 * at + 2] = (m, e.sum())


def attention_decode_reduce(name, grid, block, part_acc, part_ml, ctx, qs, out, n_heads, head_dim, n_parts,
                            partition):
    acc_flat, ml_flat, hd = part_acc.reshape(-1), part_ml.reshape(-1), int(head_dim)
    for h in range(grid[0]):
        for s in range(grid[1]):
            if qs[s + 1] == qs[s]:
                continue
            used = min(int(n_parts), -(-int(ctx[s]) // int(partition)))
            at = (s * int(n_heads) + h) * int(n_parts)
            ms = np.array([ml_flat[2 * (at + z)] for z in range(used)], np.float64)
            ls = np.array([ml_flat[2 * (at + z) + 1] for z in range(used)], np.float64)
            w = np.exp(ms - ms.max())
            acc = sum(w[z] * acc_flat[(at + z) * hd:(at + z + 1) * hd].astype(np.float64) for z in range(used))
            out[qs[s + 1] - 1, h] = acc / (w @ ls)


def kv_store(name, grid, block, k, v, k_cache, v_cache, slots, row):
    kc, vc = k_cache.reshape(-1, int(row)), v_cache.reshape(-1, int(row))
    for t in range(grid[0]):
        if slots[t] >= 0:
            kc[slots[t]] = k.reshape(-1, int(row))[t]
            vc[slots[t]] = v.reshape(-1, int(row))[t]


KERNELS = {
    **{f"dequant_{q}_f16": dequant for q in QTYPES}, **{f"matvec_{q}_f16": matvec for q in QTYPES},
    "rmsnorm": rmsnorm, "rope": rope, "silu_mul": silu_mul, "add_inplace": add_inplace, "add_bias": add_bias,
    "paged_attention_prefill": attention_prefill, "paged_attention_decode": attention_decode,
    "paged_attention_decode_reduce": attention_decode_reduce, "kv_store_f16": kv_store,
}
