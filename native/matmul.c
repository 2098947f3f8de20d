/* Weight-row x activation-row dot products (scalar reference + AVX2) and the
 * threaded matmul driver. Block layouts are drawn in quants.h.
 *
 * Every kernel computes up to nr = 4 dots per pass over a weight row, so in
 * prefill each weight block is loaded and unpacked once for 4 tokens.
 * Integer kernels follow ggml: weights as unsigned bytes (or |w| with the
 * activation's sign moved over) times signed int8 activations with
 * _mm256_maddubs_epi16, then _mm256_madd_epi16 applies a sub-block scale or
 * sums pairs, giving int32 lanes that one float multiply-add per block scales.
 */
#include "matmul.h"

#include <stdlib.h>
#include <string.h>

#include "k_scales.h"
#include "matmul_amx.h"
#include "matmul_vnni.h"
#include "quants.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(PF_AVX2) || defined(PF_F16C)
#include <immintrin.h>
#endif

#define PF_INLINE static inline __attribute__((always_inline))
/* Pin v to a register here: stops GCC from re-associating a long chain of
 * integer adds into a tree that keeps every term live (and spills them). */
#define PF_KEEP(v) __asm__("" : "+x"(v))

int pf_simd_available(void) {
#ifdef PF_AVX2
    return 1;
#else
    return 0;
#endif
}

/* Activation row j of a vec_dot call. */
PF_INLINE const void *act_row(const void *a, size_t a_stride, int j) {
    return (const char *)a + (size_t)j * a_stride;
}

/* Activation rows for Q4_0 / Q8_0 weights: the Q8_0 blocks, then a float
 * table d4[nb][4]. Kernels get rows in groups of up to 4 starting at rows 0,
 * 4, 8, ...; the first row of a group holds in d4[i][j] the scale of block i
 * of row j of its group, so the AVX2 kernel fetches four tokens' scales with
 * one load (no half -> float per block and token). The scalar kernels read
 * the blocks only. */
PF_INLINE size_t q8_0_scales_offset(int64_t n) {
    return ((size_t)(n / QK8_0) * sizeof(block_q8_0) + 15) & ~(size_t)15;
}

/* Bytes of one activation row of n values stored as vec_dot_type vt; rows of
 * quantized activations start on a cache line. */
static size_t act_row_bytes(int vt, int64_t n) {
    size_t bytes = (size_t)pf_row_bytes(vt, n);
    if (vt == PF_F32) return bytes;
    if (vt == PF_Q8_0) bytes = q8_0_scales_offset(n) + (size_t)(n / QK8_0) * 4 * sizeof(float);
    return (bytes + 63) & ~(size_t)63;
}

/* Quantize activation row t (of n values) into buf, rows a_row bytes apart. */
static void act_from_float(int vt, const float *x, char *buf, size_t a_row, int64_t t, int64_t n) {
    char *row = buf + (size_t)t * a_row;
    pf_get_type_traits(vt)->from_float(x, row, n);
    if (vt == PF_Q8_0) {
        const block_q8_0 *b = (const block_q8_0 *)row;
        float *d4 = (float *)(buf + (size_t)(t & ~(int64_t)3) * a_row + q8_0_scales_offset(n));
        for (int64_t i = 0; i < n / QK8_0; i++) d4[4 * i + (t & 3)] = pf_half_to_float(b[i].d);
    }
}

/* ======================= scalar reference kernels ======================== */

/* 8 partial sums so the compiler may vectorize without reassociating. */
static float dot_f32_ref(const float *w, const float *y, int64_t n) {
    float part[8] = {0};
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        for (int l = 0; l < 8; l++) part[l] += w[k + l] * y[k + l];
    float s = 0.0f;
    for (; k < n; k++) s += w[k] * y[k];
    for (int l = 0; l < 8; l++) s += part[l];
    return s;
}

void pf_vec_dot_f32(int64_t n, const void *w, const void *a, size_t as, int nr, float *out) {
    for (int j = 0; j < nr; j++) out[j] = dot_f32_ref(w, act_row(a, as, j), n);
}

/* Half / bfloat16 rows: widen a slice to float, then the float dot. */
#define WIDEN_CHUNK 256
static void vec_dot_widened(int64_t n, const void *w, pf_to_float_fn to_float, size_t elt, const void *a,
                            size_t as, int nr, float *out) {
    float buf[WIDEN_CHUNK];
    for (int j = 0; j < nr; j++) out[j] = 0.0f;
    for (int64_t k = 0; k < n; k += WIDEN_CHUNK) {
        const int64_t len = n - k < WIDEN_CHUNK ? n - k : WIDEN_CHUNK;
        to_float((const char *)w + k * elt, buf, len);
        for (int j = 0; j < nr; j++) out[j] += dot_f32_ref(buf, (const float *)act_row(a, as, j) + k, len);
    }
}

void pf_vec_dot_f16(int64_t n, const void *w, const void *a, size_t as, int nr, float *out) {
    vec_dot_widened(n, w, pf_f16_to_float, 2, a, as, nr, out);
}

void pf_vec_dot_bf16(int64_t n, const void *w, const void *a, size_t as, int nr, float *out) {
    vec_dot_widened(n, w, pf_bf16_to_float, 2, a, as, nr, out);
}

void pf_vec_dot_q4_0(int64_t n, const void *w, const void *a, size_t as, int nr, float *out) {
    const block_q4_0 *x = w;
    for (int j = 0; j < nr; j++) {
        const block_q8_0 *y = act_row(a, as, j);
        float sum = 0.0f;
        for (int64_t i = 0; i < n / QK4_0; i++) {
            int s = 0;
            for (int l = 0; l < QK4_0 / 2; l++)
                s += ((x[i].qs[l] & 0x0f) - 8) * y[i].qs[l] + ((x[i].qs[l] >> 4) - 8) * y[i].qs[l + 16];
            sum += pf_half_to_float(x[i].d) * pf_half_to_float(y[i].d) * (float)s;
        }
        out[j] = sum;
    }
}

void pf_vec_dot_q8_0(int64_t n, const void *w, const void *a, size_t as, int nr, float *out) {
    const block_q8_0 *x = w;
    for (int j = 0; j < nr; j++) {
        const block_q8_0 *y = act_row(a, as, j);
        float sum = 0.0f;
        for (int64_t i = 0; i < n / QK8_0; i++) {
            int s = 0;
            for (int l = 0; l < QK8_0; l++) s += x[i].qs[l] * y[i].qs[l];
            sum += pf_half_to_float(x[i].d) * pf_half_to_float(y[i].d) * (float)s;
        }
        out[j] = sum;
    }
}

/* Q4_K / Q5_K against Q8_K: sum_j sc[j] * (q . a)_j scaled by d, minus
 * sum_j m[j] * (sum of a)_j scaled by dmin; bsums give (sum of a) per 16. */
static float dot_k_ref(const uint8_t q[QK_K], pf_half dh, pf_half dminh, const uint8_t *scales,
                       const block_q8_K *y) {
    uint8_t sc[8], m[8];
    pf_unpack_k_scales(scales, sc, m);
    int isum = 0, msum = 0;
    for (int j = 0; j < 8; j++) {
        int s = 0;
        for (int l = 0; l < 32; l++) s += q[32 * j + l] * y->qs[32 * j + l];
        isum += sc[j] * s;
        msum += m[j] * (y->bsums[2 * j] + y->bsums[2 * j + 1]);
    }
    return pf_half_to_float(dh) * y->d * (float)isum - pf_half_to_float(dminh) * y->d * (float)msum;
}

/* Weight 64c + 32s + l of Q4_K / Q5_K: nibble s of qs[32c + l]. */
static void unpack_k_nibbles(const uint8_t *qs, uint8_t q[QK_K]) {
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            q[64 * c + l] = qs[32 * c + l] & 0x0f;
            q[64 * c + 32 + l] = qs[32 * c + l] >> 4;
        }
}

void pf_vec_dot_q4_K(int64_t n, const void *w, const void *a, size_t as, int nr, float *out) {
    const block_q4_K *x = w;
    uint8_t q[QK_K];
    for (int j = 0; j < nr; j++) out[j] = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        unpack_k_nibbles(x[i].qs, q);
        for (int j = 0; j < nr; j++)
            out[j] += dot_k_ref(q, x[i].d, x[i].dmin, x[i].scales, (const block_q8_K *)act_row(a, as, j) + i);
    }
}

void pf_vec_dot_q5_K(int64_t n, const void *w, const void *a, size_t as, int nr, float *out) {
    const block_q5_K *x = w;
    uint8_t q[QK_K];
    for (int j = 0; j < nr; j++) out[j] = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        unpack_k_nibbles(x[i].qs, q);
        for (int e = 0; e < QK_K; e++) q[e] |= (uint8_t)(((x[i].qh[e % 32] >> (e / 32)) & 1) << 4);
        for (int j = 0; j < nr; j++)
            out[j] += dot_k_ref(q, x[i].d, x[i].dmin, x[i].scales, (const block_q8_K *)act_row(a, as, j) + i);
    }
}

/* Q6_K against Q8_K: sum over 16-wide sub-blocks of scale * ((q - 32) . a). */
void pf_vec_dot_q6_K(int64_t n, const void *w, const void *a, size_t as, int nr, float *out) {
    const block_q6_K *x = w;
    for (int j = 0; j < nr; j++) out[j] = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int8_t q[QK_K];
        pf_q6_K_values(&x[i], q);
        for (int j = 0; j < nr; j++) {
            const block_q8_K *y = (const block_q8_K *)act_row(a, as, j) + i;
            int isum = 0;
            for (int s = 0; s < 16; s++) {
                int sub = 0;
                for (int l = 0; l < 16; l++) sub += q[16 * s + l] * y->qs[16 * s + l];
                isum += x[i].scales[s] * sub;
            }
            out[j] += pf_half_to_float(x[i].d) * y->d * (float)isum;
        }
    }
}

/* ============================ AVX2 kernels =============================== */
#ifdef PF_AVX2

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Each kernel below is written for a constant nr (1..4); the dispatcher
 * instantiates it four times so the loops over nr unroll and the per-row
 * accumulators live in registers. */
#define NR_DISPATCH(name, kernel)                                                                  \
    void pf_vec_dot_##name##_avx2(int64_t n, const void *w, const void *a, size_t as, int nr,      \
                                  float *out) {                                                    \
        switch (nr) {                                                                              \
        case 1: kernel(n, w, a, as, 1, out); break;                                                \
        case 2: kernel(n, w, a, as, 2, out); break;                                                \
        case 3: kernel(n, w, a, as, 3, out); break;                                                \
        default: kernel(n, w, a, as, 4, out); break;                                               \
        }                                                                                          \
    }

/* -- F32 / F16 / BF16 weights, F32 activations ------------------------------ */

enum { W_F32, W_F16, W_BF16 };

PF_INLINE __m256 load_w8(const void *w, int64_t k, const int kind) {
    if (kind == W_F32) return _mm256_loadu_ps((const float *)w + k);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + k));
    if (kind == W_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#ifdef PF_F16C
    return _mm256_cvtph_ps(h);
#else
    float f[8];
    pf_f16_to_float((const uint16_t *)w + k, f, 8);
    return _mm256_loadu_ps(f);
#endif
}

PF_INLINE float load_w1(const void *w, int64_t k, const int kind) {
    float f;
    if (kind == W_F32) return ((const float *)w)[k];
    if (kind == W_F16) return pf_half_to_float(((const uint16_t *)w)[k]);
    pf_bf16_to_float((const uint16_t *)w + k, &f, 1);
    return f;
}

/* U independent accumulators per row hide the FMA latency: 4 when one row
 * (decode) is all the work, 2 per row when 4 rows already interleave. */
PF_INLINE void dot_dense(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out,
                         const int kind) {
    const int U = nr == 1 ? 4 : 2;
    const float *y[4];
    __m256 acc[4][4];
    for (int t = 0; t < nr; t++) {
        y[t] = act_row(a, as, t);
        for (int u = 0; u < U; u++) acc[u][t] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 8 * U <= n; k += 8 * U)
        for (int u = 0; u < U; u++) {
            const __m256 wv = load_w8(w, k + 8 * u, kind);
            for (int t = 0; t < nr; t++)
                acc[u][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(y[t] + k + 8 * u), acc[u][t]);
        }
    for (; k + 8 <= n; k += 8) {
        const __m256 wv = load_w8(w, k, kind);
        for (int t = 0; t < nr; t++) acc[0][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(y[t] + k), acc[0][t]);
    }
    for (int t = 0; t < nr; t++) {
        __m256 s = acc[0][t];
        for (int u = 1; u < U; u++) s = _mm256_add_ps(s, acc[u][t]);
        float r = hsum_ps(s);
        for (int64_t kk = k; kk < n; kk++) r += load_w1(w, kk, kind) * y[t][kk];
        out[t] = r;
    }
}

/* The prefill tile: R weight rows x 4 activation rows, 4R accumulators, so
 * each loaded activation vector feeds R FMAs and each weight vector 4. */
PF_INLINE void dot_dense_tile(int64_t n, const void *w, size_t ws, const void *a, size_t as, float *out,
                              const int kind) {
    enum { R = PF_DENSE_TILE_ROWS };
    const char *wr[R];
    const float *y[4];
    __m256 acc[R][4];
    for (int r = 0; r < R; r++) {
        wr[r] = (const char *)w + (size_t)r * ws;
        for (int t = 0; t < 4; t++) acc[r][t] = _mm256_setzero_ps();
    }
    for (int t = 0; t < 4; t++) y[t] = act_row(a, as, t);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 wv[R];
        for (int r = 0; r < R; r++) wv[r] = load_w8(wr[r], k, kind);
        for (int t = 0; t < 4; t++) {
            const __m256 av = _mm256_loadu_ps(y[t] + k);
            for (int r = 0; r < R; r++) acc[r][t] = _mm256_fmadd_ps(wv[r], av, acc[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < 4; t++) {
            float s = hsum_ps(acc[r][t]);
            for (int64_t kk = k; kk < n; kk++) s += load_w1(wr[r], kk, kind) * y[t][kk];
            out[4 * r + t] = s;
        }
}

void pf_vec_dot_f32_tile_avx2(int64_t n, const void *w, size_t ws, const void *a, size_t as, float *out) {
    dot_dense_tile(n, w, ws, a, as, out, W_F32);
}
void pf_vec_dot_f16_tile_avx2(int64_t n, const void *w, size_t ws, const void *a, size_t as, float *out) {
    dot_dense_tile(n, w, ws, a, as, out, W_F16);
}
void pf_vec_dot_bf16_tile_avx2(int64_t n, const void *w, size_t ws, const void *a, size_t as, float *out) {
    dot_dense_tile(n, w, ws, a, as, out, W_BF16);
}

PF_INLINE void dot_f32_k(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out) {
    dot_dense(n, w, a, as, nr, out, W_F32);
}
PF_INLINE void dot_f16_k(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out) {
    dot_dense(n, w, a, as, nr, out, W_F16);
}
PF_INLINE void dot_bf16_k(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out) {
    dot_dense(n, w, a, as, nr, out, W_BF16);
}
NR_DISPATCH(f32, dot_f32_k)
NR_DISPATCH(f16, dot_f16_k)
NR_DISPATCH(bf16, dot_bf16_k)

/* -- Q4_0 / Q8_0 weights, Q8_0 activations --------------------------------- */

/* Weights of Q4_0 block b as signed bytes -8..7, in order. */
PF_INLINE __m256i q4_0_weights(const block_q4_0 *b) {
    const __m128i t = _mm_loadu_si128((const __m128i *)b->qs);
    const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0f));
    return _mm256_sub_epi8(q, _mm256_set1_epi8(8));
}

/* Block i of a Q4_0 / Q8_0 row: its weights as signed bytes and its scale. */
PF_INLINE __m256i q32_weights(const void *w, int64_t i, const int is_q4, float *d) {
    if (is_q4) {
        const block_q4_0 *b = (const block_q4_0 *)w + i;
        *d = pf_half_to_float(b->d);
        return q4_0_weights(b);
    }
    const block_q8_0 *b = (const block_q8_0 *)w + i;
    *d = pf_half_to_float(b->d);
    return _mm256_loadu_si256((const __m256i *)b->qs);
}

/* 8 int32 lanes summing to w . a. maddubs wants unsigned x signed: use |w|
 * and move w's sign onto a (exact, as activations never hold -128). */
PF_INLINE __m256i dot32_i8(__m256i aw, __m256i ws, const int8_t *a) {
    const __m256i av = _mm256_loadu_si256((const __m256i *)a);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(av, ws)), _mm256_set1_epi16(1));
}

/* Four rows: fold their four int32 vectors into one with two rounds of hadd
 * (lanes [r0 r1 r2 r3 | r0 r1 r2 r3]), then one convert and one FMA against
 * the four scales d4[i][0..3] times dw. */
PF_INLINE void q32_block4(const void *w, int64_t i, const block_q8_0 *const *y, const float *d4, __m256 *acc,
                          const int is_q4) {
    float dw;
    const __m256i ws = q32_weights(w, i, is_q4, &dw), aw = _mm256_abs_epi8(ws);
    __m256i p[4];
    for (int t = 0; t < 4; t++) p[t] = dot32_i8(aw, ws, y[t][i].qs);
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    const __m256 d = _mm256_mul_ps(_mm256_set1_ps(dw), _mm256_broadcast_ps((const __m128 *)(d4 + 4 * i)));
    *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(h), *acc);
}

/* Fewer than four rows: one FMA per row. */
PF_INLINE void q32_block(const void *w, int64_t i, const block_q8_0 *const *y, const float *d4, const int nr,
                         __m256 *acc, const int is_q4) {
    float dw;
    const __m256i ws = q32_weights(w, i, is_q4, &dw), aw = _mm256_abs_epi8(ws);
    for (int t = 0; t < nr; t++) {
        const __m256 d = _mm256_set1_ps(dw * d4[4 * i + t]);
        acc[t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot32_i8(aw, ws, y[t][i].qs)), acc[t]);
    }
}

/* Two accumulator sets, even and odd blocks, so consecutive FMAs into one
 * sum do not wait on each other. */
PF_INLINE void dot_q32(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out,
                       const int is_q4) {
    const block_q8_0 *y[4];
    const float *d4 = (const float *)((const char *)a + q8_0_scales_offset(n));
    __m256 acc0[4], acc1[4];
    for (int t = 0; t < nr; t++) y[t] = act_row(a, as, t), acc0[t] = acc1[t] = _mm256_setzero_ps();
    const int64_t nb = n / 32;
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
        if (nr == 4) {
            q32_block4(w, i, y, d4, acc0, is_q4);
            q32_block4(w, i + 1, y, d4, acc1, is_q4);
        } else {
            q32_block(w, i, y, d4, nr, acc0, is_q4);
            q32_block(w, i + 1, y, d4, nr, acc1, is_q4);
        }
    }
    if (i < nb) {
        if (nr == 4) q32_block4(w, i, y, d4, acc0, is_q4);
        else q32_block(w, i, y, d4, nr, acc0, is_q4);
    }
    if (nr == 4) {
        const __m256 s = _mm256_add_ps(acc0[0], acc1[0]);
        _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
    } else {
        for (int t = 0; t < nr; t++) out[t] = hsum_ps(_mm256_add_ps(acc0[t], acc1[t]));
    }
}

PF_INLINE void dot_q4_0_k(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out) {
    dot_q32(n, w, a, as, nr, out, 1);
}
PF_INLINE void dot_q8_0_k(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out) {
    dot_q32(n, w, a, as, nr, out, 0);
}
NR_DISPATCH(q4_0, dot_q4_0_k)
NR_DISPATCH(q8_0, dot_q8_0_k)

/* -- Q4_K / Q5_K weights, Q8_K activations --------------------------------- */

/* Bit b of every byte of qh, moved to bit 4 (the fifth bit of a Q5_K weight). */
PF_INLINE __m256i bit_to_16(__m256i qh, const int b) {
    const __m256i m = _mm256_set1_epi8(0x10);
    if (b < 4) return _mm256_and_si256(_mm256_slli_epi16(qh, 4 - b), m);
    if (b > 4) return _mm256_and_si256(_mm256_srli_epi16(qh, b - 4), m);
    return _mm256_and_si256(qh, m);
}

/* sum_j sc[j] * (q . a)_j over the 8 sub-blocks of one Q4_K / Q5_K block, as
 * 8 int32 lanes per activation row. sc16 holds sc[0..7] as int16 in both
 * 128-bit lanes; shuffling byte pair (2j, 2j+1) everywhere broadcasts sc[j]. */
PF_INLINE void k_block_isums(const uint8_t *qs, const uint8_t *qh, __m256i sc16, const block_q8_K *const *y,
                             int64_t i, const int nr, __m256i *isum) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i hbits = qh ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
    for (int t = 0; t < nr; t++) isum[t] = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
        __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        if (qh) {
            lo = _mm256_or_si256(lo, bit_to_16(hbits, 2 * c));
            hi = _mm256_or_si256(hi, bit_to_16(hbits, 2 * c + 1));
        }
        const __m256i slo = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * c))));
        const __m256i shi = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)(0x0100 + 0x0202 * (2 * c + 1))));
        for (int t = 0; t < nr; t++) {
            const int8_t *aq = y[t][i].qs + 64 * c;
            const __m256i a0 = _mm256_loadu_si256((const __m256i *)aq);
            const __m256i a1 = _mm256_loadu_si256((const __m256i *)(aq + 32));
            const __m256i plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a0), slo);
            const __m256i phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a1), shi);
            isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(plo, phi));
            PF_KEEP(isum[t]);
        }
    }
}

/* d * isum - dmin * sum_j m[j] * (sum of a)_j, added to each row's acc. */
PF_INLINE void k_block(const uint8_t *qs, const uint8_t *qh, pf_half dh, pf_half dminh, const uint8_t *scales,
                       const block_q8_K *const *y, int64_t i, const int nr, __m256 *acc) {
    const __m128i sm = k_scales_mins(scales);
    const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
    const __m128i dup = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm, dup)); /* m[j] at bsums 2j, 2j+1 */
    __m256i isum[4];
    k_block_isums(qs, qh, sc16, y, i, nr, isum);
    const float d = pf_half_to_float(dh), dmin = pf_half_to_float(dminh);
    for (int t = 0; t < nr; t++) {
        const __m256i msum = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)y[t][i].bsums), mins16);
        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * y[t][i].d), _mm256_cvtepi32_ps(isum[t]), acc[t]);
        acc[t] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * y[t][i].d), _mm256_cvtepi32_ps(msum), acc[t]);
    }
}

PF_INLINE void dot_q4_K_k(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out) {
    const block_q4_K *x = w;
    const block_q8_K *y[4];
    __m256 acc[4];
    for (int t = 0; t < nr; t++) y[t] = act_row(a, as, t), acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) k_block(x[i].qs, NULL, x[i].d, x[i].dmin, x[i].scales, y, i, nr, acc);
    for (int t = 0; t < nr; t++) out[t] = hsum_ps(acc[t]);
}

PF_INLINE void dot_q5_K_k(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out) {
    const block_q5_K *x = w;
    const block_q8_K *y[4];
    __m256 acc[4];
    for (int t = 0; t < nr; t++) y[t] = act_row(a, as, t), acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++)
        k_block(x[i].qs, x[i].qh, x[i].d, x[i].dmin, x[i].scales, y, i, nr, acc);
    for (int t = 0; t < nr; t++) out[t] = hsum_ps(acc[t]);
}
NR_DISPATCH(q4_K, dot_q4_K_k)
NR_DISPATCH(q5_K, dot_q5_K_k)

/* -- Q6_K weights, Q8_K activations ----------------------------------------- */

/* The four 32-weight groups g of half h as unsigned 0..63 (layout in quants.h). */
PF_INLINE void q6_half(const block_q6_K *b, int h, __m256i q[4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30);
    const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h));
    const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h + 32));
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b->qh + 32 * h));
    q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
    q[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                           _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
}

/* d * sum_s scales[s] * ((q - 32) . a)_s: the unsigned q go through maddubs
 * and the -32 comes back as -32 * sum_s scales[s] * bsums[s]. A 32-weight
 * group spans sub-blocks 2k (low 128-bit lane) and 2k+1 (high lane). */
PF_INLINE void q6_block(const block_q6_K *b, const block_q8_K *const *y, int64_t i, const int nr, __m256 *acc) {
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)b->scales));
    __m256i isum[4];
    for (int t = 0; t < nr; t++) {
        const __m256i corr = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)y[t][i].bsums), sc16);
        isum[t] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(corr, 5));
    }
    for (int h = 0; h < 2; h++) {
        /* scales 8h..8h+7 as int16 in both 128-bit lanes */
        const __m256i sdup = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)
                               : _mm256_permute2x128_si256(sc16, sc16, 0x00);
        __m256i q[4];
        q6_half(b, h, q);
        for (int g = 0; g < 4; g++) {
            const __m256i ctrl = _mm256_set_m128i(_mm_set1_epi16((short)(0x0302 + 0x0404 * g)),
                                                  _mm_set1_epi16((short)(0x0100 + 0x0404 * g)));
            const __m256i s = _mm256_shuffle_epi8(sdup, ctrl);
            for (int t = 0; t < nr; t++) {
                const __m256i av = _mm256_loadu_si256((const __m256i *)(y[t][i].qs + 128 * h + 32 * g));
                isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(_mm256_maddubs_epi16(q[g], av), s));
                PF_KEEP(isum[t]);
            }
        }
    }
    const float d = pf_half_to_float(b->d);
    for (int t = 0; t < nr; t++)
        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * y[t][i].d), _mm256_cvtepi32_ps(isum[t]), acc[t]);
}

PF_INLINE void dot_q6_K_k(int64_t n, const void *w, const void *a, size_t as, const int nr, float *out) {
    const block_q6_K *x = w;
    const block_q8_K *y[4];
    __m256 acc[4];
    for (int t = 0; t < nr; t++) y[t] = act_row(a, as, t), acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) q6_block(x + i, y, i, nr, acc);
    for (int t = 0; t < nr; t++) out[t] = hsum_ps(acc[t]);
}
NR_DISPATCH(q6_K, dot_q6_K_k)

#endif /* PF_AVX2 */

/* ============================== driver =================================== */

/* The most weight rows of any prefill tile (pf_vec_dot_tile_fn). */
#define PF_MAX_TILE_ROWS 8
_Static_assert(PF_DENSE_TILE_ROWS <= PF_MAX_TILE_ROWS && PF_VNNI_DENSE_TILE_ROWS <= PF_MAX_TILE_ROWS,
               "rows_x_group's buffer holds every tile");

/* Weight rows per tile in prefill: the tile stays in L2 while every group of
 * 4 activation rows (a few KB, in L1) passes over it. */
#define TILE_BYTES (192 * 1024)

typedef struct {
    pf_vec_dot_fn dot;
    pf_vec_dot_tile_fn tile_dot; /* NULL, or tile_rows weight rows x 4 activation rows */
    int tile_rows;
    const char *w;      /* [n_out][w_row bytes] */
    const char *act;    /* [n_tok][a_row bytes] */
    float *out;         /* [n_tok][n_out] */
    size_t w_row, a_row;
    int64_t n_tok, n_in, n_out;
} matmul_job;

/* Weight rows r0..r1 against activation rows t..t+nr-1 (nr <= 4). */
static void rows_x_group(const matmul_job *job, int64_t r0, int64_t r1, int64_t t, int nr) {
    const char *a = job->act + (size_t)t * job->a_row;
    float *out = job->out + t * job->n_out;
    float dots[PF_MAX_TILE_ROWS * 4];
    int64_t r = r0;
    if (job->tile_dot && nr == 4)
        for (; r + job->tile_rows <= r1; r += job->tile_rows) {
            job->tile_dot(job->n_in, job->w + (size_t)r * job->w_row, job->w_row, a, job->a_row, dots);
            for (int i = 0; i < job->tile_rows; i++)
                for (int j = 0; j < 4; j++) out[j * job->n_out + r + i] = dots[4 * i + j];
        }
    for (; r < r1; r++) {
        job->dot(job->n_in, job->w + (size_t)r * job->w_row, a, job->a_row, nr, dots);
        for (int j = 0; j < nr; j++) out[j * job->n_out + r] = dots[j];
    }
}

/* Weight rows per L2 tile: what TILE_BYTES holds, in whole register tiles
 * where there are any (rows left over would take the slower per-row dots). */
static int64_t l2_tile_rows(const matmul_job *job) {
    int64_t rows = job->w_row >= TILE_BYTES ? 1 : (int64_t)(TILE_BYTES / job->w_row);
    if (job->tile_dot && rows > job->tile_rows) rows -= rows % job->tile_rows;
    return rows;
}

/* Output rows r0..r1 of every token: weight rows in tiles that stay in L2
 * while each group of 4 activation rows (a few KB, in L1) passes over them. */
static void run_rows(const matmul_job *job, int64_t r0, int64_t r1) {
    const int64_t tile = l2_tile_rows(job);
    for (int64_t rt = r0; rt < r1; rt += tile) {
        const int64_t re = rt + tile < r1 ? rt + tile : r1;
        for (int64_t t = 0; t < job->n_tok; t += 4)
            rows_x_group(job, rt, re, t, job->n_tok - t < 4 ? (int)(job->n_tok - t) : 4);
    }
}

/* Rows per work item. Threads take contiguous row chunks from a shared
 * counter, not fixed shares, so a thread slowed by a busy core does not hold
 * the others at the end: about 8 chunks per thread, at least 16 rows (a long
 * sequential stream for the prefetchers), in prefill at most one L2 tile. */
static int64_t chunk_rows(const matmul_job *job, int nth) {
    int64_t rows = (job->n_out + 8 * nth - 1) / (8 * nth);
    rows = rows < 16 ? 16 : rows;
    if (job->n_tok <= 4) return rows;
    const int64_t tile = l2_tile_rows(job);
    return rows < tile ? rows : tile;
}

/* The vec_dot the kernel flags and this CPU allow for weights of `type`. */
static pf_vec_dot_fn pick_vec_dot(const pf_type_traits *wt, int type, int kernels) {
    if ((kernels & PF_KERNELS_VNNI) && pf_vnni_available()) {
        const pf_vec_dot_fn vnni = pf_vnni_vec_dot(type);
        if (vnni) return vnni;
    }
    return (kernels & PF_KERNELS_AVX2) && pf_simd_available() ? wt->vec_dot_simd : wt->vec_dot;
}

int pf_matmul(const float *x, const void *w, int type, int64_t n_tok, int64_t n_in, int64_t n_out, float *out,
              int n_threads, int kernels) {
    const pf_type_traits *wt = pf_get_type_traits(type);
    if (!wt || !wt->vec_dot || n_in <= 0 || n_tok < 0 || n_out < 0) return -1;
    const int vt = wt->vec_dot_type;
    if (pf_row_bytes(type, n_in) < 0 || pf_row_bytes(vt, n_in) < 0) return -1;
    if (n_tok == 0 || n_out == 0) return 0;
    const size_t a_row = act_row_bytes(vt, n_in);

    if ((kernels & PF_KERNELS_AMX) && n_tok >= PF_AMX_MIN_TOKENS && pf_amx_supports(type, n_in) &&
        pf_amx_available())
        return pf_matmul_amx(x, w, type, n_tok, n_in, n_out, out, n_threads);
    const int use_simd = (kernels & PF_KERNELS_AVX2) && pf_simd_available();
    pf_vec_dot_tile_fn tile_dot = use_simd ? wt->vec_dot_tile : NULL;
    int tile_rows = wt->tile_rows;
    const pf_vec_dot_tile_fn wide = (kernels & PF_KERNELS_VNNI) && pf_vnni_available() ? pf_vnni_dense_tile(type) : NULL;
    if (wide) tile_dot = wide, tile_rows = PF_VNNI_DENSE_TILE_ROWS;
    char *qx = NULL; /* activations quantized to vec_dot_type, unless that is F32 */
    if (vt != PF_F32 && !(qx = aligned_alloc(64, (size_t)n_tok * a_row))) return -2;
    const matmul_job job = {
        .dot = pick_vec_dot(wt, type, kernels),
        .tile_dot = tile_dot, .tile_rows = tile_rows,
        .w = w, .act = qx ? qx : (const char *)x, .out = out,
        .w_row = (size_t)pf_row_bytes(type, n_in), .a_row = a_row,
        .n_tok = n_tok, .n_in = n_in, .n_out = n_out,
    };
    /* One parallel region per call: quantize the activations (rows split
     * across threads; the implicit barrier ends it), then share out the row
     * chunks; every weight byte is read once, by one thread. */
#pragma omp parallel num_threads(n_threads)
    {
        if (qx) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < n_tok; t++) act_from_float(vt, x + t * n_in, qx, a_row, t, n_in);
        }
        int nth = 1;
#ifdef _OPENMP
        nth = omp_get_num_threads();
#endif
        const int64_t chunk = chunk_rows(&job, nth), n_chunks = (n_out + chunk - 1) / chunk;
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t c = 0; c < n_chunks; c++)
            run_rows(&job, c * chunk, (c + 1) * chunk < n_out ? (c + 1) * chunk : n_out);
    }
    free(qx);
    return 0;
}
