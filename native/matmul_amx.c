/* Q4_K / Q6_K matmul on AMX int8 tiles, for batches (prefill, batched decode).
 *
 * One TMUL op C += A . B multiplies a tile of 16 rows x 64 bytes by a tile of
 * 16 rows x 64 bytes in "VNNI" layout (4 consecutive k of one column per
 * 32-bit lane) into 16 x 16 int32. Here
 *   A = 16 weight rows; each weight as its integer product with its
 *       sub-block scale, p = sc * q (the integer the AVX2 kernel sums too),
 *       split into two bytes p = 256 * hi + lo: one A tile of lo, one of hi;
 *   B = the Q8_K activations of 16 tokens, laid out av[k/4][token][k%4]
 *       once per call;
 *   C = lo . a and hi . a, summed over a whole 256-weight block (4 TMUL ops
 *       each), since the sub-block scales are inside p.
 * Per block, AVX-512 folds the two C tiles into float sums:
 *   acc[row][token] += d_w * d_a * (256 * C_hi + C_lo)
 *                      - sum_j dmin * m_j * d_a * (sum of a over sub-block j)
 * (the second line for Q4_K's mins), which is the AVX2 kernel's sum in
 * another order of float additions.
 *
 * Work: threads take groups of 16 weight rows, unpack them once into a
 * per-thread buffer (2 x 16 x n_in bytes, in L2), then pass every group of
 * 16 tokens over them, two groups per pass so each A tile feeds two B tiles.
 * Tokens past n_tok are zero (they add nothing).
 */
#define _GNU_SOURCE /* syscall() under -std=c11 */
#include "matmul_amx.h"

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
    const char *off = getenv("PYFORGE_DISABLE_AMX");
    if (off && *off && strcmp(off, "0") != 0) return 0;
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
    static int state = -1; /* racing first calls compute the same answer */
    int s = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
    if (s < 0) {
        s = amx_probe();
        __atomic_store_n(&state, s, __ATOMIC_RELEASE);
    }
    return s;
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

/* 16 weight rows as TMUL operands. Each weight's integer product with its
 * sub-block scale, p = sc * q (Q4_K: 0..945; Q6_K: -4096..4064), is split
 * into bytes p = 256 * hi + lo (lo unsigned, hi signed), so one C tile can
 * sum a whole 256-weight block: dot = 256 * (hi . a) + (lo . a).
 *   lo, hi  [16][n_in]        bytes of p, as the A tiles read them
 *   d       [16][n_in/256]    the block's d
 *   mins    [16][n_in/32]     -dmin * m of each sub-block (Q4_K only) */
typedef struct {
    uint8_t *lo;
    int8_t *hi;
    float *d, *mins;
} weight_rows;

/* 32 products (16-bit) -> their low and high bytes, in order. */
PF_INLINE void store_split(__m512i p, uint8_t *lo, int8_t *hi) {
    _mm256_storeu_si256((__m256i *)lo, _mm512_cvtepi16_epi8(p));
    _mm256_storeu_si256((__m256i *)hi, _mm512_cvtepi16_epi8(_mm512_srai_epi16(p, 8)));
}

static void unpack_q4_K_row(const block_q4_K *blk, int64_t nb, const weight_rows *wr, int64_t r, int64_t n_in) {
    uint8_t *lo = wr->lo + r * n_in;
    int8_t *hi = wr->hi + r * n_in;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    for (int64_t i = 0; i < nb; i++) {
        const __m128i sm = k_scales_mins(blk[i].scales);
        uint8_t sc[16];
        _mm_storeu_si128((__m128i *)sc, sm);
        for (int c = 0; c < 4; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(blk[i].qs + 32 * c));
            const __m256i q[2] = {_mm256_and_si256(v, m4), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4)};
            for (int h = 0; h < 2; h++) { /* sub-block 2c + h: weights 32 (2c + h) .. */
                const int64_t k = QK_K * i + 32 * (2 * c + h);
                const __m512i p = _mm512_mullo_epi16(_mm512_cvtepu8_epi16(q[h]), _mm512_set1_epi16(sc[2 * c + h]));
                store_split(p, lo + k, hi + k);
            }
        }
        wr->d[r * nb + i] = pf_half_to_float(blk[i].d);
        const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8)));
        _mm256_storeu_ps(wr->mins + r * (n_in / 32) + 8 * i,
                         _mm256_mul_ps(_mm256_set1_ps(-pf_half_to_float(blk[i].dmin)), m));
    }
}

/* Q6_K weight 128h + 32g + l: low nibble from ql, two high bits from qh
 * (layout in quants.h), q - 32 signed; 32 weights span sub-blocks 8h + 2g
 * and 8h + 2g + 1. */
static void unpack_q6_K_row(const block_q6_K *blk, int64_t nb, const weight_rows *wr, int64_t r, int64_t n_in) {
    uint8_t *lo = wr->lo + r * n_in;
    int8_t *hi = wr->hi + r * n_in;
    const __m256i m4 = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30), off = _mm256_set1_epi8(32);
    for (int64_t i = 0; i < nb; i++) {
        for (int h = 0; h < 2; h++) {
            const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(blk[i].ql + 64 * h));
            const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(blk[i].ql + 64 * h + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk[i].qh + 32 * h));
            const __m256i g[4] = {
                _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30)),
                _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30)),
            };
            for (int k = 0; k < 4; k++) {
                const int s = 8 * h + 2 * k;
                const __m512i sc = _mm512_inserti64x4(_mm512_set1_epi16(blk[i].scales[s]),
                                                      _mm256_set1_epi16(blk[i].scales[s + 1]), 1);
                const __m512i p = _mm512_mullo_epi16(_mm512_cvtepi8_epi16(_mm256_sub_epi8(g[k], off)), sc);
                store_split(p, lo + QK_K * i + 128 * h + 32 * k, hi + QK_K * i + 128 * h + 32 * k);
            }
        }
        wr->d[r * nb + i] = pf_half_to_float(blk[i].d);
    }
}

/* Rows r0.. r0+15 of w (rows past n_out become zeros). */
static void unpack_rows(const char *w, size_t w_row, int type, int64_t r0, int64_t n_out, int64_t n_in,
                        const weight_rows *wr) {
    const int64_t nb = n_in / QK_K;
    for (int64_t r = 0; r < ROWS; r++) {
        if (r0 + r >= n_out) {
            memset(wr->lo + r * n_in, 0, (size_t)n_in);
            memset(wr->hi + r * n_in, 0, (size_t)n_in);
            memset(wr->d + r * nb, 0, (size_t)nb * sizeof(float));
            if (wr->mins) memset(wr->mins + r * (n_in / 32), 0, (size_t)(n_in / 32) * sizeof(float));
        } else if (type == PF_Q4_K) {
            unpack_q4_K_row((const void *)(w + (size_t)(r0 + r) * w_row), nb, wr, r, n_in);
        } else {
            unpack_q6_K_row((const void *)(w + (size_t)(r0 + r) * w_row), nb, wr, r, n_in);
        }
    }
}

/* C tiles of one 256-weight block from k0 for one or two token groups
 * (tiles 0, 1 and 2, 3), stored to c[0..1] / c[2..3]. */
PF_INLINE void block_tiles(const weight_rows *wr, int64_t n_in, const int8_t *aq0, const int8_t *aq1, int64_t k0,
                           int32_t c[4][ROWS][ROWS], const int two) {
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t k = k0; k < k0 + QK_K; k += SLICE) {
        _tile_loadd(4, wr->lo + k, n_in);
        _tile_loadd(5, wr->hi + k, n_in);
        _tile_loadd(6, aq0 + k * ROWS, 64);
        _tile_dpbusd(0, 4, 6); /* unsigned low bytes x signed activations */
        _tile_dpbssd(1, 5, 6); /* signed high bytes x signed activations */
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

/* acc[row] += d_w * d_a * (256 hi + lo) + sum_j mins_j * (d_a * sum of a)_j
 * for block b of one token group. */
PF_INLINE void fold_block(const int32_t clo[ROWS][ROWS], const int32_t chi[ROWS][ROWS], const weight_rows *wr,
                          int64_t nb, int64_t b, const float *ad, const float *asums, float acc[ROWS][ROWS]) {
    const __m512 da = _mm512_load_ps(ad + b * ROWS);
    for (int n = 0; n < ROWS; n++) {
        const __m512i t = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(chi[n]), 8), _mm512_load_si512(clo[n]));
        const __m512 s = _mm512_mul_ps(_mm512_set1_ps(wr->d[n * nb + b]), da);
        _mm512_store_ps(acc[n], _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), s, _mm512_load_ps(acc[n])));
    }
    if (wr->mins) {
        const int64_t n32 = nb * 8;
        __m512 sums[8];
        for (int j = 0; j < 8; j++) sums[j] = _mm512_load_ps(asums + (8 * b + j) * ROWS);
        for (int n = 0; n < ROWS; n++) {
            __m512 v = _mm512_load_ps(acc[n]);
            for (int j = 0; j < 8; j++) v = _mm512_fmadd_ps(_mm512_set1_ps(wr->mins[n * n32 + 8 * b + j]), sums[j], v);
            _mm512_store_ps(acc[n], v);
        }
    }
}

typedef struct {
    const int8_t *q;
    const float *d, *sums;
} group_view;

PF_INLINE group_view view_of(const act_groups *a, int64_t g) {
    return (group_view){group_q(a, g), group_d(a, g), a->sums ? group_sums(a, g) : NULL};
}

/* acc[t][row][token] = dot of 16 unpacked weight rows with the tokens of
 * one or two groups. Software-pipelined: block b + 1's tile ops are issued
 * before block b is folded, so the tile unit and the vector units overlap and
 * no load waits on a tile store just issued. */
PF_INLINE void rows_x_groups(const weight_rows *wr, int64_t n_in, const group_view *g0, const group_view *g1,
                             int32_t c[2][4][ROWS][ROWS], float acc[2][ROWS][ROWS], const int two) {
    const int64_t nb = n_in / QK_K;
    memset(acc, 0, (two ? 2 : 1) * sizeof(float[ROWS][ROWS]));
    block_tiles(wr, n_in, g0->q, two ? g1->q : NULL, 0, c[0], two);
    for (int64_t b = 0; b < nb; b++) {
        if (b + 1 < nb) block_tiles(wr, n_in, g0->q, two ? g1->q : NULL, (b + 1) * QK_K, c[(b + 1) & 1], two);
        fold_block(c[b & 1][0], c[b & 1][1], wr, nb, b, g0->d, g0->sums, acc[0]);
        if (two) fold_block(c[b & 1][2], c[b & 1][3], wr, nb, b, g1->d, g1->sums, acc[1]);
    }
}

/* out[t][r0 + n] = acc[n][t - t0] for the real rows and tokens. */
static void store_tile(float acc[ROWS][ROWS], float *out, int64_t n_out, int64_t r0, int64_t t0, int64_t n_tok) {
    const int64_t nn = n_out - r0 < ROWS ? n_out - r0 : ROWS, nm = n_tok - t0 < ROWS ? n_tok - t0 : ROWS;
    for (int64_t m = 0; m < nm; m++)
        for (int64_t n = 0; n < nn; n++) out[(t0 + m) * n_out + r0 + n] = acc[n][m];
}

typedef struct {
    weight_rows wr;
    block_q8_K *tmp;
    int32_t (*c)[4][ROWS][ROWS]; /* [2]: the block being folded, the block being multiplied */
    float (*acc)[ROWS][ROWS];    /* [2]: per token group */
} thread_space;

static void free_spaces(thread_space *ts, int n) {
    for (int i = 0; i < n; i++)
        free(ts[i].wr.lo), free(ts[i].wr.hi), free(ts[i].wr.d), free(ts[i].wr.mins), free(ts[i].tmp), free(ts[i].c),
            free(ts[i].acc);
    free(ts);
}

/* aligned_alloc wants a size that is a multiple of the alignment. */
static void *alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) & ~(size_t)63); }

static thread_space *alloc_spaces(int n, int64_t n_in, int has_mins) {
    thread_space *ts = calloc((size_t)n, sizeof *ts);
    if (!ts) return NULL;
    for (int i = 0; i < n; i++) {
        weight_rows *wr = &ts[i].wr;
        wr->lo = alloc64((size_t)ROWS * n_in);
        wr->hi = alloc64((size_t)ROWS * n_in);
        wr->d = alloc64((size_t)ROWS * (n_in / QK_K) * sizeof(float));
        wr->mins = has_mins ? alloc64((size_t)ROWS * (n_in / 32) * sizeof(float)) : NULL;
        ts[i].tmp = malloc((size_t)(n_in / QK_K) * sizeof(block_q8_K));
        ts[i].c = alloc64(2 * sizeof(int32_t[4][ROWS][ROWS]));
        ts[i].acc = alloc64(2 * sizeof(float[ROWS][ROWS]));
        if (!wr->lo || !wr->hi || !wr->d || (has_mins && !wr->mins) || !ts[i].tmp || !ts[i].c || !ts[i].acc) {
            free_spaces(ts, n);
            return NULL;
        }
    }
    return ts;
}

/* Every token group against the 16 weight rows in wr, two groups per pass. */
static void row_group(const thread_space *my, const act_groups *act, int64_t n_groups, float *out, int64_t n_out,
                      int64_t r0, int64_t n_tok) {
    const int64_t n_in = act->n_in;
    for (int64_t g = 0; g < n_groups; g += 2) {
        const group_view g0 = view_of(act, g);
        if (g + 1 < n_groups) {
            const group_view g1 = view_of(act, g + 1);
            rows_x_groups(&my->wr, n_in, &g0, &g1, my->c, my->acc, 1);
            store_tile(my->acc[1], out, n_out, r0, (g + 1) * ROWS, n_tok);
        } else {
            rows_x_groups(&my->wr, n_in, &g0, NULL, my->c, my->acc, 0);
        }
        store_tile(my->acc[0], out, n_out, r0, g * ROWS, n_tok);
    }
}

int pf_matmul_amx(const float *x, const void *w, int type, int64_t n_tok, int64_t n_in, int64_t n_out,
                  float *out, int n_threads) {
    if (!pf_amx_supports(type, n_in) || n_tok < 0 || n_out < 0 || n_threads < 1) return -1;
    if (n_tok == 0 || n_out == 0) return 0;
    const int has_mins = type == PF_Q4_K;
    const int64_t n_groups = (n_tok + ROWS - 1) / ROWS, n_row_groups = (n_out + ROWS - 1) / ROWS;
    const size_t w_row = (size_t)pf_row_bytes(type, n_in);
    act_groups act = {
        .q = alloc64((size_t)n_groups * ROWS * n_in),
        .d = alloc64((size_t)n_groups * ROWS * (n_in / QK_K) * sizeof(float)),
        .sums = has_mins ? alloc64((size_t)n_groups * ROWS * (n_in / 32) * sizeof(float)) : NULL,
        .n_in = n_in,
    };
    thread_space *ts = alloc_spaces(n_threads, n_in, has_mins);
    if (!act.q || !act.d || (has_mins && !act.sums) || !ts) {
        free(act.q), free(act.d), free(act.sums);
        if (ts) free_spaces(ts, n_threads);
        return -2;
    }
#pragma omp parallel num_threads(n_threads)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        const thread_space *my = &ts[tid];
        /* whole groups per thread: slots of one group share cache lines */
#pragma omp for schedule(static, ROWS)
        for (int64_t t = 0; t < n_groups * ROWS; t++) quantize_token(x, t, n_tok, my->tmp, &act);
        load_tile_config();
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t rg = 0; rg < n_row_groups; rg++) {
            unpack_rows(w, w_row, type, rg * ROWS, n_out, n_in, &my->wr);
            row_group(my, &act, n_groups, out, n_out, rg * ROWS, n_tok);
        }
        _tile_release();
    }
    free_spaces(ts, n_threads);
    free(act.q), free(act.d), free(act.sums);
    return 0;
}

#pragma GCC pop_options
#endif /* PF_AMX_BUILD */
