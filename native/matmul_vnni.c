/* AVX-512 VNNI kernels: dots for K-quant weights (Q4_K, Q5_K, Q6_K) against
 * Q8_K activations, 1..4 activation rows per pass over a weight row, the
 * tiles of the GEMMs over weights repacked 16 rows at a time (x16_formats.h),
 * and the F32 / F16 / BF16 row dots and prefill tile on 16-lane FMAs.
 *
 * vpdpbusd multiplies 64 unsigned weight bytes by 64 signed activation bytes
 * and adds each group of 4 products into one of 16 int32 lanes. A 64-byte
 * weight vector is laid out to meet 64 contiguous activation bytes, so the
 * activation rows are read as they are (no per-token shuffles):
 *   Q4_K / Q5_K  vector c = [low nibbles of qs[32c..] | high nibbles], i.e.
 *                sub-blocks 2c and 2c+1 (weights 64c .. 64c+63);
 *   Q6_K         per half h, [groups 0 | 1] and [groups 2 | 3] of quants.h.
 * The 16 int32 sums of two such vectors fit int16 (|sum| < 2^15, checked per
 * type below), so one packs + one vpmaddwd applies 16 sub-block scales at
 * once; the scale vector is one vpermw of the block's scales.
 */
#include "matmul_vnni.h"

#include <stdlib.h>
#include <string.h>

#include "cpu_probe.h"
#include "k_scales.h"
#include "x16_formats.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define PF_VNNI_BUILD 1
#endif

#ifndef PF_VNNI_BUILD

int pf_vnni_available(void) { return 0; }
pf_vec_dot_fn pf_vnni_vec_dot(int type) { (void)type; return NULL; }
pf_x16_tile_fn pf_vnni_x16_tile(int type) { (void)type; return NULL; }
pf_vec_dot_tile_fn pf_vnni_dense_tile(int type) { (void)type; return NULL; }

#else

#include <cpuid.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Compiled for the baseline target: this runs on every CPU. */
static int vnni_probe(void) {
    if (pf_env_flag("PYFORGE_DISABLE_VNNI")) return 0;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return 0; /* OSXSAVE */
    const int f16c_fma = ((c >> 29) & 1) && ((c >> 12) & 1);
    if (!f16c_fma || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    const int avx512 = ((b >> 5) & 1) && ((b >> 16) & 1) && ((b >> 17) & 1) && ((b >> 30) & 1) &&
                       ((b >> 31) & 1);          /* AVX2, F, DQ, BW, VL */
    if (!avx512 || !((c >> 11) & 1)) return 0;  /* AVX512_VNNI */
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (lo & 0xe6u) == 0xe6u;               /* the OS saves the AVX and AVX-512 state */
}

int pf_vnni_available(void) {
    static int state = -1;
    return pf_probe_once(&state, vnni_probe);
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include <immintrin.h>

#define PF_INLINE static inline __attribute__((always_inline))
/* Pin v to a register (as in matmul.c): no re-association into a wide tree. */
#define PF_KEEP(v) __asm__("" : "+v"(v))

PF_INLINE float half_to_float(pf_half h) { return _cvtsh_ss(h); }

/* 64-bit lanes 4..7 shifted by `hi`, lanes 0..3 by `lo`. */
PF_INLINE __m512i halves(int lo, int hi) { return _mm512_set_epi64(hi, hi, hi, hi, lo, lo, lo, lo); }

/* The 32 bytes at p in both 256-bit halves. */
PF_INLINE __m512i both_halves(const uint8_t *p) {
    return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
}

/* Two vectors of 16 int32 sums (each < 2^15 in magnitude) times int16 scales:
 * packs puts, in 128-bit lane k, lanes 4k..4k+3 of d0 then of d1; `scales`
 * holds each lane's sub-block scale in that order. */
PF_INLINE __m512i scaled_pair(__m512i d0, __m512i d1, __m512i scales) {
    return _mm512_madd_epi16(_mm512_packs_epi32(d0, d1), scales);
}

/* -- Q4_K / Q5_K ------------------------------------------------------------ */

/* Weights 64c .. 64c+63 of a Q4_K / Q5_K block as unsigned bytes (0..15, or
 * 0..31 with qh). Q5_K: bit j of qh[l] is the fifth bit of weight 32j + l. */
PF_INLINE __m512i k_weights(const uint8_t *qs, const uint8_t *qh, int c) {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    __m512i q = _mm512_and_si512(_mm512_srlv_epi64(both_halves(qs + 32 * c), halves(0, 4)), m4);
    if (qh) {
        const __m512i bit = _mm512_and_si512(_mm512_srlv_epi64(both_halves(qh), halves(2 * c, 2 * c + 1)),
                                             _mm512_set1_epi8(0x01));
        q = _mm512_or_si512(q, _mm512_slli_epi16(bit, 4));
    }
    return q;
}

/* K_SCALE_INDEX[base / 4], in packs order (scaled_pair): lanes of d0 = sub-blocks (base, base + 1),
 * d1 = (base + 2, base + 3), 8 int32 lanes each: 128-bit lanes 0-1 hold
 * base / base+2, lanes 2-3 base+1 / base+3. */
static const short K_SCALE_INDEX[2][32] = {
    {0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2, 1, 1, 1, 1, 3, 3, 3, 3, 1, 1, 1, 1, 3, 3, 3, 3},
    {4, 4, 4, 4, 6, 6, 6, 6, 4, 4, 4, 4, 6, 6, 6, 6, 5, 5, 5, 5, 7, 7, 7, 7, 5, 5, 5, 5, 7, 7, 7, 7},
};

/* One Q4_K / Q5_K block against nr activation rows: acc[t] += d * d_a * sum
 * sc[j] (q . a)_j - dmin * d_a * sum m[j] (sum of a)_j. |(q . a) over 4| <=
 * 4 * 31 * 127 < 2^15, so the packs are exact. */
PF_INLINE void k_block(const uint8_t *qs, const uint8_t *qh, pf_half dh, pf_half dminh, const uint8_t *scales,
                       const block_q8_K *const *y, int64_t i, const int nr, __m512 *acc) {
    const __m128i sm = k_scales_mins(scales);
    const __m512i sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
    const __m512i s01 = _mm512_permutexvar_epi16(_mm512_loadu_si512(K_SCALE_INDEX[0]), sc16);
    const __m512i s23 = _mm512_permutexvar_epi16(_mm512_loadu_si512(K_SCALE_INDEX[1]), sc16);
    const __m128i dup = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm, dup)); /* m[j] at bsums 2j, 2j+1 */
    __m512i w[4];
    for (int c = 0; c < 4; c++) w[c] = k_weights(qs, qh, c);
    const float d = half_to_float(dh), dmin = half_to_float(dminh);
    for (int t = 0; t < nr; t++) {
        const int8_t *aq = y[t][i].qs;
        __m512i p[4];
        for (int c = 0; c < 4; c++)
            p[c] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[c], _mm512_loadu_si512(aq + 64 * c));
        const __m512i isum = _mm512_add_epi32(scaled_pair(p[0], p[1], s01), scaled_pair(p[2], p[3], s23));
        const __m256i msum = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)y[t][i].bsums), mins16);
        acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(d * y[t][i].d), _mm512_cvtepi32_ps(isum), acc[t]);
        acc[t] = _mm512_fnmadd_ps(_mm512_set1_ps(dmin * y[t][i].d),
                                  _mm512_cvtepi32_ps(_mm512_zextsi256_si512(msum)), acc[t]);
        PF_KEEP(acc[t]);
    }
}

PF_INLINE void dot_q4_K(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out) {
    const block_q4_K *x = w;
    const block_q8_K *y[4];
    __m512 acc[4];
    for (int t = 0; t < nr; t++) y[t] = (const block_q8_K *)((const char *)a + t * as), acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) k_block(x[i].qs, NULL, x[i].d, x[i].dmin, x[i].scales, y, i, nr, acc);
    for (int t = 0; t < nr; t++) out[t] = _mm512_reduce_add_ps(acc[t]);
}

PF_INLINE void dot_q5_K(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out) {
    const block_q5_K *x = w;
    const block_q8_K *y[4];
    __m512 acc[4];
    for (int t = 0; t < nr; t++) y[t] = (const block_q8_K *)((const char *)a + t * as), acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++)
        k_block(x[i].qs, x[i].qh, x[i].d, x[i].dmin, x[i].scales, y, i, nr, acc);
    for (int t = 0; t < nr; t++) out[t] = _mm512_reduce_add_ps(acc[t]);
}

/* -- Q6_K ------------------------------------------------------------------- */

/* Half h of a Q6_K block as unsigned bytes 0..63: q[0] = groups 0 | 1 (weights
 * 128h .. 128h+63), q[1] = groups 2 | 3 (layout in quants.h). */
PF_INLINE void q6_half(const block_q6_K *b, int h, __m512i q[2]) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
    const __m512i ql = _mm512_loadu_si512(b->ql + 64 * h);
    const __m512i qh = both_halves(b->qh + 32 * h);
    q[0] = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_and_si512(_mm512_sllv_epi64(qh, halves(4, 2)), m30));
    q[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                           _mm512_and_si512(_mm512_srlv_epi64(qh, halves(0, 2)), m30));
}

/* Q6_SCALE_INDEX[h], in packs order: d0 lanes 4k..4k+3 = sub-block 8h + k, d1's = 8h + 4 + k. */
static const short Q6_SCALE_INDEX[2][32] = {
    {0, 0, 0, 0, 4, 4, 4, 4, 1, 1, 1, 1, 5, 5, 5, 5, 2, 2, 2, 2, 6, 6, 6, 6, 3, 3, 3, 3, 7, 7, 7, 7},
    {8, 8, 8, 8, 12, 12, 12, 12, 9, 9, 9, 9, 13, 13, 13, 13, 10, 10, 10, 10, 14, 14, 14, 14, 11, 11, 11, 11, 15, 15, 15, 15},
};

/* d * d_a * sum_s scales[s] * ((q - 32) . a)_s: unsigned q through vpdpbusd,
 * the -32 back as -32 * sum_s scales[s] * bsums[s]. |(q . a) over 4| <= 4 *
 * 63 * 127 < 2^15, so the packs are exact. */
PF_INLINE void q6_block(const block_q6_K *b, const block_q8_K *const *y, int64_t i, const int nr, __m512 *acc) {
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b->scales));
    const __m512i s0 = _mm512_permutexvar_epi16(_mm512_loadu_si512(Q6_SCALE_INDEX[0]), _mm512_castsi256_si512(sc16));
    const __m512i s1 = _mm512_permutexvar_epi16(_mm512_loadu_si512(Q6_SCALE_INDEX[1]), _mm512_castsi256_si512(sc16));
    __m512i q[4];
    q6_half(b, 0, q);
    q6_half(b, 1, q + 2);
    const float d = half_to_float(b->d);
    for (int t = 0; t < nr; t++) {
        const int8_t *aq = y[t][i].qs;
        __m512i p[4];
        for (int k = 0; k < 4; k++)
            p[k] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[k], _mm512_loadu_si512(aq + 64 * k));
        const __m256i corr = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)y[t][i].bsums), sc16);
        __m512i isum = _mm512_add_epi32(scaled_pair(p[0], p[1], s0), scaled_pair(p[2], p[3], s1));
        isum = _mm512_sub_epi32(isum, _mm512_zextsi256_si512(_mm256_slli_epi32(corr, 5)));
        acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(d * y[t][i].d), _mm512_cvtepi32_ps(isum), acc[t]);
        PF_KEEP(acc[t]);
    }
}

PF_INLINE void dot_q6_K(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out) {
    const block_q6_K *x = w;
    const block_q8_K *y[4];
    __m512 acc[4];
    for (int t = 0; t < nr; t++) y[t] = (const block_q8_K *)((const char *)a + t * as), acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) q6_block(x + i, y, i, nr, acc);
    for (int t = 0; t < nr; t++) out[t] = _mm512_reduce_add_ps(acc[t]);
}

/* Each kernel is instantiated for a constant nr (1..4), as in matmul.c. */
#define NR_DISPATCH(name, kernel)                                                                  \
    static void name(int64_t n, const void *w, const void *a, size_t as, int nr, float *out) {     \
        switch (nr) {                                                                              \
        case 1: kernel(n, w, a, as, 1, out); break;                                                \
        case 2: kernel(n, w, a, as, 2, out); break;                                                \
        case 3: kernel(n, w, a, as, 3, out); break;                                                \
        default: kernel(n, w, a, as, 4, out); break;                                               \
        }                                                                                          \
    }
NR_DISPATCH(vec_dot_q4_K_vnni, dot_q4_K)
NR_DISPATCH(vec_dot_q5_K_vnni, dot_q5_K)
NR_DISPATCH(vec_dot_q6_K_vnni, dot_q6_K)

/* -- the x16 GEMM tiles (x16_formats.h) --------------------------------------- */

PF_INLINE __m512i bcast_word(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* Bit b of every byte of v, moved to bit 4 (the fifth bit of a Q5_K weight). */
PF_INLINE __m512i bit_to_16(__m512i v, const int b) {
    const __m512i m = _mm512_set1_epi8(0x10);
    if (b < 4) return _mm512_and_si512(_mm512_slli_epi16(v, 4 - b), m);
    if (b > 4) return _mm512_and_si512(_mm512_srli_epi16(v, b - 4), m);
    return _mm512_and_si512(v, m);
}

/* out[t0 + t][16 gr .. 16 gr + 16) for T tokens against row group gr. Per
 * block: 64 vpdpbusd per token into one int32 sum per sub-block (16 rows in the
 * lanes), one vpmulld by the row scales per sub-block, 4 vpdpwssd for the
 * mins, one float update. */

PF_INLINE void k_x16_tile(const pf_x16_job *job, int64_t gr, int64_t t0, const int T, const int is_q5) {
    const int64_t nb = job->nb;
    const size_t block_bytes = is_q5 ? sizeof(block_q5_K_x16) : sizeof(block_q4_K_x16);
    const char *wb = (const char *)job->w + (size_t)(gr * nb) * block_bytes;
    const block_q8_K *y[PF_X16_TOKENS];
    const int16_t *bs[PF_X16_TOKENS];
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    __m512 facc[PF_X16_TOKENS];
    for (int t = 0; t < T; t++)
        y[t] = (const block_q8_K *)job->act + (t0 + t) * nb, bs[t] = job->k_sums + (t0 + t) * nb * 8, facc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const block_q4_K_x16 *b = (const block_q4_K_x16 *)(wb + (size_t)i * block_bytes);
        const uint8_t (*hb)[64] = is_q5 ? ((const block_q5_K_x16 *)b)->hb : NULL;
        __m512i isum[PF_X16_TOKENS];
        for (int t = 0; t < T; t++) isum[t] = _mm512_setzero_si512();
        /* A block is not read front to back (scales, weights, then mins),
         * which the hardware prefetchers follow poorly (1 token: 17 instead of
         * 34 GB/s from DRAM): fetch two blocks ahead, an eighth a sub-block. */
        const char *ahead = (const char *)b + 2 * block_bytes;
        const int lines = (int)(block_bytes / 64 / 8);
        for (int j = 0; j < 8; j++) {
            for (int l = 0; l < lines; l++) _mm_prefetch(ahead + 64 * (lines * j + l), _MM_HINT_T0);
            const __m512i h5 = is_q5 ? _mm512_loadu_si512(hb[j]) : _mm512_setzero_si512();
            /* few tokens: low and high nibbles in separate sums, so the
             * vpdpbusd chain of a sub-block is 4 long, not 8 (its latency,
             * not the loads, would bound a decode step) */
            __m512i sub[PF_X16_TOKENS], sub_hi[PF_X16_TOKENS / 2];
            for (int t = 0; t < T; t++) sub[t] = _mm512_setzero_si512();
            for (int t = 0; t < T && T <= PF_X16_TOKENS / 2; t++) sub_hi[t] = _mm512_setzero_si512();
            for (int g = 4 * j; g < 4 * j + 4; g++) {
                const __m512i wv = _mm512_loadu_si512(b->qs[g]);
                __m512i lo = _mm512_and_si512(wv, m4), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4);
                if (is_q5) {
                    lo = _mm512_or_si512(lo, bit_to_16(h5, 2 * (g - 4 * j)));
                    hi = _mm512_or_si512(hi, bit_to_16(h5, 2 * (g - 4 * j) + 1));
                }
                for (int t = 0; t < T; t++) {
                    const int8_t *a = y[t][i].qs + 8 * g;
                    sub[t] = _mm512_dpbusd_epi32(sub[t], lo, bcast_word(a));
                    if (T <= PF_X16_TOKENS / 2) sub_hi[t] = _mm512_dpbusd_epi32(sub_hi[t], hi, bcast_word(a + 4));
                    else sub[t] = _mm512_dpbusd_epi32(sub[t], hi, bcast_word(a + 4));
                }
            }
            const __m512i s = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b->sc[j]));
            for (int t = 0; t < T; t++) {
                const __m512i v = T <= PF_X16_TOKENS / 2 ? _mm512_add_epi32(sub[t], sub_hi[t]) : sub[t];
                isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(v, s));
            }
        }
        const __m512 d = _mm512_loadu_ps(b->d), dmin = _mm512_loadu_ps(b->dmin);
        for (int t = 0; t < T; t++) {
            __m512i msum = _mm512_setzero_si512();
            for (int p = 0; p < 4; p++)
                msum = _mm512_dpwssd_epi32(msum, _mm512_loadu_si512(b->m[p]), bcast_word(bs[t] + 8 * i + 2 * p));
            __m512 v = _mm512_mul_ps(d, _mm512_cvtepi32_ps(isum[t]));
            v = _mm512_fnmadd_ps(dmin, _mm512_cvtepi32_ps(msum), v);
            facc[t] = _mm512_fmadd_ps(_mm512_set1_ps(y[t][i].d), v, facc[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm512_storeu_ps(job->out + (t0 + t) * job->n_out + 16 * gr, facc[t]);
}

/* A tile of n <= PF_X16_TOKENS tokens (pf_x16_tile_fn), T a literal in each
 * instance so the per-token sums live in registers. */
#define TOKEN_DISPATCH(name, tile)                                                                 \
    static void name(const pf_x16_job *job, int64_t gr, int64_t t0, int n) {                             \
        switch (n) {                                                                               \
        case 1: tile(job, gr, t0, 1); break;                                                       \
        case 2: tile(job, gr, t0, 2); break;                                                       \
        case 3: tile(job, gr, t0, 3); break;                                                       \
        case 4: tile(job, gr, t0, 4); break;                                                       \
        case 5: tile(job, gr, t0, 5); break;                                                       \
        case 6: tile(job, gr, t0, 6); break;                                                       \
        case 7: tile(job, gr, t0, 7); break;                                                       \
        default: tile(job, gr, t0, 8); break;                                                      \
        }                                                                                          \
    }
PF_INLINE void q4_K_x16_tile(const pf_x16_job *job, int64_t gr, int64_t t0, const int T) {
    k_x16_tile(job, gr, t0, T, 0);
}
PF_INLINE void q5_K_x16_tile(const pf_x16_job *job, int64_t gr, int64_t t0, const int T) {
    k_x16_tile(job, gr, t0, T, 1);
}
TOKEN_DISPATCH(q4_K_tile, q4_K_x16_tile)
TOKEN_DISPATCH(q5_K_tile, q5_K_x16_tile)

/* -- Q6_K_X16 ---------------------------------------------------------------- */

/* k-group 2h + e of a block as two vectors of 4 columns per row lane (0..63). */
PF_INLINE void q6_group(const block_q6_K_x16 *b, int h, int e, __m512i *lo, __m512i *hi) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
    const __m512i wv = _mm512_loadu_si512(b->qs[2 * h + e]), hb = _mm512_loadu_si512(b->hb[h]);
    const __m512i l4 = _mm512_and_si512(wv, m4), h4 = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4);
    if (e == 0) {
        *lo = _mm512_or_si512(l4, _mm512_and_si512(_mm512_slli_epi16(hb, 4), m30));
        *hi = _mm512_or_si512(h4, _mm512_and_si512(_mm512_slli_epi16(hb, 2), m30));
    } else {
        *lo = _mm512_or_si512(l4, _mm512_and_si512(hb, m30));
        *hi = _mm512_or_si512(h4, _mm512_and_si512(_mm512_srli_epi16(hb, 2), m30));
    }
}

/* d * d_a * sum_s sc_s ((q - 32) . a)_s for T tokens: unsigned q through
 * vpdpbusd per sub-block, times the row scales (vpmulld), and the -32 back as
 * 32 * sum_s sc_s * bsums_s (vpdpwssd on the scale pairs). */
PF_INLINE void q6_K_x16_tile(const pf_x16_job *job, int64_t gr, int64_t t0, const int T) {
    const block_q6_K_x16 *wb = (const block_q6_K_x16 *)job->w + gr * job->nb;
    const block_q8_K *y[PF_X16_TOKENS];
    __m512 facc[PF_X16_TOKENS];
    for (int t = 0; t < T; t++) y[t] = (const block_q8_K *)job->act + (t0 + t) * job->nb, facc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < job->nb; i++) {
        const block_q6_K_x16 *b = wb + i;
        const char *ahead = (const char *)(b + 2);  /* not read front to back: see q4_K_x16_tile */
        __m512i isum[PF_X16_TOKENS];
        for (int t = 0; t < T; t++) isum[t] = _mm512_setzero_si512();
        for (int p = 0; p < 8; p++) {
            for (int l = 0; l < 7; l++) _mm_prefetch(ahead + 64 * (7 * p + l), _MM_HINT_T0);
            const __m512i pair = _mm512_loadu_si512(b->sc[p]);
            const __m512i s_even = _mm512_srai_epi32(_mm512_slli_epi32(pair, 16), 16);
            const __m512i s_odd = _mm512_srai_epi32(pair, 16);
            for (int s = 2 * p; s < 2 * p + 2; s++) {   /* sub-block s: k-groups 2s, 2s+1 = hb row s */
                __m512i lo0, hi0, lo1, hi1;
                q6_group(b, s, 0, &lo0, &hi0);
                q6_group(b, s, 1, &lo1, &hi1);
                const __m512i sc = s & 1 ? s_odd : s_even;
                for (int t = 0; t < T; t++) {
                    const int8_t *a = y[t][i].qs + 16 * s;
                    __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo0, bcast_word(a));
                    __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi0, bcast_word(a + 4));
                    d0 = _mm512_dpbusd_epi32(d0, lo1, bcast_word(a + 8));
                    d1 = _mm512_dpbusd_epi32(d1, hi1, bcast_word(a + 12));
                    isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(_mm512_add_epi32(d0, d1), sc));
                }
            }
        }
        const __m512 d = _mm512_loadu_ps(b->d);
        for (int t = 0; t < T; t++) {
            __m512i corr = _mm512_setzero_si512();
            for (int p = 0; p < 8; p++)
                corr = _mm512_dpwssd_epi32(corr, _mm512_loadu_si512(b->sc[p]), bcast_word(y[t][i].bsums + 2 * p));
            const __m512i v = _mm512_sub_epi32(isum[t], _mm512_slli_epi32(corr, 5));
            facc[t] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(y[t][i].d)), _mm512_cvtepi32_ps(v), facc[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm512_storeu_ps(job->out + (t0 + t) * job->n_out + 16 * gr, facc[t]);
}

TOKEN_DISPATCH(q6_K_tile, q6_K_x16_tile)

/* -- Q8_0_X16 and Q4_0_X16 ---------------------------------------------------
 * The weights are unsigned (Q8_0's + 128, Q4_0's q): the offset (128 or 8)
 * times sum(a) is the same for every row and comes off once per block and token. */

/* Block i's 8 weight vectors, columns 4g .. 4g+3 in vector g. */
PF_INLINE void q32_x16_weights(const void *w, int64_t i, const int is_q4, __m512i wv[8]) {
    if (is_q4) {
        const block_q4_0_x16 *b = (const block_q4_0_x16 *)w + i;
        const __m512i m4 = _mm512_set1_epi8(0x0f);
        for (int g = 0; g < 4; g++) {
            const __m512i v = _mm512_loadu_si512(b->qs[g]);
            wv[2 * g] = _mm512_and_si512(v, m4), wv[2 * g + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        }
    } else {
        const block_q8_0_x16 *b = (const block_q8_0_x16 *)w + i;
        for (int g = 0; g < 8; g++) wv[g] = _mm512_loadu_si512(b->qs[g]);
    }
}

/* out[t0 + t][16 gr .. 16 gr + 16) = sum over blocks of d_w * d_a * (w . a), T tokens. */
PF_INLINE void q32_x16_tile(const pf_x16_job *job, int64_t gr, int64_t t0, const int T, const int is_q4) {
    const int64_t nb = job->nb;
    const void *wb = is_q4 ? (const void *)((const block_q4_0_x16 *)job->w + gr * nb)
                           : (const void *)((const block_q8_0_x16 *)job->w + gr * nb);
    const int32_t offset = is_q4 ? 8 : 128;
    __m512 facc[PF_X16_TOKENS];
    for (int t = 0; t < T; t++) facc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m512i wv[8];
        q32_x16_weights(wb, i, is_q4, wv);
        const __m512 d = _mm512_loadu_ps(is_q4 ? ((const block_q4_0_x16 *)wb)[i].d : ((const block_q8_0_x16 *)wb)[i].d);
        for (int t = 0; t < T; t++) {
            const int64_t at = (t0 + t) * nb + i;
            const int8_t *a = ((const block_q8_0 *)job->act)[at].qs;
            __m512i s0 = _mm512_set1_epi32(-offset * job->q_sums[at]), s1 = _mm512_setzero_si512();   /* two chains */
            for (int g = 0; g < 8; g += 2) {
                s0 = _mm512_dpbusd_epi32(s0, wv[g], bcast_word(a + 4 * g));
                s1 = _mm512_dpbusd_epi32(s1, wv[g + 1], bcast_word(a + 4 * g + 4));
            }
            const __m512 v = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
            facc[t] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(job->da[at])), v, facc[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm512_storeu_ps(job->out + (t0 + t) * job->n_out + 16 * gr, facc[t]);
}

PF_INLINE void q8_0_x16_tile(const pf_x16_job *job, int64_t gr, int64_t t0, const int T) {
    q32_x16_tile(job, gr, t0, T, 0);
}
PF_INLINE void q4_0_x16_tile(const pf_x16_job *job, int64_t gr, int64_t t0, const int T) {
    q32_x16_tile(job, gr, t0, T, 1);
}
TOKEN_DISPATCH(q8_0_tile, q8_0_x16_tile)
TOKEN_DISPATCH(q4_0_tile, q4_0_x16_tile)

/* -- F32_X16 -------------------------------------------------------------------
 * Lane r is row r: each column's weight vector meets one broadcast activation
 * per token; two chains per token (even and odd columns) keep 2T FMAs in flight.
 * Rows past n_out in the last group are not stored. */
PF_INLINE void f32_x16_tile(const pf_x16_job *job, int64_t gr, int64_t t0, const int T) {
    const int64_t n_in = job->nb;
    const float *w = (const float *)job->w + gr * n_in * 16;
    const float *x = (const float *)job->act + t0 * n_in;
    __m512 even[PF_X16_TOKENS], odd[PF_X16_TOKENS];
    for (int t = 0; t < T; t++) even[t] = odd[t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 <= n_in; k += 2) {
        const __m512 w0 = _mm512_loadu_ps(w + 16 * k), w1 = _mm512_loadu_ps(w + 16 * k + 16);
        for (int t = 0; t < T; t++) {
            even[t] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[t * n_in + k]), even[t]);
            odd[t] = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[t * n_in + k + 1]), odd[t]);
        }
    }
    if (k < n_in)
        for (int t = 0; t < T; t++) even[t] = _mm512_fmadd_ps(_mm512_loadu_ps(w + 16 * k), _mm512_set1_ps(x[t * n_in + k]), even[t]);
    const int64_t rows = job->n_out - 16 * gr;
    const __mmask16 keep = rows >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rows) - 1);
    for (int t = 0; t < T; t++)
        _mm512_mask_storeu_ps(job->out + (t0 + t) * job->n_out + 16 * gr, keep, _mm512_add_ps(even[t], odd[t]));
}
TOKEN_DISPATCH(f32_tile, f32_x16_tile)

/* -- F32 / F16 / BF16 weights, F32 activations: the prefill tile -------------- */

/* The AVX2 tile (matmul.c) on 16-lane vectors, with more rows: R weight rows x
 * 4 activation rows, 4R accumulators (24 of the 32 registers), so each loaded
 * (and widened) weight vector feeds 4 FMAs and each activation vector R. Zen 5
 * runs 512-bit FMAs at full rate: twice the AVX2 tile's multiply-adds a cycle.
 * Products are exact in float32 (fp16 and bf16 widen exactly); only the
 * summation order differs from the AVX2 tile. */
enum { DENSE_F32, DENSE_F16, DENSE_BF16 };

PF_INLINE __m512 dense_w16(const void *w, int64_t k, const int kind) {
    if (kind == DENSE_F32) return _mm512_loadu_ps((const float *)w + k);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + k));
    if (kind == DENSE_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

PF_INLINE float dense_w1(const void *w, int64_t k, const int kind) {
    if (kind == DENSE_F32) return ((const float *)w)[k];
    const uint16_t h = ((const uint16_t *)w)[k];
    if (kind == DENSE_F16) return half_to_float(h);
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

PF_INLINE void dense_tile(int64_t n, const void *w, size_t ws, const void *a, size_t as, float *out,
                          const int kind) {
    enum { R = PF_VNNI_DENSE_TILE_ROWS };
    const char *wr[R];
    const float *y[4];
    __m512 acc[R][4];
    for (int r = 0; r < R; r++) {
        wr[r] = (const char *)w + (size_t)r * ws;
        for (int t = 0; t < 4; t++) acc[r][t] = _mm512_setzero_ps();
    }
    for (int t = 0; t < 4; t++) y[t] = (const float *)((const char *)a + (size_t)t * as);
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        __m512 wv[R];
        for (int r = 0; r < R; r++) wv[r] = dense_w16(wr[r], k, kind);
        for (int t = 0; t < 4; t++) {
            const __m512 av = _mm512_loadu_ps(y[t] + k);
            for (int r = 0; r < R; r++) acc[r][t] = _mm512_fmadd_ps(wv[r], av, acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < 4; t++) {
            float s = _mm512_reduce_add_ps(acc[r][t]);
            for (int64_t kk = k; kk < n; kk++) s += dense_w1(wr[r], kk, kind) * y[t][kk];
            out[4 * r + t] = s;
        }
}

static void dense_tile_f32(int64_t n, const void *w, size_t ws, const void *a, size_t as, float *out) {
    dense_tile(n, w, ws, a, as, out, DENSE_F32);
}
static void dense_tile_f16(int64_t n, const void *w, size_t ws, const void *a, size_t as, float *out) {
    dense_tile(n, w, ws, a, as, out, DENSE_F16);
}
static void dense_tile_bf16(int64_t n, const void *w, size_t ws, const void *a, size_t as, float *out) {
    dense_tile(n, w, ws, a, as, out, DENSE_BF16);
}

/* The row dot (decode: 1..4 activation rows per pass over a weight row) with
 * the tile's arithmetic for every (row, token): one 16-lane accumulator, k in
 * steps of 16, the same reduction and tail. So a token's outputs are the same
 * bits whether it runs alone, beside others, or in a tile: batch invariance.
 * (Independent rows keep several FMA chains in flight.) */
PF_INLINE void dense_dot(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out,
                         const int kind) {
    const float *y[4];
    __m512 acc[4];
    for (int t = 0; t < nr; t++) y[t] = (const float *)((const char *)a + (size_t)t * as), acc[t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        const __m512 wv = dense_w16(w, k, kind);
        for (int t = 0; t < nr; t++) acc[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(y[t] + k), acc[t]);
    }
    for (int t = 0; t < nr; t++) {
        float s = _mm512_reduce_add_ps(acc[t]);
        for (int64_t kk = k; kk < n; kk++) s += dense_w1(w, kk, kind) * y[t][kk];
        out[t] = s;
    }
}

PF_INLINE void dot_f32_16(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out) {
    dense_dot(n, w, a, as, nr, out, DENSE_F32);
}
PF_INLINE void dot_f16_16(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out) {
    dense_dot(n, w, a, as, nr, out, DENSE_F16);
}
PF_INLINE void dot_bf16_16(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out) {
    dense_dot(n, w, a, as, nr, out, DENSE_BF16);
}
NR_DISPATCH(vec_dot_f32_vnni, dot_f32_16)
NR_DISPATCH(vec_dot_f16_vnni, dot_f16_16)
NR_DISPATCH(vec_dot_bf16_vnni, dot_bf16_16)

#pragma GCC pop_options

pf_x16_tile_fn pf_vnni_x16_tile(int type) {
    switch (type) {
    case PF_Q4_K: return q4_K_tile;
    case PF_Q5_K: return q5_K_tile;
    case PF_Q6_K: return q6_K_tile;
    case PF_Q8_0: return q8_0_tile;
    case PF_Q4_0: return q4_0_tile;
    case PF_F32: return f32_tile;
    default: return NULL;
    }
}

pf_vec_dot_tile_fn pf_vnni_dense_tile(int type) {
    switch (type) {
    case PF_F32: return dense_tile_f32;
    case PF_F16: return dense_tile_f16;
    case PF_BF16: return dense_tile_bf16;
    default: return NULL;
    }
}

pf_vec_dot_fn pf_vnni_vec_dot(int type) {
    switch (type) {
    case PF_Q4_K: return vec_dot_q4_K_vnni;
    case PF_Q5_K: return vec_dot_q5_K_vnni;
    case PF_Q6_K: return vec_dot_q6_K_vnni;
    case PF_F32: return vec_dot_f32_vnni;  /* the dense tile's arithmetic (batch invariance) */
    case PF_F16: return vec_dot_f16_vnni;
    case PF_BF16: return vec_dot_bf16_vnni;
    default: return NULL;
    }
}

#endif /* PF_VNNI_BUILD */
