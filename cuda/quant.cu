/* Weights on the GPU: dequantize to fp16, and the fused matrix x vector
 * products of decode (quantized weights; fp16 ones for CUDA graphs, where
 * cuBLAS cannot be captured through CuPy).
 *
 * Weights are GGUF rows as stored (cuda/common.cuh): a [n_out, n_in] matrix
 * is n_out rows of n_in / block_size blocks, back to back. n_in must be a
 * whole number of blocks (32 for Q8_0, 256 for Q4_K / Q6_K).
 */
#include "common.cuh"

/* ------------------------------------------------------------------------ */
/* Dequantize: dst[n_blocks * block_size] fp16 = the weights of src          */
/* ------------------------------------------------------------------------ */

/* dequant_q8_0_f16(src, dst, n_blocks)
 *   src  block_q8_0 [n_blocks]      dst  half [n_blocks * 32]
 *   grid (ceil(n_blocks * 32 / blockDim.x)), block (any multiple of 32; 256):
 *   one thread per weight. */
extern "C" __global__ void dequant_q8_0_f16(const block_q8_0 *__restrict__ src, __half *__restrict__ dst,
                                            pf_i64 n_blocks) {
    pf_i64 i = (pf_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_blocks * QK8_0) return;
    const block_q8_0 *b = src + i / QK8_0;
    dst[i] = __float2half_rn(pf_h2f(b->d) * (float)b->qs[i % QK8_0]);
}

/* dequant_q4_K_f16(src, dst, n_blocks)
 *   src  block_q4_K [n_blocks]      dst  half [n_blocks * 256]
 *   grid (n_blocks), block (256): thread e makes weight e of block blockIdx.x. */
extern "C" __global__ void dequant_q4_K_f16(const block_q4_K *__restrict__ src, __half *__restrict__ dst,
                                            pf_i64 n_blocks) {
    const block_q4_K *b = src + blockIdx.x;
    const int e = threadIdx.x, j = e / 32;  /* sub-block */
    const int c = e / 64, l = e % 32;
    int q = (b->qs[32 * c + l] >> (4 * (j & 1))) & 0xF;
    float sc, m;
    pf_q4k_scale_min(b->scales, j, &sc, &m);
    dst[(pf_i64)blockIdx.x * QK_K + e] = __float2half_rn(pf_h2f(b->d) * sc * (float)q - pf_h2f(b->dmin) * m);
}

/* dequant_q6_K_f16(src, dst, n_blocks)
 *   src  block_q6_K [n_blocks]      dst  half [n_blocks * 256]
 *   grid (n_blocks), block (256): thread e makes weight e of block blockIdx.x. */
extern "C" __global__ void dequant_q6_K_f16(const block_q6_K *__restrict__ src, __half *__restrict__ dst,
                                            pf_i64 n_blocks) {
    const block_q6_K *b = src + blockIdx.x;
    const int e = threadIdx.x;
    float w = pf_h2f(b->d) * (float)b->scales[e / 16] * (float)pf_q6k_value(b, e);
    dst[(pf_i64)blockIdx.x * QK_K + e] = __float2half_rn(w);
}

/* ------------------------------------------------------------------------ */
/* Matrix x vector: y[r, o] = sum_i W[o, i] * x[r, i]                        */
/* ------------------------------------------------------------------------ */
/* All three kernels share one launch layout:
 *   w  [n_out] rows of n_in weights (blocks)    x  half [n_x, n_in]
 *   y  half [n_x, n_out]
 *   grid (ceil(n_out / (blockDim.x / 32)), ceil(n_x / MV_ROWS)), block (128: 4 warps).
 * One warp per output row and per group of up to MV_ROWS activation rows
 * (blockIdx.y): each weight is read from memory once for the whole group and
 * multiplied into every row of it, so a decode batch of up to MV_ROWS costs
 * one pass over the weights, not one per sequence. Lane t reads byte t of each
 * 32-wide run of a block (coalesced), multiplies in float, and the warp
 * reduces each row's sum at the end. */
#define MV_ROWS 8

/* This group's rows of x (n_rows of them) and its outputs for weight row `row`. */
struct MvGroup {
    const __half *x;
    __half *y;
    int n_rows;
};

__device__ __forceinline__ MvGroup mv_group(const __half *x, __half *y, int n_in, int n_out, int n_x, int row) {
    const int r0 = blockIdx.y * MV_ROWS;
    return MvGroup{x + (pf_i64)r0 * n_in, y + (pf_i64)r0 * n_out + row, min(MV_ROWS, n_x - r0)};
}

__device__ __forceinline__ void mv_store(const MvGroup &g, const float *acc, int n_out) {
#pragma unroll
    for (int j = 0; j < MV_ROWS; j++) {
        if (j >= g.n_rows) break;
        const float v = pf_warp_sum(acc[j]);
        if ((threadIdx.x & 31) == 0) g.y[(pf_i64)j * n_out] = __float2half_rn(v);
    }
}

/* Q8_0: lane t takes weight t of every block of the row. */
extern "C" __global__ void matvec_q8_0_f16(const block_q8_0 *__restrict__ w, const __half *__restrict__ x,
                                           __half *__restrict__ y, int n_in, int n_out, int n_x) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (row >= n_out) return;
    const int nb = n_in / QK8_0;
    const block_q8_0 *wr = w + (pf_i64)row * nb;
    const MvGroup g = mv_group(x, y, n_in, n_out, n_x, row);
    float acc[MV_ROWS] = {};
    for (int ib = 0; ib < nb; ib++) {
        const float wv = pf_h2f(wr[ib].d) * (float)wr[ib].qs[lane];
        const __half *xb = g.x + ib * QK8_0 + lane;
#pragma unroll
        for (int j = 0; j < MV_ROWS; j++)
            if (j < g.n_rows) acc[j] += wv * __half2float(xb[(pf_i64)j * n_in]);
    }
    mv_store(g, acc, n_out);
}

/* Q4_K: per super-block, lane t takes weights 64c + t (low nibble, sub-block
 * 2c) and 64c + 32 + t (high nibble, sub-block 2c + 1) for c = 0..3, as
 * d*sc*q - dmin*m, formed once and used for every row of the group. */
extern "C" __global__ void matvec_q4_K_f16(const block_q4_K *__restrict__ w, const __half *__restrict__ x,
                                           __half *__restrict__ y, int n_in, int n_out, int n_x) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (row >= n_out) return;
    const int nb = n_in / QK_K;
    const block_q4_K *wr = w + (pf_i64)row * nb;
    const MvGroup g = mv_group(x, y, n_in, n_out, n_x, row);
    float acc[MV_ROWS] = {};
    for (int ib = 0; ib < nb; ib++) {
        const block_q4_K *b = wr + ib;
        const __half *xb = g.x + ib * QK_K + lane;
        const float d = pf_h2f(b->d), dmin = pf_h2f(b->dmin);
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const int q = b->qs[32 * c + lane];
            float sc0, m0, sc1, m1;
            pf_q4k_scale_min(b->scales, 2 * c, &sc0, &m0);
            pf_q4k_scale_min(b->scales, 2 * c + 1, &sc1, &m1);
            const float w0 = d * sc0 * (float)(q & 0xF) - dmin * m0, w1 = d * sc1 * (float)(q >> 4) - dmin * m1;
#pragma unroll
            for (int j = 0; j < MV_ROWS; j++)
                if (j < g.n_rows) {
                    const __half *xj = xb + (pf_i64)j * n_in + 64 * c;
                    acc[j] += w0 * __half2float(xj[0]) + w1 * __half2float(xj[32]);
                }
        }
    }
    mv_store(g, acc, n_out);
}

/* Q6_K: per super-block, lane t takes weights 128h + 32g + t (h = 0..1,
 * g = 0..3): bytes ql[64h + 32(g&1) + t] and qh[32h + t], scale 8h + 2g + t/16. */
extern "C" __global__ void matvec_q6_K_f16(const block_q6_K *__restrict__ w, const __half *__restrict__ x,
                                           __half *__restrict__ y, int n_in, int n_out, int n_x) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (row >= n_out) return;
    const int nb = n_in / QK_K;
    const block_q6_K *wr = w + (pf_i64)row * nb;
    const MvGroup gr = mv_group(x, y, n_in, n_out, n_x, row);
    float acc[MV_ROWS] = {};
    for (int ib = 0; ib < nb; ib++) {
        const block_q6_K *b = wr + ib;
        const __half *xb = gr.x + ib * QK_K + lane;
        const float d = pf_h2f(b->d);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int lo0 = b->ql[64 * h + lane], lo1 = b->ql[64 * h + 32 + lane];
            const int hi = b->qh[32 * h + lane];
#pragma unroll
            for (int g = 0; g < 4; g++) {
                const int lo = ((g & 1) ? lo1 : lo0) >> (4 * (g >> 1));
                const int q = ((lo & 0xF) | (((hi >> (2 * g)) & 3) << 4)) - 32;
                const float wv = d * (float)b->scales[8 * h + 2 * g + lane / 16] * (float)q;
#pragma unroll
                for (int j = 0; j < MV_ROWS; j++)
                    if (j < gr.n_rows) acc[j] += wv * __half2float(xb[(pf_i64)j * n_in + 128 * h + 32 * g]);
            }
        }
    }
    mv_store(gr, acc, n_out);
}

/* F16: lane t takes the 8 weights 256k + 8t .. 256k + 8t + 7 of the row, in one
 * 16-byte load (a warp reads 512 contiguous bytes); n_in a multiple of 8. */
extern "C" __global__ void matvec_f16_f16(const __half *__restrict__ w, const __half *__restrict__ x,
                                          __half *__restrict__ y, int n_in, int n_out, int n_x) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (row >= n_out) return;
    const __half *wr = w + (pf_i64)row * n_in;
    const MvGroup g = mv_group(x, y, n_in, n_out, n_x, row);
    float acc[MV_ROWS] = {};
    for (int i = 8 * lane; i < n_in; i += 256) {
        const uint4 wq = *(const uint4 *)(wr + i);
        const __half *wh = (const __half *)&wq;
        float wf[8];
#pragma unroll
        for (int e = 0; e < 8; e++) wf[e] = __half2float(wh[e]);
#pragma unroll
        for (int j = 0; j < MV_ROWS; j++)
            if (j < g.n_rows) {
                const uint4 xq = *(const uint4 *)(g.x + (pf_i64)j * n_in + i);
                const __half *xh = (const __half *)&xq;
#pragma unroll
                for (int e = 0; e < 8; e++) acc[j] += wf[e] * __half2float(xh[e]);
            }
    }
    mv_store(g, acc, n_out);
}
