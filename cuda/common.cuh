/* Shared definitions for the pyforge CUDA kernels (every .cu file here).
 *
 * Every .cu file is compiled on its own, at run time by CuPy (NVRTC:
 * RawModule(code=..., options=("-I<repo>/cuda", ...))), and in the tests by
 * nvcc and by NVRTC with CuPy's options (build_tools/nvcc_check.py,
 * nvrtc_check.py). So: no host code, no C/C++ standard headers
 * (NVRTC has none; only cuda_fp16.h, which CuPy puts on the include path),
 * and every kernel extern "C" so it is found by its plain name.
 *
 * The quantized block structs are the GGUF file format byte for byte, as in
 * native/quants.h (where the layouts are drawn bit by bit); fp16 fields are
 * raw IEEE-half bits read through pf_h2f. Weight rows handed to the kernels
 * are arrays of these blocks, rows back to back.
 */
#ifndef PYFORGE_CUDA_COMMON_CUH
#define PYFORGE_CUDA_COMMON_CUH

#include <cuda_fp16.h>

typedef unsigned char pf_u8;
typedef signed char pf_i8;
typedef unsigned short pf_u16;
typedef long long pf_i64;

#define PF_WARP 32
#define PF_NEG_INF __int_as_float(0xff800000) /* -inf; NVRTC has no INFINITY */
#define QK8_0 32
#define QK_K 256
#define K_SCALE_SIZE 12

/* Q8_0: 32 weights, w = d * q. */
struct block_q8_0 {
    pf_u16 d;
    pf_i8 qs[QK8_0];
};
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must be 34 bytes");

/* Q4_K: 256 weights in 8 sub-blocks of 32, w = d * sc[j] * q - dmin * m[j].
 * qs[32*c + l]: low nibble = weight 64c + l, high nibble = weight 64c + 32 + l. */
struct block_q4_K {
    pf_u16 d;
    pf_u16 dmin;
    pf_u8 scales[K_SCALE_SIZE];
    pf_u8 qs[QK_K / 2];
};
static_assert(sizeof(block_q4_K) == 144, "block_q4_K must be 144 bytes");

/* Q6_K: 256 weights in 16 sub-blocks of 16, w = d * scales[e/16] * (q - 32).
 * e = 128h + 32g + l: low 4 bits = nibble (g >= 2) of ql[64h + 32(g&1) + l],
 * high 2 bits = bits 2g..2g+1 of qh[32h + l]. */
struct block_q6_K {
    pf_u8 ql[QK_K / 2];
    pf_u8 qh[QK_K / 4];
    pf_i8 scales[QK_K / 16];
    pf_u16 d;
};
static_assert(sizeof(block_q6_K) == 210, "block_q6_K must be 210 bytes");

__device__ __forceinline__ float pf_h2f(pf_u16 bits) { return __half2float(__ushort_as_half(bits)); }

/* Scale and min of sub-block j (0..7) of a Q4_K block (see quants.h):
 * j < 4: the low 6 bits of bytes j and j + 4; j >= 4: low / high nibble of
 * byte j + 4 plus the top two bits of bytes j - 4 / j. */
__device__ __forceinline__ void pf_q4k_scale_min(const pf_u8 *s, int j, float *sc, float *m) {
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *m = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        *m = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* Q6_K weight e (0..255) of block b as q - 32 (-32..31). */
__device__ __forceinline__ int pf_q6k_value(const block_q6_K *b, int e) {
    int h = e >> 7, g = (e >> 5) & 3, l = e & 31;
    int lo = (b->ql[64 * h + 32 * (g & 1) + l] >> (4 * (g >> 1))) & 0xF;
    int hi = (b->qh[32 * h + l] >> (2 * g)) & 3;
    return (lo | (hi << 4)) - 32;
}

__device__ __forceinline__ float pf_warp_sum(float v) {
#pragma unroll
    for (int o = PF_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float pf_warp_max(float v) {
#pragma unroll
    for (int o = PF_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum of v over the whole block (blockDim.x a multiple of 32, <= 1024);
 * every thread gets the result. scratch: 32 floats of shared memory. */
__device__ __forceinline__ float pf_block_sum(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = pf_warp_sum(v);
    __syncthreads();  /* scratch may still be read from a previous call */
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    return pf_warp_sum(v);
}

/* Element access for the float / half variants of a kernel. */
__device__ __forceinline__ float pf_load(const float *p) { return *p; }
__device__ __forceinline__ float pf_load(const __half *p) { return __half2float(*p); }
__device__ __forceinline__ void pf_store(float *p, float v) { *p = v; }
__device__ __forceinline__ void pf_store(__half *p, float v) { *p = __float2half_rn(v); }

#endif
