/* Non-matmul model primitives for the CPU backend. See ops_kernels.h.
 *
 * Routines with an AVX2/FMA body keep a scalar loop after it, which handles
 * the tail and is the whole routine in a portable build
 * (PYFORGE_NATIVE_ARCH=scalar); the tests pass on both builds.
 */
#include "ops_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PF_AVX2 1
#endif

/* Starting a parallel region costs microseconds; below this many floats of
 * work one thread is done before a team would have started. */
#define PAR_MIN_WORK 16384

/* Attention positions scored at once: their keys (or values) for one kv
 * head, 64 x head_dim floats, stay in L1 while every head of the run uses them. */
#define ATTN_CHUNK 64

/* Most query heads one attention work item handles (stack: 64 x 64 scores). */
#define MAX_HEAD_RUN 64

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ------------------------------------------------------------------------ */
/* Vector building blocks                                                    */
/* ------------------------------------------------------------------------ */

#ifdef PF_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The eight horizontal sums of a[0..7] as one vector. */
static inline __m256 hsum8x8(const __m256 a[8]) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    /* u0 = [sums 0-3 of low halves | sums 0-3 of high halves], u1 likewise for 4-7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* exp per lane. x = n*ln2 + r with |r| <= ln2/2; e^r by its degree-7 Taylor
 * polynomial (truncation < 2e-9 relative, so float rounding dominates), 2^n
 * written straight into the exponent bits. Inputs below -87.3 (true result
 * < 1.2e-38) give exactly 0, so masked logits (-inf) get zero probability;
 * NaN stays NaN (min/max take their second operand when one is NaN). */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(lo, _mm256_min_ps(_mm256_set1_ps(88.3f), x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* ln2 split as float(ln2) + residual: FMA keeps n*ln2 exact enough. */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147182f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-1.90465430e-9f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

/* x[n] *= c */
static void scale_inplace(float *x, float c, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] *= c;
}

static float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float sum = 0.0f;
#ifdef PF_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    sum = hsum8(acc);
#endif
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static float max_of(const float *x, int64_t n) {
    int64_t i = 0;
    float m = -INFINITY;
#ifdef PF_AVX2
    if (n >= 8) {
        __m256 mv = _mm256_loadu_ps(x);
        for (i = 8; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    }
#endif
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* x[n] = exp(x - m); returns the sum of the new values. */
static float exp_shifted(float *x, int64_t n, float m) {
    int64_t i = 0;
    float sum = 0.0f;
#ifdef PF_AVX2
    __m256 acc = _mm256_setzero_ps(), mv = _mm256_set1_ps(m);
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
#endif
    for (; i < n; i++) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    return sum;
}

/* ------------------------------------------------------------------------ */
/* rmsnorm                                                                   */
/* ------------------------------------------------------------------------ */

/* sum(x^2) accumulated in double, so the norm of a long row carries no
 * float32 summation error (float would drift ~1e-6 at d = 8192). */
static double sum_squares(const float *x, int64_t d) {
    int64_t i = 0;
    double sum = 0.0;
#ifdef PF_AVX2
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    for (; i + 8 <= d; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        a0 = _mm256_fmadd_pd(lo, lo, a0);
        a1 = _mm256_fmadd_pd(hi, hi, a1);
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(a0, a1));
    sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
    for (; i < d; i++) sum += (double)x[i] * x[i];
    return sum;
}

void pf_rmsnorm(const float *x, const float *w, float eps, float *out,
                int64_t n, int64_t d, int n_threads) {
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1 && n * d >= PAR_MIN_WORK)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * d;  /* [d] */
        float *oi = out + i * d;      /* [d] */
        float r = (float)(1.0 / sqrt(sum_squares(xi, d) / (double)d + (double)eps));
        for (int64_t j = 0; j < d; j++) oi[j] = xi[j] * r * w[j];
    }
}

/* ------------------------------------------------------------------------ */
/* rope                                                                      */
/* ------------------------------------------------------------------------ */

/* Rotate pair i of every head of one token by pos * inv_freq[i]. The angle is
 * formed in double: at position 1e5 a float angle would already be off by
 * ~4e-3 rad. */
static void rope_token(float *x /* [n_heads, hd] */, double pos, const double *inv_freq,
                       int64_t half, int64_t n_heads, int64_t hd, int neox) {
    for (int64_t i = 0; i < half; i++) {
        double a = pos * inv_freq[i];
        float c = (float)cos(a), s = (float)sin(a);
        int64_t i0 = neox ? i : 2 * i;          /* first of the pair */
        int64_t i1 = neox ? i + half : 2 * i + 1;
        for (int64_t h = 0; h < n_heads; h++) {
            float *xh = x + h * hd;
            float x0 = xh[i0], x1 = xh[i1];
            xh[i0] = x0 * c - x1 * s;
            xh[i1] = x0 * s + x1 * c;
        }
    }
}

int pf_rope(float *x, const int32_t *positions, int64_t n_tok, int64_t n_heads,
            int64_t head_dim, int n_rot, double theta, int neox,
            const float *freq_factors, int n_threads) {
    const int64_t half = n_rot / 2;
    double *inv_freq = malloc((size_t)(half > 0 ? half : 1) * sizeof(double));  /* [half] */
    if (!inv_freq) return -1;
    for (int64_t i = 0; i < half; i++) {
        inv_freq[i] = pow(theta, -2.0 * (double)i / (double)n_rot);
        if (freq_factors) inv_freq[i] /= (double)freq_factors[i];
    }
    const int64_t work = n_tok * n_heads * n_rot;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1 && work >= PAR_MIN_WORK)
    for (int64_t t = 0; t < n_tok; t++)
        rope_token(x + t * n_heads * head_dim, (double)positions[t], inv_freq, half, n_heads, head_dim, neox);
    free(inv_freq);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Elementwise                                                               */
/* ------------------------------------------------------------------------ */

/* silu(g) * u = g * u / (1 + e^-g); for g << 0 the quotient underflows to 0. */
static void silu_mul_span(const float *g, const float *u, float *out, int64_t n) {
    int64_t i = 0;
#ifdef PF_AVX2
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 den = _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv)));
        _mm256_storeu_ps(out + i, _mm256_div_ps(_mm256_mul_ps(gv, _mm256_loadu_ps(u + i)), den));
    }
#endif
    for (; i < n; i++) out[i] = g[i] * u[i] / (1.0f + expf(-g[i]));
}

void pf_silu_mul(const float *gate, const float *up, float *out, int64_t n, int n_threads) {
    /* Split into spans of whole vectors so each thread runs the SIMD loop. */
    const int64_t span = 4096;
    const int64_t n_spans = (n + span - 1) / span;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1 && n >= PAR_MIN_WORK)
    for (int64_t s = 0; s < n_spans; s++) {
        int64_t i = s * span;
        silu_mul_span(gate + i, up + i, out + i, min64(span, n - i));
    }
}

void pf_add_inplace(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];  /* -O3 vectorizes this */
}

void pf_softmax_rows(float *x, int64_t n, int64_t d) {
    for (int64_t r = 0; r < n; r++) {
        float *xr = x + r * d;  /* [d] */
        float m = max_of(xr, d);
        /* Sum per 256-chunk in float, across chunks in double: a 128k vocab
         * row keeps ~1e-7 relative error in its normalizer. */
        double sum = 0.0;
        for (int64_t i = 0; i < d; i += 256) sum += exp_shifted(xr + i, min64(256, d - i), m);
        scale_inplace(xr, (float)(1.0 / sum), d);
    }
}

void pf_argmax_rows(const float *x, int64_t n, int64_t d, int32_t *out) {
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * d;  /* [d] */
        int64_t best = 0;
        for (int64_t j = 1; j < d; j++)
            if (xr[j] > xr[best]) best = j;
        out[r] = (int32_t)best;
    }
}

/* ------------------------------------------------------------------------ */
/* Paged KV cache                                                            */
/* ------------------------------------------------------------------------ */

void pf_kv_store(const float *k, const float *v, float *k_cache, float *v_cache,
                 const int32_t *slot_mapping, int64_t n_tok, int64_t n_kv, int64_t head_dim, int64_t block_size) {
    const size_t bytes = (size_t)head_dim * sizeof(float);
    for (int64_t t = 0; t < n_tok; t++) {
        const int64_t slot = slot_mapping[t], block = slot / block_size, off = slot % block_size;
        for (int64_t h = 0; h < n_kv; h++) {
            const int64_t at = ((block * n_kv + h) * block_size + off) * head_dim, from = (t * n_kv + h) * head_dim;
            memcpy(k_cache + at, k + from, bytes);
            memcpy(v_cache + at, v + from, bytes);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Paged attention                                                           */
/* ------------------------------------------------------------------------ */

/* s[j] = scale * q . k_j for the cnt keys k_j = k + j * stride, each [hd].
 * Eight keys at a time: eight independent FMA chains hide the FMA latency,
 * each load of q serves all eight, and one transposing reduction gives the
 * eight sums in one vector. */
static void score_keys(const float *q, const float *k, int64_t stride, int64_t cnt,
                       int64_t hd, float scale, float *s) {
    int64_t j = 0;
#ifdef PF_AVX2
    for (; j + 8 <= cnt; j += 8) {
        const float *kj = k + j * stride;
        __m256 a[8];
        for (int c = 0; c < 8; c++) a[c] = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= hd; d += 8) {
            __m256 qv = _mm256_loadu_ps(q + d);
            for (int c = 0; c < 8; c++) a[c] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kj + c * stride + d), a[c]);
        }
        _mm256_storeu_ps(s + j, _mm256_mul_ps(hsum8x8(a), _mm256_set1_ps(scale)));
        for (; d < hd; d++)
            for (int c = 0; c < 8; c++) s[j + c] += scale * q[d] * kj[c * stride + d];
    }
#endif
    for (; j < cnt; j++) s[j] = scale * dot(q, k + j * stride, hd);
}

#ifdef PF_AVX2
/* acc[8*NR] += sum_j p[j] * v_j[0 .. 8*NR) with acc held in NR registers for
 * the whole run of values (NR is a literal at every call, so a[] is registers). */
static inline __attribute__((always_inline)) void accumulate_tile(
    int nr, const float *p, const float *v, int64_t stride, int64_t cnt, float *acc) {
    __m256 a[8];
    for (int r = 0; r < nr; r++) a[r] = _mm256_loadu_ps(acc + 8 * r);
    for (int64_t j = 0; j < cnt; j++) {
        __m256 pj = _mm256_set1_ps(p[j]);
        const float *vj = v + j * stride;
        for (int r = 0; r < nr; r++) a[r] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * r), a[r]);
    }
    for (int r = 0; r < nr; r++) _mm256_storeu_ps(acc + 8 * r, a[r]);
}
#endif

/* acc[hd] += sum_j p[j] * v_j for the cnt values v_j = v + j * stride.
 * acc stays in registers across the values, 64 floats at a time: going
 * through memory would chain every FMA behind a store-to-load forward. */
static void accumulate_values(const float *p, const float *v, int64_t stride, int64_t cnt,
                              int64_t hd, float *acc) {
    int64_t d = 0;
#ifdef PF_AVX2
    for (; d + 64 <= hd; d += 64) accumulate_tile(8, p, v + d, stride, cnt, acc + d);
    for (; d + 32 <= hd; d += 32) accumulate_tile(4, p, v + d, stride, cnt, acc + d);
    for (; d + 8 <= hd; d += 8) accumulate_tile(1, p, v + d, stride, cnt, acc + d);
#endif
    for (int64_t j = 0; j < cnt; j++) {
        const float *vj = v + j * stride;
        for (int64_t e = d; e < hd; e++) acc[e] += p[j] * vj[e];
    }
}

/* Where one sequence's keys or values for one kv head live in the cache
 * [n_blocks, n_kv, block_size, hd]. */
typedef struct {
    const int32_t *table;  /* [max_blocks] block ids */
    int64_t block_size;
    int64_t stride;        /* floats between consecutive positions in a block (hd) */
    int64_t block_floats;  /* floats per block, all kv heads */
    int64_t head_off;      /* floats from a block's start to this kv head's rows */
} CacheView;

/* Offset of position p, and how many positions from p on stay in its block. */
static inline int64_t cache_offset(const CacheView *cv, int64_t p, int64_t *run) {
    int64_t off = p % cv->block_size;
    *run = cv->block_size - off;
    return (int64_t)cv->table[p / cv->block_size] * cv->block_floats + cv->head_off + off * cv->stride;
}

/* s[cnt] = scale * q . k_p for positions p0 .. p0+cnt-1, block by block. */
static void score_span(const float *q, const float *k_cache, const CacheView *cv, int64_t p0,
                       int64_t cnt, int64_t hd, float scale, float *s) {
    for (int64_t j = 0, run; j < cnt; j += run) {
        int64_t base = cache_offset(cv, p0 + j, &run);
        run = min64(run, cnt - j);
        score_keys(q, k_cache + base, cv->stride, run, hd, scale, s + j);
    }
}

/* acc[hd] += sum_j p[j] * v_(p0+j) over cnt positions, block by block. */
static void value_span(const float *p, const float *v_cache, const CacheView *cv, int64_t p0,
                       int64_t cnt, int64_t hd, float *acc) {
    for (int64_t j = 0, run; j < cnt; j += run) {
        int64_t base = cache_offset(cv, p0 + j, &run);
        run = min64(run, cnt - j);
        accumulate_values(p + j, v_cache + base, cv->stride, run, hd, acc);
    }
}

/* Online softmax for one head and one chunk: s[cnt] scores become weights
 * relative to the running max *m; out[hd] (the running weighted sum of
 * values) and *sum are rescaled when the max grows. */
static void softmax_chunk(float *s, int64_t cnt, float *m, float *sum, float *out, int64_t hd) {
    float cm = max_of(s, cnt);
    if (cm > *m) {
        float c = expf(*m - cm);  /* 0 on the first chunk */
        scale_inplace(out, c, hd);
        *sum *= c;
        *m = cm;
    }
    *sum += exp_shifted(s, cnt, *m);
}

/* Query heads h0 .. h0+gs-1 of one row against positions 0 .. n_ctx-1 of
 * its sequence. Chunk by chunk and kv head by kv head, every query head of
 * the group scores the same keys, then weighs the same values, while those
 * rows sit in L1 (read once per query head from L2 instead, they bound the
 * kernel by L2 bandwidth). Covering several kv heads walks whole cache rows
 * [n_kv, hd] in order, which the hardware prefetcher streams well. */
static void attend_heads(const float *q /* [gs, hd] */, int64_t h0, int64_t gs, int64_t group,
                         const float *k_cache, const float *v_cache, CacheView cv,
                         int64_t n_ctx, int64_t hd, float scale, float *out /* [gs, hd] */) {
    float s[MAX_HEAD_RUN][ATTN_CHUNK];  /* per head: scores, then weights, of one chunk */
    float m[MAX_HEAD_RUN], sum[MAX_HEAD_RUN];
    const int64_t per_kv = min64(gs, group);  /* query heads per kv head in this item */
    for (int64_t h = 0; h < gs; h++) m[h] = -INFINITY, sum[h] = 0.0f;
    memset(out, 0, (size_t)(gs * hd) * sizeof(float));
    for (int64_t p = 0, cnt; p < n_ctx; p += cnt) {
        cnt = min64(ATTN_CHUNK, n_ctx - p);
        for (int64_t g = 0; g < gs; g += per_kv) {
            cv.head_off = ((h0 + g) / group) * cv.block_size * hd;
            for (int64_t h = g; h < g + per_kv; h++) score_span(q + h * hd, k_cache, &cv, p, cnt, hd, scale, s[h]);
            for (int64_t h = g; h < g + per_kv; h++) softmax_chunk(s[h], cnt, &m[h], &sum[h], out + h * hd, hd);
            for (int64_t h = g; h < g + per_kv; h++) value_span(s[h], v_cache, &cv, p, cnt, hd, out + h * hd);
        }
    }
    for (int64_t h = 0; h < gs; h++) scale_inplace(out + h * hd, 1.0f / sum[h], hd);
}

/* Query heads per work item: a divisor of the GQA group, or a run of whole
 * groups, as large as the stack buffers allow while leaving two items per
 * thread (so one decode row still keeps every core busy). Larger is better:
 * the heads of an item share each key and value row read from memory (TinyLlama
 * decode at 1900 positions, 2 threads: whole groups of 8 heads took attention
 * from 11.5 to 8.5 ms a step against half groups, 4 items a thread). */
static int64_t heads_per_item(int64_t n_heads, int64_t group, int64_t n_tok, int n_threads) {
    int64_t best = 1;
    for (int64_t gs = 2; gs <= n_heads && gs <= MAX_HEAD_RUN; gs++) {
        int shape_ok = gs <= group ? group % gs == 0 : gs % group == 0 && n_heads % gs == 0;
        if (shape_ok && n_tok * (n_heads / gs) >= 2 * (int64_t)n_threads) best = gs;
    }
    return best;
}

/* The sequence owning query row `row`: the s with qs[s] <= row < qs[s+1]
 * (empty sequences have qs[s] == qs[s+1] and are skipped). */
static int64_t seq_of_row(const int32_t *qs, int64_t n_seq, int64_t row) {
    int64_t lo = 0, hi = n_seq;  /* qs[lo] <= row < qs[hi] */
    while (hi - lo > 1) {
        int64_t mid = (lo + hi) / 2;
        if (qs[mid] <= row) lo = mid;
        else hi = mid;
    }
    return lo;
}

void pf_paged_attention(const float *q, const float *k_cache, const float *v_cache,
                        const int32_t *block_tables, const int32_t *context_lens,
                        const int32_t *query_start, float *out,
                        const PagedAttnDims *dm, int n_threads) {
    const int64_t H = dm->n_heads, hd = dm->head_dim, group = H / dm->n_kv;
    const int64_t gs = heads_per_item(H, group, dm->n_tok, n_threads);
    const int64_t runs = H / gs;  /* head runs per query row */
    const int64_t n_items = dm->n_tok * runs;
    /* Items are (query row, run of gs heads). Rows differ in cost (causal
     * prefill, mixed context lengths): hand them out dynamically. */
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads) if (n_threads > 1 && n_items > 1)
    for (int64_t it = 0; it < n_items; it++) {
        int64_t row = it / runs, h0 = (it % runs) * gs;
        int64_t s = seq_of_row(query_start, dm->n_seq, row);
        int64_t n_q = query_start[s + 1] - query_start[s];
        int64_t n_ctx = context_lens[s] - n_q + (row - query_start[s]) + 1;
        CacheView cv = {block_tables + s * dm->max_blocks, dm->block_size, hd, dm->n_kv * dm->block_size * hd, 0};
        int64_t at = (row * H + h0) * hd;  /* q and out rows of heads h0 .. h0+gs-1 */
        attend_heads(q + at, h0, gs, group, k_cache, v_cache, cv, n_ctx, hd, dm->scale, out + at);
    }
}
