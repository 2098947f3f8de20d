/* Paged attention over an fp16 or fp8 (e4m3) KV cache, with the metadata of
 * the CPU kernel (native/ops_kernels.h, pf_paged_attention):
 *   q, out        half [n_tok, n_heads, head_dim]   (a flattened varlen batch)
 *   k/v_cache     half or fp8 e4m3 bytes [n_blocks, block_size, n_kv, head_dim]
 *   k/v_scale     (fp8 kernels) float [n_kv]: kv head j's value = e4m3 * scale[j]
 *   block_tables  int32 [n_seq, max_blocks]
 *   context_lens  int32 [n_seq]     L_s, cached tokens incl. this step's
 *   query_start   int32 [n_seq + 1] sequence s owns rows query_start[s] ..
 * Query row j of sequence s (n_q rows) sits at position L_s - n_q + j and
 * sees positions 0 ..= that one (causal), or with window > 0 only the last
 * `window` of them, (p - window, p] (sliding-window attention). softcap > 0
 * turns each scaled score s into softcap * tanh(s / softcap) (Gemma 2); 0:
 * off. Query head h reads kv head h / (n_heads / n_kv) (GQA). head_dim: a
 * multiple of 32, at most 256.
 *
 * The core is one warp running an online softmax over a run of positions:
 * lane t holds dimensions t, t + 32, ... of q, of the running output and of
 * each key / value row it reads (coalesced 64-byte reads per 32 dims).
 */
#include "common.cuh"

#define ATT_MAX_DPL 8    /* dims per lane: head_dim <= 256 */
#define FP8_E4M3_MAX 448.0f

/* fp8 e4m3 ("fn": no infinities) as a byte: sign, 4 exponent bits (bias 7), 3
 * mantissa bits; exponent 0 holds subnormals m * 2^-9; 0x7f / 0xff are NaN.
 * Arithmetic rather than bit casts, so NVRTC and the emulator run the same code. */
__device__ __forceinline__ float pf_fp8_e4m3_to_float(pf_u8 b) {
    const int e = (b >> 3) & 15, m = b & 7;
    float a;
    if ((b & 0x7f) == 0x7f) a = __int_as_float(0x7fc00000); /* NaN */
    else if (e == 0) a = ldexpf((float)m, -9);
    else a = ldexpf((float)(8 + m), e - 10);                  /* (1 + m/8) 2^(e-7) */
    return (b & 0x80) ? -a : a;
}

/* Round to nearest even, saturating to +-448 (a KV cache wants the largest
 * value, not NaN, for an outlier); NaN stays NaN. */
__device__ __forceinline__ pf_u8 pf_float_to_fp8_e4m3(float x) {
    if (x != x) return 0x7f;
    const pf_u8 sign = copysignf(1.0f, x) < 0.0f ? 0x80 : 0;
    const float a = fminf(fabsf(x), FP8_E4M3_MAX);
    if (a < 0.015625f) return sign | (pf_u8)rintf(a * 512.0f); /* under 2^-6: subnormal (8 -> 2^-6 itself) */
    int e;
    float m = rintf(frexpf(a, &e) * 16.0f);                      /* a = m/16 2^e, m in 8 ..= 16 */
    if (m == 16.0f) m = 8.0f, e++;
    return sign | (pf_u8)((e + 6) << 3) | (pf_u8)(m - 8.0f);
}

/* A cached value as float (times its kv head's scale for fp8, folded in by the caller). */
__device__ __forceinline__ float kv_value(const __half *c, pf_i64 i) { return __half2float(c[i]); }
__device__ __forceinline__ float kv_value(const pf_u8 *c, pf_i64 i) { return pf_fp8_e4m3_to_float(c[i]); }
#define ATT_DECODE_WARPS 4 /* paged_attention_decode: blockDim.x == 32 * this */

/* Online-softmax state of one warp for one (query row, head). All lanes hold
 * the same m (running max score) and l (running sum of e^(s - m)). */
struct AttnState {
    float m, l;
    float acc[ATT_MAX_DPL]; /* this lane's dims of sum e^(s - m) v */
};

__device__ __forceinline__ void attn_init(AttnState &st) {
    st.m = PF_NEG_INF;
    st.l = 0.0f;
#pragma unroll
    for (int i = 0; i < ATT_MAX_DPL; i++) st.acc[i] = 0.0f;
}

/* The first position a query row with n_ctx positions sees (0 without a window). */
__device__ __forceinline__ int attn_window_start(int n_ctx, int window) {
    return window > 0 && n_ctx > window ? n_ctx - window : 0;
}

/* Positions p_begin, p_begin + p_step, ... < p_end of one sequence into st.
 * q: this lane's dims of the query, already multiplied by the scale.
 * row_stride = n_kv * head_dim (values between positions), head_off = kv
 * head * head_dim; ks, vs: the kv head's cache scales (1 for fp16). */
template <typename T>
__device__ __forceinline__ void attn_run(AttnState &st, const float *q, const T *__restrict__ k_cache,
                                         const T *__restrict__ v_cache, const int *__restrict__ table,
                                         int block_size, pf_i64 row_stride, int head_off, int dpl, int p_begin,
                                         int p_end, int p_step, float softcap, float ks, float vs) {
    const int lane = threadIdx.x & 31;
    for (int p = p_begin; p < p_end; p += p_step) {
        const pf_i64 base =
            ((pf_i64)table[p / block_size] * block_size + p % block_size) * row_stride + head_off + lane;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_MAX_DPL; i++)
            if (i < dpl) s += q[i] * kv_value(k_cache, base + 32 * i);
        s = pf_warp_sum(s) * ks;
        if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
        if (s > st.m) { /* warp-uniform: every lane has the same s */
            const float c = expf(st.m - s); /* 0 on the first position */
            st.l *= c;
#pragma unroll
            for (int i = 0; i < ATT_MAX_DPL; i++) st.acc[i] *= c;
            st.m = s;
        }
        const float w = expf(s - st.m), wv = w * vs;
        st.l += w;
#pragma unroll
        for (int i = 0; i < ATT_MAX_DPL; i++)
            if (i < dpl) st.acc[i] += wv * kv_value(v_cache, base + 32 * i);
    }
}

/* This lane's dims of query row `row`, head h, times scale. */
__device__ __forceinline__ void attn_load_q(float *q, const __half *__restrict__ qg, pf_i64 row, int h,
                                            int n_heads, int head_dim, float scale) {
    const __half *qr = qg + (row * n_heads + h) * head_dim + (threadIdx.x & 31);
#pragma unroll
    for (int i = 0; i < ATT_MAX_DPL; i++) q[i] = i < head_dim / 32 ? __half2float(qr[32 * i]) * scale : 0.0f;
}

/* ------------------------------------------------------------------------ */
/* Prefill (any varlen batch)                                                */
/* ------------------------------------------------------------------------ */
/* paged_attention_prefill(q, k_cache, v_cache, block_tables, context_lens, query_start, out,
 *                         n_tok, n_seq, n_heads, n_kv, head_dim, block_size, max_blocks, scale,
 *                         window, softcap)
 *   grid (ceil(n_tok / (blockDim.x / 32)), n_heads), block (128: 4 warps).
 *   Warp w of block (bx, h) computes query row bx * 4 + w, head h, over its
 *   whole causal context; consecutive rows of one sequence share a block, so
 *   the keys they read come from L1 / L2. */
template <typename T>
__device__ __forceinline__ void prefill_rows(const __half *__restrict__ q, const T *__restrict__ k_cache,
                                             const T *__restrict__ v_cache, const int *__restrict__ block_tables,
                                             const int *__restrict__ context_lens,
                                             const int *__restrict__ query_start, __half *__restrict__ out,
                                             int n_tok, int n_seq, int n_heads, int n_kv, int head_dim,
                                             int block_size, int max_blocks, float scale, int window,
                                             float softcap, const float *k_scale, const float *v_scale) {
    const int row = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    const int h = blockIdx.y, lane = threadIdx.x & 31;
    if (row >= n_tok) return;
    int lo = 0, hi = n_seq; /* the s with query_start[s] <= row < query_start[s + 1] */
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (query_start[mid] <= row) lo = mid;
        else hi = mid;
    }
    const int s = lo, n_q = query_start[s + 1] - query_start[s];
    const int n_ctx = context_lens[s] - n_q + (row - query_start[s]) + 1;
    const int dpl = head_dim / 32;
    float qv[ATT_MAX_DPL];
    attn_load_q(qv, q, row, h, n_heads, head_dim, scale);
    AttnState st;
    attn_init(st);
    const int kvh = h / (n_heads / n_kv);
    attn_run(st, qv, k_cache, v_cache, block_tables + (pf_i64)s * max_blocks, block_size,
             (pf_i64)n_kv * head_dim, kvh * head_dim, dpl, attn_window_start(n_ctx, window),
             n_ctx, 1, softcap, k_scale ? k_scale[kvh] : 1.0f, v_scale ? v_scale[kvh] : 1.0f);
    __half *o = out + ((pf_i64)row * n_heads + h) * head_dim + lane;
    const float inv = st.l > 0.0f ? 1.0f / st.l : 0.0f;
#pragma unroll
    for (int i = 0; i < ATT_MAX_DPL; i++)
        if (i < dpl) o[32 * i] = __float2half_rn(st.acc[i] * inv);
}

extern "C" __global__ void paged_attention_prefill(const __half *__restrict__ q, const __half *__restrict__ k_cache,
                                                   const __half *__restrict__ v_cache, const int *__restrict__ block_tables,
                                                   const int *__restrict__ context_lens,
                                                   const int *__restrict__ query_start, __half *__restrict__ out,
                                                   int n_tok, int n_seq, int n_heads, int n_kv, int head_dim,
                                                   int block_size, int max_blocks, float scale, int window,
                                                   float softcap) {
    prefill_rows(q, k_cache, v_cache, block_tables, context_lens, query_start, out, n_tok, n_seq, n_heads, n_kv,
                 head_dim, block_size, max_blocks, scale, window, softcap, (const float *)0, (const float *)0);
}

/* paged_attention_prefill_fp8: the same over fp8 e4m3 caches, k_scale / v_scale
 * float [n_kv] after softcap. */
extern "C" __global__ void paged_attention_prefill_fp8(const __half *__restrict__ q, const pf_u8 *__restrict__ k_cache,
                                                       const pf_u8 *__restrict__ v_cache,
                                                       const int *__restrict__ block_tables,
                                                       const int *__restrict__ context_lens,
                                                       const int *__restrict__ query_start, __half *__restrict__ out,
                                                       int n_tok, int n_seq, int n_heads, int n_kv, int head_dim,
                                                       int block_size, int max_blocks, float scale, int window,
                                                       float softcap, const float *__restrict__ k_scale,
                                                       const float *__restrict__ v_scale) {
    prefill_rows(q, k_cache, v_cache, block_tables, context_lens, query_start, out, n_tok, n_seq, n_heads, n_kv,
                 head_dim, block_size, max_blocks, scale, window, softcap, k_scale, v_scale);
}

/* ------------------------------------------------------------------------ */
/* Decode: the last query row of each sequence, split over the context       */
/* ------------------------------------------------------------------------ */
/* paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, query_start,
 *                        part_acc, part_ml, n_heads, n_kv, head_dim, block_size, max_blocks,
 *                        partition, scale, window, softcap)
 *   grid (n_heads, n_seq, n_parts), block (128 = ATT_DECODE_WARPS warps, exactly);
 *   n_parts >= ceil(max_s L_s / partition).
 *   part_acc  float [n_seq, n_heads, n_parts, head_dim]  unnormalized output
 *   part_ml   float [n_seq, n_heads, n_parts, 2]         (max score, sum)
 * Block (h, s, z) covers positions [z * partition, (z + 1) * partition) of
 * sequence s for its row query_start[s + 1] - 1 (position L_s - 1): warp w
 * takes every 4th of them, then the warps merge through shared memory.
 * Partitions past L_s, and sequences without query rows, write nothing;
 * paged_attention_decode_reduce skips them by the same rule. A partition
 * wholly before the window writes max -inf and sum 0, which the reduction
 * weighs by e^-inf = 0 (the partition holding L_s - 1 always has a position). */
template <typename T>
__device__ __forceinline__ void decode_partition(const __half *__restrict__ q, const T *__restrict__ k_cache,
                                                 const T *__restrict__ v_cache, const int *__restrict__ block_tables,
                                                 const int *__restrict__ context_lens,
                                                 const int *__restrict__ query_start, float *__restrict__ part_acc,
                                                 float *__restrict__ part_ml, int n_heads, int n_kv, int head_dim,
                                                 int block_size, int max_blocks, int partition, float scale,
                                                 int window, float softcap, const float *k_scale,
                                                 const float *v_scale) {
    __shared__ float sh_ml[ATT_DECODE_WARPS][2];
    __shared__ float sh_acc[ATT_DECODE_WARPS][32 * ATT_MAX_DPL]; /* per warp [head_dim]: merged below */
    const int h = blockIdx.x, s = blockIdx.y, z = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = ATT_DECODE_WARPS;
    const int n_ctx = context_lens[s];
    const int p0 = z * partition, p1 = min(p0 + partition, n_ctx);
    if (query_start[s + 1] == query_start[s] || p0 >= n_ctx) return; /* uniform over the block */
    const int p_begin = max(p0, attn_window_start(n_ctx, window));
    const int dpl = head_dim / 32;
    float qv[ATT_MAX_DPL];
    attn_load_q(qv, q, query_start[s + 1] - 1, h, n_heads, head_dim, scale);
    AttnState st;
    attn_init(st);
    const int kvh = h / (n_heads / n_kv);
    attn_run(st, qv, k_cache, v_cache, block_tables + (pf_i64)s * max_blocks, block_size,
             (pf_i64)n_kv * head_dim, kvh * head_dim, dpl, p_begin + warp, p1, n_warps, softcap,
             k_scale ? k_scale[kvh] : 1.0f, v_scale ? v_scale[kvh] : 1.0f);
    if (lane == 0) sh_ml[warp][0] = st.m, sh_ml[warp][1] = st.l;
#pragma unroll
    for (int i = 0; i < ATT_MAX_DPL; i++)
        if (i < dpl) sh_acc[warp][lane + 32 * i] = st.acc[i];
    __syncthreads();
    float m = PF_NEG_INF;
    for (int w = 0; w < n_warps; w++) m = fmaxf(m, sh_ml[w][0]); /* -inf only before the window */
    const pf_i64 at = ((pf_i64)s * n_heads + h) * gridDim.z + z;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < n_warps; w++)
            if (sh_ml[w][0] > PF_NEG_INF) o += expf(sh_ml[w][0] - m) * sh_acc[w][d];
        part_acc[at * head_dim + d] = o;
    }
    if (threadIdx.x == 0) {
        float l = 0.0f;
        for (int w = 0; w < n_warps; w++)
            if (sh_ml[w][0] > PF_NEG_INF) l += expf(sh_ml[w][0] - m) * sh_ml[w][1];
        part_ml[2 * at] = m;
        part_ml[2 * at + 1] = l;
    }
}

extern "C" __global__ void paged_attention_decode(const __half *__restrict__ q, const __half *__restrict__ k_cache,
                                                  const __half *__restrict__ v_cache, const int *__restrict__ block_tables,
                                                  const int *__restrict__ context_lens,
                                                  const int *__restrict__ query_start, float *__restrict__ part_acc,
                                                  float *__restrict__ part_ml, int n_heads, int n_kv, int head_dim,
                                                  int block_size, int max_blocks, int partition, float scale,
                                                  int window, float softcap) {
    decode_partition(q, k_cache, v_cache, block_tables, context_lens, query_start, part_acc, part_ml, n_heads, n_kv,
                     head_dim, block_size, max_blocks, partition, scale, window, softcap, (const float *)0,
                     (const float *)0);
}

/* paged_attention_decode_fp8: the same over fp8 e4m3 caches, k_scale / v_scale float [n_kv] after softcap. */
extern "C" __global__ void paged_attention_decode_fp8(const __half *__restrict__ q, const pf_u8 *__restrict__ k_cache,
                                                      const pf_u8 *__restrict__ v_cache,
                                                      const int *__restrict__ block_tables,
                                                      const int *__restrict__ context_lens,
                                                      const int *__restrict__ query_start,
                                                      float *__restrict__ part_acc, float *__restrict__ part_ml,
                                                      int n_heads, int n_kv, int head_dim, int block_size,
                                                      int max_blocks, int partition, float scale, int window,
                                                      float softcap, const float *__restrict__ k_scale,
                                                      const float *__restrict__ v_scale) {
    decode_partition(q, k_cache, v_cache, block_tables, context_lens, query_start, part_acc, part_ml, n_heads, n_kv,
                     head_dim, block_size, max_blocks, partition, scale, window, softcap, k_scale, v_scale);
}

/* paged_attention_decode_reduce(part_acc, part_ml, context_lens, query_start, out,
 *                               n_heads, head_dim, n_parts, partition)
 *   grid (n_heads, n_seq), block (128): merges the partitions of
 *   paged_attention_decode into out row query_start[s + 1] - 1, head h. */
extern "C" __global__ void paged_attention_decode_reduce(const float *__restrict__ part_acc,
                                                         const float *__restrict__ part_ml,
                                                         const int *__restrict__ context_lens,
                                                         const int *__restrict__ query_start, __half *__restrict__ out,
                                                         int n_heads, int head_dim, int n_parts, int partition) {
    const int h = blockIdx.x, s = blockIdx.y;
    if (query_start[s + 1] == query_start[s]) return;
    const int used = min(n_parts, (context_lens[s] + partition - 1) / partition);
    const pf_i64 at = ((pf_i64)s * n_heads + h) * n_parts;
    float m = PF_NEG_INF, l = 0.0f;
    for (int z = 0; z < used; z++) m = fmaxf(m, part_ml[2 * (at + z)]);
    for (int z = 0; z < used; z++) l += expf(part_ml[2 * (at + z)] - m) * part_ml[2 * (at + z) + 1];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    __half *o = out + ((pf_i64)(query_start[s + 1] - 1) * n_heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int z = 0; z < used; z++) acc += expf(part_ml[2 * (at + z)] - m) * part_acc[(at + z) * head_dim + d];
        o[d] = __float2half_rn(acc * inv);
    }
}

/* ------------------------------------------------------------------------ */
/* KV store                                                                  */
/* ------------------------------------------------------------------------ */
/* kv_store_f16(k, v, k_cache, v_cache, slot_mapping, row)
 *   k, v  half [n_tok, row] (row = n_kv * head_dim)   slot_mapping int32 [n_tok]
 *   grid (n_tok), block (128): token t's rows go to cache slot
 *   slot_mapping[t] (= block id * block_size + offset); a negative slot
 *   (padding) is skipped. */
extern "C" __global__ void kv_store_f16(const __half *__restrict__ k, const __half *__restrict__ v,
                                        __half *__restrict__ k_cache, __half *__restrict__ v_cache,
                                        const int *__restrict__ slot_mapping, int row) {
    const int slot = slot_mapping[blockIdx.x];
    if (slot < 0) return;
    const pf_i64 src = (pf_i64)blockIdx.x * row, dst = (pf_i64)slot * row;
    for (int j = threadIdx.x; j < row; j += blockDim.x) {
        k_cache[dst + j] = k[src + j];
        v_cache[dst + j] = v[src + j];
    }
}

/* kv_store_fp8(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, n_kv, head_dim)
 *   as kv_store_f16 into fp8 e4m3 caches: value / its kv head's scale, rounded
 *   to nearest even and saturated to +-448 (pf_float_to_fp8_e4m3). */
extern "C" __global__ void kv_store_fp8(const __half *__restrict__ k, const __half *__restrict__ v,
                                        pf_u8 *__restrict__ k_cache, pf_u8 *__restrict__ v_cache,
                                        const int *__restrict__ slot_mapping, const float *__restrict__ k_scale,
                                        const float *__restrict__ v_scale, int n_kv, int head_dim) {
    const int slot = slot_mapping[blockIdx.x], row = n_kv * head_dim;
    if (slot < 0) return;
    const pf_i64 src = (pf_i64)blockIdx.x * row, dst = (pf_i64)slot * row;
    for (int j = threadIdx.x; j < row; j += blockDim.x) {
        const int h = j / head_dim;
        k_cache[dst + j] = pf_float_to_fp8_e4m3(__half2float(k[src + j]) / k_scale[h]);
        v_cache[dst + j] = pf_float_to_fp8_e4m3(__half2float(v[src + j]) / v_scale[h]);
    }
}
