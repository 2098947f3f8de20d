# Declarations of native/quants.h and native/matmul.h for quant.pyx. The block
# structs are the GGUF byte layouts; quant.pyx checks their sizes against
# pyforge.ggml_types.BLOCK_LAYOUT at import.
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t


cdef extern from "quants.h" nogil:
    ctypedef uint16_t pf_half

    ctypedef struct block_q4_0:
        pf_half d
        uint8_t qs[16]

    ctypedef struct block_q8_0:
        pf_half d
        int8_t qs[32]

    ctypedef struct block_q4_K:
        pf_half d
        pf_half dmin
        uint8_t scales[12]
        uint8_t qs[128]

    ctypedef struct block_q5_K:
        pf_half d
        pf_half dmin
        uint8_t scales[12]
        uint8_t qh[32]
        uint8_t qs[128]

    ctypedef struct block_q6_K:
        uint8_t ql[128]
        uint8_t qh[64]
        int8_t scales[16]
        pf_half d

    ctypedef struct block_q8_K:
        float d
        int8_t qs[256]
        int16_t bsums[16]

    ctypedef void (*pf_to_float_fn)(const void *src, float *dst, int64_t n)
    ctypedef void (*pf_from_float_fn)(const float *src, void *dst, int64_t n)
    ctypedef void (*pf_vec_dot_fn)(int64_t n, const void *w, const void *a, size_t a_stride, int nr,
                                   float *out)
    ctypedef void (*pf_vec_dot_tile_fn)(int64_t n, const void *w, size_t w_stride, const void *a,
                                        size_t a_stride, float *out)

    ctypedef struct pf_type_traits:
        const char *name
        int block_size
        int block_bytes
        pf_to_float_fn to_float
        pf_from_float_fn from_float
        int vec_dot_type
        pf_vec_dot_fn vec_dot
        pf_vec_dot_fn vec_dot_simd
        int tile_rows
        pf_vec_dot_tile_fn vec_dot_tile

    const pf_type_traits *pf_get_type_traits(int type)
    int64_t pf_row_bytes(int type, int64_t n)
    int pf_quantize(const float *src, void *dst, int type, int64_t n, int n_threads)
    float pf_half_to_float_scalar(pf_half h)
    pf_half pf_float_to_half_scalar(float f)


cdef extern from "matmul_vnni.h" nogil:
    int pf_vnni_available()


cdef extern from "matmul_x16.h" nogil:
    enum:
        PF_X16_NONE
        PF_X16_AVX2
        PF_X16_VNNI
    int pf_x16_kernels()
    int64_t pf_x16_bytes(int type, int64_t n_out, int64_t n_in)
    int pf_repack_x16(int type, const void *w, void *dst, int64_t n_out, int64_t n_in, int n_threads)
    int pf_matmul_x16(int type, const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out,
                      float *out, int n_threads, int kernels)


cdef extern from "matmul.h" nogil:
    enum:
        PF_KERNELS_SCALAR
        PF_KERNELS_AVX2
        PF_KERNELS_VNNI
        PF_KERNELS_AMX
    int pf_simd_available()
    int pf_matmul(const float *x, const void *w, int type, int64_t n_tok, int64_t n_in, int64_t n_out,
                  float *out, int n_threads, int kernels)


cdef extern from "matmul_amx.h" nogil:
    int pf_amx_available()


cdef extern from "moe_kernels.h" nogil:
    ctypedef struct pf_expert:
        const void *gate
        const void *up
        const void *down
        int gate_type
        int up_type
        int down_type
        int gate_x16
        int up_x16
        int down_x16
    int pf_moe_ffn(const float *x, int64_t n_tok, int64_t d, int64_t n_ff, const int32_t *ids, const float *weights,
                   int k, const pf_expert *experts, int n_experts, float *out, int n_threads, int kernels)
