# cython: language_level=3, boundscheck=False, wraparound=False
"""Model primitives for the CPU backend: rmsnorm, layernorm, rope, silu*up, gelu_tanh*up,
soft-capping, residual add, paged KV store and attention, row softmax / argmax.

Arguments are checked here (dtype, shape, C-contiguity, writability, index
ranges) and rejected with ValueError; the C kernels trust what they get and
run without the GIL.
"""
import numpy as np

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t

cnp.import_array()


cdef extern from "kv_dtypes.h" nogil:
    int64_t pf_kv_row_bytes(int dtype, int64_t hd)
    void pf_kv_row_to_float(int dtype, const void *src, float *dst, int64_t hd)
    void pf_kv_row_from_float(int dtype, const float *src, void *dst, int64_t hd)
    void pf_kv_row_to_float_scalar(int dtype, const void *src, float *dst, int64_t hd)
    void pf_kv_row_from_float_scalar(int dtype, const float *src, void *dst, int64_t hd)


cdef extern from "ops_kernels.h" nogil:
    ctypedef struct PagedAttnDims:
        int64_t n_tok, n_heads, n_kv, head_dim, block_size, n_seq, max_blocks
        float scale, softcap
        int64_t window
        int kv_dtype

    void pf_rmsnorm(const float *x, const float *w, float eps, float *out, int64_t n, int64_t d, int n_threads)
    void pf_layernorm(const float *x, const float *w, const float *b, float eps, float *out,
                      int64_t n, int64_t d, int n_threads)
    int pf_rope(float *x, const int32_t *positions, int64_t n_tok, int64_t n_heads, int64_t head_dim,
                int n_rot, double theta, int neox, const float *freq_factors, double mscale, int n_threads)
    void pf_silu_mul(const float *gate, const float *up, float *out, int64_t n, int n_threads)
    void pf_gelu_tanh_mul(const float *gate, const float *up, float *out, int64_t n, int n_threads)
    void pf_softcap(float *x, int64_t n, float cap)
    void pf_add_inplace(float *x, const float *y, int64_t n)
    void pf_softmax_rows(float *x, int64_t n, int64_t d)
    void pf_argmax_rows(const float *x, int64_t n, int64_t d, int32_t *out)
    void pf_kv_store(const float *k, const float *v, void *k_cache, void *v_cache,
                     const int32_t *slot_mapping, int64_t n_tok, int64_t n_kv, int64_t head_dim, int64_t block_size,
                     int kv_dtype)
    void pf_paged_attention(const float *q, const void *k_cache, const void *v_cache,
                            const int32_t *block_tables, const int32_t *context_lens,
                            const int32_t *query_start, float *out, const PagedAttnDims *dims, int n_threads)


# -- KV cache dtypes -----------------------------------------------------------

# name -> (PfKvDtype code, numpy dtype of a cache array). A cache is
# [n_blocks, n_kv, block_size, row] with row = head_dim values (f32, f16; bf16
# as its raw uint16 bits) or head_dim / 32 * 34 bytes (q8_0: ggml's block_q8_0).
KV_DTYPES = {"f32": (0, np.float32), "f16": (1, np.float16), "bf16": (2, np.uint16), "q8_0": (3, np.uint8)}


cdef int _kv_code(str kv_dtype) except -1:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return KV_DTYPES[kv_dtype][0]


def kv_row_bytes(str kv_dtype, int64_t head_dim):
    """Bytes of one cached row (one position of one kv head) of head_dim values."""
    cdef int64_t n = pf_kv_row_bytes(_kv_code(kv_dtype), head_dim)
    if n < 0 or head_dim < 1:
        raise ValueError(f"head_dim {head_dim} cannot be stored as {kv_dtype} (q8_0 needs a multiple of 32)")
    return n


def kv_cache_shape(int64_t n_blocks, int64_t n_kv, int64_t block_size, int64_t head_dim, str kv_dtype):
    """(shape, numpy dtype) of one K or V pool of kv_dtype."""
    row = kv_row_bytes(kv_dtype, head_dim) // np.dtype(KV_DTYPES[kv_dtype][1]).itemsize
    return (n_blocks, n_kv, block_size, row), KV_DTYPES[kv_dtype][1]


def kv_encode(x, str kv_dtype, bint scalar=False):
    """Rows x[n, hd] float32 as the cache stores them: [n, row] of the cache's
    numpy dtype (scalar: through the scalar reference, not the SIMD path)."""
    cdef cnp.ndarray xa = _f32(x, "x", 2)
    cdef int code = _kv_code(kv_dtype)
    cdef int64_t n = xa.shape[0], hd = xa.shape[1], rb = kv_row_bytes(kv_dtype, hd), i
    cdef cnp.ndarray out = np.zeros((n, rb), dtype=np.uint8)
    cdef char *dst = <char *>cnp.PyArray_DATA(out)
    cdef float *src = _fp(xa)
    with nogil:
        for i in range(n):
            if scalar:
                pf_kv_row_from_float_scalar(code, src + i * hd, dst + i * rb, hd)
            else:
                pf_kv_row_from_float(code, src + i * hd, dst + i * rb, hd)
    return out.view(KV_DTYPES[kv_dtype][1])


def kv_decode(rows, str kv_dtype, int64_t head_dim, bint scalar=False):
    """float32 [n, head_dim] of rows [n, row] stored as kv_dtype (kv_encode's inverse, up to rounding)."""
    cdef int code = _kv_code(kv_dtype)
    cdef int64_t rb = kv_row_bytes(kv_dtype, head_dim), i
    cdef cnp.ndarray ra = _arr(rows, "rows", 2, KV_DTYPES[kv_dtype][1])
    if ra.shape[1] * ra.itemsize != rb:
        raise ValueError(f"{kv_dtype} rows of {head_dim} values are {rb} bytes, got {ra.shape[1] * ra.itemsize}")
    cdef int64_t n = ra.shape[0]
    cdef cnp.ndarray out = np.empty((n, head_dim), dtype=np.float32)
    cdef char *src = <char *>cnp.PyArray_DATA(ra)
    cdef float *dst = _fp(out)
    with nogil:
        for i in range(n):
            if scalar:
                pf_kv_row_to_float_scalar(code, src + i * rb, dst + i * head_dim, head_dim)
            else:
                pf_kv_row_to_float(code, src + i * rb, dst + i * head_dim, head_dim)
    return out


# -- argument checks ---------------------------------------------------------

cdef cnp.ndarray _arr(a, str name, int ndim, dtype, bint writeable=False):
    """a itself, if it is a C-contiguous ndarray of dtype (and ndim, unless -1)."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if ndim >= 0 and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return <cnp.ndarray>a


cdef cnp.ndarray _f32(a, str name, int ndim, bint writeable=False):
    return _arr(a, name, ndim, np.float32, writeable)


cdef cnp.ndarray _i32(a, str name, int ndim):
    return _arr(a, name, ndim, np.int32)


cdef void _same_shape(a, b, str name_a, str name_b) except *:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {a.shape} and {name_b} {b.shape} must have the same shape")


cdef int _threads(n_threads) except -1:
    if n_threads < 1:
        raise ValueError(f"n_threads must be at least 1, got {n_threads}")
    return n_threads


cdef inline float *_fp(cnp.ndarray a):
    return <float *>cnp.PyArray_DATA(a)


cdef inline int32_t *_ip(cnp.ndarray a):
    return <int32_t *>cnp.PyArray_DATA(a)


# -- norms, rope, elementwise ------------------------------------------------

def rmsnorm(x, weight, float eps, out, n_threads=1):
    """out[n, d] = x / sqrt(mean(x^2) + eps) * weight[d]. out may be x."""
    cdef cnp.ndarray xa = _f32(x, "x", 2), wa = _f32(weight, "weight", 1), oa = _f32(out, "out", 2, True)
    _same_shape(xa, oa, "x", "out")
    if wa.shape[0] != xa.shape[1]:
        raise ValueError(f"weight has {wa.shape[0]} elements, x rows have {xa.shape[1]}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    cdef int nt = _threads(n_threads)
    cdef int64_t n = xa.shape[0], d = xa.shape[1]
    cdef float *xp = _fp(xa)
    cdef float *wp = _fp(wa)
    cdef float *op = _fp(oa)
    with nogil:
        pf_rmsnorm(xp, wp, eps, op, n, d, nt)
    return out


def layernorm(x, weight, bias, float eps, out, n_threads=1):
    """out[n, d] = (x - mean(x)) / sqrt(var(x) + eps) * weight[d] + bias[d]. out may be x."""
    cdef cnp.ndarray xa = _f32(x, "x", 2), wa = _f32(weight, "weight", 1), ba = _f32(bias, "bias", 1)
    cdef cnp.ndarray oa = _f32(out, "out", 2, True)
    _same_shape(xa, oa, "x", "out")
    if wa.shape[0] != xa.shape[1] or ba.shape[0] != xa.shape[1]:
        raise ValueError(f"weight and bias have {wa.shape[0]} and {ba.shape[0]} elements, x rows have {xa.shape[1]}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    cdef int nt = _threads(n_threads)
    cdef int64_t n = xa.shape[0], d = xa.shape[1]
    cdef float *xp = _fp(xa)
    cdef float *wp = _fp(wa)
    cdef float *bp = _fp(ba)
    cdef float *op = _fp(oa)
    with nogil:
        pf_layernorm(xp, wp, bp, eps, op, n, d, nt)
    return out


def rope(x, positions, int n_rot, double theta, bint neox, freq_factors=None, n_threads=1, double mscale=1.0):
    """Rotate the first n_rot dims of each head of x[n_tok, n_heads, head_dim] in place.

    neox=False pairs dims (2i, 2i+1) (GGUF / llama.cpp normal), neox=True pairs
    (i, i + n_rot/2) (HF rotate-half). Pair i turns by
    positions[t] * theta^(-2i/n_rot) / freq_factors[i], and is multiplied by
    mscale (longrope's attention factor, as llama.cpp's attn_factor).
    """
    cdef cnp.ndarray xa = _f32(x, "x", 3, True), pa = _i32(positions, "positions", 1)
    cdef cnp.ndarray fa = None
    cdef const float *ff = NULL
    if pa.shape[0] != xa.shape[0]:
        raise ValueError(f"positions has {pa.shape[0]} entries, x has {xa.shape[0]} tokens")
    if n_rot <= 0 or n_rot % 2 or n_rot > xa.shape[2]:
        raise ValueError(f"n_rot must be even and in (0, head_dim={xa.shape[2]}], got {n_rot}")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta}")
    if not 0 < mscale < float("inf"):
        raise ValueError(f"mscale must be positive and finite, got {mscale}")
    if freq_factors is not None:
        fa = _f32(freq_factors, "freq_factors", 1)
        if fa.shape[0] != n_rot // 2:
            raise ValueError(f"freq_factors must have n_rot/2 = {n_rot // 2} entries, got {fa.shape[0]}")
        ff = _fp(fa)
    cdef int nt = _threads(n_threads), rc
    cdef int64_t n_tok = xa.shape[0], n_heads = xa.shape[1], hd = xa.shape[2]
    cdef float *xp = _fp(xa)
    cdef int32_t *pp = _ip(pa)
    with nogil:
        rc = pf_rope(xp, pp, n_tok, n_heads, hd, n_rot, theta, neox, ff, mscale, nt)
    if rc:
        raise MemoryError("rope: out of memory")
    return x


ctypedef void (*gated_fn)(const float *gate, const float *up, float *out, int64_t n, int n_threads) noexcept nogil


def silu_mul(gate, up, out, n_threads=1):
    """out[n, f] = gate * sigmoid(gate) * up. out may be gate or up."""
    return _gated(pf_silu_mul, gate, up, out, n_threads)


def gelu_tanh_mul(gate, up, out, n_threads=1):
    """out[n, f] = gelu_tanh(gate) * up (GeGLU: GELU's tanh approximation). out may be gate or up."""
    return _gated(pf_gelu_tanh_mul, gate, up, out, n_threads)


cdef object _gated(gated_fn fn, gate, up, out, n_threads):
    """out = act(gate) * up through `fn`, shapes checked."""
    cdef cnp.ndarray ga = _f32(gate, "gate", 2), ua = _f32(up, "up", 2), oa = _f32(out, "out", 2, True)
    _same_shape(ga, ua, "gate", "up")
    _same_shape(ga, oa, "gate", "out")
    cdef int nt = _threads(n_threads)
    cdef int64_t n = ga.size
    cdef float *gp = _fp(ga)
    cdef float *up_ = _fp(ua)
    cdef float *op = _fp(oa)
    with nogil:
        fn(gp, up_, op, n, nt)
    return out


def softcap(x, float cap):
    """x = cap * tanh(x / cap), in place, for a contiguous float32 array (any rank); cap > 0."""
    cdef cnp.ndarray xa = _f32(x, "x", -1, True)
    if not cap > 0 or cap == float("inf"):
        raise ValueError(f"softcap cap must be a positive finite number, got {cap}")
    cdef int64_t n = xa.size
    cdef float *xp = _fp(xa)
    with nogil:
        pf_softcap(xp, n, cap)
    return x


def add_inplace(x, y):
    """x += y for contiguous float32 arrays of one shape (any rank)."""
    cdef cnp.ndarray xa = _f32(x, "x", -1, True), ya = _f32(y, "y", -1)
    _same_shape(xa, ya, "x", "y")
    cdef int64_t n = xa.size
    cdef float *xp = _fp(xa)
    cdef float *yp = _fp(ya)
    with nogil:
        pf_add_inplace(xp, yp, n)
    return x


def softmax_rows(x):
    """Each row of x[n, d] becomes its softmax, in place (-inf entries get 0)."""
    cdef cnp.ndarray xa = _f32(x, "x", 2, True)
    cdef int64_t n = xa.shape[0], d = xa.shape[1]
    cdef float *xp = _fp(xa)
    with nogil:
        pf_softmax_rows(xp, n, d)
    return x


def argmax_rows(x):
    """int32[n]: index of the first maximum in each row of x[n, d]."""
    cdef cnp.ndarray xa = _f32(x, "x", 2)
    cdef int64_t n = xa.shape[0], d = xa.shape[1]
    if d == 0 and n > 0:
        raise ValueError("argmax_rows needs rows of at least one element")
    cdef cnp.ndarray out = np.empty(n, dtype=np.int32)
    cdef float *xp = _fp(xa)
    cdef int32_t *op = _ip(out)
    with nogil:
        pf_argmax_rows(xp, n, d, op)
    return out


# -- paged KV cache ----------------------------------------------------------

cdef cnp.ndarray _cache(c, str name, str kv_dtype, bint writeable=False):
    return _arr(c, name, 4, KV_DTYPES[kv_dtype][1], writeable)


cdef void _check_caches(cnp.ndarray kc, cnp.ndarray vc, int64_t n_kv, int64_t hd, str kv_dtype) except *:
    """Both caches [n_blocks, n_kv, block_size, row] of kv_dtype and alike."""
    _same_shape(kc, vc, "k_cache", "v_cache")
    if kc.shape[1] != n_kv or kc.shape[3] * kc.itemsize != kv_row_bytes(kv_dtype, hd):
        raise ValueError(f"{kv_dtype} cache {(<object>kc).shape} does not hold {n_kv} kv heads of dim {hd}")
    if kc.shape[2] < 1:
        raise ValueError("cache block_size must be at least 1")


def kv_store(k, v, k_cache, v_cache, slot_mapping, str kv_dtype="f32"):
    """Write token t of k, v [n_tok, n_kv, hd] to cache slot slot_mapping[t]
    (block slot // block_size, position slot % block_size), converted to kv_dtype."""
    cdef int code = _kv_code(kv_dtype)
    cdef cnp.ndarray ka = _f32(k, "k", 3), va = _f32(v, "v", 3)
    cdef cnp.ndarray kc = _cache(k_cache, "k_cache", kv_dtype, True), vc = _cache(v_cache, "v_cache", kv_dtype, True)
    cdef cnp.ndarray sa = _i32(slot_mapping, "slot_mapping", 1)
    _same_shape(ka, va, "k", "v")
    _check_caches(kc, vc, ka.shape[1], ka.shape[2], kv_dtype)
    if sa.shape[0] != ka.shape[0]:
        raise ValueError(f"slot_mapping has {sa.shape[0]} entries, k has {ka.shape[0]} tokens")
    cdef int64_t n_tok = ka.shape[0], n_slots = kc.shape[0] * kc.shape[2], t
    cdef int32_t *slots = _ip(sa)
    for t in range(n_tok):
        if slots[t] < 0 or slots[t] >= n_slots:
            raise ValueError(f"slot_mapping[{t}] = {slots[t]} outside the cache's {n_slots} slots")
    cdef int64_t n_kv = ka.shape[1], hd = ka.shape[2], block_size = kc.shape[2]
    cdef float *kp = _fp(ka)
    cdef float *vp = _fp(va)
    cdef void *kcp = cnp.PyArray_DATA(kc)
    cdef void *vcp = cnp.PyArray_DATA(vc)
    with nogil:
        pf_kv_store(kp, vp, kcp, vcp, slots, n_tok, n_kv, hd, block_size, code)


cdef void _check_batch(const int32_t[:, ::1] tables, const int32_t[::1] lens, const int32_t[::1] qsl,
                       int64_t n_tok, int64_t block_size, int64_t n_blocks) except *:
    """The varlen batch plan: query ranges, context lengths and used block ids."""
    cdef int64_t n_seq = lens.shape[0], max_blocks = tables.shape[1], s, b, n_q, used
    if qsl.shape[0] != n_seq + 1 or tables.shape[0] != n_seq:
        raise ValueError(f"{n_seq} context_lens need query_start_loc[{n_seq + 1}] and "
                         f"block_tables[{n_seq}, :], got {qsl.shape[0]} and {tables.shape[0]}")
    if qsl[0] != 0 or qsl[n_seq] != n_tok:
        raise ValueError(f"query_start_loc must run from 0 to n_tok={n_tok}, got {qsl[0]} .. {qsl[n_seq]}")
    for s in range(n_seq):
        n_q = qsl[s + 1] - qsl[s]
        if n_q < 0:
            raise ValueError(f"query_start_loc decreases at sequence {s}")
        if lens[s] < n_q:
            raise ValueError(f"sequence {s}: context_len {lens[s]} shorter than its {n_q} query rows")
        used = (lens[s] + block_size - 1) // block_size
        if used > max_blocks:
            raise ValueError(f"sequence {s}: context_len {lens[s]} needs {used} blocks, table has {max_blocks}")
        for b in range(used):
            if tables[s, b] < 0 or tables[s, b] >= n_blocks:
                raise ValueError(f"sequence {s}: block_tables[{s}, {b}] = {tables[s, b]} outside [0, {n_blocks})")


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, float scale, out,
                    n_threads=1, window=0, float softcap=0.0, str kv_dtype="f32"):
    """Causal GQA attention of a varlen batch over the paged KV cache.

    q, out [n_tok, n_heads, hd]; caches [n_blocks, n_kv, block_size, hd];
    block_tables int32[n_seq, max_blocks]; context_lens int32[n_seq];
    query_start_loc int32[n_seq + 1]. Row j of sequence s (n_q rows, context
    L) is at position p = L - n_q + j and attends to positions 0 ..= p, or
    with window > 0 to (p - window, p] (sliding-window attention). softcap > 0
    turns each scaled score s into softcap * tanh(s / softcap) (Gemma 2).
    The caches hold kv_dtype rows (KV_DTYPES; kv_cache_shape gives their shape).
    """
    cdef int code = _kv_code(kv_dtype)
    cdef cnp.ndarray qa = _f32(q, "q", 3), oa = _f32(out, "out", 3, True)
    cdef cnp.ndarray kc = _cache(k_cache, "k_cache", kv_dtype), vc = _cache(v_cache, "v_cache", kv_dtype)
    cdef cnp.ndarray bt = _i32(block_tables, "block_tables", 2), cl = _i32(context_lens, "context_lens", 1)
    cdef cnp.ndarray qs = _i32(query_start_loc, "query_start_loc", 1)
    _same_shape(qa, oa, "q", "out")
    cdef int64_t n_heads = qa.shape[1], hd = qa.shape[2], n_kv = kc.shape[1]
    _check_caches(kc, vc, n_kv, hd, kv_dtype)
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} must be a multiple of the cache's n_kv={n_kv}")
    _check_batch(bt, cl, qs, qa.shape[0], kc.shape[2], kc.shape[0])
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an integer >= 0 (0: no window), got {window!r}")
    if not (softcap >= 0 and softcap != float("inf")):
        raise ValueError(f"softcap must be a finite number >= 0 (0: off), got {softcap}")
    cdef int nt = _threads(n_threads)
    cdef PagedAttnDims dims
    dims.n_tok, dims.n_heads, dims.n_kv, dims.head_dim = qa.shape[0], n_heads, n_kv, hd
    dims.block_size, dims.n_seq, dims.max_blocks, dims.scale = kc.shape[2], cl.shape[0], bt.shape[1], scale
    dims.softcap, dims.window, dims.kv_dtype = softcap, window, code
    cdef float *qp = _fp(qa)
    cdef void *kcp = cnp.PyArray_DATA(kc)
    cdef void *vcp = cnp.PyArray_DATA(vc)
    cdef float *op = _fp(oa)
    cdef int32_t *btp = _ip(bt)
    cdef int32_t *clp = _ip(cl)
    cdef int32_t *qsp = _ip(qs)
    with nogil:
        pf_paged_attention(qp, kcp, vcp, btp, clp, qsp, op, &dims, nt)
    return out
