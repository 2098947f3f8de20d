/* Q4_K / Q6_K matmul on AMX int8 tiles, for batches (prefill, batched decode).
 *
 * One TMUL op C += A . B multiplies a tile of 16 rows x 64 bytes by a tile of
 * 16 rows x 64 bytes in "VNNI" layout (4 consecutive k of one column per
 * 32-bit lane) into 16 x 16 int32. Here
 *   A = 16 weight rows; each weight as its integer product with its
 *       sub-block scale (the integer the AVX2 kernel sums too), split into
 *       two bytes with p = 2^shift * hi + lo: one A tile of lo, one of hi
 *       (weight_block below says how per type);
 *   B = the Q8_K activations of 16 tokens, laid out av[k/4][token][k%4]
 *       once per call;
 *   C = lo . a and hi . a, summed over a whole 256-weight block (4 TMUL ops
 *       each), since the sub-block scales are inside p.
 * Per block, AVX-512 folds the two C tiles into float sums:
 *   acc[row][token] += d_w * d_a * (2^shift * C_hi + C_lo)
 *                      - sum_j dmin * m_j * d_a * (sum of a over sub-block j)
 * (the second line for Q4_K's mins), which is the AVX2 kernel's sum in
 * another order of float additions.
 *
 * Work: threads take groups of 16 weight rows; a group's 256-weight blocks
 * are unpacked one at a time (8 KB, in L1) and every pair of 16-token groups
 * passes over each (one A tile feeds two B tiles). Tokens past n_tok are
 * zero (they add nothing).
 */
#define _GNU_SOURCE /* syscall() under -std=c11 */
#include "matmul_amx.h"

#include "cpu_probe.h"

#include <stdlib.h>
#include <string.h>

#include "k_scales.h"
#include "quants.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define PF_AMX_BUILD 1
#endif

int pf_amx_supports(int type, int64_t n_in) {
    return (type == PF_Q4_K || type == PF_Q6_K) && n_in > 0 && n_in % QK_K == 0;
}

#ifndef PF_AMX_BUILD

int pf_amx_available(void) { return 0; }

int pf_matmul_amx(const float *x, const void *w, int type, int64_t n_tok, int64_t n_in, int64_t n_out,
                  float *out, int n_threads) {
    (void)x, (void)w, (void)type, (void)n_tok, (void)n_in, (void)n_out, (void)out, (void)n_threads;
    return -1;
}

#else

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* ---------------------------- detection --------------------------------- */
/* Compiled for the baseline target: this runs on every CPU. */

static int amx_probe(void) {
    if (pf_env_flag("PYFORGE_DISABLE_AMX")) return 0;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return 0; /* OSXSAVE */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    const int amx = ((d >> 24) & 1) && ((d >> 25) & 1);                 /* AMX-TILE, AMX-INT8 */
    const int avx512 = ((b >> 16) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1); /* F, BW, VL */
    if (!amx || !avx512) return 0;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    /* the OS saves x87/SSE/AVX/AVX-512 state and the tile config + data */
    if ((lo & 0xe7u) != 0xe7u || ((lo >> 17) & 3u) != 3u) return 0;
    /* Linux hands out tile data per process, on request. */
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

int pf_amx_available(void) {
    static int state = -1;
    return pf_probe_once(&state, amx_probe);
}

/* ------------------------------ kernels ---------------------------------- */

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-int8")
#include <immintrin.h>

#define PF_INLINE static inline __attribute__((always_inline))
#define ROWS 16 /* weight rows per tile, and tokens per tile */
#define SLICE 64 /* k per TMUL op: 16 rows x 64 bytes */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Every tile 16 rows x 64 bytes: 0..3 C (lo, hi of token group 0, then of
 * group 1), 4 A lo, 5 A hi, 6 B of group 0, 7 B of group 1. */
static void load_tile_config(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) cfg.rows[i] = ROWS, cfg.colsb[i] = 64;
    _tile_loadconfig(&cfg);
}

/* Activations of all tokens, quantized to Q8_K, per group of 16 tokens:
 *   q      int8  [n_in/4][16][4]   B tiles (VNNI layout)
 *   d      float [n_in/256][16]    Q8_K scale per block and token
 *   sums   float [n_in/32][16]     d * (sum of q) per sub-block (Q4_K mins) */
typedef struct {
    int8_t *q;
    float *d, *sums;
    int64_t n_in;
} act_groups;

PF_INLINE int8_t *group_q(const act_groups *a, int64_t g) { return a->q + g * a->n_in * ROWS; }
PF_INLINE float *group_d(const act_groups *a, int64_t g) { return a->d + g * (a->n_in / QK_K) * ROWS; }
PF_INLINE float *group_sums(const act_groups *a, int64_t g) { return a->sums + g * (a->n_in / 32) * ROWS; }

/* Token t (row t of x, or zeros past n_tok) into its group's slot t % 16. */
static void quantize_token(const float *x, int64_t t, int64_t n_tok, block_q8_K *tmp, const act_groups *a) {
    const int64_t n_in = a->n_in, g = t / ROWS, m = t % ROWS;
    int8_t *q = group_q(a, g);
    float *d = group_d(a, g), *sums = a->sums ? group_sums(a, g) : NULL;
    if (t >= n_tok) {
        for (int64_t k4 = 0; k4 < n_in / 4; k4++) memset(q + (k4 * ROWS + m) * 4, 0, 4);
        for (int64_t b = 0; b < n_in / QK_K; b++) d[b * ROWS + m] = 0.0f;
        if (sums)
            for (int64_t s = 0; s < n_in / 32; s++) sums[s * ROWS + m] = 0.0f;
        return;
    }
    pf_q8_K_from_float(x + t * n_in, tmp, n_in);
    for (int64_t b = 0; b < n_in / QK_K; b++) {
        d[b * ROWS + m] = tmp[b].d;
        for (int k4 = 0; k4 < QK_K / 4; k4++) memcpy(q + ((b * QK_K / 4 + k4) * ROWS + m) * 4, tmp[b].qs + 4 * k4, 4);
        if (sums)
            for (int s = 0; s < 8; s++)
                sums[(b * 8 + s) * ROWS + m] = tmp[b].d * (float)(tmp[b].bsums[2 * s] + tmp[b].bsums[2 * s + 1]);
    }
}

/* One 256-weight block of 16 weight rows as TMUL operands: each weight's
 * integer product with its sub-block scale (the integer the AVX2 kernel sums
 * too) as two bytes lo, hi with p = 2^shift * hi + lo, so one pair of C tiles
 * sums the whole block: dot = 2^shift (hi . a) + (lo . a).
 *   Q4_K: sc = 16 sh + sl, lo = sl * q, hi = sh * q (both 0..225), shift 4;
 *   Q6_K: p = sc * (q - 32) in -4096..4064, lo its low byte (unsigned),
 *         hi its high byte (signed), shift 8.
 *   lo, hi  [16][256]   as the A tiles read them (8 KB: in L1)
 *   d       [16]        the block's d
 *   mins    [16][8]     -dmin * m of each sub-block (Q4_K only) */
typedef struct {
    uint8_t *lo;
    int8_t *hi;
    float *d, *mins;
} weight_block;

/* 64 products in order -> their low and high bytes: pe / po hold the
 * products of the even / odd weights, one per 16-bit lane. */
PF_INLINE void store_split(__m512i pe, __m512i po, uint8_t *lo, int8_t *hi) {
    const __m512i low_byte = _mm512_set1_epi16(0x00ff);
    /* ternary logic 0xE4: mask ? a : b, bit by bit */
    const __m512i l = _mm512_ternarylogic_epi32(pe, _mm512_slli_epi16(po, 8), low_byte, 0xe4);
    const __m512i h = _mm512_ternarylogic_epi32(_mm512_srai_epi16(pe, 8), po, low_byte, 0xe4);
    _mm512_storeu_si512(lo, l);
    _mm512_storeu_si512(hi, h);
}

/* sc * q for 64 unsigned bytes q (0..63): s16 holds one int16 scale per
 * 16-bit lane (the scale of that lane's two weights). maddubs with bytes
 * (s, 0) resp. (0, s) multiplies the even resp. odd weight alone. */
PF_INLINE void scaled_products(__m512i q, __m512i s16, __m512i *pe, __m512i *po) {
    *pe = _mm512_maddubs_epi16(q, _mm512_and_si512(s16, _mm512_set1_epi16(0x00ff)));
    *po = _mm512_maddubs_epi16(q, _mm512_slli_epi16(s16, 8));
}

/* Byte products for Q4_K by table: sc = 16 sh + sl (sh 0..3, sl 0..15), so
 * sc * q = 16 * (sh * q) + sl * q with both products bytes (<= 225), and a
 * 4-bit q indexes a 16-byte row of products with one shuffle. */
#define PF_PRODUCTS(a)                                                                                            \
    { 0 * a, 1 * a, 2 * a, 3 * a, 4 * a, 5 * a, 6 * a, 7 * a, 8 * a, 9 * a, 10 * a, 11 * a, 12 * a, 13 * a, 14 * a, 15 * a }
static const uint8_t products_table[16][16] = { /* [s][q] = s * q; rows 0..3 serve sh too */
    PF_PRODUCTS(0),  PF_PRODUCTS(1),  PF_PRODUCTS(2),  PF_PRODUCTS(3),  PF_PRODUCTS(4),  PF_PRODUCTS(5),
    PF_PRODUCTS(6),  PF_PRODUCTS(7),  PF_PRODUCTS(8),  PF_PRODUCTS(9),  PF_PRODUCTS(10), PF_PRODUCTS(11),
    PF_PRODUCTS(12), PF_PRODUCTS(13), PF_PRODUCTS(14), PF_PRODUCTS(15),
};
#undef PF_PRODUCTS

/* Rows a, b of the products table in the two 256-bit halves (each row in
 * both 128-bit lanes of its half), for a 64-byte shuffle. */
PF_INLINE __m512i table_pair(int a, int b) {
    const __m256i ta = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)products_table[a]));
    const __m256i tb = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)products_table[b]));
    return _mm512_inserti64x4(_mm512_castsi256_si512(ta), tb, 1);
}

/* Q4_K: chunk c of 32 bytes holds sub-block 2c in its low nibbles and 2c + 1
 * in its high ones, i.e. weights 64c .. 64c + 63 in order as [low | high].
 * Here lo = sl * q and hi = sh * q: dot = 16 (hi . a) + (lo . a). */
static void unpack_q4_K(const block_q4_K *blk, const weight_block *wb, int r) {
    uint8_t *lo = wb->lo + r * QK_K;
    int8_t *hi = wb->hi + r * QK_K;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i nibble_shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    const __m128i sm = k_scales_mins(blk->scales);
    uint8_t sc[16];
    _mm_storeu_si128((__m128i *)sc, sm);
    for (int c = 0; c < 4; c++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(blk->qs + 32 * c));
        const __m512i vv = _mm512_inserti64x4(_mm512_castsi256_si512(v), v, 1);
        const __m512i q = _mm512_and_si512(_mm512_srlv_epi16(vv, nibble_shift), m4);
        const int s0 = sc[2 * c], s1 = sc[2 * c + 1];
        _mm512_storeu_si512(lo + 64 * c, _mm512_shuffle_epi8(table_pair(s0 & 15, s1 & 15), q));
        _mm512_storeu_si512(hi + 64 * c, _mm512_shuffle_epi8(table_pair(s0 >> 4, s1 >> 4), q));
    }
    wb->d[r] = pf_half_to_float(blk->d);
    const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8)));
    _mm256_storeu_ps(wb->mins + 8 * r, _mm256_mul_ps(_mm256_set1_ps(-pf_half_to_float(blk->dmin)), m));
}

/* Q6_K weight 128h + 32g + l: low nibble from ql, two high bits from qh
 * (layout in quants.h); p = sc * (q - 32) = sc * q - 32 sc. Half h in two
 * passes of 64 weights: groups g = 0, 1 (low nibbles of ql[64h..64h+63], qh
 * bits 0-1 / 2-3) and g = 2, 3 (high nibbles, qh bits 4-5 / 6-7); each pass
 * spans four 16-weight sub-blocks. */
static void unpack_q6_K(const block_q6_K *blk, const weight_block *wb, int r) {
    uint8_t *lo = wb->lo + r * QK_K;
    int8_t *hi = wb->hi + r * QK_K;
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
    const __m512i shift_01 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i shift_23 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    /* 16-bit lane i of a pass -> sub-block i / 8 of its four */
    const __m512i quarter = _mm512_srli_epi16(
        _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7,
                         6, 5, 4, 3, 2, 1, 0),
        3);
    const __m512i sc16 = _mm512_cvtepi8_epi16(_mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)blk->scales)));
    for (int h = 0; h < 2; h++) {
        const __m512i ql = _mm512_loadu_si512(blk->ql + 64 * h);
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk->qh + 32 * h)));
        const __m512i q[2] = {
            /* ternary logic 0xEA: (a & b) | c */
            _mm512_ternarylogic_epi32(m4, ql, _mm512_and_si512(_mm512_sllv_epi16(qh, shift_01), m30), 0xea),
            _mm512_ternarylogic_epi32(m4, _mm512_srli_epi16(ql, 4),
                                      _mm512_and_si512(_mm512_srlv_epi16(qh, shift_23), m30), 0xea),
        };
        for (int p = 0; p < 2; p++) {
            const __m512i idx = _mm512_add_epi16(quarter, _mm512_set1_epi16((short)(8 * h + 4 * p)));
            const __m512i s = _mm512_permutexvar_epi16(idx, sc16), off = _mm512_slli_epi16(s, 5);
            __m512i pe, po;
            scaled_products(q[p], s, &pe, &po);
            store_split(_mm512_sub_epi16(pe, off), _mm512_sub_epi16(po, off), lo + 128 * h + 64 * p,
                        hi + 128 * h + 64 * p);
        }
    }
    wb->d[r] = pf_half_to_float(blk->d);
}

/* Block b of rows r0 .. r0 + 15 of w (rows past n_out become zeros). The
 * 16 rows are 16 streams too sparse for the hardware prefetcher (one block
 * of each per step): fetching block b + 1 now doubles the rate from DRAM. */
static void unpack_block(const char *w, size_t w_row, int type, int64_t r0, int64_t n_out, int64_t b,
                         const weight_block *wb) {
    const size_t block_bytes = type == PF_Q4_K ? sizeof(block_q4_K) : sizeof(block_q6_K);
    const int prefetch = (int64_t)((b + 2) * block_bytes) <= (int64_t)w_row;
    for (int r = 0; r < ROWS; r++) {
        const char *row = w + (size_t)(r0 + r) * w_row;
        if (prefetch && r0 + r < n_out)
            for (size_t l = 0; l < block_bytes; l += 64) __builtin_prefetch(row + (b + 1) * block_bytes + l);
        if (r0 + r >= n_out) {
            memset(wb->lo + r * QK_K, 0, QK_K);
            memset(wb->hi + r * QK_K, 0, QK_K);
            memset(wb->mins + 8 * r, 0, 8 * sizeof(float));
            wb->d[r] = 0.0f;
        } else if (type == PF_Q4_K) {
            unpack_q4_K((const block_q4_K *)row + b, wb, r);
        } else {
            unpack_q6_K((const block_q6_K *)row + b, wb, r);
        }
    }
}

/* C tiles of one block for one or two token groups (tiles 0, 1 and 2, 3),
 * stored to c[0..1] / c[2..3]; aq0 / aq1 point at the block's activations. */
PF_INLINE void block_tiles(const weight_block *wb, const int8_t *aq0, const int8_t *aq1, int32_t c[4][ROWS][ROWS],
                           const int two) {
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int k = 0; k < QK_K; k += SLICE) {
        _tile_loadd(4, wb->lo + k, QK_K);
        _tile_loadd(5, wb->hi + k, QK_K);
        _tile_loadd(6, aq0 + k * ROWS, 64);
        _tile_dpbusd(0, 4, 6); /* unsigned low bytes x signed activations */
        _tile_dpbssd(1, 5, 6); /* signed (Q6_K) or small (Q4_K) high bytes */
        if (two) {
            _tile_loadd(7, aq1 + k * ROWS, 64);
            _tile_dpbusd(2, 4, 7);
            _tile_dpbssd(3, 5, 7);
        }
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    if (two) {
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
    }
}

/* acc[row] += d_w * d_a * (2^shift hi + lo) + sum_j mins_j * (d_a * sum of a)_j
 * for one block of one token group: ad = the block's 16 token scales, asums
 * its [8][16] scaled sub-block sums. */
PF_INLINE void fold_block(const int32_t clo[ROWS][ROWS], const int32_t chi[ROWS][ROWS], __m128i shift,
                          const float *wd, const float *wmins, const float *ad, const float *asums,
                          float acc[ROWS][ROWS]) {
    const __m512 da = _mm512_load_ps(ad);
    for (int n = 0; n < ROWS; n++) {
        const __m512i t = _mm512_add_epi32(_mm512_sll_epi32(_mm512_load_si512(chi[n]), shift), _mm512_load_si512(clo[n]));
        const __m512 s = _mm512_mul_ps(_mm512_set1_ps(wd[n]), da);
        _mm512_store_ps(acc[n], _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), s, _mm512_load_ps(acc[n])));
    }
    if (wmins) {
        __m512 sums[8];
        for (int j = 0; j < 8; j++) sums[j] = _mm512_load_ps(asums + j * ROWS);
        for (int n = 0; n < ROWS; n++) {
            __m512 v = _mm512_load_ps(acc[n]);
            for (int j = 0; j < 8; j++) v = _mm512_fmadd_ps(_mm512_set1_ps(wmins[8 * n + j]), sums[j], v);
            _mm512_store_ps(acc[n], v);
        }
    }
}

/* out[t][r0 + n] = acc[n][t - t0] for the real rows and tokens. */
static void store_tile(float acc[ROWS][ROWS], float *out, int64_t n_out, int64_t r0, int64_t t0, int64_t n_tok) {
    const int64_t nn = n_out - r0 < ROWS ? n_out - r0 : ROWS, nm = n_tok - t0 < ROWS ? n_tok - t0 : ROWS;
    for (int64_t m = 0; m < nm; m++)
        for (int64_t n = 0; n < nn; n++) out[(t0 + m) * n_out + r0 + n] = acc[n][m];
}

typedef struct {
    weight_block wb[2];          /* by block parity: block b is folded while b + 1 is unpacked */
    block_q8_K *tmp;
    int32_t (*c)[4][ROWS][ROWS]; /* [2]: the C tiles being folded, the ones being multiplied */
    float (*acc)[ROWS][ROWS];    /* [n_groups] */
} thread_space;

static void free_spaces(thread_space *ts, int n) {
    for (int i = 0; i < n; i++) {
        for (int p = 0; p < 2; p++) free(ts[i].wb[p].lo), free(ts[i].wb[p].hi), free(ts[i].wb[p].d), free(ts[i].wb[p].mins);
        free(ts[i].tmp), free(ts[i].c), free(ts[i].acc);
    }
    free(ts);
}

/* aligned_alloc wants a size that is a multiple of the alignment. */
static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) & ~(size_t)63); }

static thread_space *alloc_spaces(int n, int64_t n_in, int64_t n_groups) {
    thread_space *ts = calloc((size_t)n, sizeof *ts);
    if (!ts) return NULL;
    for (int i = 0; i < n; i++) {
        int ok = 1;
        for (int p = 0; p < 2; p++) {
            weight_block *wb = &ts[i].wb[p];
            wb->lo = alloc64(ROWS * QK_K), wb->hi = alloc64(ROWS * QK_K);
            wb->d = alloc64(ROWS * sizeof(float)), wb->mins = alloc64(ROWS * 8 * sizeof(float));
            ok = ok && wb->lo && wb->hi && wb->d && wb->mins;
        }
        ts[i].tmp = malloc((size_t)(n_in / QK_K) * sizeof(block_q8_K));
        ts[i].c = alloc64(2 * sizeof(int32_t[4][ROWS][ROWS]));
        ts[i].acc = alloc64((size_t)n_groups * sizeof(float[ROWS][ROWS]));
        if (!ok || !ts[i].tmp || !ts[i].c || !ts[i].acc) {
            free_spaces(ts, n);
            return NULL;
        }
    }
    return ts;
}

/* One pass over 16 weight rows. Work item i is block i / n_pairs against
 * token groups 2p and 2p + 1, p = i % n_pairs. */
typedef struct {
    const char *w;
    size_t w_row;
    int type;
    int64_t r0, n_out, n_groups, n_pairs;
    const act_groups *act;
} row_job;

/* Item i's C tiles into c[i & 1]; its block is unpacked on its first pair. */
static void item_tiles(const row_job *job, thread_space *my, int64_t i) {
    const int64_t b = i / job->n_pairs, g = 2 * (i % job->n_pairs);
    const weight_block *wb = &my->wb[b & 1];
    if (g == 0) unpack_block(job->w, job->w_row, job->type, job->r0, job->n_out, b, wb);
    const int8_t *aq0 = group_q(job->act, g) + b * QK_K * ROWS;
    if (g + 1 < job->n_groups) block_tiles(wb, aq0, group_q(job->act, g + 1) + b * QK_K * ROWS, my->c[i & 1], 1);
    else block_tiles(wb, aq0, NULL, my->c[i & 1], 0);
}

static void item_fold(const row_job *job, thread_space *my, int64_t i) {
    const int64_t b = i / job->n_pairs, g0 = 2 * (i % job->n_pairs);
    const weight_block *wb = &my->wb[b & 1];
    const int has_mins = job->act->sums != NULL;
    const __m128i shift = _mm_cvtsi32_si128(job->type == PF_Q4_K ? 4 : 8);
    for (int64_t g = g0; g < g0 + 2 && g < job->n_groups; g++) {
        int32_t(*c)[ROWS][ROWS] = my->c[i & 1] + 2 * (g - g0);
        fold_block(c[0], c[1], shift, wb->d, has_mins ? wb->mins : NULL, group_d(job->act, g) + b * ROWS,
                   has_mins ? group_sums(job->act, g) + 8 * b * ROWS : NULL, my->acc[g]);
    }
}

/* Rows r0 .. r0 + 15 against every token, block by block: a block's 16 rows
 * are unpacked once (8 KB, in L1) and every pair of token groups passes over
 * them. Software-pipelined: item i + 1's tile ops are issued before item i is
 * folded, so the tile unit and the vector units overlap. */
static void row_group(const row_job *job, thread_space *my, float *out, int64_t n_tok) {
    const int64_t n_items = (job->act->n_in / QK_K) * job->n_pairs;
    memset(my->acc, 0, (size_t)job->n_groups * sizeof(float[ROWS][ROWS]));
    item_tiles(job, my, 0);
    for (int64_t i = 0; i < n_items; i++) {
        if (i + 1 < n_items) item_tiles(job, my, i + 1);
        item_fold(job, my, i);
    }
    for (int64_t g = 0; g < job->n_groups; g++) store_tile(my->acc[g], out, job->n_out, job->r0, g * ROWS, n_tok);
}

int pf_matmul_amx(const float *x, const void *w, int type, int64_t n_tok, int64_t n_in, int64_t n_out,
                  float *out, int n_threads) {
    if (!pf_amx_supports(type, n_in) || n_tok < 0 || n_out < 0 || n_threads < 1) return -1;
    if (n_tok == 0 || n_out == 0) return 0;
    const int has_mins = type == PF_Q4_K;
    const int64_t n_groups = (n_tok + ROWS - 1) / ROWS, n_row_groups = (n_out + ROWS - 1) / ROWS;
    act_groups act = {
        .q = alloc64((size_t)n_groups * ROWS * n_in),
        .d = alloc64((size_t)n_groups * ROWS * (n_in / QK_K) * sizeof(float)),
        .sums = has_mins ? alloc64((size_t)n_groups * ROWS * (n_in / 32) * sizeof(float)) : NULL,
        .n_in = n_in,
    };
    thread_space *ts = alloc_spaces(n_threads, n_in, n_groups);
    if (!act.q || !act.d || (has_mins && !act.sums) || !ts) {
        free(act.q), free(act.d), free(act.sums);
        if (ts) free_spaces(ts, n_threads);
        return -2;
    }
    const size_t w_row = (size_t)pf_row_bytes(type, n_in);
#pragma omp parallel num_threads(n_threads)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        thread_space *my = &ts[tid];
        /* whole groups per thread: slots of one group share cache lines */
#pragma omp for schedule(static, ROWS)
        for (int64_t t = 0; t < n_groups * ROWS; t++) quantize_token(x, t, n_tok, my->tmp, &act);
        load_tile_config();
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t rg = 0; rg < n_row_groups; rg++) {
            const row_job job = {.w = w, .w_row = w_row, .type = type, .r0 = rg * ROWS, .n_out = n_out,
                                 .n_groups = n_groups, .n_pairs = (n_groups + 1) / 2, .act = &act};
            row_group(&job, my, out, n_tok);
        }
        _tile_release();
    }
    free_spaces(ts, n_threads);
    free(act.q), free(act.d), free(act.sums);
    return 0;
}

#pragma GCC pop_options
#endif /* PF_AMX_BUILD */
