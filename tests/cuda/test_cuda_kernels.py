"""CUDA kernels (cuda/*.cu) against float64 numpy references.

They run on a CUDA device through CuPy when there is one, else on the CPU
through the CUDA emulator (tests/emulated_cupy.py, build_tools/cuda_emulator),
which executes the same source with real barriers and warp shuffles; TARGET
says which. Every output buffer is filled with NaN before its launch, so a
position a kernel fails to write cannot pass. Error bounds, elementwise, per
output dtype:
  float32 out: |err| <= 1e-5 |ref| + 1e-5 max|ref|   (float arithmetic)
  float16 out: |err| <= 2^-10 |ref| + atol            (one fp16 rounding, plus
               the float accumulation of the kernel, bounded per test)
Quantized weights are random bytes with finite scales (every bit pattern of
the packed integers occurs), dequantized by the `gguf` package.
"""
import functools

import numpy as np
import pytest
from emulated_cupy import make_emulated_cupy

from conftest import require_module
from pyforge.backends import cuda_status
from pyforge.backends.cuda_kernels import MATVEC_ROWS, compile_options, kernel_source


def _cupy_and_target():
    """Real CuPy with a device, else the emulated one."""
    ok, _ = cuda_status()
    if ok:
        import cupy
        return cupy, "gpu"
    return make_emulated_cupy(), "emulator"


cupy, TARGET = _cupy_and_target()
F16_RTOL = 2.0 ** -10
NULL = np.uint64(0)  # a NULL pointer argument


# -- launch helpers (the backend will own these) ----------------------------
@functools.lru_cache(maxsize=None)
def module(name):
    return cupy.RawModule(code=kernel_source(name), options=compile_options())


def launch(mod, kernel, grid, block, *args):
    module(mod).get_function(kernel)(tuple(grid), (block,), args)


def cdiv(a, b):
    return -(-a // b)


def elementwise_grid(n, block=256):
    return (min(cdiv(n, block), 65535),)


def nan_like(shape, dtype):
    return cupy.full(shape, np.nan, dtype=dtype)


def check(out, ref, rtol, atol):
    out = cupy.asnumpy(out).astype(np.float64)
    assert np.isfinite(out).all(), "kernel left NaN / inf in its output"
    err = np.abs(out - ref)
    bound = rtol * np.abs(ref) + atol
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"at {worst}: got {out[worst]}, want {ref[worst]} (bound {bound[worst]})"


# -- quantized weights --------------------------------------------------------
# type name: (weights per block, bytes per block, offsets of fp16 scale fields)
QTYPES = {"Q8_0": (32, 34, (0,)), "Q4_K": (256, 144, (0, 2)), "Q6_K": (256, 210, (208,))}


def random_quant(qtype, n_rows, n_in, rng):
    """Random GGUF rows [n_rows, row_bytes] uint8 and their float64 weights [n_rows, n_in]."""
    gguf = require_module("gguf")
    bs, nbytes, scale_offs = QTYPES[qtype]
    nb = n_in // bs
    raw = rng.integers(0, 256, size=(n_rows * nb, nbytes), dtype=np.uint8)
    for off in scale_offs:
        d = rng.uniform(0.001, 0.05, size=n_rows * nb).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(n_rows, nb * nbytes)
    ref = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))
    return raw, np.asarray(ref, dtype=np.float64).reshape(n_rows, n_in)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n_rows,n_blocks", [(1, 1), (3, 2), (17, 11)])
def test_dequantize(qtype, n_rows, n_blocks):
    rng = np.random.default_rng(n_rows * 100 + n_blocks)
    bs = QTYPES[qtype][0]
    raw, ref = random_quant(qtype, n_rows, n_blocks * bs, rng)
    total = n_rows * n_blocks
    out = nan_like(total * bs, np.float16)
    grid = (cdiv(total * bs, 256),) if qtype == "Q8_0" else (total,)
    launch("quant", f"dequant_{qtype.lower().replace('_k', '_K')}_f16", grid, 256,
           cupy.asarray(raw), out, np.int64(total))
    check(out.reshape(n_rows, -1), ref, F16_RTOL, 1e-7 * np.abs(ref).max() + 6e-8)


MATVEC_SHAPES = [(1, 256, 1), (37, 512, 1), (130, 2048, 3), (5, 4096, 8), (66, 512, 19)]


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("n_out,n_in,n_x", MATVEC_SHAPES + [(9, 96, 2)])
def test_matvec(qtype, n_out, n_in, n_x):
    if n_in % QTYPES[qtype][0]:
        pytest.skip(f"{n_in} is not a whole number of {qtype} blocks")
    rng = np.random.default_rng(n_out * 7 + n_in + n_x)
    raw, w = random_quant(qtype, n_out, n_in, rng)
    x = rng.standard_normal((n_x, n_in)).astype(np.float16)
    ref = x.astype(np.float64) @ w.T  # [n_x, n_out]
    mag = np.abs(x.astype(np.float64)) @ np.abs(w).T
    y = nan_like((n_x, n_out), np.float16)
    warps = 4               # quant.cu: 4 warps a block, MV_ROWS (= MATVEC_ROWS) rows of x per warp
    launch("quant", f"matvec_{qtype.lower().replace('_k', '_K')}_f16", (cdiv(n_out, warps), cdiv(n_x, MATVEC_ROWS)),
           32 * warps, cupy.asarray(raw), cupy.asarray(x), y, np.int32(n_in), np.int32(n_out), np.int32(n_x))
    # float accumulation (Q4_K subtracts dmin * m terms of the size of |w|): 1e-5 of sum |w x|
    out = cupy.asnumpy(y).astype(np.float64)
    assert np.isfinite(out).all()
    assert (np.abs(out - ref) <= F16_RTOL * np.abs(ref) + 1e-5 * mag + 1e-4).all()


@pytest.mark.parametrize("n_out,n_in,n_x", [(1, 8, 1), (37, 264, 1), (130, 2048, 3), (5, 4096, 8), (66, 520, 19)])
def test_matvec_f16(n_out, n_in, n_x):
    rng = np.random.default_rng(n_out + n_in + n_x)
    w = (rng.standard_normal((n_out, n_in)) * 0.05).astype(np.float16)
    x = rng.standard_normal((n_x, n_in)).astype(np.float16)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    y = nan_like((n_x, n_out), np.float16)
    launch("quant", "matvec_f16_f16", (cdiv(n_out, 4), cdiv(n_x, MATVEC_ROWS)), 128, cupy.asarray(w),
           cupy.asarray(x), y, np.int32(n_in), np.int32(n_out), np.int32(n_x))
    out = cupy.asnumpy(y).astype(np.float64)
    assert np.isfinite(out).all()
    assert (np.abs(out - ref) <= F16_RTOL * np.abs(ref) + 1e-6 * mag + 1e-5).all()


# -- norm, rope, elementwise --------------------------------------------------
DTYPES = {"f32": (np.float32, 1e-5), "f16": (np.float16, F16_RTOL)}


@pytest.mark.parametrize("t", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 64), (7, 2048), (3, 5000)])
def test_rmsnorm(t, n, d):
    dtype, rtol = DTYPES[t]
    rng = np.random.default_rng(n + d)
    x = (rng.standard_normal((n, d)) * 3).astype(dtype)
    w = rng.uniform(0.5, 1.5, d).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + 1e-6) * w
    out = nan_like((n, d), dtype)
    launch("norm_rope", f"rmsnorm_{t}", (n,), 256, cupy.asarray(x), cupy.asarray(w), out, np.int32(d),
           np.float32(1e-6))
    check(out, ref, rtol, 1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("t", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 64), (7, 2048), (3, 5000)])
def test_add_rmsnorm(t, n, d):
    dtype, rtol = DTYPES[t]
    rng = np.random.default_rng(n + d + 1)
    x = (rng.standard_normal((n, d)) * 3).astype(dtype)
    y = rng.standard_normal((n, d)).astype(dtype)
    w = rng.uniform(0.5, 1.5, d).astype(np.float32)
    summed = (x.astype(np.float64) + y).astype(dtype).astype(np.float64)     # stored as add_inplace stores it
    ref = summed / np.sqrt((summed ** 2).mean(axis=1, keepdims=True) + 1e-6) * w
    xd, out = cupy.asarray(x), nan_like((n, d), dtype)
    launch("norm_rope", f"add_rmsnorm_{t}", (n,), 256, xd, cupy.asarray(y), cupy.asarray(w), out, np.int32(d),
           np.float32(1e-6))
    check(xd, summed, rtol, 1e-7)
    check(out, ref, rtol, 1e-5 * np.abs(ref).max())


def layernorm_ref(x64, w, b, eps):
    centered = x64 - x64.mean(axis=1, keepdims=True)
    return centered / np.sqrt((centered ** 2).mean(axis=1, keepdims=True) + eps) * w + b


@pytest.mark.parametrize("t", DTYPES)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("n,d", [(1, 64), (3, 5000)])
def test_layernorm(t, fused, n, d):
    """layernorm_* and add_layernorm_* (x += y first) on rows with a large mean."""
    dtype, rtol = DTYPES[t]
    rng = np.random.default_rng(n + d + 2)
    x = (rng.standard_normal((n, d)) * 3 + 4).astype(dtype)
    y = rng.standard_normal((n, d)).astype(dtype)
    w, b = rng.uniform(0.5, 1.5, d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    summed = (x.astype(np.float64) + y).astype(dtype).astype(np.float64) if fused else x.astype(np.float64)
    ref = layernorm_ref(summed, w, b, 1e-5)
    xd, out = cupy.asarray(x), nan_like((n, d), dtype)
    if fused:
        launch("norm_rope", f"add_layernorm_{t}", (n,), 256, xd, cupy.asarray(y), cupy.asarray(w), cupy.asarray(b),
               out, np.int32(d), np.float32(1e-5))
    else:
        launch("norm_rope", f"layernorm_{t}", (n,), 256, xd, cupy.asarray(w), cupy.asarray(b), out, np.int32(d),
               np.float32(1e-5))
    check(xd, summed, rtol, 1e-7)
    check(out, ref, rtol, 1e-5 * np.abs(ref).max())


def rope_ref(x, pos, n_rot, theta, neox, ff, mscale=1.0):
    """x [n_tok, n_heads, hd] float64, rotated (and the rotated dims scaled) as native/ops_kernels.c does."""
    x = x.copy()
    half = n_rot // 2
    inv = theta ** (-2.0 * np.arange(half) / n_rot)
    if ff is not None:
        inv = inv / ff
    a = pos[:, None].astype(np.float64) * inv  # [n_tok, half]
    c, s = mscale * np.cos(a)[:, None, :], mscale * np.sin(a)[:, None, :]
    i0 = np.arange(half) if neox else 2 * np.arange(half)
    i1 = i0 + half if neox else i0 + 1
    x0, x1 = x[:, :, i0].copy(), x[:, :, i1].copy()
    x[:, :, i0], x[:, :, i1] = x0 * c - x1 * s, x0 * s + x1 * c
    return x


@pytest.mark.parametrize("t", DTYPES)
@pytest.mark.parametrize("neox", [0, 1])
@pytest.mark.parametrize("with_ff", [False, True])
@pytest.mark.parametrize("n_tok,n_heads,hd,n_rot", [(1, 4, 64, 64), (9, 8, 128, 128), (5, 3, 128, 64)])
def test_rope(t, neox, with_ff, n_tok, n_heads, hd, n_rot):
    dtype, rtol = DTYPES[t]
    rng = np.random.default_rng(n_tok * 31 + hd + neox)
    x = rng.standard_normal((n_tok, n_heads, hd)).astype(dtype)
    pos = rng.integers(0, 100_000, n_tok).astype(np.int32)
    ff = rng.uniform(1.0, 8.0, n_rot // 2).astype(np.float32) if with_ff else None
    mscale = 1.19 if with_ff else 1.0     # longrope's attention factor comes with its factors
    ref = rope_ref(x.astype(np.float64), pos, n_rot, 10000.0, neox, None if ff is None else ff.astype(np.float64),
                   mscale)
    xd = cupy.asarray(x)
    launch("norm_rope", f"rope_{t}", (n_tok,), 128, xd, cupy.asarray(pos), np.int32(n_heads), np.int32(hd),
           np.int32(n_rot), np.float32(10000.0), np.int32(neox), NULL if ff is None else cupy.asarray(ff),
           np.float32(mscale))
    check(xd, ref, rtol, 4 * rtol * np.abs(ref).max())  # in place: no poisoning, every value is compared


@pytest.mark.parametrize("t", DTYPES)
@pytest.mark.parametrize("n", [1, 1000, 300_001])
def test_elementwise(t, n):
    dtype, rtol = DTYPES[t]
    rng = np.random.default_rng(n)
    g = (rng.standard_normal(n) * 6).astype(dtype)
    u = rng.standard_normal(n).astype(dtype)
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    out = nan_like(n, dtype)
    launch("norm_rope", f"silu_mul_{t}", elementwise_grid(n), 256, cupy.asarray(g), cupy.asarray(u), out, np.int64(n))
    ref = g64 * u64 / (1 + np.exp(-g64))
    check(out, ref, rtol, 1e-6 * np.abs(ref).max())

    x = cupy.asarray(g)
    launch("norm_rope", f"add_inplace_{t}", elementwise_grid(n), 256, x, cupy.asarray(u), np.int64(n))
    check(x, g64 + u64, rtol, 1e-7)

    x = cupy.asarray(g)
    launch("norm_rope", f"scale_{t}", elementwise_grid(n), 256, x, np.float32(0.37), np.int64(n))
    check(x, g64 * np.float64(np.float32(0.37)), rtol, 1e-7)

    d = 1 if n == 1 else 1000
    bias = rng.standard_normal(d).astype(np.float32)
    x = cupy.asarray(g)
    launch("norm_rope", f"add_bias_{t}", elementwise_grid(n), 256, x, cupy.asarray(bias), np.int64(n), np.int32(d))
    check(x, g64 + np.resize(bias.astype(np.float64), n), rtol, 1e-7)


def gelu_tanh_ref(g):
    """GELU's tanh approximation as its definition writes it (float64)."""
    return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))


@pytest.mark.parametrize("t", DTYPES)
@pytest.mark.parametrize("n", [1, 1000, 300_001])
def test_gelu_tanh_mul_and_softcap(t, n):
    dtype, rtol = DTYPES[t]
    rng = np.random.default_rng(n + 5)
    g = (rng.standard_normal(n) * 6).astype(dtype)
    u = rng.standard_normal(n).astype(dtype)
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    out = nan_like(n, dtype)
    launch("norm_rope", f"gelu_tanh_mul_{t}", elementwise_grid(n), 256, cupy.asarray(g), cupy.asarray(u), out,
           np.int64(n))
    ref = gelu_tanh_ref(g64) * u64
    check(out, ref, rtol, 1e-6 * np.abs(ref).max())

    x = cupy.asarray(g * 8)      # |x| up to ~200: the cap of 30 bends most of them
    launch("norm_rope", f"softcap_{t}", elementwise_grid(n), 256, x, np.int64(n), np.float32(30.0))
    check(x, 30.0 * np.tanh(g64 * 8 / 30.0), rtol, 1e-6 * 30.0)


# -- paged attention ------------------------------------------------------------
def build_batch(seqs, n_heads, n_kv, hd, block_size, rng):
    """seqs: (n_q, context_len) per sequence. Returns host arrays of a batch whose
    blocks are scattered through a shuffled pool (plus unused blocks)."""
    need = [cdiv(L, block_size) for _, L in seqs]
    max_blocks = max(max(need), 1)
    n_blocks = sum(need) + 5
    perm = rng.permutation(n_blocks).astype(np.int32)
    tables = np.full((len(seqs), max_blocks), -1, np.int32)
    at = 0
    for s, nb in enumerate(need):
        tables[s, :nb] = perm[at:at + nb]
        at += nb
    shape = (n_blocks, block_size, n_kv, hd)
    k_cache = rng.standard_normal(shape).astype(np.float16)
    v_cache = rng.standard_normal(shape).astype(np.float16)
    qs = np.concatenate([[0], np.cumsum([nq for nq, _ in seqs])]).astype(np.int32)
    ctx = np.array([L for _, L in seqs], np.int32)
    q = rng.standard_normal((int(qs[-1]), n_heads, hd)).astype(np.float16)
    return q, k_cache, v_cache, tables, ctx, qs


def attention_ref(q, k_cache, v_cache, tables, ctx, qs, scale, window=0, softcap=0.0):
    """float64 [n_tok, n_heads, hd], the semantics of pf_paged_attention: a row at position p
    sees (p - window, p] when window > 0; scores soft-capped to softcap * tanh(s / softcap)."""
    n_tok, n_heads, hd = q.shape
    bs, n_kv = k_cache.shape[1], k_cache.shape[2]
    out = np.zeros((n_tok, n_heads, hd))
    for s in range(len(ctx)):
        n_q, L = qs[s + 1] - qs[s], int(ctx[s])
        pos = np.arange(L)
        keys = k_cache[tables[s, pos // bs], pos % bs].astype(np.float64)  # [L, n_kv, hd]
        vals = v_cache[tables[s, pos // bs], pos % bs].astype(np.float64)
        for j in range(n_q):
            row, n_ctx = qs[s] + j, L - n_q + j + 1
            first = max(0, n_ctx - window) if window else 0
            for h in range(n_heads):
                kv = h // (n_heads // n_kv)
                sc = scale * keys[first:n_ctx, kv] @ q[row, h].astype(np.float64)
                if softcap:
                    sc = softcap * np.tanh(sc / softcap)
                p = np.exp(sc - sc.max())
                out[row, h] = p @ vals[first:n_ctx, kv] / p.sum()
    return out


HEADS = [(4, 4, 64, 16), (8, 2, 128, 16), (4, 1, 256, 8)]  # n_heads, n_kv, head_dim, block_size


def attention_args(batch):
    q, k_cache, v_cache, tables, ctx, qs = (cupy.asarray(a) for a in batch)
    return q, k_cache, v_cache, tables, ctx, qs


# (window, softcap): full causal; Mistral-style window; Gemma 2 (window and a soft cap, scores
# scaled up so that the cap bends them)
WINDOWS = [(0, 0.0), (7, 0.0), (16, 2.0)]


@pytest.mark.parametrize("n_heads,n_kv,hd,block_size", HEADS)
@pytest.mark.parametrize("window,softcap", WINDOWS)
def test_attention_prefill(n_heads, n_kv, hd, block_size, window, softcap):
    rng = np.random.default_rng(n_heads * hd + block_size)
    seqs = [(5, 5), (3, 20), (1, 33), (0, 7), (17, 40), (1, 1)]  # mixed prefill, chunked prefill, decode
    batch = build_batch(seqs, n_heads, n_kv, hd, block_size, rng)
    scale = (4.0 if softcap else 1.0) / np.sqrt(hd)
    ref = attention_ref(*batch, scale, window, softcap)
    q, k_cache, v_cache, tables, ctx, qs = attention_args(batch)
    n_tok = q.shape[0]
    out = nan_like(q.shape, np.float16)
    launch("attention", "paged_attention_prefill", (cdiv(n_tok, 4), n_heads), 128,
           q, k_cache, v_cache, tables, ctx, qs, out, np.int32(n_tok), np.int32(len(seqs)), np.int32(n_heads),
           np.int32(n_kv), np.int32(hd), np.int32(block_size), np.int32(tables.shape[1]), np.float32(scale),
           np.int32(window), np.float32(softcap))
    check(out, ref, F16_RTOL, 2e-4)


@pytest.mark.parametrize("n_heads,n_kv,hd,block_size", HEADS)
@pytest.mark.parametrize("partition", [64, 256])
@pytest.mark.parametrize("window,softcap", WINDOWS + [(100, 0.0)])
def test_attention_decode(n_heads, n_kv, hd, block_size, partition, window, softcap):
    """Windows shorter than a partition, and one (100) that starts inside one."""
    rng = np.random.default_rng(n_heads * hd + block_size + partition)
    seqs = [(1, 1), (1, 17), (0, 9), (1, 300), (1, 1000), (1, 2049)]
    batch = build_batch(seqs, n_heads, n_kv, hd, block_size, rng)
    scale = (4.0 if softcap else 1.0) / np.sqrt(hd)
    ref = attention_ref(*batch, scale, window, softcap)
    q, k_cache, v_cache, tables, ctx, qs = attention_args(batch)
    n_seq, n_parts = len(seqs), cdiv(int(batch[4].max()), partition)
    part_acc = nan_like((n_seq, n_heads, n_parts, hd), np.float32)
    part_ml = nan_like((n_seq, n_heads, n_parts, 2), np.float32)
    out = nan_like(q.shape, np.float16)
    launch("attention", "paged_attention_decode", (n_heads, n_seq, n_parts), 128,
           q, k_cache, v_cache, tables, ctx, qs, part_acc, part_ml, np.int32(n_heads), np.int32(n_kv),
           np.int32(hd), np.int32(block_size), np.int32(tables.shape[1]), np.int32(partition), np.float32(scale),
           np.int32(window), np.float32(softcap))
    launch("attention", "paged_attention_decode_reduce", (n_heads, n_seq), 128,
           part_acc, part_ml, ctx, qs, out, np.int32(n_heads), np.int32(hd), np.int32(n_parts), np.int32(partition))
    check(out, ref, F16_RTOL, 2e-4)


def test_kv_store():
    rng = np.random.default_rng(3)
    n_blocks, bs, n_kv, hd, n_tok = 6, 16, 2, 64, 10
    k = rng.standard_normal((n_tok, n_kv, hd)).astype(np.float16)
    v = rng.standard_normal((n_tok, n_kv, hd)).astype(np.float16)
    slots = rng.choice(n_blocks * bs, n_tok, replace=False).astype(np.int32)
    slots[3] = -1  # padding: skipped
    k_cache = nan_like((n_blocks, bs, n_kv, hd), np.float16)
    v_cache = nan_like((n_blocks, bs, n_kv, hd), np.float16)
    launch("attention", "kv_store_f16", (n_tok,), 128, cupy.asarray(k), cupy.asarray(v), k_cache, v_cache,
           cupy.asarray(slots), np.int32(n_kv * hd))
    kc, vc = cupy.asnumpy(k_cache).reshape(-1, n_kv, hd), cupy.asnumpy(v_cache).reshape(-1, n_kv, hd)
    keep = slots >= 0
    np.testing.assert_array_equal(kc[slots[keep]], k[keep])
    np.testing.assert_array_equal(vc[slots[keep]], v[keep])
    untouched = np.setdiff1d(np.arange(n_blocks * bs), slots[keep])
    assert np.isnan(kc[untouched].astype(np.float32)).all()


# -- fp8 e4m3 KV cache --------------------------------------------------------------

def fp8_to_float64(raw):
    """Bytes as fp8 e4m3fn values, by torch's own dtype (the external reference)."""
    torch = require_module("torch")
    return torch.from_numpy(np.ascontiguousarray(raw)).view(torch.float8_e4m3fn).to(torch.float64).numpy()


def fp8_batch(seqs, n_heads, n_kv, hd, block_size, rng):
    """build_batch with fp8 caches: every byte but the two NaNs, at random; per kv head
    scales that keep values within a few units. Returns the launch arrays and, for the
    reference, the caches as the float64 values they stand for."""
    q, k16, _, tables, ctx, qs = build_batch(seqs, n_heads, n_kv, hd, block_size, rng)
    codes = np.setdiff1d(np.arange(256), [0x7F, 0xFF]).astype(np.uint8)
    k_raw, v_raw = (rng.choice(codes, k16.shape) for _ in range(2))
    k_scale, v_scale = (rng.uniform(0.002, 0.01, n_kv).astype(np.float32) for _ in range(2))
    k_ref = fp8_to_float64(k_raw) * k_scale[:, None]     # [n_blocks, bs, n_kv, hd] x [n_kv, 1]
    v_ref = fp8_to_float64(v_raw) * v_scale[:, None]
    return (q, k_raw, v_raw, tables, ctx, qs, k_scale, v_scale), (q, k_ref, v_ref, tables, ctx, qs)


@pytest.mark.parametrize("n_heads,n_kv,hd,block_size", HEADS)
@pytest.mark.parametrize("window,softcap", WINDOWS)
def test_attention_prefill_fp8(n_heads, n_kv, hd, block_size, window, softcap):
    rng = np.random.default_rng(n_heads * hd + block_size + 1)
    seqs = [(5, 5), (3, 20), (1, 33), (0, 7), (17, 40), (1, 1)]
    launch_args, ref_args = fp8_batch(seqs, n_heads, n_kv, hd, block_size, rng)
    scale = (4.0 if softcap else 1.0) / np.sqrt(hd)
    ref = attention_ref(*ref_args, scale, window, softcap)
    q, k_cache, v_cache, tables, ctx, qs, k_scale, v_scale = (cupy.asarray(a) for a in launch_args)
    n_tok = q.shape[0]
    out = nan_like(q.shape, np.float16)
    launch("attention", "paged_attention_prefill_fp8", (cdiv(n_tok, 4), n_heads), 128,
           q, k_cache, v_cache, tables, ctx, qs, out, np.int32(n_tok), np.int32(len(seqs)), np.int32(n_heads),
           np.int32(n_kv), np.int32(hd), np.int32(block_size), np.int32(tables.shape[1]), np.float32(scale),
           np.int32(window), np.float32(softcap), k_scale, v_scale)
    check(out, ref, F16_RTOL, 2e-4 * np.abs(ref).max())


@pytest.mark.parametrize("n_heads,n_kv,hd,block_size", HEADS[:2])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (100, 2.0)])
def test_attention_decode_fp8(n_heads, n_kv, hd, block_size, window, softcap):
    rng = np.random.default_rng(n_heads * hd + block_size + 2)
    seqs = [(1, 1), (1, 17), (0, 9), (1, 300), (1, 700)]
    launch_args, ref_args = fp8_batch(seqs, n_heads, n_kv, hd, block_size, rng)
    scale = (4.0 if softcap else 1.0) / np.sqrt(hd)
    ref = attention_ref(*ref_args, scale, window, softcap)
    q, k_cache, v_cache, tables, ctx, qs, k_scale, v_scale = (cupy.asarray(a) for a in launch_args)
    partition = 64
    n_seq, n_parts = len(seqs), cdiv(int(launch_args[4].max()), partition)
    part_acc = nan_like((n_seq, n_heads, n_parts, hd), np.float32)
    part_ml = nan_like((n_seq, n_heads, n_parts, 2), np.float32)
    out = nan_like(q.shape, np.float16)
    launch("attention", "paged_attention_decode_fp8", (n_heads, n_seq, n_parts), 128,
           q, k_cache, v_cache, tables, ctx, qs, part_acc, part_ml, np.int32(n_heads), np.int32(n_kv),
           np.int32(hd), np.int32(block_size), np.int32(tables.shape[1]), np.int32(partition), np.float32(scale),
           np.int32(window), np.float32(softcap), k_scale, v_scale)
    launch("attention", "paged_attention_decode_reduce", (n_heads, n_seq), 128,
           part_acc, part_ml, ctx, qs, out, np.int32(n_heads), np.int32(hd), np.int32(n_parts), np.int32(partition))
    check(out, ref, F16_RTOL, 2e-4 * np.abs(ref).max())


def test_kv_store_fp8():
    """Stored bytes equal torch's float8_e4m3fn rounding of value / scale (nearest even:
    ties, subnormals, zero and -0 included), values past 448 saturate, padding is skipped."""
    torch = require_module("torch")
    rng = np.random.default_rng(4)
    n_blocks, bs, n_kv, hd, n_tok = 6, 16, 2, 64, 10
    scales = np.array([0.5, 0.03125], np.float32)                      # powers of 2: value / scale is exact
    k = (rng.standard_normal((n_tok, n_kv, hd)) * 4).astype(np.float16)
    v = (rng.standard_normal((n_tok, n_kv, hd)) * 4).astype(np.float16)
    k[0, 0, :8] = [0.0, -0.0, 2.0 ** -10, 2.0 ** -11 * 3, 2.0 ** -8 * 0.5, 1.0625 * 0.5, 1.1875 * 0.5, 300.0]
    k[0, 1, :3] = [2.0 ** -10, 2.0 ** -10 * 1.5, 15.0]                # 15 / 0.03125 = 480: saturates
    slots = rng.choice(n_blocks * bs, n_tok, replace=False).astype(np.int32)
    slots[3] = -1
    k_cache = cupy.zeros((n_blocks, bs, n_kv, hd), np.uint8)
    v_cache = cupy.zeros((n_blocks, bs, n_kv, hd), np.uint8)
    launch("attention", "kv_store_fp8", (n_tok,), 128, cupy.asarray(k), cupy.asarray(v), k_cache, v_cache,
           cupy.asarray(slots), cupy.asarray(scales), cupy.asarray(scales), np.int32(n_kv), np.int32(hd))
    keep = slots >= 0
    for cache, x in ((k_cache, k), (v_cache, v)):
        scaled = np.clip(x.astype(np.float32) / scales[:, None], -448, 448)   # saturation, then torch's rounding
        want = torch.from_numpy(scaled).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        got = cupy.asnumpy(cache).reshape(-1, n_kv, hd)
        np.testing.assert_array_equal(got[slots[keep]], want[keep])
        untouched = np.setdiff1d(np.arange(n_blocks * bs), slots[keep])
        assert not got[untouched].any()
    assert cupy.asnumpy(k_cache).reshape(-1, n_kv, hd)[slots[0], 1, 2] == 0x7E        # 480 -> 448


# -- sampling on the device ---------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_greedy_tokens_are_the_host_samplers(dtype):
    """Each row's token is the native sampler's greedy pick (NaN skipped, ties to the lower
    id, the first -inf when nothing is larger, id 0 for an all-NaN row) and its logprob the
    host's raw logprob; rows of 1 to 40000 logits, fewer or more than the block's threads."""
    from pyforge.native import sampler as ns
    rng = np.random.default_rng(11)
    for vocab in (1, 7, 255, 4097, 40000):
        x = (rng.standard_normal((6, vocab)) * 4).astype(dtype)
        if vocab > 1:
            x[1, [vocab // 3, vocab - 1]] = x[1].max() + 1          # a tie: the lower id wins
            x[2, : vocab // 2] = np.nan                             # NaNs, the max after them
            x[3] = -np.inf
            x[3, vocab - 1] = np.nan                                # nothing above -inf: the first -inf
        x[4] = np.nan                                               # all NaN: id 0
        logits32 = x.astype(np.float32)
        n = len(x)
        state = np.zeros(n, np.uint64)
        want, want_lp, *_ = ns.sample(logits32.copy(), np.zeros(n, np.float32), np.zeros(n, np.int32),
                                      np.ones(n, np.float32), np.zeros(n, np.float32), np.ones(n, np.float32),
                                      np.zeros(n, np.float32), np.zeros(n, np.float32),
                                      np.zeros(n + 1, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32),
                                      state)
        tokens, logprobs = cupy.full(n, -7, np.int32), nan_like(n, np.float32)
        launch("sampling", "greedy_tokens_f16" if dtype == np.float16 else "greedy_tokens_f32", (n,), 256,
               cupy.asarray(x), np.int32(vocab), tokens, logprobs)
        np.testing.assert_array_equal(cupy.asnumpy(tokens), want, err_msg=f"vocab {vocab}")
        finite = [0, 1, 2, 5] if vocab > 1 else [0, 5]
        np.testing.assert_allclose(cupy.asnumpy(logprobs)[finite], want_lp[finite], rtol=1e-5, atol=1e-5)
