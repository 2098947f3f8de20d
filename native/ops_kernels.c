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

/* The AVX-512 attention kernels (prefill tiles, decode rows): compiled with
 * per-function targets, used where the CPU has AVX-512F. */
#if defined(PF_AVX2) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define PF_TILES_512 1
#endif

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

/* tanh per lane. |y| < 1/4: its odd Taylor polynomial to y^9 (the next term is
 * < 1e-8 relative there); above: 1 - 2 / (e^(2|y|) + 1), which loses no more
 * than ~3e-7 relative once tanh(|y|) > 0.24 (below, the subtraction would
 * cancel). Saturates to +-1; NaN stays NaN. */
static inline __m256 tanh8(__m256 y) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    __m256 a = _mm256_andnot_ps(sign, y), y2 = _mm256_mul_ps(y, y);
    __m256 p = _mm256_set1_ps(62.0f / 2835.0f);
    p = _mm256_fmadd_ps(p, y2, _mm256_set1_ps(-17.0f / 315.0f));
    p = _mm256_fmadd_ps(p, y2, _mm256_set1_ps(2.0f / 15.0f));
    p = _mm256_fmadd_ps(p, y2, _mm256_set1_ps(-1.0f / 3.0f));
    __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, y2), y, y);
    __m256 e = exp8(_mm256_add_ps(a, a));
    __m256 big = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
    big = _mm256_or_ps(big, _mm256_and_ps(sign, y));   /* tanh is odd */
    return _mm256_blendv_ps(big, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.25f), _CMP_LT_OQ));
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

/* LayerNorm (StableLM): mean and variance in double, two passes over the row,
 * so a row with a large mean loses nothing to cancellation. */
void pf_layernorm(const float *x, const float *w, const float *b, float eps, float *out,
                  int64_t n, int64_t d, int n_threads) {
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1 && n * d >= PAR_MIN_WORK)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * d;  /* [d] */
        float *oi = out + i * d;      /* [d] */
        double sum = 0.0, var = 0.0;
        for (int64_t j = 0; j < d; j++) sum += xi[j];
        double mean = sum / (double)d;
        for (int64_t j = 0; j < d; j++) var += ((double)xi[j] - mean) * ((double)xi[j] - mean);
        float r = (float)(1.0 / sqrt(var / (double)d + (double)eps)), m = (float)mean;
        for (int64_t j = 0; j < d; j++) oi[j] = (xi[j] - m) * r * w[j] + b[j];
    }
}

/* ------------------------------------------------------------------------ */
/* rope                                                                      */
/* ------------------------------------------------------------------------ */

/* Rotate pair i of every head of one token by pos * inv_freq[i], scaled by
 * mscale. The angle is formed in double: at position 1e5 a float angle would
 * already be off by ~4e-3 rad. */
static void rope_token(float *x /* [n_heads, hd] */, double pos, const double *inv_freq,
                       int64_t half, int64_t n_heads, int64_t hd, int neox, double mscale) {
    for (int64_t i = 0; i < half; i++) {
        double a = pos * inv_freq[i];
        float c = (float)(cos(a) * mscale), s = (float)(sin(a) * mscale);
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
            const float *freq_factors, double mscale, int n_threads) {
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
        rope_token(x + t * n_heads * head_dim, (double)positions[t], inv_freq, half, n_heads, head_dim, neox, mscale);
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

/* gelu_tanh(g) * u = g * u / (1 + e^(-2 sqrt(2/pi) (g + 0.044715 g^3))): the
 * tanh form as a logistic, which saturates cleanly at both ends. */
#define GELU_C 0.7978845608028654f   /* sqrt(2 / pi) */
#define GELU_A 0.044715f

static void gelu_tanh_mul_span(const float *g, const float *u, float *out, int64_t n) {
    int64_t i = 0;
#ifdef PF_AVX2
    const __m256 one = _mm256_set1_ps(1.0f), m2c = _mm256_set1_ps(-2.0f * GELU_C), a = _mm256_set1_ps(GELU_A);
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(a, gv), _mm256_mul_ps(gv, gv), gv);
        __m256 den = _mm256_add_ps(one, exp8(_mm256_mul_ps(m2c, inner)));
        _mm256_storeu_ps(out + i, _mm256_div_ps(_mm256_mul_ps(gv, _mm256_loadu_ps(u + i)), den));
    }
#endif
    for (; i < n; i++) {
        float inner = g[i] + GELU_A * g[i] * g[i] * g[i];
        out[i] = g[i] * u[i] / (1.0f + expf(-2.0f * GELU_C * inner));
    }
}

void pf_gelu_tanh_mul(const float *gate, const float *up, float *out, int64_t n, int n_threads) {
    const int64_t span = 4096;   /* whole vectors per thread, as pf_silu_mul */
    const int64_t n_spans = (n + span - 1) / span;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1 && n >= PAR_MIN_WORK)
    for (int64_t s = 0; s < n_spans; s++) {
        int64_t i = s * span;
        gelu_tanh_mul_span(gate + i, up + i, out + i, min64(span, n - i));
    }
}

void pf_softcap(float *x, int64_t n, float cap) {
    int64_t i = 0;
    const float inv = 1.0f / cap;
#ifdef PF_AVX2
    const __m256 cv = _mm256_set1_ps(cap), iv = _mm256_set1_ps(inv);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_mul_ps(cv, tanh8(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv))));
#endif
    for (; i < n; i++) x[i] = cap * tanhf(x[i] * inv);
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

void pf_kv_store(const float *k, const float *v, void *k_cache, void *v_cache,
                 const int32_t *slot_mapping, int64_t n_tok, int64_t n_kv, int64_t head_dim, int64_t block_size,
                 int kv_dtype) {
    const int64_t row_bytes = pf_kv_row_bytes(kv_dtype, head_dim);
    for (int64_t t = 0; t < n_tok; t++) {
        const int64_t slot = slot_mapping[t], block = slot / block_size, off = slot % block_size;
        for (int64_t h = 0; h < n_kv; h++) {
            const int64_t row = (block * n_kv + h) * block_size + off, from = (t * n_kv + h) * head_dim;
            pf_kv_row_from_float(kv_dtype, k + from, (char *)k_cache + row * row_bytes, head_dim);
            pf_kv_row_from_float(kv_dtype, v + from, (char *)v_cache + row * row_bytes, head_dim);
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

#ifdef PF_TILES_512
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f")
/* score_keys on 16-lane vectors (hd a multiple of 16): per key half the FMAs
 * of the AVX2 loop; each key's 16 partial sums fold to 8 before the shared
 * transposing reduction. */
static void score_keys16(const float *q, const float *k, int64_t stride, int64_t cnt,
                         int64_t hd, float scale, float *s) {
    int64_t j = 0;
    for (; j + 8 <= cnt; j += 8) {
        const float *kj = k + j * stride;
        __m512 a[8];
        for (int c = 0; c < 8; c++) a[c] = _mm512_setzero_ps();
        for (int64_t d = 0; d < hd; d += 16) {
            __m512 qv = _mm512_loadu_ps(q + d);
            for (int c = 0; c < 8; c++) a[c] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kj + c * stride + d), a[c]);
        }
        __m256 h[8];
        for (int c = 0; c < 8; c++)
            h[c] = _mm256_add_ps(_mm512_castps512_ps256(a[c]),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[c]), 1)));
        _mm256_storeu_ps(s + j, _mm256_mul_ps(hsum8x8(h), _mm256_set1_ps(scale)));
    }
    for (; j < cnt; j++) s[j] = scale * dot(q, k + j * stride, hd);
}

static inline __attribute__((always_inline)) void accumulate_tile16(
    int nr, const float *p, const float *v, int64_t stride, int64_t cnt, float *acc) {
    __m512 a[8];
    for (int r = 0; r < nr; r++) a[r] = _mm512_loadu_ps(acc + 16 * r);
    for (int64_t j = 0; j < cnt; j++) {
        __m512 pj = _mm512_set1_ps(p[j]);
        const float *vj = v + j * stride;
        for (int r = 0; r < nr; r++) a[r] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vj + 16 * r), a[r]);
    }
    for (int r = 0; r < nr; r++) _mm512_storeu_ps(acc + 16 * r, a[r]);
}

/* accumulate_values on 16-lane vectors; dims past the last 16 go the AVX2 way. */
static void accumulate_values16(const float *p, const float *v, int64_t stride, int64_t cnt,
                                int64_t hd, float *acc) {
    int64_t d = 0;
    for (; d + 128 <= hd; d += 128) accumulate_tile16(8, p, v + d, stride, cnt, acc + d);
    for (; d + 64 <= hd; d += 64) accumulate_tile16(4, p, v + d, stride, cnt, acc + d);
    for (; d + 16 <= hd; d += 16) accumulate_tile16(1, p, v + d, stride, cnt, acc + d);
    if (d < hd) accumulate_values(p, v + d, stride, cnt, hd - d, acc + d);
}
#pragma GCC pop_options
#endif

/* The per-row kernels, on 16-lane vectors when `wide` (and hd allows). */
static void score_keys_on(int wide, const float *q, const float *k, int64_t stride, int64_t cnt, int64_t hd,
                          float scale, float *s) {
#ifdef PF_TILES_512
    if (wide && hd % 16 == 0) {
        score_keys16(q, k, stride, cnt, hd, scale, s);
        return;
    }
#endif
    (void)wide;
    score_keys(q, k, stride, cnt, hd, scale, s);
}

static void accumulate_values_on(int wide, const float *p, const float *v, int64_t stride, int64_t cnt,
                                 int64_t hd, float *acc) {
#ifdef PF_TILES_512
    if (wide) {
        accumulate_values16(p, v, stride, cnt, hd, acc);
        return;
    }
#endif
    (void)wide;
    accumulate_values(p, v, stride, cnt, hd, acc);
}

/* Where one sequence's keys or values for one kv head live in the cache
 * [n_blocks, n_kv, block_size, hd]. */
typedef struct {
    const int32_t *table;  /* [max_blocks] block ids */
    int64_t block_size;
    int64_t stride;        /* floats between consecutive positions in a block (hd) */
    int64_t block_floats;  /* floats per block, all kv heads */
    int64_t head_off;      /* floats from a block's start to this kv head's rows */
    int wide;              /* the per-row kernels may use AVX-512 */
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
        score_keys_on(cv->wide, q, k_cache + base, cv->stride, run, hd, scale, s + j);
    }
}

/* acc[hd] += sum_j p[j] * v_(p0+j) over cnt positions, block by block. */
static void value_span(const float *p, const float *v_cache, const CacheView *cv, int64_t p0,
                       int64_t cnt, int64_t hd, float *acc) {
    for (int64_t j = 0, run; j < cnt; j += run) {
        int64_t base = cache_offset(cv, p0 + j, &run);
        run = min64(run, cnt - j);
        accumulate_values_on(cv->wide, p + j, v_cache + base, cv->stride, run, hd, acc);
    }
}

/* rows[cnt][hd] = positions p0 .. p0+cnt-1 of a cache in dtype, as float32.
 * Offsets from cache_offset count hd-value rows (stride == hd), so row r
 * starts r * row_bytes into the cache. */
static void load_span(const void *cache, int dtype, const CacheView *cv, int64_t p0, int64_t cnt, int64_t hd,
                      float *rows) {
    const int64_t row_bytes = pf_kv_row_bytes(dtype, hd);
    for (int64_t j = 0, run; j < cnt; j += run) {
        const int64_t row = cache_offset(cv, p0 + j, &run) / hd;
        run = min64(run, cnt - j);
        for (int64_t i = 0; i < run; i++)
            pf_kv_row_to_float(dtype, (const char *)cache + (row + i) * row_bytes, rows + (j + i) * hd, hd);
    }
}

/* Positions p0 .. p0+cnt-1 of a cache asked into L1 while the chunk before
 * them computes: a sequence's blocks lie anywhere in the pool, and the
 * hardware prefetchers stop at each block's end (TinyLlama at 2000
 * positions, Zen 5: F16 and BF16 caches 1.35x, Q8_0 1.5x, F32 1.05x). */
static void prefetch_span(const void *cache, int dtype, const CacheView *cv, int64_t p0, int64_t cnt, int64_t hd) {
    const int64_t row_bytes = pf_kv_row_bytes(dtype, hd);
    for (int64_t j = 0, run; j < cnt; j += run) {
        const char *at = (const char *)cache + cache_offset(cv, p0 + j, &run) / hd * row_bytes;
        run = min64(run, cnt - j);
        for (int64_t b = 0; b < run * row_bytes; b += 64) __builtin_prefetch(at + b, 0, 3);
    }
}

/* Floats of the conversion buffer a non-F32 cache needs (1 for F32: no VLA of 0). */
static inline int64_t convert_floats(int dtype, int64_t hd) { return dtype == PF_KV_F32 ? 1 : ATTN_CHUNK * hd; }

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

/* The first position a query row with n_ctx positions sees (0 without a window). */
static inline int64_t window_start(int64_t n_ctx, int64_t window) {
    return window > 0 && n_ctx > window ? n_ctx - window : 0;
}

/* Query heads h0 .. h0+gs-1 of one row against positions p_begin .. n_ctx-1
 * of its sequence (scores soft-capped when softcap > 0). Chunk by chunk and
 * kv head by kv head, every query head of the group scores the same keys,
 * then weighs the same values, while those
 * rows sit in L1 (read once per query head from L2 instead, they bound the
 * kernel by L2 bandwidth). Covering several kv heads walks whole cache rows
 * [n_kv, hd] in order, which the hardware prefetcher streams well. */
static void attend_heads(const float *q /* [gs, hd] */, int64_t h0, int64_t gs, int64_t group,
                         const void *k_cache, const void *v_cache, int dtype, CacheView cv,
                         int64_t p_begin, int64_t n_ctx, int64_t hd, float scale, float softcap,
                         float *out /* [gs, hd] */) {
    float s[MAX_HEAD_RUN][ATTN_CHUNK];  /* per head: scores, then weights, of one chunk */
    float m[MAX_HEAD_RUN], sum[MAX_HEAD_RUN];
    float rows[convert_floats(dtype, hd)];  /* [cnt][hd]: the chunk's keys, then values, as float32 */
    const int conv = dtype != PF_KV_F32;
    const int64_t per_kv = min64(gs, group);  /* query heads per kv head in this item */
    for (int64_t h = 0; h < gs; h++) m[h] = -INFINITY, sum[h] = 0.0f;
    memset(out, 0, (size_t)(gs * hd) * sizeof(float));
    for (int64_t p = p_begin, cnt; p < n_ctx; p += cnt) {
        cnt = min64(ATTN_CHUNK, n_ctx - p);
        const int64_t next = min64(ATTN_CHUNK, n_ctx - p - cnt);  /* the next chunk's positions */
        for (int64_t g = 0; g < gs; g += per_kv) {
            cv.head_off = ((h0 + g) / group) * cv.block_size * hd;
            if (next > 0) {
                prefetch_span(k_cache, dtype, &cv, p + cnt, next, hd);
                prefetch_span(v_cache, dtype, &cv, p + cnt, next, hd);
            }
            if (conv) load_span(k_cache, dtype, &cv, p, cnt, hd, rows);
            for (int64_t h = g; h < g + per_kv; h++) {
                if (conv) score_keys_on(cv.wide, q + h * hd, rows, hd, cnt, hd, scale, s[h]);
                else score_span(q + h * hd, k_cache, &cv, p, cnt, hd, scale, s[h]);
                if (softcap > 0.0f) pf_softcap(s[h], cnt, softcap);
            }
            for (int64_t h = g; h < g + per_kv; h++) softmax_chunk(s[h], cnt, &m[h], &sum[h], out + h * hd, hd);
            if (conv) load_span(v_cache, dtype, &cv, p, cnt, hd, rows);
            for (int64_t h = g; h < g + per_kv; h++) {
                if (conv) accumulate_values_on(cv.wide, s[h], rows, hd, cnt, hd, out + h * hd);
                else value_span(s[h], v_cache, &cv, p, cnt, hd, out + h * hd);
            }
        }
    }
    for (int64_t h = 0; h < gs; h++) scale_inplace(out + h * hd, 1.0f / sum[h], hd);
}

/* ------------------------------------------------------------------------ */
/* Paged attention, prefill tiles                                            */
/* ------------------------------------------------------------------------ */

/* A prefill tile is consecutive query rows of one sequence x query heads that
 * share one kv head: its (row, head) pairs are the lanes l = r * gh + h of mp
 * floats (a multiple of 8, of 16 for the AVX-512 kernels; padded with zero
 * queries). Chunk by chunk of positions it runs two small GEMMs with keys and
 * values as broadcasts against whole vectors of lanes:
 *
 *   qt [hd][mp]   the queries, transposed and scaled
 *   s  [cnt][mp]  s[j][l] = k_j . qt[.][l], then the softmax weights
 *   ot [hd][mp]   ot[d][l] = sum_j s[j][l] v_j[d], the running output
 *
 * Each key and value row is read once per tile instead of once per query row
 * and meets a whole vector of lanes per load, and the online softmax (max,
 * rescale, sum) runs down the lanes: no horizontal sums.
 *
 * At most 32 lanes: 4 AVX2 vectors (their loads plus 2 x 4 accumulators fill
 * the 16 registers) or 2 AVX-512 ones; TinyLlama's groups of 8 heads give
 * tiles of 4 rows. (16 lanes x 6 keys a block ran at the same speed on AVX2.) */
#define TILE_LANES 32

/* Dims a score sums in one chain of FMAs before it is added to the score:
 * one chain over all 128 dims had 1.7x the error of the per-row path (eight
 * partial sums, then a tree); chains of 16 match it, for ~1% of the time. */
#define SCORE_SPAN 16


#ifdef PF_AVX2
/* Pin v to a register: without it GCC folds each load of a query or weight
 * vector into every FMA that uses it (twice the loads, ~15% slower). */
#define PF_PIN(v) __asm__("" : "+x"(v))

/* s[jr][mp] = the scores of keys k[0 .. jr): per dimension, mv vectors of
 * queries meet jr broadcast key elements. */
static inline __attribute__((always_inline)) void score_block(
    int mv, int jr, const float *const *k, const float *qt, int64_t hd, float *s) {
    for (int64_t d0 = 0; d0 < hd; d0 += SCORE_SPAN) {
        __m256 a[8][4];
        for (int j = 0; j < jr; j++)
            for (int x = 0; x < mv; x++) a[j][x] = _mm256_setzero_ps();
        for (int64_t d = d0; d < min64(d0 + SCORE_SPAN, hd); d++) {
            __m256 y[4];
            for (int x = 0; x < mv; x++) {
                y[x] = _mm256_loadu_ps(qt + (d * mv + x) * 8);
                PF_PIN(y[x]);
            }
            for (int j = 0; j < jr; j++) {
                __m256 b = _mm256_broadcast_ss(k[j] + d);
                for (int x = 0; x < mv; x++) a[j][x] = _mm256_fmadd_ps(b, y[x], a[j][x]);
            }
        }
        for (int j = 0; j < jr; j++)
            for (int x = 0; x < mv; x++) {
                float *sj = s + (j * mv + x) * 8;
                _mm256_storeu_ps(sj, d0 ? _mm256_add_ps(_mm256_loadu_ps(sj), a[j][x]) : a[j][x]);
            }
    }
}

/* ot[d0 .. d0+dr)[mp] = c[mp] * ot + sum_j v_j[d] * s[j][mp] over cnt
 * values, the accumulators in registers for the whole chunk. */
static inline __attribute__((always_inline)) void value_block(
    int mv, int dr, const float *const *v, int64_t cnt, int64_t d0, const float *s, const float *c, float *ot) {
    __m256 a[8][4];
    for (int e = 0; e < dr; e++)
        for (int x = 0; x < mv; x++)
            a[e][x] = _mm256_mul_ps(_mm256_loadu_ps(c + x * 8), _mm256_loadu_ps(ot + ((d0 + e) * mv + x) * 8));
    for (int64_t j = 0; j < cnt; j++) {
        __m256 y[4];
        for (int x = 0; x < mv; x++) {
            y[x] = _mm256_loadu_ps(s + (j * mv + x) * 8);
            PF_PIN(y[x]);
        }
        for (int e = 0; e < dr; e++) {
            __m256 b = _mm256_broadcast_ss(v[j] + d0 + e);
            for (int x = 0; x < mv; x++) a[e][x] = _mm256_fmadd_ps(b, y[x], a[e][x]);
        }
    }
    for (int e = 0; e < dr; e++)
        for (int x = 0; x < mv; x++) _mm256_storeu_ps(ot + ((d0 + e) * mv + x) * 8, a[e][x]);
}

/* One GEMM of a chunk, nb keys (or dims) per block: nb * mv = 8-9
 * accumulators hide the FMA latency and leave registers for the mv vectors. */
static inline __attribute__((always_inline)) void tile_gemm8(
    int values, int mv, int nb, const float *const *k, const float *const *v, int64_t cnt,
    const float *qt, int64_t hd, float *s, const float *c, float *ot) {
    if (!values) {
        for (int64_t j = 0; j < cnt; j += nb) score_block(mv, nb, k + j, qt, hd, s + j * mv * 8);
        return;
    }
    int64_t d = 0;
    for (; d + nb <= hd; d += nb) value_block(mv, nb, v, cnt, d, s, c, ot);
    for (; d < hd; d++) value_block(mv, 1, v, cnt, d, s, c, ot);
}
#endif

#ifdef PF_TILES_512
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f")
/* The same two blocks on 16-lane vectors (mv of them): 32 registers hold
 * 8 x mv accumulators beside the loaded vectors. */
#define PF_PIN512(v) __asm__("" : "+v"(v))

static inline __attribute__((always_inline)) void score_block16(
    int mv, int jr, const float *const *k, const float *qt, int64_t hd, float *s) {
    for (int64_t d0 = 0; d0 < hd; d0 += SCORE_SPAN) {
        __m512 a[8][2];
        for (int j = 0; j < jr; j++)
            for (int x = 0; x < mv; x++) a[j][x] = _mm512_setzero_ps();
        for (int64_t d = d0; d < min64(d0 + SCORE_SPAN, hd); d++) {
            __m512 y[2];
            for (int x = 0; x < mv; x++) {
                y[x] = _mm512_loadu_ps(qt + (d * mv + x) * 16);
                PF_PIN512(y[x]);
            }
            for (int j = 0; j < jr; j++) {
                __m512 b = _mm512_set1_ps(k[j][d]);
                for (int x = 0; x < mv; x++) a[j][x] = _mm512_fmadd_ps(b, y[x], a[j][x]);
            }
        }
        for (int j = 0; j < jr; j++)
            for (int x = 0; x < mv; x++) {
                float *sj = s + (j * mv + x) * 16;
                _mm512_storeu_ps(sj, d0 ? _mm512_add_ps(_mm512_loadu_ps(sj), a[j][x]) : a[j][x]);
            }
    }
}

static inline __attribute__((always_inline)) void value_block16(
    int mv, int dr, const float *const *v, int64_t cnt, int64_t d0, const float *s, const float *c, float *ot) {
    __m512 a[8][2];
    for (int e = 0; e < dr; e++)
        for (int x = 0; x < mv; x++)
            a[e][x] = _mm512_mul_ps(_mm512_loadu_ps(c + x * 16), _mm512_loadu_ps(ot + ((d0 + e) * mv + x) * 16));
    for (int64_t j = 0; j < cnt; j++) {
        __m512 y[2];
        for (int x = 0; x < mv; x++) {
            y[x] = _mm512_loadu_ps(s + (j * mv + x) * 16);
            PF_PIN512(y[x]);
        }
        for (int e = 0; e < dr; e++) {
            __m512 b = _mm512_set1_ps(v[j][d0 + e]);
            for (int x = 0; x < mv; x++) a[e][x] = _mm512_fmadd_ps(b, y[x], a[e][x]);
        }
    }
    for (int e = 0; e < dr; e++)
        for (int x = 0; x < mv; x++) _mm512_storeu_ps(ot + ((d0 + e) * mv + x) * 16, a[e][x]);
}

static inline __attribute__((always_inline)) void tile_gemm16_mv(
    int values, int mv, const float *const *k, const float *const *v, int64_t cnt,
    const float *qt, int64_t hd, float *s, const float *c, float *ot) {
    if (!values) {
        for (int64_t j = 0; j < cnt; j += 8) score_block16(mv, 8, k + j, qt, hd, s + j * mv * 16);
        return;
    }
    int64_t d = 0;
    for (; d + 8 <= hd; d += 8) value_block16(mv, 8, v, cnt, d, s, c, ot);
    for (; d < hd; d++) value_block16(mv, 1, v, cnt, d, s, c, ot);
}

static void tile_gemm16(int values, int64_t mp, const float *const *k, const float *const *v, int64_t cnt,
                        const float *qt, int64_t hd, float *s, const float *c, float *ot) {
    if (mp == 16) tile_gemm16_mv(values, 1, k, v, cnt, qt, hd, s, c, ot);
    else tile_gemm16_mv(values, 2, k, v, cnt, qt, hd, s, c, ot);
}
#pragma GCC pop_options

/* AVX-512F usable here: CPU and OS (GCC's check reads XCR0). */
static int avx512_usable(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}
#endif

/* values 0: s[cnt][mp] = scores of keys k[cnt] (k readable and s writable 7
 * rows past cnt); values 1: ot[hd][mp] = c[mp] * ot + weights s[cnt][mp] x
 * values v[cnt]. wide: the AVX-512 kernels (mp a multiple of 16). */
static void tile_gemm(int values, int wide, int64_t mp, const float *const *k, const float *const *v,
                      int64_t cnt, const float *qt, int64_t hd, float *s, const float *c, float *ot) {
#ifdef PF_TILES_512
    if (wide) {
        tile_gemm16(values, mp, k, v, cnt, qt, hd, s, c, ot);
        return;
    }
#endif
    (void)wide;
#ifdef PF_AVX2
    switch (mp) {
    case 8: tile_gemm8(values, 1, 8, k, v, cnt, qt, hd, s, c, ot); return;
    case 16: tile_gemm8(values, 2, 4, k, v, cnt, qt, hd, s, c, ot); return;
    case 24: tile_gemm8(values, 3, 3, k, v, cnt, qt, hd, s, c, ot); return;
    default: tile_gemm8(values, 4, 2, k, v, cnt, qt, hd, s, c, ot); return;
    }
#else
    if (!values) {
        for (int64_t j = 0; j < cnt; j++)
            for (int64_t l = 0; l < mp; l++) {
                float acc = 0.0f;
                for (int64_t d = 0; d < hd; d++) acc += k[j][d] * qt[d * mp + l];
                s[j * mp + l] = acc;
            }
        return;
    }
    for (int64_t d = 0; d < hd; d++)
        for (int64_t l = 0; l < mp; l++) {
            float acc = c[l] * ot[d * mp + l];
            for (int64_t j = 0; j < cnt; j++) acc += v[j][d] * s[j * mp + l];
            ot[d * mp + l] = acc;
        }
#endif
}

/* Online softmax of one chunk, lane by lane: scores s[cnt][mp] of positions
 * p0 .. p0+cnt-1 become weights relative to the running max m[mp]; when
 * masked, a lane gives weight 0 to positions at or past its lim (its row's
 * n_ctx) and before its lo (its window's start). A lane that has seen no
 * position yet (max still -inf) keeps all-zero weights. c[mp] gets the
 * factor the running output must be rescaled by where the max grew (0 on
 * the first chunk); sum[mp] is rescaled here. */
static void softmax_lanes(float *s, int64_t cnt, int64_t mp, int64_t p0, const float *lo, const float *lim,
                          int masked, float *m, float *sum, float *c) {
    int64_t x = 0;
#ifdef PF_AVX2
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    for (; x < mp; x += 8) {
        __m256 cm = ninf;
        if (masked) {
            __m256 lv = _mm256_loadu_ps(lim + x), bv = _mm256_loadu_ps(lo + x);
            for (int64_t j = 0; j < cnt; j++) {
                __m256 pj = _mm256_set1_ps((float)(p0 + j));
                __m256 out = _mm256_or_ps(_mm256_cmp_ps(pj, lv, _CMP_GE_OQ), _mm256_cmp_ps(pj, bv, _CMP_LT_OQ));
                __m256 sv = _mm256_blendv_ps(_mm256_loadu_ps(s + j * mp + x), ninf, out);
                _mm256_storeu_ps(s + j * mp + x, sv);
                cm = _mm256_max_ps(cm, sv);
            }
        } else {
            for (int64_t j = 0; j < cnt; j++) cm = _mm256_max_ps(cm, _mm256_loadu_ps(s + j * mp + x));
        }
        __m256 mo = _mm256_loadu_ps(m + x), mn = _mm256_max_ps(mo, cm);
        __m256 ms = _mm256_andnot_ps(_mm256_cmp_ps(mn, ninf, _CMP_EQ_OQ), mn);  /* -inf -> 0: e^-inf, not NaN */
        __m256 cv = exp8(_mm256_sub_ps(mo, ms)), acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < cnt; j++) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j * mp + x), ms));
            _mm256_storeu_ps(s + j * mp + x, e);
            acc = _mm256_add_ps(acc, e);
        }
        _mm256_storeu_ps(c + x, cv);
        _mm256_storeu_ps(sum + x, _mm256_fmadd_ps(cv, _mm256_loadu_ps(sum + x), acc));
        _mm256_storeu_ps(m + x, mn);
    }
#endif
    for (; x < mp; x++) {
        float cm = -INFINITY;
        for (int64_t j = 0; j < cnt; j++) {
            if (masked && ((float)(p0 + j) >= lim[x] || (float)(p0 + j) < lo[x])) s[j * mp + x] = -INFINITY;
            cm = s[j * mp + x] > cm ? s[j * mp + x] : cm;
        }
        float mn = cm > m[x] ? cm : m[x], ms = mn == -INFINITY ? 0.0f : mn;
        float acc = 0.0f;
        for (int64_t j = 0; j < cnt; j++) acc += s[j * mp + x] = expf(s[j * mp + x] - ms);
        c[x] = expf(m[x] - ms);
        sum[x] = sum[x] * c[x] + acc;
        m[x] = mn;
    }
}

#ifdef PF_AVX2
/* r[8] rows of an 8 x 8 block become its columns. */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}
#endif

/* qt[hd][mp] = scale * the lanes' query rows rows[mp] (NULL: a padding lane). */
static void pack_queries(const float *const *rows, int64_t mp, int64_t hd, float scale, float *qt) {
    int64_t d = 0;
#ifdef PF_AVX2
    const __m256 sv = _mm256_set1_ps(scale);
    for (; d + 8 <= hd; d += 8)
        for (int64_t l = 0; l < mp; l += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++)
                r[i] = rows[l + i] ? _mm256_mul_ps(sv, _mm256_loadu_ps(rows[l + i] + d)) : _mm256_setzero_ps();
            transpose8(r);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(qt + (d + i) * mp + l, r[i]);
        }
#endif
    for (; d < hd; d++)
        for (int64_t l = 0; l < mp; l++) qt[d * mp + l] = rows[l] ? rows[l][d] * scale : 0.0f;
}

/* The lanes' output rows rows[mp] (NULL: padding) = ot[.][l] / sum[l]. */
static void unpack_outputs(const float *ot, const float *sum, int64_t mp, int64_t hd, float *const *rows) {
    int64_t d = 0;
#ifdef PF_AVX2
    for (; d + 8 <= hd; d += 8)
        for (int64_t l = 0; l < mp; l += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(ot + (d + i) * mp + l);
            transpose8(r);
            for (int i = 0; i < 8; i++)
                if (rows[l + i]) _mm256_storeu_ps(rows[l + i] + d, _mm256_mul_ps(_mm256_set1_ps(1.0f / sum[l + i]), r[i]));
        }
#endif
    for (; d < hd; d++)
        for (int64_t l = 0; l < mp; l++)
            if (rows[l]) rows[l][d] = ot[d * mp + l] / sum[l];
}

/* Row pointers of positions p0 .. p0+cnt-1 of one kv head in a cache: into
 * the cache itself for F32, else into buf[cnt][hd], converted there. */
static void cache_rows(const void *cache, int dtype, const CacheView *cv, int64_t p0, int64_t cnt, int64_t hd,
                       float *buf, const float **rows) {
    if (dtype != PF_KV_F32) {
        load_span(cache, dtype, cv, p0, cnt, hd, buf);
        for (int64_t j = 0; j < cnt; j++) rows[j] = buf + j * hd;
        return;
    }
    for (int64_t j = 0, run; j < cnt; j += run) {
        const float *base = (const float *)cache + cache_offset(cv, p0 + j, &run);
        run = min64(run, cnt - j);
        for (int64_t i = 0; i < run; i++) rows[j + i] = base + i * cv->stride;
    }
}

/* n_rows query rows of one sequence, the first at n_ctx0 positions (each next
 * row sees one more), x query heads h0 .. h0+gh-1, all on the kv head that cv
 * points at. q and out are the first row's [H, hd]; ws holds 2 * hd *
 * TILE_LANES floats (qt, ot); wide: AVX-512 kernels when the lanes allow. */
static void attend_tile(const float *q, int64_t H, int64_t h0, int64_t gh, int64_t n_rows,
                        const void *k_cache, const void *v_cache, int dtype, const CacheView *cv,
                        int64_t n_ctx0, int64_t hd, float scale, float softcap, int64_t window, int wide,
                        float *ws, float *out) {
    const int64_t lanes = n_rows * gh, n_end = n_ctx0 + n_rows - 1;  /* the last row's n_ctx */
    const int64_t lo_end = window_start(n_end, window);              /* the last row's first position */
    wide = wide && lanes > 8;
    const int64_t mp = wide ? (lanes + 15) / 16 * 16 : (lanes + 7) / 8 * 8;
    float *qt = ws, *ot = ws + hd * TILE_LANES;
    float s[(ATTN_CHUNK + 8) * TILE_LANES];  /* key blocks may run 7 rows past a chunk */
    float lo[TILE_LANES], lim[TILE_LANES], m[TILE_LANES], sum[TILE_LANES], c[TILE_LANES];
    const float *kr[ATTN_CHUNK + 8], *vr[ATTN_CHUNK], *qrows[TILE_LANES];
    float *orows[TILE_LANES];
    float buf[convert_floats(dtype, hd)];  /* a non-F32 chunk's keys, then its values, as float32 */
    for (int64_t l = 0; l < mp; l++) {
        int64_t at = ((l / gh) * H + h0 + l % gh) * hd;
        qrows[l] = l < lanes ? q + at : NULL;
        orows[l] = l < lanes ? out + at : NULL;
        lim[l] = (float)(l < lanes ? n_ctx0 + l / gh : n_end);
        lo[l] = (float)window_start((int64_t)lim[l], window);
        m[l] = -INFINITY, sum[l] = 0.0f;
    }
    pack_queries(qrows, mp, hd, scale, qt);
    memset(ot, 0, (size_t)(hd * mp) * sizeof(float));
    for (int64_t p = window_start(n_ctx0, window), cnt; p < n_end; p += cnt) {
        cnt = min64(ATTN_CHUNK, n_end - p);
        cache_rows(k_cache, dtype, cv, p, cnt, hd, buf, kr);
        for (int64_t j = cnt; j < cnt + 7; j++) kr[j] = kr[cnt - 1];  /* key blocks overrun */
        tile_gemm(0, wide, mp, kr, vr, cnt, qt, hd, s, NULL, ot);
        if (softcap > 0.0f) pf_softcap(s, cnt * mp, softcap);
        softmax_lanes(s, cnt, mp, p, lo, lim, p + cnt > n_ctx0 || p < lo_end, m, sum, c);
        cache_rows(v_cache, dtype, cv, p, cnt, hd, buf, vr);  /* after the scores: buf held the keys */
        tile_gemm(1, wide, mp, kr, vr, cnt, qt, hd, s, c, ot);
    }
    unpack_outputs(ot, sum, mp, hd, orows);
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

/* One work item: query rows row0 .. row0+n_rows-1 of sequence seq (n_rows
 * > 0: a prefill tile of the heads of one kv head from h0 on; n_rows == 0:
 * the single row row0, heads h0 .. through attend_heads). */
typedef struct {
    int32_t seq, row0, n_rows, h0;
    int64_t cost;  /* positions x (row, head) pairs: the largest go first */
} AttnItem;

static int by_cost_desc(const void *a, const void *b) {
    int64_t ca = ((const AttnItem *)a)->cost, cb = ((const AttnItem *)b)->cost;
    return (ca < cb) - (ca > cb);
}

/* Query heads per tile: the largest divisor of the GQA group that fits. */
static int64_t tile_heads(int64_t group) {
    for (int64_t g = min64(group, TILE_LANES); g > 1; g--)
        if (group % g == 0) return g;
    return 1;
}

/* A sequence goes through tiles when it has several query rows giving at
 * least half a vector of (row, head) lanes; decode rows keep the per-row path.
 * Half-empty tiles pay where the per-row path is overhead (2 threads, Zen 5,
 * 500 positions: 4-7 rows x 1 head of 96-128 dims 1.0-2.3x faster, 2-3 rows
 * x 2 heads of 8 dims 1.3-2x — a drafted step of stories260K); at exactly 4
 * lanes of over 64 dims the rows were faster (2 x 2 of 128: 0.8x). */
static int tiled_seq(int64_t n_q, int64_t gh, int64_t hd) {
    return n_q >= 2 && n_q * gh >= (hd > 64 ? 5 : 4);
}

/* The work items of a batch (NULL when no sequence is tiled, or out of
 * memory: the per-row loop then does it all). Tiles take TILE_LANES / gh
 * rows, halved while that leaves fewer than two items per thread; items are
 * ordered largest first, so the causal tail of a prompt, the cheapest, fills
 * in at the end of a dynamic schedule. */
static AttnItem *plan_items(const int32_t *context_lens, const int32_t *qs, const PagedAttnDims *dm,
                            int64_t gh, int64_t gs, int n_threads, int64_t *n_items) {
    const int64_t H = dm->n_heads;
    int64_t rows = TILE_LANES / gh, n_tiled = 0;
    for (int64_t s = 0; s < dm->n_seq; s++) n_tiled += tiled_seq(qs[s + 1] - qs[s], gh, dm->head_dim);
    if (!n_tiled) return NULL;
    for (;; rows /= 2) {
        *n_items = 0;
        for (int64_t s = 0; s < dm->n_seq; s++) {
            int64_t n_q = qs[s + 1] - qs[s];
            *n_items += tiled_seq(n_q, gh, dm->head_dim) ? (n_q + rows - 1) / rows * (H / gh) : n_q * (H / gs);
        }
        if (rows == 1 || *n_items >= 2 * (int64_t)n_threads) break;
    }
    AttnItem *items = malloc((size_t)*n_items * sizeof(AttnItem)), *it = items;
    if (!items) return NULL;
    for (int64_t s = 0; s < dm->n_seq; s++) {
        int64_t n_q = qs[s + 1] - qs[s], pos0 = context_lens[s] - n_q, tiled = tiled_seq(n_q, gh, dm->head_dim);
        int64_t step = tiled ? rows : 1, heads = tiled ? gh : gs;
        for (int64_t r = 0; r < n_q; r += step) {
            int64_t n_rows = min64(step, n_q - r), seen = pos0 + r + n_rows;  /* positions the last row sees */
            if (dm->window > 0 && seen > dm->window + n_rows) seen = dm->window + n_rows;
            int64_t cost = seen * n_rows * heads;
            for (int64_t h = 0; h < H; h += heads)
                *it++ = (AttnItem){(int32_t)s, (int32_t)(qs[s] + r), tiled ? (int32_t)n_rows : 0, (int32_t)h, cost};
        }
    }
    qsort(items, (size_t)*n_items, sizeof(AttnItem), by_cost_desc);
    return items;
}

/* What every work item of one call shares. */
typedef struct {
    const float *q;
    const void *k_cache, *v_cache;  /* of dm->kv_dtype */
    const int32_t *block_tables, *context_lens, *query_start;
    float *out;
    const PagedAttnDims *dm;
    int64_t gh, gs;  /* query heads per tile, per row item */
    int wide;        /* tiles may use the AVX-512 kernels */
} AttnCall;

/* Run one item. ws: 2 * hd * TILE_LANES floats, or NULL (a tile then goes
 * row by row through attend_heads). */
static void run_item(const AttnCall *c, const AttnItem *it, float *ws) {
    const PagedAttnDims *dm = c->dm;
    const int64_t H = dm->n_heads, hd = dm->head_dim, group = H / dm->n_kv, s = it->seq;
    const int64_t n_q = c->query_start[s + 1] - c->query_start[s];
    const int64_t n_ctx0 = c->context_lens[s] - n_q + (it->row0 - c->query_start[s]) + 1;
    CacheView cv = {c->block_tables + s * dm->max_blocks, dm->block_size, hd, dm->n_kv * dm->block_size * hd,
                    (it->h0 / group) * dm->block_size * hd, c->wide};
    if (it->n_rows && ws) {
        const int64_t row = (int64_t)it->row0 * H * hd;  /* q and out of the tile's first row */
        attend_tile(c->q + row, H, it->h0, c->gh, it->n_rows, c->k_cache, c->v_cache, dm->kv_dtype, &cv, n_ctx0, hd,
                    dm->scale, dm->softcap, dm->window, c->wide, ws, c->out + row);
        return;
    }
    const int64_t heads = it->n_rows ? c->gh : c->gs, n_rows = it->n_rows ? it->n_rows : 1;
    for (int64_t r = 0; r < n_rows; r++) {
        const int64_t at = (((int64_t)it->row0 + r) * H + it->h0) * hd;
        attend_heads(c->q + at, it->h0, heads, group, c->k_cache, c->v_cache, dm->kv_dtype, cv,
                     window_start(n_ctx0 + r, dm->window), n_ctx0 + r, hd, dm->scale, dm->softcap, c->out + at);
    }
}

/* PYFORGE_ATTN_TILES=0 keeps every row on the per-row path, =avx2 keeps
 * attention off the AVX-512 kernels (to compare and to test each path);
 * unset, tiles and rows run on the widest kernels the CPU has. Returns
 * whether to tile; *wide: whether AVX-512 may run. */
static int tile_mode(int *wide) {
    const char *env = getenv("PYFORGE_ATTN_TILES");
    *wide = 0;
#ifdef PF_TILES_512
    *wide = !(env && strcmp(env, "avx2") == 0) && avx512_usable();
#endif
    return !(env && strcmp(env, "0") == 0);
}

/* Work items are (query row, run of gs heads), handed out dynamically: rows
 * differ in cost (causal prefill, mixed context lengths). Sequences with
 * several query rows go through prefill tiles instead (plan_items). */
void pf_paged_attention(const float *q, const void *k_cache, const void *v_cache,
                        const int32_t *block_tables, const int32_t *context_lens,
                        const int32_t *query_start, float *out,
                        const PagedAttnDims *dm, int n_threads) {
    const int64_t H = dm->n_heads, hd = dm->head_dim, group = H / dm->n_kv;
    AttnCall c = {q, k_cache, v_cache, block_tables, context_lens, query_start, out, dm,
                  tile_heads(group), heads_per_item(H, group, dm->n_tok, n_threads), 0};
    int64_t n_items = 0;
    AttnItem *items = tile_mode(&c.wide) ? plan_items(context_lens, query_start, dm, c.gh, c.gs, n_threads, &n_items)
                                         : NULL;
    if (items) {
#pragma omp parallel num_threads(n_threads) if (n_threads > 1 && n_items > 1)
        {
            float *ws = aligned_alloc(64, ((size_t)(2 * hd * TILE_LANES) * sizeof(float) + 63) / 64 * 64);
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < n_items; i++) run_item(&c, &items[i], ws);
            free(ws);
        }
        free(items);
        return;
    }
    const int64_t gs = c.gs, runs = H / gs;  /* head runs per query row */
    n_items = dm->n_tok * runs;
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads) if (n_threads > 1 && n_items > 1)
    for (int64_t it = 0; it < n_items; it++) {
        int64_t row = it / runs, h0 = (it % runs) * gs;
        int64_t s = seq_of_row(query_start, dm->n_seq, row);
        int64_t n_q = query_start[s + 1] - query_start[s];
        int64_t n_ctx = context_lens[s] - n_q + (row - query_start[s]) + 1;
        CacheView cv = {block_tables + s * dm->max_blocks, dm->block_size, hd, dm->n_kv * dm->block_size * hd, 0,
                        c.wide};
        int64_t at = (row * H + h0) * hd;  /* q and out rows of heads h0 .. h0+gs-1 */
        attend_heads(q + at, h0, gs, group, k_cache, v_cache, dm->kv_dtype, cv, window_start(n_ctx, dm->window), n_ctx, hd,
                     dm->scale, dm->softcap, out + at);
    }
}
