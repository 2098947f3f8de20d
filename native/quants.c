/* Block formats: half/bfloat16 conversion, dequantize (to_float), quantize
 * (from_float) and the traits table. Layouts are drawn in quants.h.
 *
 * Dequantizers compute exactly what gguf-py computes (same float32 products
 * in the same order, no FMA contraction: -std=c11 turns contraction off), so
 * they agree bit for bit. Q4_0 / Q8_0 quantizers reproduce ggml's reference
 * rounding byte for byte; the K-quant quantizers are our own simpler search.
 */
#include "quants.h"

#include <math.h>
#include <string.h>

#include "matmul.h"

#if defined(PF_F16C) || defined(PF_AVX2)
#include <immintrin.h>
#endif

/* -- half / bfloat16 ------------------------------------------------------ */

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float pf_half_to_float_scalar(pf_half h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) /* inf / nan */
        return f32_from_bits(sign | 0x7f800000u | (man << 13));
    if (exp != 0) /* normal: rebias 15 -> 127 */
        return f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
    /* zero / subnormal: man * 2^-24, exact in float */
    return f32_from_bits(sign | f32_bits((float)man * 0x1p-24f));
}

/* Round to nearest even, like F16C and numpy. NaN becomes a quiet NaN that
 * keeps the top payload bits (F16C's rule; numpy leaves the quiet bit alone). */
pf_half pf_float_to_half_scalar(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((ax >> 13) & 0x3ff);
    if (ax >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520 rounds to inf */
    if (ax >= 0x38800000u) { /* normal half: rebias, round 23 -> 10 mantissa bits */
        uint32_t v = ax - 0x38000000u;
        return sign | (uint16_t)((v + 0xfffu + ((v >> 13) & 1u)) >> 13);
    }
    if (ax <= 0x33000000u) return sign; /* <= 2^-25 (a tie at 2^-25 goes to even 0) */
    /* subnormal half: the mantissa (with its leading 1) in units of 2^-24 */
    uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    int shift = 126 - (int)(ax >> 23); /* 14..24 */
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return sign | (uint16_t)r;
}

uint16_t pf_float_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/* -- dequantize ----------------------------------------------------------- */

void pf_f32_to_float(const void *src, float *dst, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}

void pf_f16_to_float(const void *src, float *dst, int64_t n) {
    const pf_half *h = src;
    int64_t i = 0;
#ifdef PF_F16C
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; i++) dst[i] = pf_half_to_float(h[i]);
}

void pf_bf16_to_float(const void *src, float *dst, int64_t n) {
    const uint16_t *b = src;
    for (int64_t i = 0; i < n; i++) dst[i] = f32_from_bits((uint32_t)b[i] << 16);
}

void pf_q4_0_to_float(const void *src, float *dst, int64_t n) {
    const block_q4_0 *b = src;
    for (int64_t i = 0; i < n / QK4_0; i++, dst += QK4_0) {
        const float d = pf_half_to_float(b[i].d);
        for (int l = 0; l < QK4_0 / 2; l++) {
            dst[l] = d * (float)((b[i].qs[l] & 0x0f) - 8);
            dst[l + QK4_0 / 2] = d * (float)((b[i].qs[l] >> 4) - 8);
        }
    }
}

void pf_q8_0_to_float(const void *src, float *dst, int64_t n) {
    const block_q8_0 *b = src;
    for (int64_t i = 0; i < n / QK8_0; i++, dst += QK8_0) {
        const float d = pf_half_to_float(b[i].d);
        for (int l = 0; l < QK8_0; l++) dst[l] = (float)b[i].qs[l] * d;
    }
}

void pf_unpack_k_scales(const uint8_t p[K_SCALE_SIZE], uint8_t sc[8], uint8_t m[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = p[j] & 0x3f;
        m[j] = p[j + 4] & 0x3f;
        sc[j + 4] = (uint8_t)((p[j + 8] & 0x0f) | ((p[j] >> 2) & 0x30));
        m[j + 4] = (uint8_t)((p[j + 8] >> 4) | ((p[j + 4] >> 2) & 0x30));
    }
}

static void pack_k_scales(const uint8_t sc[8], const uint8_t m[8], uint8_t p[K_SCALE_SIZE]) {
    for (int j = 0; j < 4; j++) {
        p[j] = (uint8_t)((sc[j] & 0x3f) | ((sc[j + 4] & 0x30) << 2));
        p[j + 4] = (uint8_t)((m[j] & 0x3f) | ((m[j + 4] & 0x30) << 2));
        p[j + 8] = (uint8_t)((sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4));
    }
}

/* Weight 64c + 32s + l of a Q4_K / Q5_K block: nibble s of qs[32c + l]. */
static inline int k_nibble(const uint8_t *qs, int e) {
    return (qs[32 * (e / 64) + e % 32] >> (4 * ((e / 32) & 1))) & 0x0f;
}

void pf_q4_K_to_float(const void *src, float *dst, int64_t n) {
    const block_q4_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++, dst += QK_K) {
        const float d = pf_half_to_float(b[i].d), dmin = pf_half_to_float(b[i].dmin);
        uint8_t sc[8], m[8];
        pf_unpack_k_scales(b[i].scales, sc, m);
        for (int e = 0; e < QK_K; e++) {
            const float dl = d * (float)sc[e / 32], ml = dmin * (float)m[e / 32];
            dst[e] = dl * (float)k_nibble(b[i].qs, e) - ml;
        }
    }
}

void pf_q5_K_to_float(const void *src, float *dst, int64_t n) {
    const block_q5_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++, dst += QK_K) {
        const float d = pf_half_to_float(b[i].d), dmin = pf_half_to_float(b[i].dmin);
        uint8_t sc[8], m[8];
        pf_unpack_k_scales(b[i].scales, sc, m);
        for (int e = 0; e < QK_K; e++) {
            const int q = k_nibble(b[i].qs, e) | (((b[i].qh[e % 32] >> (e / 32)) & 1) << 4);
            const float dl = d * (float)sc[e / 32], ml = dmin * (float)m[e / 32];
            dst[e] = dl * (float)q - ml;
        }
    }
}

/* Weight e = 128h + 32g + l of a Q6_K block, 0..63 (see quants.h). */
static inline int q6_value(const block_q6_K *b, int e) {
    const int h = e / 128, g = (e / 32) & 3, l = e % 32;
    const int lo = (b->ql[64 * h + 32 * (g & 1) + l] >> (4 * (g >> 1))) & 0x0f;
    const int hi = (b->qh[32 * h + l] >> (2 * g)) & 0x03;
    return lo | (hi << 4);
}

void pf_q6_K_values(const block_q6_K *b, int8_t q[QK_K]) {
    for (int e = 0; e < QK_K; e++) q[e] = (int8_t)(q6_value(b, e) - 32);
}

void pf_q6_K_to_float(const void *src, float *dst, int64_t n) {
    const block_q6_K *b = src;
    for (int64_t i = 0; i < n / QK_K; i++, dst += QK_K) {
        const float d = pf_half_to_float(b[i].d);
        for (int e = 0; e < QK_K; e++) {
            const float dl = d * (float)b[i].scales[e / 16];
            dst[e] = dl * (float)(q6_value(&b[i], e) - 32);
        }
    }
}

/* -- quantize: plain formats, Q4_0, Q8_0 ---------------------------------- */

void pf_f32_from_float(const float *src, void *dst, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}

void pf_f16_from_float(const float *src, void *dst, int64_t n) {
    pf_half *h = dst;
    int64_t i = 0;
#ifdef PF_F16C
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) h[i] = pf_float_to_half(src[i]);
}

void pf_bf16_from_float(const float *src, void *dst, int64_t n) {
    uint16_t *b = dst;
    for (int64_t i = 0; i < n; i++) b[i] = pf_float_to_bf16(src[i]);
}

/* ggml's reference: d = (the value of largest magnitude) / -8, so that value
 * lands exactly on q = 0; q = trunc(x/d + 8.5) clipped to 15. */
void pf_q4_0_from_float(const float *src, void *dst, int64_t n) {
    block_q4_0 *b = dst;
    for (int64_t i = 0; i < n / QK4_0; i++, src += QK4_0) {
        float amax = fabsf(src[0]), max = src[0];
        for (int l = 1; l < QK4_0; l++)
            if (fabsf(src[l]) > amax) amax = fabsf(src[l]), max = src[l];
        const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = pf_float_to_half(d);
        for (int l = 0; l < QK4_0 / 2; l++) {
            const float v0 = src[l] * id + 8.5f, v1 = src[l + QK4_0 / 2] * id + 8.5f;
            const int q0 = (int)v0 < 15 ? (int)v0 : 15, q1 = (int)v1 < 15 ? (int)v1 : 15;
            b[i].qs[l] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static inline float maxf(float a, float b) {
    return a > b ? a : b; /* unlike fmaxf, vectorizes (inputs are not NaN) */
}

#ifndef PF_AVX2
static float abs_max(const float *x, int n) {
    float amax = 0.0f;
    for (int l = 0; l < n; l++) amax = maxf(amax, fabsf(x[l]));
    return amax;
}
#endif

#ifdef PF_AVX2
/* Helpers for the AVX2 activation quantizers below. They compute exactly
 * what the scalar loops compute (same float ops, same rounding), so a
 * matmul's integers do not depend on which path quantized them. */

static inline float hmax_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline float abs_max_avx2(const float *x, int n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int l = 0; l < n; l += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + l)));
    return hmax_ps(m);
}

/* Four vectors of 8 int32 (each within int8 range) -> 32 int8 in order. */
static inline __m256i pack_i8(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* roundf (half away from zero) of 8 floats, as int32. */
static inline __m256i round_away_epi32(__m256 v) {
    const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 frac = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t)); /* exact */
    const __m256 step = _mm256_or_ps(_mm256_and_ps(v, sign), _mm256_set1_ps(1.0f));
    const __m256 up = _mm256_and_ps(_mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ), step);
    return _mm256_cvtps_epi32(_mm256_add_ps(t, up));
}

static void q8_0_blocks_avx2(const float *src, block_q8_0 *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, src += QK8_0) {
        const float d = abs_max_avx2(src, QK8_0) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int k = 0; k < 4; k++) q[k] = round_away_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + 8 * k), vid));
        b[i].d = pf_float_to_half(d);
        _mm256_storeu_si256((__m256i *)b[i].qs, pack_i8(q[0], q[1], q[2], q[3]));
    }
}

/* Sums of the 16 int8 in each 128-bit half of q[0..7] -> 16 int16 in order. */
static inline __m256i q8_K_bsums(const __m256i q[8]) {
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    __m256i s[8];
    for (int g = 0; g < 8; g++) s[g] = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, q[g]), ones16);
    /* hadd twice: lane k of each half holds group k's partial sum */
    const __m256i u = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
    const __m256i v = _mm256_hadd_epi32(_mm256_hadd_epi32(s[4], s[5]), _mm256_hadd_epi32(s[6], s[7]));
    /* u = [g0..g3 low 16 | g0..g3 high 16]: bsums 0,2,4,6 | 1,3,5,7 */
    const __m256i p = _mm256_packs_epi32(u, v); /* [0 2 4 6 8 10 12 14 | 1 3 5 7 9 11 13 15] as int16 */
    return _mm256_shuffle_epi8(_mm256_permute4x64_epi64(p, 0xd8),
                               _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, 0, 1, 8, 9,
                                                2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15));
}

static void q8_K_blocks_avx2(const float *src, block_q8_K *b, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, src += QK_K) {
        const float amax = abs_max_avx2(src, QK_K);
        const __m256 vid = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        b[i].d = amax / 127.0f;
        __m256i q[8];
        for (int g = 0; g < 8; g++) {
            __m256i v[4];
            for (int k = 0; k < 4; k++)
                v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + 32 * g + 8 * k), vid));
            q[g] = pack_i8(v[0], v[1], v[2], v[3]);
            _mm256_storeu_si256((__m256i *)(b[i].qs + 32 * g), q[g]);
        }
        _mm256_storeu_si256((__m256i *)b[i].bsums, q8_K_bsums(q));
    }
}
#endif

/* ggml's reference: d = amax / 127, q = round-half-away(x / d). Also the
 * activation format of Q4_0 / Q8_0 dots (|q| <= 127 always). */
void pf_q8_0_from_float(const float *src, void *dst, int64_t n) {
    block_q8_0 *b = dst;
#ifdef PF_AVX2
    q8_0_blocks_avx2(src, b, n / QK8_0);
#else
    for (int64_t i = 0; i < n / QK8_0; i++, src += QK8_0) {
        const float d = abs_max(src, QK8_0) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = pf_float_to_half(d);
        for (int l = 0; l < QK8_0; l++) b[i].qs[l] = (int8_t)roundf(src[l] * id);
    }
#endif
}

/* Activations for K-quant dots: d = amax / 127 (float), round to nearest
 * even, |q| <= 127, plus the 16-element sums. */
void pf_q8_K_from_float(const float *src, void *dst, int64_t n) {
    block_q8_K *b = dst;
#ifdef PF_AVX2
    q8_K_blocks_avx2(src, b, n / QK_K);
#else
    for (int64_t i = 0; i < n / QK_K; i++, src += QK_K) {
        const float amax = abs_max(src, QK_K), id = amax != 0.0f ? 127.0f / amax : 0.0f;
        b[i].d = amax / 127.0f;
        for (int l = 0; l < QK_K; l++) b[i].qs[l] = (int8_t)lrintf(src[l] * id);
        for (int s = 0; s < QK_K / 16; s++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) sum += b[i].qs[16 * s + l];
            b[i].bsums[s] = (int16_t)sum;
        }
    }
#endif
}

/* -- quantize: K-quants --------------------------------------------------- */

static inline int clampi(int v, int lo, int hi) {
    return v < lo ? lo : v > hi ? hi : v;
}

/* Asymmetric fit of x[n] ~ scale * q - min, q in 0..nmax, min >= 0 (the
 * format subtracts it). Start from the min/max range, then two rounds of
 * least squares for (scale, min) given the rounded q's. */
static void fit_scale_min(const float *x, int n, int nmax, float *scale, float *min) {
    float lo = 0.0f, hi = x[0];
    for (int l = 0; l < n; l++) lo = x[l] < lo ? x[l] : lo, hi = maxf(hi, x[l]);
    float s = (hi - lo) / (float)nmax, m = -lo;
    for (int iter = 0; iter < 2 && s > 0.0f; iter++) {
        double sq = 0, sx = 0, sqq = 0, sqx = 0;
        for (int l = 0; l < n; l++) {
            const int q = clampi((int)lrintf((x[l] + m) / s), 0, nmax);
            sq += q, sx += x[l], sqq += (double)q * q, sqx += (double)q * x[l];
        }
        const double det = n * sqq - sq * sq;
        if (det <= 0) break;
        double a = (n * sqx - sq * sx) / det, bmin = (a * sq - sx) / n;
        if (bmin < 0) bmin = 0, a = sqx / sqq; /* a positive offset is not representable */
        if (a <= 0) break;
        s = (float)a, m = (float)bmin;
    }
    *scale = s, *min = m;
}

/* Shared by Q4_K (nmax 15) and Q5_K (nmax 31): 8 sub-blocks of 32 fitted on
 * their own, their scales and mins then quantized to 6 bits against the
 * block's d and dmin, and the weights rounded with the scales as stored. */
static void quantize_k_block(const float *x, int nmax, pf_half *dh, pf_half *dminh, uint8_t scales[12],
                             uint8_t q[QK_K]) {
    float s[8], m[8], smax = 0.0f, mmax = 0.0f;
    for (int j = 0; j < 8; j++) {
        fit_scale_min(x + 32 * j, 32, nmax, &s[j], &m[j]);
        smax = maxf(smax, s[j]), mmax = maxf(mmax, m[j]);
    }
    *dh = pf_float_to_half(smax / 63.0f), *dminh = pf_float_to_half(mmax / 63.0f);
    const float d = pf_half_to_float(*dh), dmin = pf_half_to_float(*dminh);
    uint8_t sc[8], mq[8];
    for (int j = 0; j < 8; j++) {
        sc[j] = (uint8_t)(d > 0.0f ? clampi((int)lrintf(s[j] / d), 0, 63) : 0);
        mq[j] = (uint8_t)(dmin > 0.0f ? clampi((int)lrintf(m[j] / dmin), 0, 63) : 0);
        const float dl = d * (float)sc[j], ml = dmin * (float)mq[j];
        for (int l = 0; l < 32; l++) {
            const float v = dl > 0.0f ? (x[32 * j + l] + ml) / dl : 0.0f;
            q[32 * j + l] = (uint8_t)clampi((int)lrintf(v), 0, nmax);
        }
    }
    pack_k_scales(sc, mq, scales);
}

/* Low nibbles of weights 64c + l and high nibbles of 64c + 32 + l -> qs[32c + l]. */
static void pack_k_nibbles(const uint8_t q[QK_K], uint8_t qs[QK_K / 2]) {
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++)
            qs[32 * c + l] = (uint8_t)((q[64 * c + l] & 0x0f) | ((q[64 * c + 32 + l] & 0x0f) << 4));
}

void pf_q4_K_from_float(const float *src, void *dst, int64_t n) {
    block_q4_K *b = dst;
    uint8_t q[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++, src += QK_K) {
        quantize_k_block(src, 15, &b[i].d, &b[i].dmin, b[i].scales, q);
        pack_k_nibbles(q, b[i].qs);
    }
}

void pf_q5_K_from_float(const float *src, void *dst, int64_t n) {
    block_q5_K *b = dst;
    uint8_t q[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++, src += QK_K) {
        quantize_k_block(src, 31, &b[i].d, &b[i].dmin, b[i].scales, q);
        pack_k_nibbles(q, b[i].qs);
        memset(b[i].qh, 0, sizeof b[i].qh);
        for (int e = 0; e < QK_K; e++) b[i].qh[e % 32] |= (uint8_t)((q[e] >> 4) << (e / 32));
    }
}

/* Symmetric fit of x[16] ~ scale * q, q in -32..31: the value of largest
 * magnitude goes to -32, then one least-squares round for the scale. */
static float fit_scale_q6(const float *x) {
    float amax = 0.0f, max = 0.0f;
    for (int l = 0; l < 16; l++)
        if (fabsf(x[l]) > amax) amax = fabsf(x[l]), max = x[l];
    if (amax == 0.0f) return 0.0f;
    const float s = max / -32.0f;
    double sqx = 0, sqq = 0;
    for (int l = 0; l < 16; l++) {
        const int q = clampi((int)lrintf(x[l] / s), -32, 31);
        sqx += (double)q * x[l], sqq += (double)q * q;
    }
    return sqq > 0 ? (float)(sqx / sqq) : s;
}

static void pack_q6(const int q[QK_K], block_q6_K *b) {
    memset(b->ql, 0, sizeof b->ql);
    memset(b->qh, 0, sizeof b->qh);
    for (int e = 0; e < QK_K; e++) {
        const int h = e / 128, g = (e / 32) & 3, l = e % 32;
        b->ql[64 * h + 32 * (g & 1) + l] |= (uint8_t)((q[e] & 0x0f) << (4 * (g >> 1)));
        b->qh[32 * h + l] |= (uint8_t)((q[e] >> 4) << (2 * g));
    }
}

void pf_q6_K_from_float(const float *src, void *dst, int64_t n) {
    block_q6_K *b = dst;
    for (int64_t i = 0; i < n / QK_K; i++, src += QK_K) {
        float s[16], smax = 0.0f;
        for (int j = 0; j < 16; j++) s[j] = fit_scale_q6(src + 16 * j), smax = maxf(smax, fabsf(s[j]));
        b[i].d = pf_float_to_half(smax / 127.0f);
        const float d = pf_half_to_float(b[i].d);
        int q[QK_K];
        for (int j = 0; j < 16; j++) {
            b[i].scales[j] = (int8_t)(d > 0.0f ? clampi((int)lrintf(s[j] / d), -127, 127) : 0);
            const float dl = d * (float)b[i].scales[j];
            for (int l = 0; l < 16; l++) {
                const int v = dl != 0.0f ? (int)lrintf(src[16 * j + l] / dl) : 0;
                q[16 * j + l] = clampi(v, -32, 31) + 32;
            }
        }
        pack_q6(q, &b[i]);
    }
}

/* -- traits --------------------------------------------------------------- */

#ifdef PF_AVX2
#define SIMD(fn) fn##_avx2
#define TILE(fn) PF_DENSE_TILE_ROWS, fn##_tile_avx2
#else
#define SIMD(fn) fn
#define TILE(fn) 0, NULL
#endif

static const pf_type_traits TRAITS[] = {
    {"F32", 1, 4, pf_f32_to_float, pf_f32_from_float, PF_F32, pf_vec_dot_f32, SIMD(pf_vec_dot_f32),
     TILE(pf_vec_dot_f32)},
    {"F16", 1, 2, pf_f16_to_float, pf_f16_from_float, PF_F32, pf_vec_dot_f16, SIMD(pf_vec_dot_f16),
     TILE(pf_vec_dot_f16)},
    {"BF16", 1, 2, pf_bf16_to_float, pf_bf16_from_float, PF_F32, pf_vec_dot_bf16, SIMD(pf_vec_dot_bf16),
     TILE(pf_vec_dot_bf16)},
    {"Q4_0", QK4_0, 18, pf_q4_0_to_float, pf_q4_0_from_float, PF_Q8_0, pf_vec_dot_q4_0, SIMD(pf_vec_dot_q4_0),
     0, NULL},
    {"Q8_0", QK8_0, 34, pf_q8_0_to_float, pf_q8_0_from_float, PF_Q8_0, pf_vec_dot_q8_0, SIMD(pf_vec_dot_q8_0),
     0, NULL},
    {"Q4_K", QK_K, 144, pf_q4_K_to_float, pf_q4_K_from_float, PF_Q8_K, pf_vec_dot_q4_K, SIMD(pf_vec_dot_q4_K),
     0, NULL},
    {"Q5_K", QK_K, 176, pf_q5_K_to_float, pf_q5_K_from_float, PF_Q8_K, pf_vec_dot_q5_K, SIMD(pf_vec_dot_q5_K),
     0, NULL},
    {"Q6_K", QK_K, 210, pf_q6_K_to_float, pf_q6_K_from_float, PF_Q8_K, pf_vec_dot_q6_K, SIMD(pf_vec_dot_q6_K),
     0, NULL},
    {"Q8_K", QK_K, 292, NULL, pf_q8_K_from_float, PF_Q8_K, NULL, NULL, 0, NULL},
};

const pf_type_traits *pf_get_type_traits(int type) {
    switch (type) {
    case PF_F32: return &TRAITS[0];
    case PF_F16: return &TRAITS[1];
    case PF_BF16: return &TRAITS[2];
    case PF_Q4_0: return &TRAITS[3];
    case PF_Q8_0: return &TRAITS[4];
    case PF_Q4_K: return &TRAITS[5];
    case PF_Q5_K: return &TRAITS[6];
    case PF_Q6_K: return &TRAITS[7];
    case PF_Q8_K: return &TRAITS[8];
    default: return NULL;
    }
}

int64_t pf_row_bytes(int type, int64_t n) {
    const pf_type_traits *t = pf_get_type_traits(type);
    if (!t || n < 0 || n % t->block_size) return -1;
    return n / t->block_size * t->block_bytes;
}

int pf_quantize(const float *src, void *dst, int type, int64_t n, int n_threads) {
    const pf_type_traits *t = pf_get_type_traits(type);
    if (!t || !t->from_float || pf_row_bytes(type, n) < 0) return -1;
    /* chunks of whole blocks (4096 is a multiple of 32 and 256); every block
     * is quantized on its own, so threads never share one */
    const int64_t chunk = t->block_size == 1 ? 65536 : 4096;
    const int64_t n_chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 4)
    for (int64_t c = 0; c < n_chunks; c++) {
        const int64_t start = c * chunk, len = n - start < chunk ? n - start : chunk;
        t->from_float(src + start, (char *)dst + start / t->block_size * t->block_bytes, len);
    }
    return 0;
}
