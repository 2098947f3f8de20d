# cython: language_level=3, boundscheck=False, wraparound=False
"""Stored-weight kernels for the CPU backend: dequantize, quantize, matmul.

Types are ggml_type numbers (pyforge.ggml_types.GGMLType): F32, F16, BF16,
Q4_0, Q8_0, Q4_K, Q5_K, Q6_K. Raw weights are numpy arrays of any dtype
holding the GGUF bytes (memory-mapped, possibly read-only). Every size is
checked here and rejected with ValueError; the C code trusts what it gets and
runs without the GIL.
"""
import os

import numpy as np

cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint16_t
from cpython.mem cimport PyMem_Free, PyMem_Malloc

from quants cimport *

from pyforge.ggml_types import BLOCK_LAYOUT, GGMLType

cnp.import_array()


# The C structs are the file format: their sizes must be GGUF's.
for _t, _size in ((GGMLType.Q4_0, sizeof(block_q4_0)), (GGMLType.Q8_0, sizeof(block_q8_0)),
                  (GGMLType.Q4_K, sizeof(block_q4_K)), (GGMLType.Q5_K, sizeof(block_q5_K)),
                  (GGMLType.Q6_K, sizeof(block_q6_K))):
    if BLOCK_LAYOUT[_t][1] != _size:
        raise ImportError(f"native {_t.name} block is {_size} bytes, GGUF says {BLOCK_LAYOUT[_t][1]}")
    if pf_get_type_traits(_t).block_bytes != _size:
        raise ImportError(f"traits table disagrees on the {_t.name} block size")


# -- argument checks ---------------------------------------------------------

cdef const pf_type_traits *_traits(ggml_type) except NULL:
    """Traits of a storage type (Q8_K is internal to matmul, not a storage type)."""
    cdef int t = ggml_type
    cdef const pf_type_traits *tr = pf_get_type_traits(t)
    if tr == NULL or tr.to_float == NULL or tr.vec_dot == NULL:
        raise ValueError(f"unsupported ggml_type {ggml_type}")
    return tr


cdef int64_t _row_bytes(int ggml_type, int64_t n, const pf_type_traits *tr) except -1:
    if n < 0 or n % tr.block_size:
        raise ValueError(f"{tr.name.decode()} needs a multiple of {tr.block_size} weights, got {n}")
    return pf_row_bytes(ggml_type, n)


cdef cnp.ndarray _c_array(a, str name):
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a):
        raise ValueError(f"{name} must be C-contiguous")
    return <cnp.ndarray>a


cdef cnp.ndarray _f32_2d(a, str name, bint writeable):
    cdef cnp.ndarray arr = _c_array(a, name)
    if cnp.PyArray_TYPE(arr) != cnp.NPY_FLOAT32:
        raise ValueError(f"{name} must be float32, got {a.dtype}")
    if cnp.PyArray_NDIM(arr) != 2:
        raise ValueError(f"{name} must have 2 dimensions, got shape {a.shape}")
    if writeable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} must be writeable")
    return arr


cdef bint _overlap(cnp.ndarray a, cnp.ndarray b):
    cdef char *pa = <char *>cnp.PyArray_DATA(a)
    cdef char *pb = <char *>cnp.PyArray_DATA(b)
    return pa < pb + cnp.PyArray_NBYTES(b) and pb < pa + cnp.PyArray_NBYTES(a)


# -- API -----------------------------------------------------------------------

def simd_available():
    """True when the AVX2/FMA kernels were compiled in."""
    return bool(pf_simd_available())


def amx_available():
    """True when batched Q4_K / Q6_K matmuls run on AMX tiles here (CPU + OS
    support, and PYFORGE_DISABLE_AMX unset)."""
    return bool(pf_amx_available())


def vnni_available():
    """True when K-quant matmuls run on the AVX-512 VNNI kernels here (CPU + OS
    support, and PYFORGE_DISABLE_VNNI unset)."""
    return bool(pf_vnni_available())


X16_KERNELS = {"avx2": PF_X16_AVX2, "vnni": PF_X16_VNNI}


def x16_kernels():
    """The kernel family that runs repacked (x16) weights here: "vnni", "avx2",
    or None (no AVX2 build, or PYFORGE_DISABLE_X16 set): then weights stay as stored."""
    return {PF_X16_AVX2: "avx2", PF_X16_VNNI: "vnni"}.get(pf_x16_kernels())


def dequantize(raw, ggml_type, n):
    """float32[n]: the n weights whose GGUF bytes are raw (exactly that many bytes)."""
    cdef const pf_type_traits *tr = _traits(ggml_type)
    cdef int64_t nn = n
    cdef int64_t nbytes = _row_bytes(ggml_type, nn, tr)
    cdef cnp.ndarray src = _c_array(raw, "raw")
    if cnp.PyArray_NBYTES(src) != nbytes:
        raise ValueError(f"{n} {tr.name.decode()} weights are {nbytes} bytes, raw has {src.nbytes}")
    cdef cnp.ndarray dst = np.empty(nn, dtype=np.float32)
    cdef const void *sp = cnp.PyArray_DATA(src)
    cdef float *dp = <float *>cnp.PyArray_DATA(dst)
    with nogil:
        tr.to_float(sp, dp, nn)
    return dst


def quantize(x, ggml_type, n_threads=None):
    """GGUF bytes (uint8, shape (row_bytes,) or (rows, row_bytes)) of the float rows x.

    x is 1-D or 2-D, its last dimension a multiple of the type's block size.
    F32, F16, BF16, Q4_0, Q8_0 (bytes as gguf-py writes them), Q4_K, Q5_K, Q6_K.
    """
    cdef const pf_type_traits *tr = _traits(ggml_type)
    if tr.from_float == NULL:
        raise ValueError(f"cannot quantize to {tr.name.decode()}")
    if not isinstance(x, np.ndarray) or x.ndim not in (1, 2):
        raise ValueError("x must be a 1-D or 2-D numpy array")
    if x.dtype.kind != "f":
        raise ValueError(f"x must be floating point, got {x.dtype}")
    cdef cnp.ndarray src = np.ascontiguousarray(x, dtype=np.float32)
    cdef int64_t rb = _row_bytes(ggml_type, x.shape[x.ndim - 1], tr)
    cdef cnp.ndarray dst = np.empty((x.shape[0], rb) if x.ndim == 2 else rb, dtype=np.uint8)
    cdef int nt = n_threads if n_threads is not None else (os.cpu_count() or 1)
    if nt < 1:
        raise ValueError(f"n_threads must be at least 1, got {n_threads}")
    cdef int t = ggml_type
    cdef int64_t n = src.size
    cdef const float *sp = <const float *>cnp.PyArray_DATA(src)
    cdef void *dp = cnp.PyArray_DATA(dst)
    with nogil:
        pf_quantize(sp, dp, t, n, nt)
    return dst


def matmul(x, w, ggml_type, n_out, out, n_threads, simd=True, amx=True, vnni=True):
    """out[t, r] = sum_k x[t, k] * W[r, k], W the n_out rows of stored weights w.

    x float32 [n_tok, n_in]; w any C-contiguous array of exactly n_out rows of
    n_in weights' bytes; out float32 [n_tok, n_out], not overlapping x.
    simd=False runs the scalar reference kernels; amx=False keeps batches off
    AMX tiles, vnni=False keeps K-quants off the AVX-512 VNNI kernels, where
    this CPU has them (each family falls back to the next: AMX -> VNNI -> AVX2).
    """
    cdef const pf_type_traits *tr = _traits(ggml_type)
    cdef cnp.ndarray xa = _f32_2d(x, "x", False)
    cdef cnp.ndarray oa = _f32_2d(out, "out", True)
    cdef cnp.ndarray wa = _c_array(w, "w")
    cdef int64_t n_tok = xa.shape[0], n_in = xa.shape[1], no = n_out
    if n_in == 0:
        raise ValueError("x rows are empty")
    cdef int64_t rb = _row_bytes(ggml_type, n_in, tr)
    if no < 0 or oa.shape[0] != n_tok or oa.shape[1] != no:
        raise ValueError(f"out must have shape ({n_tok}, {n_out}), got {out.shape}")
    if cnp.PyArray_NBYTES(wa) != no * rb:
        raise ValueError(f"w must hold {n_out} rows of {n_in} {tr.name.decode()} weights "
                         f"({no * rb} bytes), got {wa.nbytes}")
    if _overlap(xa, oa):
        raise ValueError("out must not overlap x")
    cdef int nt = n_threads
    if nt < 1:
        raise ValueError(f"n_threads must be at least 1, got {n_threads}")
    cdef int t = ggml_type, rc
    cdef int kernels = PF_KERNELS_SCALAR
    if simd:
        kernels = PF_KERNELS_AVX2 | (PF_KERNELS_AMX if amx else 0) | (PF_KERNELS_VNNI if vnni else 0)
    cdef const float *xp = <const float *>cnp.PyArray_DATA(xa)
    cdef const void *wp = cnp.PyArray_DATA(wa)
    cdef float *op = <float *>cnp.PyArray_DATA(oa)
    with nogil:
        rc = pf_matmul(xp, wp, t, n_tok, n_in, no, op, nt, kernels)
    if rc == -2:
        raise MemoryError("matmul: out of memory for the quantized activations")
    if rc:
        raise ValueError("matmul: bad arguments")


# -- repacked weights (x16: AVX-512 VNNI or AVX2 tiles) ---------------------------

def x16_layout(ggml_type, n_out, n_in):
    """Whether n_out x n_in weights of ggml_type have an x16 layout: Q4_K, Q5_K, Q6_K,
    Q8_0, Q4_0 with n_out a multiple of 16; F32 with at most 512 columns (x16_formats.h)."""
    return pf_x16_bytes(ggml_type, n_out, n_in) > 0


def repack_x16(w, ggml_type, n_out, n_in, n_threads=1):
    """Weights (n_out rows of n_in) interleaved 16 rows at a time for matmul_x16
    (uint8 array), or None where no x16 kernels run here (x16_kernels()) or the type
    and shape have no such layout (x16_layout)."""
    cdef int t = ggml_type
    cdef int64_t no = n_out, ni = n_in
    cdef int64_t nbytes = pf_x16_bytes(t, no, ni)
    if pf_x16_kernels() == PF_X16_NONE or nbytes < 0:
        return None
    cdef cnp.ndarray src = _c_array(w, "w")
    if cnp.PyArray_NBYTES(src) != _row_bytes(t, ni, _traits(t)) * no:
        raise ValueError(f"w must hold {n_out} {GGMLType(t).name} rows of {n_in} weights")
    cdef cnp.ndarray dst = np.empty(nbytes, dtype=np.uint8)
    cdef const void *sp = cnp.PyArray_DATA(src)
    cdef void *dp = cnp.PyArray_DATA(dst)
    cdef int nt = n_threads
    with nogil:
        pf_repack_x16(t, sp, dp, no, ni, nt)
    return dst


def matmul_x16(x, packed, ggml_type, n_out, out, n_threads, kernels=None):
    """out[t, r] = sum_k x[t, k] * W[r, k], W repacked by repack_x16, on the
    best x16 kernels here, or on `kernels` ("avx2" runs on VNNI hosts too)."""
    cdef int t = ggml_type
    if kernels is not None and kernels not in X16_KERNELS:
        raise ValueError(f"kernels must be one of {sorted(X16_KERNELS)} or None, got {kernels!r}")
    cdef int family = X16_KERNELS.get(kernels, PF_X16_NONE)
    cdef cnp.ndarray xa = _f32_2d(x, "x", False)
    cdef cnp.ndarray oa = _f32_2d(out, "out", True)
    cdef cnp.ndarray pa = _c_array(packed, "packed")
    cdef int64_t n_tok = xa.shape[0], n_in = xa.shape[1], no = n_out
    if oa.shape[0] != n_tok or oa.shape[1] != no:
        raise ValueError(f"out must have shape ({n_tok}, {n_out}), got {out.shape}")
    cdef int64_t nbytes = pf_x16_bytes(t, no, n_in)
    if nbytes < 0 or cnp.PyArray_NBYTES(pa) != nbytes:
        raise ValueError(f"packed does not hold {n_out} x {n_in} repacked weights of type {ggml_type}")
    if _overlap(xa, oa):
        raise ValueError("out must not overlap x")
    cdef int nt = n_threads, rc
    if nt < 1:
        raise ValueError(f"n_threads must be at least 1, got {n_threads}")
    cdef const float *xp = <const float *>cnp.PyArray_DATA(xa)
    cdef const void *wp = cnp.PyArray_DATA(pa)
    cdef float *op = <float *>cnp.PyArray_DATA(oa)
    with nogil:
        rc = pf_matmul_x16(t, xp, wp, n_tok, n_in, no, op, nt, family)
    if rc == -2:
        raise MemoryError("matmul: out of memory for the quantized activations")
    if rc:
        raise ValueError(f"matmul_x16: no {kernels or 'x16'} kernels here")


# -- test hooks: the portable half converters the F16C build does not use ----

def _half_to_float_scalar(h):
    """float32 copy of uint16 half bits h, through the portable C converter."""
    cdef cnp.ndarray src = np.ascontiguousarray(h, dtype=np.uint16).ravel()
    cdef cnp.ndarray dst = np.empty(src.size, dtype=np.float32)
    cdef const uint16_t *sp = <const uint16_t *>cnp.PyArray_DATA(src)
    cdef float *dp = <float *>cnp.PyArray_DATA(dst)
    cdef int64_t i
    for i in range(src.size):
        dp[i] = pf_half_to_float_scalar(sp[i])
    return dst


def _float_to_half_scalar(f):
    """uint16 half bits of float32 f, through the portable C converter."""
    cdef cnp.ndarray src = np.ascontiguousarray(f, dtype=np.float32).ravel()
    cdef cnp.ndarray dst = np.empty(src.size, dtype=np.uint16)
    cdef const float *sp = <const float *>cnp.PyArray_DATA(src)
    cdef uint16_t *dp = <uint16_t *>cnp.PyArray_DATA(dst)
    cdef int64_t i
    for i in range(src.size):
        dp[i] = pf_float_to_half_scalar(sp[i])
    return dst


# -- routed experts (mixture of experts) ------------------------------------------

cdef class ExpertTable:
    """One MoE layer's experts as moe_ffn reads them, checked and laid out once (at load).

    experts: one ((gate, type), (up, type), (down, type)) per expert, each a C-contiguous
    array of stored rows (gate, up: n_ff rows of d weights; down: d rows of n_ff).
    repack: the ggml types to repack 16 rows at a time (repack_x16) where their shape has an
    x16 layout and x16 kernels run here; the others stay as given (mapped, not copied)."""
    cdef pf_expert *table
    cdef readonly int n_experts
    cdef readonly int64_t d, n_ff
    cdef readonly int n_repacked      # matrices repacked
    cdef list kept                    # the arrays the table points into

    def __cinit__(self):
        self.table = NULL

    def __init__(self, experts, n_ff, d, repack=(), n_threads=1):
        self.n_experts, self.n_ff, self.d, self.n_repacked, self.kept = len(experts), n_ff, d, 0, []
        if n_ff < 1 or d < 1:
            raise ValueError(f"n_ff and d must be positive, got {n_ff} and {d}")
        self.table = <pf_expert *>PyMem_Malloc(sizeof(pf_expert) * max(self.n_experts, 1))
        if self.table == NULL:
            raise MemoryError()
        repack = {int(t) for t in repack} if pf_x16_kernels() != PF_X16_NONE else set()
        for e, matrices in enumerate(experts):
            if len(matrices) != 3:
                raise ValueError(f"expert {e} must be (gate, up, down), got {len(matrices)} matrices")
            laid_out = []
            for (array, ggml_type), (rows, cols), what in zip(matrices, ((n_ff, d), (n_ff, d), (d, n_ff)),
                                                             ("gate", "up", "down")):
                arr = _c_array(array, f"expert {e} {what}")
                tr = _traits(ggml_type)
                if arr.nbytes != rows * _row_bytes(ggml_type, cols, tr):
                    raise ValueError(f"expert {e} {what} must hold {rows} rows of {cols} "
                                     f"{tr.name.decode()} weights, got {arr.nbytes} bytes")
                packed = repack_x16(arr, ggml_type, rows, cols, n_threads) if int(ggml_type) in repack else None
                self.n_repacked += packed is not None
                self.kept.append(arr if packed is None else packed)
                laid_out.append((int(ggml_type), packed is not None))
            (self.table[e].gate_type, self.table[e].gate_x16), (self.table[e].up_type, self.table[e].up_x16), \
                (self.table[e].down_type, self.table[e].down_x16) = laid_out
            self.table[e].gate = cnp.PyArray_DATA(<cnp.ndarray>self.kept[3 * e])
            self.table[e].up = cnp.PyArray_DATA(<cnp.ndarray>self.kept[3 * e + 1])
            self.table[e].down = cnp.PyArray_DATA(<cnp.ndarray>self.kept[3 * e + 2])

    def __dealloc__(self):
        PyMem_Free(self.table)


def moe_ffn(x, ids, weights, ExpertTable experts not None, out, n_threads, simd=True):
    """out[t] = sum_j weights[t, j] * FFN_e(x[t]) over e = ids[t, j]: each token through the
    experts its router picked, tokens grouped by expert so each expert's weights are read once.

    x float32 [n_tok, d]; ids int32 [n_tok, k] (distinct per token, < experts.n_experts); weights
    float32 [n_tok, k]; out float32 [n_tok, d], not overlapping x. simd=False runs the scalar
    reference kernels (a table with repacked matrices has none: ValueError).
    """
    cdef cnp.ndarray xa = _f32_2d(x, "x", False)
    cdef cnp.ndarray oa = _f32_2d(out, "out", True)
    cdef cnp.ndarray ia = _c_array(ids, "ids")
    cdef cnp.ndarray wa = _f32_2d(weights, "weights", False)
    cdef int64_t n_tok = xa.shape[0], d = xa.shape[1]
    if d != experts.d:
        raise ValueError(f"x must have rows of {experts.d}, the experts' width, got {d}")
    if cnp.PyArray_TYPE(ia) != cnp.NPY_INT32 or cnp.PyArray_NDIM(ia) != 2 or ia.shape[0] != n_tok:
        raise ValueError(f"ids must be int32 [{n_tok}, k], got {ids.dtype} {ids.shape}")
    cdef int k = ia.shape[1]
    if k < 1 or wa.shape[0] != n_tok or wa.shape[1] != k:
        raise ValueError(f"weights must have the shape of ids ({n_tok}, {k}), got {weights.shape}")
    if oa.shape[0] != n_tok or oa.shape[1] != d:
        raise ValueError(f"out must have shape ({n_tok}, {d}), got {out.shape}")
    if _overlap(xa, oa):
        raise ValueError("out must not overlap x")
    cdef int nt = n_threads
    if nt < 1:
        raise ValueError(f"n_threads must be at least 1, got {n_threads}")
    if experts.n_experts < k:
        raise ValueError(f"{experts.n_experts} experts cannot serve {k} picks per token")
    if n_tok and (int(ids.min()) < 0 or int(ids.max()) >= experts.n_experts):
        raise ValueError(f"ids must be in 0..{experts.n_experts - 1}")
    if not simd and experts.n_repacked:
        raise ValueError("the scalar kernels read stored weights: this table has repacked ones")
    cdef int rc
    cdef int kernels = (PF_KERNELS_AVX2 | PF_KERNELS_AMX | PF_KERNELS_VNNI) if simd else PF_KERNELS_SCALAR
    with nogil:
        rc = pf_moe_ffn(<const float *>cnp.PyArray_DATA(xa), n_tok, d, experts.n_ff,
                        <const int32_t *>cnp.PyArray_DATA(ia), <const float *>cnp.PyArray_DATA(wa), k,
                        experts.table, experts.n_experts, <float *>cnp.PyArray_DATA(oa), nt, kernels)
    if rc == -2:
        raise MemoryError("moe_ffn: out of memory")
    if rc:
        raise ValueError("moe_ffn: bad arguments")
