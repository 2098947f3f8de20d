"""pyforge.native.quant against gguf-py (the reference GGUF codec) and float64 numpy.

- dequantize: bit for bit equal to gguf.quants.dequantize on random blocks
  (random bytes, fp16 scale fields overwritten with finite random halves).
- quantize: Q4_0 / Q8_0 / F16 / BF16 bytes equal gguf.quants.quantize's;
  K-quants (gguf-py cannot quantize them) round-trip through gguf-py's
  dequantizer within the stated error per type.
- matmul: float64 x @ W.T of the gguf-dequantized weights, within the bound
  that activation quantization explains (see matmul_bound); plus a tight check
  against the same activations quantized by a numpy model, and SIMD (AVX2,
  and AMX tiles where the CPU has them) == scalar up to float summation order.
"""
import numpy as np
import pytest

from pyforge.ggml_types import BLOCK_LAYOUT, GGMLType as T
from pyforge.native import quant

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GQ  # noqa: E402

QUANTIZED = [T.Q4_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
DENSE = [T.F32, T.F16, T.BF16]
ALL_TYPES = DENSE + QUANTIZED
K_QUANTS = {T.Q4_K, T.Q5_K, T.Q6_K}
# byte offsets of the fp16 scale fields in each block (see native/quants.h)
HALF_FIELDS = {T.Q4_0: [0], T.Q8_0: [0], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
needs_simd = pytest.mark.skipif(not quant.simd_available(), reason="built without AVX2/FMA")
needs_amx = pytest.mark.skipif(not quant.amx_available(), reason="no AMX-INT8 on this CPU (or PYFORGE_DISABLE_AMX)")
needs_vnni = pytest.mark.skipif(not quant.vnni_available(),
                                reason="no AVX-512 VNNI on this CPU (or PYFORGE_DISABLE_VNNI)")
needs_x16 = pytest.mark.skipif(quant.x16_kernels() is None, reason="no x16 kernels here (or PYFORGE_DISABLE_X16)")
# the x16 kernel families, each where it runs (a VNNI host runs the AVX2 tiles too)
X16_FAMILIES = [pytest.param("avx2", marks=needs_x16), pytest.param("vnni", marks=needs_vnni)]


AMX_TYPES = {T.Q4_K, T.Q6_K}
VNNI_TYPES = K_QUANTS | set(DENSE)  # dense: the AVX-512 prefill tile


def type_kernel_params(types):
    """(type, kernels) for every kernel family that covers the type: AMX
    tiles (batched Q4_K / Q6_K), AVX-512 VNNI (K-quants; for F32 / F16 / BF16
    the AVX-512 prefill tile), AVX2, and the scalar references."""
    params = []
    for t in types:
        if t in AMX_TYPES:
            params.append(pytest.param(t, "amx", id=f"{t.name}-amx", marks=needs_amx))
        if t in VNNI_TYPES:
            params.append(pytest.param(t, "vnni", id=f"{t.name}-vnni", marks=needs_vnni))
        params.append(pytest.param(t, "avx2", id=f"{t.name}-avx2", marks=needs_simd))
        params.append(pytest.param(t, "scalar", id=f"{t.name}-scalar"))
    return params


# -- helpers -------------------------------------------------------------------

def finite_halves(rng, n, lo_exp=-14, hi_exp=3):
    """n random finite fp16 values, signs and magnitudes 2^lo_exp .. 2^hi_exp."""
    mag = rng.uniform(1.0, 2.0, n) * 2.0 ** rng.integers(lo_exp, hi_exp, n)
    return (mag * rng.choice([-1.0, 1.0], n)).astype(np.float16)


def random_weights(t, n_weights, rng):
    """Raw bytes of n_weights weights of type t: random bits, finite scales."""
    if t == T.F32:
        return rng.standard_normal(n_weights).astype(np.float32)
    if t == T.F16:
        return rng.standard_normal(n_weights).astype(np.float16)
    if t == T.BF16:
        return (rng.standard_normal(n_weights).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    block, size = BLOCK_LAYOUT[t]
    raw = rng.integers(0, 256, (n_weights // block, size), dtype=np.uint8)
    for off in HALF_FIELDS[t]:
        raw[:, off:off + 2] = finite_halves(rng, len(raw), -8, -2).view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


def gguf_dequantize(raw, t):
    """float32 weights as gguf-py decodes raw bytes of type t."""
    if t == T.F32:
        return raw.view(np.float32).copy()
    if t == T.F16:
        return raw.view(np.float16).astype(np.float32)
    return gguf.quants.dequantize(raw.view(np.uint8), GQ(int(t))).reshape(-1)


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# -- half converters (the portable path the F16C build never runs) --------------

def test_scalar_half_to_float_all_patterns():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours, ref = quant._half_to_float_scalar(h), h.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(bits(ours)[~nan], bits(ref)[~nan])


def test_scalar_float_to_half_rounding():
    rng = np.random.default_rng(0)
    # every exponent from below the smallest subnormal to above the largest half
    f = (rng.uniform(1, 2, 200_000) * 2.0 ** rng.integers(-27, 18, 200_000)).astype(np.float32)
    f *= rng.choice([-1, 1], f.size).astype(np.float32)
    # exact ties between neighbouring halves, normal and subnormal, and the edges
    h = np.arange(0, 0x7c00, 7, dtype=np.uint16)
    mid = ((h.view(np.float16).astype(np.float64) + (h + 1).view(np.float16).astype(np.float64)) / 2)
    edges = np.array([0.0, -0.0, 65504, 65519.996, 65520, 1e9, np.inf, -np.inf, 2**-25, 2**-24, 2**-14])
    f = np.concatenate([f, mid.astype(np.float32), edges.astype(np.float32)])
    with np.errstate(over="ignore"):
        ref = f.astype(np.float16).view(np.uint16)
    assert np.array_equal(quant._float_to_half_scalar(f), ref)
    assert np.isnan(quant._float_to_half_scalar(np.float32([np.nan])).view(np.float16)).all()


# -- dequantize ----------------------------------------------------------------

@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_bit_for_bit(t):
    rng = np.random.default_rng(int(t))
    raw = random_weights(t, 64 * 256, rng)
    if t == T.F16:  # every finite half, subnormals and -0 included
        h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
        raw = h[(h & 0x7c00) != 0x7c00].view(np.float16)
    if t == T.BF16:  # any bits, NaN and inf included
        raw = rng.integers(0, 1 << 16, raw.size, dtype=np.uint32).astype(np.uint16)
    n = raw.size if t in DENSE else 64 * 256
    ours = quant.dequantize(raw, int(t), n)
    assert ours.dtype == np.float32 and ours.shape == (n,)
    assert np.array_equal(bits(ours), bits(gguf_dequantize(raw, t)))


def test_dequantize_accepts_read_only_views():
    rng = np.random.default_rng(5)
    raw = random_weights(T.Q4_K, 512, rng).reshape(2, -1)
    raw.setflags(write=False)
    ours = quant.dequantize(raw[1], int(T.Q4_K), 256)
    assert np.array_equal(bits(ours), bits(gguf_dequantize(raw[1], T.Q4_K)))


# -- quantize ------------------------------------------------------------------

def weight_rows(rng, rows, cols):
    """Gaussian rows of different scales, plus the awkward cases: a zero row,
    a constant row, a row whose first element is -0.0, one huge outlier."""
    x = rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3.0, (rows, 1))
    x[0] = 0.0
    x[1] = 0.25
    x[2, 0] = -0.0
    x[3, 5] = 40.0
    return x.astype(np.float32)


@pytest.mark.parametrize("t", [T.F16, T.BF16, T.Q4_0, T.Q8_0], ids=lambda t: t.name)
def test_quantize_bytes_match_gguf(t):
    rng = np.random.default_rng(1)
    x = weight_rows(rng, 24, 512)
    ours = quant.quantize(x, int(t))
    ref = np.ascontiguousarray(gguf.quants.quantize(x, GQ(int(t)))).view(np.uint8).reshape(ours.shape)
    assert ours.dtype == np.uint8 and ours.shape == (24, x.shape[1] // BLOCK_LAYOUT[t][0] * BLOCK_LAYOUT[t][1])
    assert np.array_equal(ours, ref)


# RMS round-trip error / RMS of the input, for Gaussian rows. Expected from the
# step sizes: Q8_0 amax32/127 -> ~0.005; Q4_0 amax32/8 (one side clips) ->
# ~0.09; Q4_K (max-min)/15 per 32 -> ~0.075; Q5_K /31 -> ~0.037; Q6_K
# amax16/32 -> ~0.018; F16 / BF16: half an ulp.
RMS_BOUND = {T.F16: 3e-4, T.BF16: 2.5e-3, T.Q8_0: 0.006, T.Q4_0: 0.1, T.Q4_K: 0.085, T.Q5_K: 0.043,
             T.Q6_K: 0.021}


@pytest.mark.parametrize("t", list(RMS_BOUND), ids=lambda t: t.name)
def test_quantize_round_trip_through_gguf(t):
    rng = np.random.default_rng(2)
    x = weight_rows(rng, 32, 1024)
    raw = quant.quantize(x, int(t))
    back = gguf_dequantize(raw.reshape(-1), t).reshape(x.shape)
    assert np.all(back[0] == 0.0)                                  # zeros stay exact
    assert np.allclose(back[1], 0.25, rtol=0.02)                   # constants nearly so
    normal = slice(4, None)
    rel = np.sqrt(np.mean((back[normal] - x[normal]) ** 2, axis=1)) / np.sqrt(np.mean(x[normal] ** 2, axis=1))
    assert rel.max() < RMS_BOUND[t], f"{t.name}: worst row rms error {rel.max():.4f}"
    assert np.abs(back[3, 5] - 40.0) < 40.0 * 0.07                # an outlier keeps its size
    # 1-D input gives the same bytes as the rows
    assert np.array_equal(quant.quantize(x[5], int(t)), raw[5])


def test_quantize_threads_give_same_bytes():
    x = weight_rows(np.random.default_rng(3), 64, 2048)
    for t in (T.Q4_K, T.Q6_K, T.Q8_0):
        assert np.array_equal(quant.quantize(x, int(t), n_threads=1), quant.quantize(x, int(t), n_threads=2))


# -- matmul ----------------------------------------------------------------------

def q8_0_model(x):
    """The Q8_0 activations matmul uses, as gguf-py makes them (same bytes as ggml)."""
    raw = gguf.quants.quantize(x, GQ.Q8_0)
    return gguf.quants.dequantize(raw, GQ.Q8_0).astype(np.float64)


def q8_K_model(x):
    """Q8_K activations per native/quants.c: d = amax/127, q = round-half-even(x * 127/amax)."""
    b = x.reshape(-1, 256)
    amax = np.abs(b).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        iscale = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(b * iscale)
    d = (amax / np.float32(127)).astype(np.float32)
    return (q.astype(np.float64) * d).reshape(x.shape)


def activation_model(t, x):
    if t in DENSE:
        return x.astype(np.float64)
    return q8_K_model(x) if t in K_QUANTS else q8_0_model(x)


def matmul_bound(t, x, w64):
    """Largest |out - x @ W.T| that activation quantization plus float32
    arithmetic can explain, per output [n_tok, n_out].

    Activations are quantized per block of B = 32 (Q8_0) or 256 (Q8_K) to
    q * d with d = amax/127 and |q| <= 127, so each element is off by at most
    d/2 = amax/254; Q8_0 also stores d as fp16, adding |q| * |d - fp16(d)| <=
    amax * 2^-11. The output error is at most sum_k |W[r,k]| * err_k. On top,
    float32 rounding of products, scales and sums: n_in * 2^-24 * sum |x||W|
    (any summation order; scales add a few ulps per block, covered by the 4x).
    """
    n_tok, n_in = x.shape
    ax = np.abs(x.astype(np.float64))
    if t in DENSE:
        elem = np.zeros_like(ax)
    else:
        b = 256 if t in K_QUANTS else 32
        amax = ax.reshape(n_tok, -1, b).max(axis=2, keepdims=True)
        per = amax / 254 + (amax * 2.0**-11 if b == 32 else 0.0)
        elem = np.broadcast_to(per, (n_tok, n_in // b, b)).reshape(n_tok, n_in)
    arith = 4 * n_in * 2.0**-24 * (ax @ np.abs(w64).T)
    return elem @ np.abs(w64).T + arith + 1e-30


SHAPES = {  # type -> (n_in, n_out) pairs: odd block counts, tails, many rows
    "dense": [(37, 5), (256, 67), (1000, 9)],
    "q32": [(96, 5), (512, 67), (2048, 9)],
    "k": [(256, 5), (768, 67), (2048, 9)],
}


def shapes_for(t):
    return SHAPES["dense" if t in DENSE else "k" if t in K_QUANTS else "q32"]


_CASES = {}


def case(t, n_in, n_out):
    """Random weights (bytes + gguf-decoded float64), cached across tests."""
    key = (t, n_in, n_out)
    if key not in _CASES:
        rng = np.random.default_rng(n_in * 1000 + n_out + int(t))
        raw = random_weights(t, n_in * n_out, rng)
        w64 = gguf_dequantize(raw, t).astype(np.float64).reshape(n_out, n_in)
        if t in DENSE:
            raw = raw.reshape(n_out, n_in)
        _CASES[key] = (raw, w64)
    return _CASES[key]


def run_matmul(x, raw, t, n_out, n_threads, kernels="amx"):
    """kernels: 'amx' (the best this CPU has: AMX tiles for batches where
    present, else VNNI, else AVX2), 'vnni' (no AMX), 'avx2' or 'scalar'."""
    out = np.full((x.shape[0], n_out), np.nan, dtype=np.float32)  # unwritten outputs fail
    quant.matmul(x, raw, int(t), n_out, out, n_threads, simd=kernels != "scalar", amx=kernels == "amx",
                 vnni=kernels in ("amx", "vnni"))
    return out


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("n_tok", [1, 3, 17, 64])
@pytest.mark.parametrize("t, kernels", type_kernel_params(ALL_TYPES))
def test_matmul_matches_float64(t, kernels, n_tok, n_threads):
    for n_in, n_out in shapes_for(t):
        raw, w64 = case(t, n_in, n_out)
        rng = np.random.default_rng(n_tok * 7 + n_in)
        x = (rng.standard_normal((n_tok, n_in)) * rng.uniform(0.1, 4, (n_tok, 1))).astype(np.float32)
        out = run_matmul(x, raw, t, n_out, n_threads, kernels).astype(np.float64)
        err = np.abs(out - x.astype(np.float64) @ w64.T)
        assert np.all(err <= matmul_bound(t, x, w64)), f"{t.name} {n_in}->{n_out}: max err {err.max():.3g}"
        # tighter: against the very activations the kernels see, only float32
        # rounding is left (relative to sum |a||W|)
        a64 = activation_model(t, x)
        tight = np.abs(out - a64 @ w64.T) / (np.abs(a64) @ np.abs(w64).T + 1e-30)
        assert tight.max() < 4 * n_in * 2.0**-24 + 1e-6, f"{t.name} {n_in}->{n_out}: {tight.max():.3g}"


@needs_simd
@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_simd_matches_scalar(t):
    n_in, n_out = shapes_for(t)[-1]
    raw, w64 = case(t, n_in, n_out)
    x = np.random.default_rng(9).standard_normal((11, n_in)).astype(np.float32)
    ref = run_matmul(x, raw, t, n_out, 1, "scalar")
    scale = np.abs(activation_model(t, x)) @ np.abs(w64).T
    for kernels in ("avx2", "vnni", "amx"):
        fast = run_matmul(x, raw, t, n_out, 2, kernels)
        assert np.all(np.abs(fast.astype(np.float64) - ref) <= 1e-6 * scale + 1e-30), kernels


@needs_vnni
@pytest.mark.parametrize("t", DENSE, ids=lambda t: t.name)
def test_dense_matmul_is_batch_invariant_on_the_avx512_family(t):
    """A token's outputs are the same bits alone, in a batch of any size (tiles of 4
    tokens, row dots for the rest), on 1 or 2 threads: the row dot does the tile's
    arithmetic. (The engine's batch invariance rests on it for F32/F16/BF16 models.)"""
    for n_in, n_out in [(64, 64), (1000, 67), (72, 30)]:
        raw, _ = case(t, n_in, n_out)
        x = np.random.default_rng(n_in).standard_normal((9, n_in)).astype(np.float32)
        alone = run_matmul(x[:1], raw, t, n_out, 1, "vnni")
        for n in (2, 4, 5, 9):
            for n_threads in (1, 2):
                assert np.array_equal(run_matmul(x[:n], raw, t, n_out, n_threads, "vnni")[0], alone[0]), (n, n_threads)


def test_matmul_read_only_weights_and_weight_dtypes():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    w = rng.standard_normal((3, 64)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    for raw in (w, w.view(np.uint8), quant.quantize(w, int(T.F32))):
        raw.setflags(write=False)
        assert np.allclose(run_matmul(x, raw, T.F32, 3, 1), ref, rtol=1e-5, atol=1e-5)


def test_matmul_empty_batch():
    raw, _ = case(T.Q4_K, 256, 5)
    out = np.empty((0, 5), dtype=np.float32)
    quant.matmul(np.empty((0, 256), np.float32), raw, int(T.Q4_K), 5, out, 2)


# -- bad inputs ------------------------------------------------------------------

def test_bad_dequantize_inputs():
    raw = random_weights(T.Q4_K, 512, np.random.default_rng(0))
    with pytest.raises(ValueError):
        quant.dequantize(raw, 99, 512)                    # unknown type
    with pytest.raises(ValueError):
        quant.dequantize(raw, 15, 512)                    # Q8_K: not a storage type
    with pytest.raises(ValueError):
        quant.dequantize(raw, int(T.Q4_K), 768)           # more weights than bytes
    with pytest.raises(ValueError):
        quant.dequantize(raw, int(T.Q4_K), 256)           # fewer
    with pytest.raises(ValueError):
        quant.dequantize(raw, int(T.Q4_K), 300)           # not whole blocks
    with pytest.raises(ValueError):
        quant.dequantize(raw, int(T.Q4_K), -256)
    with pytest.raises(ValueError):
        quant.dequantize(raw.reshape(2, -1)[:, :100], int(T.Q4_K), 256)  # not contiguous
    with pytest.raises(ValueError):
        quant.dequantize(bytes(raw), int(T.Q4_K), 512)    # not an array


def test_bad_quantize_inputs():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError):
        quant.quantize(x, 99)
    with pytest.raises(ValueError):
        quant.quantize(x[:, :100], int(T.Q4_K))           # not whole blocks
    with pytest.raises(ValueError):
        quant.quantize(np.zeros((2, 2, 256), np.float32), int(T.Q8_0))
    with pytest.raises(ValueError):
        quant.quantize(np.zeros(256, np.int32), int(T.Q8_0))
    with pytest.raises(ValueError):
        quant.quantize(x, int(T.Q8_0), n_threads=0)


def test_bad_matmul_inputs():
    raw, _ = case(T.Q4_K, 256, 5)
    x = np.zeros((2, 256), np.float32)
    out = np.zeros((2, 5), np.float32)
    q = int(T.Q4_K)

    def bad(**kw):
        args = dict(x=x, w=raw, ggml_type=q, n_out=5, out=out, n_threads=1)
        args.update(kw)
        with pytest.raises(ValueError):
            quant.matmul(**args)

    bad(ggml_type=99)
    bad(ggml_type=15)                                     # Q8_K
    bad(w=raw[:-1])                                       # too few bytes
    bad(w=np.concatenate([raw, raw[:144]]))               # too many
    bad(n_out=4)                                          # out shape disagrees
    bad(out=np.zeros((3, 5), np.float32))
    bad(out=np.zeros((2, 5), np.float64))
    bad(out=np.zeros((5, 2), np.float32).T)               # not contiguous
    bad(x=x.astype(np.float64))
    bad(x=x[0])                                           # 1-D
    bad(x=np.zeros((2, 100), np.float32))                 # not whole blocks
    bad(x=np.zeros((2, 0), np.float32), ggml_type=int(T.F32), w=np.zeros(0, np.float32))
    bad(n_threads=0)
    ro = np.zeros((2, 5), np.float32)
    ro.setflags(write=False)
    bad(out=ro)
    buf = np.zeros((2, 256), np.float32)
    bad(x=buf, out=buf.reshape(-1)[:10].reshape(2, 5))  # out overlaps x


# -- weights repacked 16 rows at a time (the x16 GEMMs) ---------------------------

X16_SHAPES = {  # type -> (n_in, n_out) pairs; n_out a multiple of 16 but for F32
    T.Q4_K: [(256, 16), (768, 48), (2048, 272)],
    T.Q5_K: [(256, 16), (768, 48), (2048, 272)],
    T.Q6_K: [(256, 16), (768, 48), (2048, 272)],
    T.Q8_0: [(32, 16), (96, 48), (2048, 272)],
    T.Q4_0: [(32, 16), (96, 48), (2048, 272)],
    # F32: at most 512 columns; odd columns (one chain longer), a last group of 1-15 rows
    T.F32: [(64, 16), (64, 172), (171, 40), (512, 33), (1, 17)],
}
X16_QUANTIZED = [t for t in X16_SHAPES if t not in DENSE]


@pytest.mark.parametrize("family", X16_FAMILIES)
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("n_tok", [1, 2, 3, 5, 8, 17, 64])
@pytest.mark.parametrize("t", list(X16_SHAPES), ids=lambda t: t.name)
def test_repacked_weights_match_float64_and_the_scalar_kernel(t, n_tok, n_threads, family):
    for n_in, n_out in X16_SHAPES[t]:
        raw, w64 = case(t, n_in, n_out)
        packed = quant.repack_x16(raw, int(t), n_out, n_in, n_threads)
        rng = np.random.default_rng(n_tok * 7 + n_in)
        x = (rng.standard_normal((n_tok, n_in)) * rng.uniform(0.1, 4, (n_tok, 1))).astype(np.float32)
        out = np.full((n_tok, n_out), np.nan, dtype=np.float32)
        quant.matmul_x16(x, packed, int(t), n_out, out, n_threads, kernels=family)
        err = np.abs(out.astype(np.float64) - x.astype(np.float64) @ w64.T)
        assert np.all(err <= matmul_bound(t, x, w64)), f"{n_in}->{n_out}: max err {err.max():.3g}"
        ref = run_matmul(x, raw, t, n_out, 1, "scalar")      # the same quantized activations
        scale = np.abs(activation_model(t, x)) @ np.abs(w64).T
        assert np.all(np.abs(out.astype(np.float64) - ref) <= 1e-6 * scale + 1e-30)


@needs_x16
@pytest.mark.parametrize("t", X16_QUANTIZED, ids=lambda t: t.name)
def test_repacking_refuses_what_it_cannot_lay_out(t):
    n_in = X16_SHAPES[t][0][0]
    raw, _ = case(t, n_in, 5)
    assert quant.repack_x16(raw, int(t), 5, n_in) is None          # 5 rows: not a multiple of 16
    raw, _ = case(t, n_in, 16)
    with pytest.raises(ValueError):
        quant.repack_x16(raw[:-1], int(t), 16, n_in)              # too few bytes
    packed = quant.repack_x16(raw, int(t), 16, n_in)
    with pytest.raises(ValueError):
        quant.matmul_x16(np.zeros((2, 2 * n_in), np.float32), packed, int(t), 16, np.zeros((2, 16), np.float32), 1)
    with pytest.raises(ValueError):
        quant.matmul_x16(np.zeros((2, n_in), np.float32), packed, int(t), 16, np.zeros((2, 32), np.float32), 1)
    assert quant.repack_x16(*case(T.F16, 256, 16)[:1], int(T.F16), 16, 256) is None     # no layout for F16
    x, out = np.zeros((2, n_in), np.float32), np.zeros((2, 16), np.float32)
    with pytest.raises(ValueError, match="kernels must be one of"):
        quant.matmul_x16(x, packed, int(t), 16, out, 1, kernels="amx")
    if not quant.vnni_available():
        with pytest.raises(ValueError, match="no vnni kernels here"):
            quant.matmul_x16(x, packed, int(t), 16, out, 1, kernels="vnni")


@needs_x16
def test_f32_repacks_only_narrow_matrices():
    """F32 has an x16 layout up to 512 columns, any row count (x16_formats.h): wider rows
    spend little on their horizontal sums and keep the dense tiles."""
    assert quant.x16_layout(int(T.F32), 5, 512) and not quant.x16_layout(int(T.F32), 16, 513)
    raw, _ = case(T.F32, 513, 16)
    assert quant.repack_x16(raw, int(T.F32), 16, 513) is None
    raw, _ = case(T.F32, 64, 5)
    packed = quant.repack_x16(raw, int(T.F32), 5, 64)
    assert packed.nbytes == 16 * 64 * 4                          # one group, rows 5-15 zeros
    with pytest.raises(ValueError):
        quant.matmul_x16(np.zeros((2, 64), np.float32), packed, int(T.F32), 17, np.zeros((2, 17), np.float32), 1)


@pytest.mark.parametrize("family", X16_FAMILIES)
def test_f32_x16_is_batch_invariant_and_the_same_on_both_families(family):
    """A token's outputs are the same bits alone or in a batch of any size, on 1 or 2
    threads (each output sums its even and odd columns in two chains whatever the tile),
    and the AVX2 and AVX-512 tiles agree bit for bit (the same operations per lane)."""
    for n_in, n_out in [(64, 172), (171, 40)]:
        raw, _ = case(T.F32, n_in, n_out)
        packed = quant.repack_x16(raw, int(T.F32), n_out, n_in)
        x = np.random.default_rng(n_in).standard_normal((19, n_in)).astype(np.float32)
        alone = np.empty((1, n_out), np.float32)
        quant.matmul_x16(x[:1], packed, int(T.F32), n_out, alone, 1, kernels="avx2")
        for n in (1, 2, 4, 5, 9, 19):
            for n_threads in (1, 2):
                out = np.full((n, n_out), np.nan, np.float32)
                quant.matmul_x16(x[:n], packed, int(T.F32), n_out, out, n_threads, kernels=family)
                assert np.array_equal(out[0], alone[0]), (n_in, n, n_threads)


@pytest.mark.parametrize("t", list(X16_SHAPES), ids=lambda t: t.name)
def test_the_cpu_backend_repacks_only_where_an_x16_gemm_runs(t):
    from pyforge.backends.cpu import CpuBackend, RepackedWeight
    from pyforge.loader import TensorRef
    backend = CpuBackend(n_threads=1)
    n_in = X16_SHAPES[t][-1][0]
    raw, w64 = case(t, n_in, 16)
    prepared = backend.prepare_weight(TensorRef("w", t, (16, n_in), raw))
    assert isinstance(prepared, RepackedWeight) == (quant.x16_kernels() is not None and not quant.amx_available())
    for n_tok in (1, 3):        # one token may take another path (SINGLE_TOKEN_ORIGINAL)
        x = np.random.default_rng(n_tok).standard_normal((n_tok, n_in)).astype(np.float32)
        out = backend.matmul(x, prepared, np.empty((n_tok, 16), np.float32))
        assert np.all(np.abs(out - x.astype(np.float64) @ w64.T) <= matmul_bound(t, x, w64))


def test_vnni_can_be_switched_off():
    """PYFORGE_DISABLE_VNNI=1 keeps every matmul on the AVX2 / scalar kernels."""
    import os
    import subprocess
    import sys
    code = "from pyforge.native import quant; print(quant.vnni_available())"
    env = dict(os.environ, PYFORGE_DISABLE_VNNI="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def x16_kernels_under(env_var):
    import os
    import subprocess
    import sys
    code = "from pyforge.native import quant; print(quant.x16_kernels())"
    env = dict(os.environ, **{env_var: "1"})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_x16_kernels_can_be_switched_off():
    """PYFORGE_DISABLE_X16=1: no repacking (weights stay as stored, on the row kernels)."""
    assert x16_kernels_under("PYFORGE_DISABLE_X16") == "None"


@needs_x16
def test_without_vnni_the_avx2_tiles_run_repacked_weights():
    assert x16_kernels_under("PYFORGE_DISABLE_VNNI") == "avx2"


def test_amx_can_be_switched_off():
    """PYFORGE_DISABLE_AMX=1 keeps every matmul on the AVX2 / scalar kernels."""
    import os
    import subprocess
    import sys
    code = "from pyforge.native import quant; print(quant.amx_available())"
    env = dict(os.environ, PYFORGE_DISABLE_AMX="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
