/* AVX-512 VNNI kernels: dots for K-quant weights (Q4_K, Q5_K, Q6_K) against
 * Q8_K activations, 1..4 activation rows per pass over a weight row, and the
 * GEMMs over weights repacked 16 rows at a time (Q4_K, Q5_K, Q6_K, Q8_0, Q4_0; below).
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

#include "k_scales.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define PF_VNNI_BUILD 1
#endif

#ifndef PF_VNNI_BUILD

int pf_vnni_available(void) { return 0; }
pf_vec_dot_fn pf_vnni_vec_dot(int type) { (void)type; return NULL; }
int64_t pf_x16_bytes(int type, int64_t n_out, int64_t n_in) { (void)type, (void)n_out, (void)n_in; return -1; }
int pf_repack_x16(int type, const void *w, void *dst, int64_t n_out, int64_t n_in, int n_threads) {
    (void)type, (void)w, (void)dst, (void)n_out, (void)n_in, (void)n_threads;
    return -1;
}
int pf_matmul_x16(int type, const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out,
                  float *out, int n_threads) {
    (void)type, (void)x, (void)packed, (void)n_tok, (void)n_in, (void)n_out, (void)out, (void)n_threads;
    return -1;
}

#else

#include <cpuid.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* -- Q4_K_X16: 16 Q4_K rows interleaved, one block of 256 columns ----------
 * Weight 8g + j (j < 4) of row r is the low nibble of qs[g][4r + j], weight
 * 8g + 4 + j its high nibble: a 64-byte load of qs[g] gives, after the nibble
 * split, lane r = 4 consecutive weights of row r, two vectors per 8 columns.
 * The scales come unpacked, row-minor, so a sub-block's 16 row scales are one
 * 16-byte load, and the mins as int16 pairs for vpdpwssd. */
typedef struct {
    float d[16], dmin[16];
    uint8_t sc[8][16];      /* sc[j][r]: sub-block j's scale in row r */
    int16_t m[4][16][2];    /* m[p][r] = the mins of sub-blocks 2p, 2p+1 in row r */
    uint8_t qs[32][64];
} block_q4_K_x16;
_Static_assert(sizeof(block_q4_K_x16) == 2560, "block_q4_K_x16 must be 2560 bytes");

/* Q5_K_X16: Q4_K_X16 plus the fifth bits: byte j of hb[s][4r ..] holds, for
 * row r and k-group 4s + e (e = 0..3), the fifth bit of column 8(4s+e) + j at
 * bit 2e and of column 8(4s+e) + 4 + j at bit 2e + 1. */
typedef struct {
    block_q4_K_x16 k;
    uint8_t hb[8][64];
} block_q5_K_x16;
_Static_assert(sizeof(block_q5_K_x16) == 3072, "block_q5_K_x16 must be 3072 bytes");

/* Row r of a Q4_K_X16 block from one Q4_K / Q5_K block's d, dmin, packed
 * scales and weights q (0..15; Q5_K's fifth bits go to hb, if given). */
static void repack_k_row(pf_half d, pf_half dmin, const uint8_t *scales, const uint8_t q[QK_K], int r,
                         block_q4_K_x16 *out, uint8_t (*hb)[64]) {
    uint8_t sc[8], m[8];
    pf_unpack_k_scales(scales, sc, m);
    out->d[r] = pf_half_to_float_scalar(d);
    out->dmin[r] = pf_half_to_float_scalar(dmin);
    for (int j = 0; j < 8; j++) out->sc[j][r] = sc[j];
    for (int p = 0; p < 4; p++) out->m[p][r][0] = m[2 * p], out->m[p][r][1] = m[2 * p + 1];
    for (int g = 0; g < 32; g++)
        for (int j = 0; j < 4; j++) {
            const uint8_t lo = q[8 * g + j], hi = q[8 * g + 4 + j];
            out->qs[g][4 * r + j] = (uint8_t)((lo & 0x0f) | ((hi & 0x0f) << 4));
            if (hb) hb[g / 4][4 * r + j] |= (uint8_t)(((lo >> 4) << (2 * (g % 4))) | ((hi >> 4) << (2 * (g % 4) + 1)));
        }
}

/* The 256 weights of a Q4_K / Q5_K block in column order (qs as in quants.h). */
static void k_block_weights(const uint8_t *qs, const uint8_t *qh, uint8_t q[QK_K]) {
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            q[64 * c + l] = qs[32 * c + l] & 0x0f;
            q[64 * c + 32 + l] = qs[32 * c + l] >> 4;
        }
    if (qh)
        for (int e = 0; e < QK_K; e++) q[e] |= (uint8_t)(((qh[e % 32] >> (e / 32)) & 1) << 4);
}

static void q4_K_row(const void *src, int r, void *dst) {
    const block_q4_K *b = src;
    uint8_t q[QK_K];
    k_block_weights(b->qs, NULL, q);
    repack_k_row(b->d, b->dmin, b->scales, q, r, dst, NULL);
}

static void q5_K_row(const void *src, int r, void *dst) {
    const block_q5_K *b = src;
    block_q5_K_x16 *o = dst;
    uint8_t q[QK_K];
    k_block_weights(b->qs, b->qh, q);
    repack_k_row(b->d, b->dmin, b->scales, q, r, &o->k, o->hb);
}

/* Compiled for the baseline target: this runs on every CPU. */
static int vnni_probe(void) {
    const char *off = getenv("PYFORGE_DISABLE_VNNI");
    if (off && *off && strcmp(off, "0") != 0) return 0;
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
    static int state = -1; /* racing first calls compute the same answer */
    int s = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
    if (s < 0) {
        s = vnni_probe();
        __atomic_store_n(&state, s, __ATOMIC_RELEASE);
    }
    return s;
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

/* -- the Q4_K_X16 GEMM ---------------------------------------------------- */

#define X16_TOKENS 8 /* tokens per pass over a row group's unpacked weights */

PF_INLINE __m512i bcast_word(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* out[t0 + t][16 gr .. 16 gr + 16) for T tokens against row group gr. Per block: 64 vpdpbusd per token into one int32
 * sum per sub-block (16 rows in the lanes), one vpmulld by the row scales per
 * sub-block, 4 vpdpwssd for the mins, one float update. bs[t]: token t's
 * sums per 32 activations, int16 [nb][8]. */
typedef struct {
    const void *w;              /* block_q4_K_x16 or block_q5_K_x16 */
    const block_q8_K *act;      /* [n_tok][nb] */
    const int16_t *sums;        /* [n_tok][nb][8]: activation sums per 32 */
    float *out;
    int64_t nb, n_out;
} q4_K_job;

/* Bit b of every byte of v, moved to bit 4 (the fifth bit of a Q5_K weight). */
PF_INLINE __m512i bit_to_16(__m512i v, const int b) {
    const __m512i m = _mm512_set1_epi8(0x10);
    if (b < 4) return _mm512_and_si512(_mm512_slli_epi16(v, 4 - b), m);
    if (b > 4) return _mm512_and_si512(_mm512_srli_epi16(v, b - 4), m);
    return _mm512_and_si512(v, m);
}

PF_INLINE void k_x16_tile(const q4_K_job *job, int64_t gr, int64_t t0, const int T, const int is_q5) {
    const int64_t nb = job->nb;
    const size_t block_bytes = is_q5 ? sizeof(block_q5_K_x16) : sizeof(block_q4_K_x16);
    const char *wb = (const char *)job->w + (size_t)(gr * nb) * block_bytes;
    const block_q8_K *y[X16_TOKENS];
    const int16_t *bs[X16_TOKENS];
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    __m512 facc[X16_TOKENS];
    for (int t = 0; t < T; t++)
        y[t] = job->act + (t0 + t) * nb, bs[t] = job->sums + (t0 + t) * nb * 8, facc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const block_q4_K_x16 *b = (const block_q4_K_x16 *)(wb + (size_t)i * block_bytes);
        const uint8_t (*hb)[64] = is_q5 ? ((const block_q5_K_x16 *)b)->hb : NULL;
        __m512i isum[X16_TOKENS];
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
            __m512i sub[X16_TOKENS], sub_hi[X16_TOKENS / 2];
            for (int t = 0; t < T; t++) sub[t] = _mm512_setzero_si512();
            for (int t = 0; t < T && T <= X16_TOKENS / 2; t++) sub_hi[t] = _mm512_setzero_si512();
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
                    if (T <= X16_TOKENS / 2) sub_hi[t] = _mm512_dpbusd_epi32(sub_hi[t], hi, bcast_word(a + 4));
                    else sub[t] = _mm512_dpbusd_epi32(sub[t], hi, bcast_word(a + 4));
                }
            }
            const __m512i s = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b->sc[j]));
            for (int t = 0; t < T; t++) {
                const __m512i v = T <= X16_TOKENS / 2 ? _mm512_add_epi32(sub[t], sub_hi[t]) : sub[t];
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

/* A tile of n <= X16_TOKENS tokens (x16_tile_fn), T a literal in each
 * instance so the per-token sums live in registers. */
#define TOKEN_DISPATCH(name, tile)                                                                 \
    static void name(const void *job, int64_t gr, int64_t t0, int n) {                             \
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
PF_INLINE void q4_K_x16_tile(const q4_K_job *job, int64_t gr, int64_t t0, const int T) {
    k_x16_tile(job, gr, t0, T, 0);
}
PF_INLINE void q5_K_x16_tile(const q4_K_job *job, int64_t gr, int64_t t0, const int T) {
    k_x16_tile(job, gr, t0, T, 1);
}
TOKEN_DISPATCH(q4_K_tile, q4_K_x16_tile)
TOKEN_DISPATCH(q5_K_tile, q5_K_x16_tile)

/* Row groups x token tiles of an x16 GEMM, shared out inside the caller's
 * parallel region (an orphaned omp for). A row group's weights stay in L2
 * while every token tile passes over them. Threads take runs of row groups
 * from a shared counter (about 8 runs a thread: long sequential streams for
 * the prefetchers, and a slow core does not hold the others). */
typedef void (*x16_tile_fn)(const void *job, int64_t group, int64_t t0, int n_tok);

static void x16_row_groups(const void *job, x16_tile_fn tile, int64_t n_groups, int64_t n_tok) {
    int nth = 1;
#ifdef _OPENMP
    nth = omp_get_num_threads();
#endif
    const int64_t run = (n_groups + 8 * nth - 1) / (8 * nth);
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t r0 = 0; r0 < n_groups; r0 += run)
        for (int64_t gr = r0; gr < r0 + run && gr < n_groups; gr++)
            for (int64_t t0 = 0; t0 < n_tok; t0 += X16_TOKENS)
                tile(job, gr, t0, n_tok - t0 < X16_TOKENS ? (int)(n_tok - t0) : X16_TOKENS);
}

static int matmul_k_x16(const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out, float *out,
                        int n_threads, x16_tile_fn tile) {
    if (n_tok == 0) return 0;
    const int64_t nb = n_in / QK_K;
    block_q8_K *act = aligned_alloc(64, (size_t)(n_tok * nb) * sizeof(block_q8_K));
    int16_t *sums = malloc((size_t)(n_tok * nb * 8) * sizeof(int16_t));
    if (!act || !sums) {
        free(act), free(sums);
        return -2;
    }
    const q4_K_job job = {packed, act, sums, out, nb, n_out};
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tok; t++) {
            pf_q8_K_from_float(x + t * n_in, act + t * nb, n_in);
            for (int64_t i = 0; i < nb; i++)
                for (int j = 0; j < 8; j++) {
                    const int16_t *b = act[t * nb + i].bsums;
                    sums[(t * nb + i) * 8 + j] = (int16_t)(b[2 * j] + b[2 * j + 1]);
                }
        }
        x16_row_groups(&job, tile, n_out / 16, n_tok);
    }
    free(act);
    free(sums);
    return 0;
}

/* -- Q6_K_X16 ----------------------------------------------------------------
 * 16 Q6_K rows, one block of 256 columns. The 6-bit weights q (0..63) split as
 * Q4_K_X16's nibbles (lo, qs[32][64]) plus two high bits: hb[h][4r + j] holds
 * those of row r's columns 16h + j, 16h + 4 + j, 16h + 8 + j, 16h + 12 + j in
 * bit pairs 0-1, 2-3, 4-5, 6-7 (k-group 2h's low and high half, then 2h+1's).
 * The 16 sub-block scales as int16 pairs per row (sub-blocks 2p, 2p+1): one
 * vpdpwssd applies two to the bsums for the -32 offset, and a shift pair
 * gives each as int32 for the dots. */
typedef struct {
    float d[16];
    int16_t sc[8][16][2];   /* sc[p][r] = the scales of sub-blocks 2p, 2p+1 in row r */
    uint8_t qs[32][64];
    uint8_t hb[16][64];
} block_q6_K_x16;
_Static_assert(sizeof(block_q6_K_x16) == 3648, "block_q6_K_x16 must be 3648 bytes");

static void q6_K_row(const void *src, int r, void *dst) {
    const block_q6_K *b = src;
    block_q6_K_x16 *out = dst;
    int8_t v[QK_K];
    pf_q6_K_values(b, v);
    uint8_t q[QK_K];
    for (int k = 0; k < QK_K; k++) q[k] = (uint8_t)(v[k] + 32);
    out->d[r] = pf_half_to_float_scalar(b->d);
    for (int p = 0; p < 8; p++) out->sc[p][r][0] = b->scales[2 * p], out->sc[p][r][1] = b->scales[2 * p + 1];
    for (int g = 0; g < 32; g++)
        for (int j = 0; j < 4; j++)
            out->qs[g][4 * r + j] = (uint8_t)((q[8 * g + j] & 0x0f) | ((q[8 * g + 4 + j] & 0x0f) << 4));
    for (int h = 0; h < 16; h++)
        for (int j = 0; j < 4; j++)
            for (int e = 0; e < 4; e++) out->hb[h][4 * r + j] |= (uint8_t)((q[16 * h + 4 * e + j] >> 4) << (2 * e));
}

typedef struct {
    const block_q6_K_x16 *w;
    const block_q8_K *act;      /* [n_tok][nb] */
    float *out;
    int64_t nb, n_out;
} q6_K_job;

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
PF_INLINE void q6_K_x16_tile(const q6_K_job *job, int64_t gr, int64_t t0, const int T) {
    const block_q6_K_x16 *wb = job->w + gr * job->nb;
    const block_q8_K *y[X16_TOKENS];
    __m512 facc[X16_TOKENS];
    for (int t = 0; t < T; t++) y[t] = job->act + (t0 + t) * job->nb, facc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < job->nb; i++) {
        const block_q6_K_x16 *b = wb + i;
        const char *ahead = (const char *)(b + 2);  /* not read front to back: see q4_K_x16_tile */
        __m512i isum[X16_TOKENS];
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

static int matmul_q6_K_x16(const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out, float *out,
                           int n_threads, x16_tile_fn tile) {
    if (n_tok == 0) return 0;
    const int64_t nb = n_in / QK_K;
    block_q8_K *act = aligned_alloc(64, (size_t)(n_tok * nb) * sizeof(block_q8_K));
    if (!act) return -2;
    const q6_K_job job = {packed, act, out, nb, n_out};
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tok; t++) pf_q8_K_from_float(x + t * n_in, act + t * nb, n_in);
        x16_row_groups(&job, tile, n_out / 16, n_tok);
    }
    free(act);
    return 0;
}

/* -- Q8_0_X16 and Q4_0_X16 ---------------------------------------------------
 * 16 rows, one block of 32 columns: the row scales as floats, and the weights
 * as unsigned bytes (vpdpbusd wants them so): Q8_0's + 128, one byte each,
 * column 4g + j of row r at qs[g][4r + j]; Q4_0's q (w = d * (q - 8)) as
 * nibbles, columns 8g + j / 8g + 4 + j of row r in the low / high nibble of
 * qs[g][4r + j]. The offset (128 or 8) times sum(a) is the same for every row
 * and comes off once per block and token. */
typedef struct {
    float d[16];
    uint8_t qs[8][64];
} block_q8_0_x16;
_Static_assert(sizeof(block_q8_0_x16) == 576, "block_q8_0_x16 must be 576 bytes");

typedef struct {
    float d[16];
    uint8_t qs[4][64];
} block_q4_0_x16;
_Static_assert(sizeof(block_q4_0_x16) == 320, "block_q4_0_x16 must be 320 bytes");

static void q8_0_row(const void *src, int r, void *dst) {
    const block_q8_0 *b = src;
    block_q8_0_x16 *o = dst;
    o->d[r] = pf_half_to_float_scalar(b->d);
    for (int k = 0; k < QK8_0; k++) o->qs[k / 4][4 * r + k % 4] = (uint8_t)(b->qs[k] + 128);
}

static void q4_0_row(const void *src, int r, void *dst) {
    const block_q4_0 *b = src;
    block_q4_0_x16 *o = dst;
    uint8_t q[QK4_0];   /* quants.h: qs[l] holds column l (low nibble) and l + 16 (high) */
    for (int l = 0; l < QK4_0 / 2; l++) q[l] = b->qs[l] & 0x0f, q[l + 16] = b->qs[l] >> 4;
    o->d[r] = pf_half_to_float_scalar(b->d);
    for (int g = 0; g < 4; g++)
        for (int j = 0; j < 4; j++) o->qs[g][4 * r + j] = (uint8_t)(q[8 * g + j] | (q[8 * g + 4 + j] << 4));
}

typedef struct {
    const void *w;              /* block_q8_0_x16 or block_q4_0_x16 */
    const block_q8_0 *act;      /* [n_tok][nb] */
    const float *da;            /* [n_tok][nb]: the activation scales as floats */
    const int32_t *sums;        /* [n_tok][nb]: the sum of each activation block */
    float *out;
    int64_t nb, n_out;
} q32_job;

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
PF_INLINE void q32_x16_tile(const q32_job *job, int64_t gr, int64_t t0, const int T, const int is_q4) {
    const int64_t nb = job->nb;
    const void *wb = is_q4 ? (const void *)((const block_q4_0_x16 *)job->w + gr * nb)
                           : (const void *)((const block_q8_0_x16 *)job->w + gr * nb);
    const int32_t offset = is_q4 ? 8 : 128;
    __m512 facc[X16_TOKENS];
    for (int t = 0; t < T; t++) facc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m512i wv[8];
        q32_x16_weights(wb, i, is_q4, wv);
        const __m512 d = _mm512_loadu_ps(is_q4 ? ((const block_q4_0_x16 *)wb)[i].d : ((const block_q8_0_x16 *)wb)[i].d);
        for (int t = 0; t < T; t++) {
            const int64_t at = (t0 + t) * nb + i;
            const int8_t *a = job->act[at].qs;
            __m512i s0 = _mm512_set1_epi32(-offset * job->sums[at]), s1 = _mm512_setzero_si512();   /* two chains */
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

PF_INLINE void q8_0_x16_tile(const q32_job *job, int64_t gr, int64_t t0, const int T) {
    q32_x16_tile(job, gr, t0, T, 0);
}
PF_INLINE void q4_0_x16_tile(const q32_job *job, int64_t gr, int64_t t0, const int T) {
    q32_x16_tile(job, gr, t0, T, 1);
}
TOKEN_DISPATCH(q8_0_tile, q8_0_x16_tile)
TOKEN_DISPATCH(q4_0_tile, q4_0_x16_tile)

static int matmul_q32_x16(const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out, float *out,
                          int n_threads, x16_tile_fn tile) {
    if (n_tok == 0) return 0;
    const int64_t nb = n_in / QK8_0;
    block_q8_0 *act = malloc((size_t)(n_tok * nb) * sizeof(block_q8_0));
    float *da = malloc((size_t)(n_tok * nb) * sizeof(float));
    int32_t *sums = malloc((size_t)(n_tok * nb) * sizeof(int32_t));
    if (!act || !da || !sums) {
        free(act), free(da), free(sums);
        return -2;
    }
    const q32_job job = {packed, act, da, sums, out, nb, n_out};
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tok; t++) {
            pf_q8_0_from_float(x + t * n_in, act + t * nb, n_in);
            for (int64_t i = t * nb; i < (t + 1) * nb; i++) {
                int32_t s = 0;
                for (int k = 0; k < QK8_0; k++) s += act[i].qs[k];
                da[i] = half_to_float(act[i].d), sums[i] = s;
            }
        }
        x16_row_groups(&job, tile, n_out / 16, n_tok);
    }
    free(act), free(da), free(sums);
    return 0;
}



#pragma GCC pop_options

/* -- the x16 formats, by ggml type ----------------------------------------- */

/* A GEMM driver: quantizes the activations its tiles read, then runs them. */
typedef int (*x16_driver_fn)(const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out,
                             float *out, int n_threads, x16_tile_fn tile);

/* Row r of an x16 block from one stored block of that row (the block is zeroed first). */
typedef void (*x16_row_fn)(const void *src, int r, void *dst);

typedef struct {
    int type;
    int64_t cols;               /* columns per block */
    size_t block_bytes;         /* bytes of an x16 block (16 rows) */
    x16_row_fn row;
    x16_driver_fn driver;
    x16_tile_fn tile;
} x16_format;

static const x16_format X16_FORMATS[] = {
    {PF_Q4_K, QK_K, sizeof(block_q4_K_x16), q4_K_row, matmul_k_x16, q4_K_tile},
    {PF_Q5_K, QK_K, sizeof(block_q5_K_x16), q5_K_row, matmul_k_x16, q5_K_tile},
    {PF_Q6_K, QK_K, sizeof(block_q6_K_x16), q6_K_row, matmul_q6_K_x16, q6_K_tile},
    {PF_Q8_0, QK8_0, sizeof(block_q8_0_x16), q8_0_row, matmul_q32_x16, q8_0_tile},
    {PF_Q4_0, QK4_0, sizeof(block_q4_0_x16), q4_0_row, matmul_q32_x16, q4_0_tile},
};

static const x16_format *x16_format_of(int type) {
    for (size_t i = 0; i < sizeof X16_FORMATS / sizeof X16_FORMATS[0]; i++)
        if (X16_FORMATS[i].type == type) return &X16_FORMATS[i];
    return NULL;
}

static int64_t x16_bytes(const x16_format *f, int64_t n_out, int64_t n_in) {
    if (!f || n_out <= 0 || n_in <= 0 || n_out % 16 || n_in % f->cols) return -1;
    return n_out / 16 * (n_in / f->cols) * (int64_t)f->block_bytes;
}

int64_t pf_x16_bytes(int type, int64_t n_out, int64_t n_in) { return x16_bytes(x16_format_of(type), n_out, n_in); }

int pf_repack_x16(int type, const void *w, void *dst, int64_t n_out, int64_t n_in, int n_threads) {
    const x16_format *f = x16_format_of(type);
    if (x16_bytes(f, n_out, n_in) < 0) return -1;
    const int64_t nb = n_in / f->cols, n_groups = n_out / 16;
    const size_t src_bytes = (size_t)pf_row_bytes(type, f->cols);
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t gr = 0; gr < n_groups; gr++)
        for (int64_t i = 0; i < nb; i++) {
            char *o = (char *)dst + (size_t)(gr * nb + i) * f->block_bytes;
            memset(o, 0, f->block_bytes);
            for (int r = 0; r < 16; r++) f->row((const char *)w + (size_t)((16 * gr + r) * nb + i) * src_bytes, r, o);
        }
    return 0;
}

int pf_matmul_x16(int type, const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out,
                  float *out, int n_threads) {
    const x16_format *f = x16_format_of(type);
    if (x16_bytes(f, n_out, n_in) < 0 || n_tok < 0 || !pf_vnni_available()) return -1;
    return f->driver(x, packed, n_tok, n_in, n_out, out, n_threads, f->tile);
}

pf_vec_dot_fn pf_vnni_vec_dot(int type) {
    switch (type) {
    case PF_Q4_K: return vec_dot_q4_K_vnni;
    case PF_Q5_K: return vec_dot_q5_K_vnni;
    case PF_Q6_K: return vec_dot_q6_K_vnni;
    default: return NULL;
    }
}

#endif /* PF_VNNI_BUILD */
