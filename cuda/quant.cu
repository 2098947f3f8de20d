/* Quantized weights on the GPU: dequantize to fp16, and the fused quantized
 * matrix x vector products of decode.
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
 *   grid (ceil(n_out / (blockDim.x / 32)), n_x), block (128: 4 warps).
 * One warp per output row; lane t reads byte t of each 32-wide run of a block
 * (coalesced), multiplies by x in float, and the warp reduces at the end.
 * blockIdx.y picks the activation row, so a small decode batch is one launch
 * (the weight rows then come from L2 after the first read). */

/* Q8_0: lane t takes weight t of every block of the row. */
extern "C" __global__ void matvec_q8_0_f16(const block_q8_0 *__restrict__ w, const __half *__restrict__ x,
                                           __half *__restrict__ y, int n_in, int n_out) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (row >= n_out) return;
    const int nb = n_in / QK8_0;
    const block_q8_0 *wr = w + (pf_i64)row * nb;
    const __half *xr = x + (pf_i64)blockIdx.y * n_in;
    float acc = 0.0f;
#pragma unroll 4
    for (int ib = 0; ib < nb; ib++)
        acc += pf_h2f(wr[ib].d) * (float)wr[ib].qs[lane] * __half2float(xr[ib * QK8_0 + lane]);
    acc = pf_warp_sum(acc);
    if (lane == 0) y[(pf_i64)blockIdx.y * n_out + row] = __float2half_rn(acc);
}

/* Q4_K: per super-block, lane t takes weights 64c + t (low nibble, sub-block
 * 2c) and 64c + 32 + t (high nibble, sub-block 2c + 1) for c = 0..3, and
 * applies d*sc and dmin*m once per sub-block: sum(w x) = d sc sum(q x) - dmin m sum(x). */
extern "C" __global__ void matvec_q4_K_f16(const block_q4_K *__restrict__ w, const __half *__restrict__ x,
                                           __half *__restrict__ y, int n_in, int n_out) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (row >= n_out) return;
    const int nb = n_in / QK_K;
    const block_q4_K *wr = w + (pf_i64)row * nb;
    const __half *xr = x + (pf_i64)blockIdx.y * n_in;
    float acc = 0.0f;
    for (int ib = 0; ib < nb; ib++) {
        const block_q4_K *b = wr + ib;
        const __half *xb = xr + ib * QK_K;
        const float d = pf_h2f(b->d), dmin = pf_h2f(b->dmin);
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const int q = b->qs[32 * c + lane];
            const float x0 = __half2float(xb[64 * c + lane]), x1 = __half2float(xb[64 * c + 32 + lane]);
            float sc0, m0, sc1, m1;
            pf_q4k_scale_min(b->scales, 2 * c, &sc0, &m0);
            pf_q4k_scale_min(b->scales, 2 * c + 1, &sc1, &m1);
            acc += d * (sc0 * (float)(q & 0xF) * x0 + sc1 * (float)(q >> 4) * x1) - dmin * (m0 * x0 + m1 * x1);
        }
    }
    acc = pf_warp_sum(acc);
    if (lane == 0) y[(pf_i64)blockIdx.y * n_out + row] = __float2half_rn(acc);
}

/* Q6_K: per super-block, lane t takes weights 128h + 32g + t (h = 0..1,
 * g = 0..3): bytes ql[64h + 32(g&1) + t] and qh[32h + t], scale 8h + 2g + t/16. */
extern "C" __global__ void matvec_q6_K_f16(const block_q6_K *__restrict__ w, const __half *__restrict__ x,
                                           __half *__restrict__ y, int n_in, int n_out) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (row >= n_out) return;
    const int nb = n_in / QK_K;
    const block_q6_K *wr = w + (pf_i64)row * nb;
    const __half *xr = x + (pf_i64)blockIdx.y * n_in;
    float acc = 0.0f;
    for (int ib = 0; ib < nb; ib++) {
        const block_q6_K *b = wr + ib;
        const __half *xb = xr + ib * QK_K;
        float part = 0.0f;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int lo0 = b->ql[64 * h + lane], lo1 = b->ql[64 * h + 32 + lane];
            const int hi = b->qh[32 * h + lane];
#pragma unroll
            for (int g = 0; g < 4; g++) {
                const int lo = ((g & 1) ? lo1 : lo0) >> (4 * (g >> 1));
                const int q = ((lo & 0xF) | (((hi >> (2 * g)) & 3) << 4)) - 32;
                const float s = (float)b->scales[8 * h + 2 * g + lane / 16];
                part += s * (float)q * __half2float(xb[128 * h + 32 * g + lane]);
            }
        }
        acc += pf_h2f(b->d) * part;
    }
    acc = pf_warp_sum(acc);
    if (lane == 0) y[(pf_i64)blockIdx.y * n_out + row] = __float2half_rn(acc);
}
