/* The x16 formats: repacking stored weights 16 rows at a time, and the GEMM
 * driver that quantizes the activations and shares the row groups out to a
 * kernel family's tiles (layouts in x16_formats.h, API in matmul_x16.h).
 * Plain C: it runs on every CPU; the tiles carry the instruction sets.
 */
#include "matmul_x16.h"

#include <stdlib.h>
#include <string.h>

#include "cpu_probe.h"
#include "k_scales.h"
#include "matmul_vnni.h"
#include "x16_formats.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* -- repacking: row r of an x16 block from one stored block of that row ------ */

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

static void f32_row(const void *src, int r, void *dst) { ((float *)dst)[r] = *(const float *)src; }

/* -- the formats, by ggml type ----------------------------------------------- */

/* What a format's tiles read besides the weights (ACT_F32: the activations as they are). */
enum { ACT_Q8_K, ACT_Q8_K_SUMS, ACT_Q8_0, ACT_F32 };

/* Row r of an x16 block from one stored block of that row (the block is zeroed first). */
typedef void (*x16_row_fn)(const void *src, int r, void *dst);

typedef struct {
    int type;
    int64_t cols;               /* columns per block */
    size_t block_bytes;         /* bytes of an x16 block (16 rows) */
    x16_row_fn row;
    int act;                    /* ACT_* */
} x16_format;

static const x16_format X16_FORMATS[] = {
    {PF_Q4_K, QK_K, sizeof(block_q4_K_x16), q4_K_row, ACT_Q8_K_SUMS},
    {PF_Q5_K, QK_K, sizeof(block_q5_K_x16), q5_K_row, ACT_Q8_K_SUMS},
    {PF_Q6_K, QK_K, sizeof(block_q6_K_x16), q6_K_row, ACT_Q8_K},
    {PF_Q8_0, QK8_0, sizeof(block_q8_0_x16), q8_0_row, ACT_Q8_0},
    {PF_Q4_0, QK4_0, sizeof(block_q4_0_x16), q4_0_row, ACT_Q8_0},
    {PF_F32, 1, 16 * sizeof(float), f32_row, ACT_F32},
};

static const x16_format *x16_format_of(int type) {
    for (size_t i = 0; i < sizeof X16_FORMATS / sizeof X16_FORMATS[0]; i++)
        if (X16_FORMATS[i].type == type) return &X16_FORMATS[i];
    return NULL;
}

/* Row groups of an n_out-row matrix: F32's last one may be partial (zero rows). */
static int64_t x16_groups(const x16_format *f, int64_t n_out) {
    return f->act == ACT_F32 ? (n_out + 15) / 16 : n_out / 16;
}

static int64_t x16_bytes(const x16_format *f, int64_t n_out, int64_t n_in) {
    if (!f || n_out <= 0 || n_in <= 0 || n_in % f->cols) return -1;
    if (f->act == ACT_F32 ? n_in > PF_X16_F32_MAX_IN : n_out % 16 != 0) return -1;
    return x16_groups(f, n_out) * (n_in / f->cols) * (int64_t)f->block_bytes;
}

int64_t pf_x16_bytes(int type, int64_t n_out, int64_t n_in) { return x16_bytes(x16_format_of(type), n_out, n_in); }

int pf_repack_x16(int type, const void *w, void *dst, int64_t n_out, int64_t n_in, int n_threads) {
    const x16_format *f = x16_format_of(type);
    if (x16_bytes(f, n_out, n_in) < 0) return -1;
    const int64_t nb = n_in / f->cols, n_groups = x16_groups(f, n_out);
    const size_t src_bytes = (size_t)pf_row_bytes(type, f->cols);
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t gr = 0; gr < n_groups; gr++)
        for (int64_t i = 0; i < nb; i++) {
            char *o = (char *)dst + (size_t)(gr * nb + i) * f->block_bytes;
            memset(o, 0, f->block_bytes);
            for (int r = 0; r < 16 && 16 * gr + r < n_out; r++)
                f->row((const char *)w + (size_t)((16 * gr + r) * nb + i) * src_bytes, r, o);
        }
    return 0;
}

/* -- which family runs ------------------------------------------------------- */

static int x16_probe(void) {
    if (pf_env_flag("PYFORGE_DISABLE_X16")) return PF_X16_NONE;
    if (pf_vnni_available()) return PF_X16_VNNI;
    return pf_avx2_x16_tile(PF_Q4_K) ? PF_X16_AVX2 : PF_X16_NONE;
}

int pf_x16_kernels(void) {
    static int state = -1;
    return pf_probe_once(&state, x16_probe);
}

/* The tile of family `kernels` (PF_X16_NONE: the best here), NULL where it cannot run. */
static pf_x16_tile_fn pick_tile(int type, int kernels) {
    const int best = pf_x16_kernels();
    if (kernels == PF_X16_NONE) kernels = best;
    if (best == PF_X16_NONE || kernels > best) return NULL;   /* VNNI hosts run AVX2 too; not the reverse */
    return kernels == PF_X16_VNNI ? pf_vnni_x16_tile(type) : pf_avx2_x16_tile(type);
}

/* -- the GEMM driver --------------------------------------------------------- */

/* Row groups x token tiles, shared out inside the caller's parallel region (an
 * orphaned omp for). A row group's weights stay in L2 while every token tile
 * passes over them. Threads take runs of row groups from a shared counter
 * (about 8 runs a thread: long sequential streams for the prefetchers, and a
 * slow core does not hold the others). */
static void x16_row_groups(const pf_x16_job *job, pf_x16_tile_fn tile, int64_t n_groups, int64_t n_tok) {
    int nth = 1;
#ifdef _OPENMP
    nth = omp_get_num_threads();
#endif
    const int64_t run = (n_groups + 8 * nth - 1) / (8 * nth);
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t r0 = 0; r0 < n_groups; r0 += run)
        for (int64_t gr = r0; gr < r0 + run && gr < n_groups; gr++)
            for (int64_t t0 = 0; t0 < n_tok; t0 += PF_X16_TOKENS)
                tile(job, gr, t0, n_tok - t0 < PF_X16_TOKENS ? (int)(n_tok - t0) : PF_X16_TOKENS);
}

/* Token t's activations as the format's tiles read them. */
static void quantize_token(const x16_format *f, const float *x, int64_t t, int64_t n_in, void *act, int16_t *k_sums,
                           float *da, int32_t *q_sums) {
    const int64_t nb = n_in / f->cols;
    if (f->act == ACT_Q8_0) {
        block_q8_0 *a = (block_q8_0 *)act + t * nb;
        pf_q8_0_from_float(x + t * n_in, a, n_in);
        for (int64_t i = 0; i < nb; i++) {
            int32_t s = 0;
            for (int k = 0; k < QK8_0; k++) s += a[i].qs[k];
            da[t * nb + i] = pf_half_to_float(a[i].d), q_sums[t * nb + i] = s;
        }
        return;
    }
    block_q8_K *a = (block_q8_K *)act + t * nb;
    pf_q8_K_from_float(x + t * n_in, a, n_in);
    if (f->act == ACT_Q8_K_SUMS)
        for (int64_t i = 0; i < nb; i++)
            for (int j = 0; j < 8; j++) k_sums[(t * nb + i) * 8 + j] = (int16_t)(a[i].bsums[2 * j] + a[i].bsums[2 * j + 1]);
}

int pf_matmul_x16(int type, const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out,
                  float *out, int n_threads, int kernels) {
    const x16_format *f = x16_format_of(type);
    const pf_x16_tile_fn tile = pick_tile(type, kernels);
    if (x16_bytes(f, n_out, n_in) < 0 || n_tok < 0 || !tile) return -1;
    if (n_tok == 0) return 0;
    const int64_t nb = n_in / f->cols, n = n_tok * nb;
    if (f->act == ACT_F32) {
        const pf_x16_job job = {packed, x, NULL, NULL, NULL, out, nb, n_out};
        const int64_t n_groups = x16_groups(f, n_out);
#pragma omp parallel num_threads(n_threads) if (n_threads > 1 && n_groups > 1)
        x16_row_groups(&job, tile, n_groups, n_tok);
        return 0;
    }
    const int q8_0 = f->act == ACT_Q8_0;
    void *act = aligned_alloc(64, (((size_t)n * (q8_0 ? sizeof(block_q8_0) : sizeof(block_q8_K))) + 63) & ~(size_t)63);
    int16_t *k_sums = f->act == ACT_Q8_K_SUMS ? malloc((size_t)n * 8 * sizeof(int16_t)) : NULL;
    float *da = q8_0 ? malloc((size_t)n * sizeof(float)) : NULL;
    int32_t *q_sums = q8_0 ? malloc((size_t)n * sizeof(int32_t)) : NULL;
    if (!act || (f->act == ACT_Q8_K_SUMS && !k_sums) || (q8_0 && (!da || !q_sums))) {
        free(act), free(k_sums), free(da), free(q_sums);
        return -2;
    }
    const pf_x16_job job = {packed, act, k_sums, da, q_sums, out, nb, n_out};
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tok; t++) quantize_token(f, x, t, n_in, act, k_sums, da, q_sums);
        /* no token chunks that keep activations in L2: each would re-read every weight from DRAM
         * (a 512-token prefill ran 0.90x with 192 KB chunks); the activations stream from L3 */
        x16_row_groups(&job, tile, n_out / 16, n_tok);
    }
    free(act), free(k_sums), free(da), free(q_sums);
    return 0;
}
