/* KV cache element types. See kv_dtypes.h. */
#include "kv_dtypes.h"

#include <math.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#define KV_AVX2 1
#endif
#if defined(__F16C__) && defined(__AVX__)
#define KV_F16C 1
#endif

#define QB PF_KV_Q8_0_BLOCK

/* ggml's block_q8_0, byte for byte: the cache row is an array of these. */
typedef struct {
    uint16_t d;       /* IEEE half scale */
    int8_t qs[QB];
} kv_block_q8_0;
_Static_assert(sizeof(kv_block_q8_0) == 34, "kv_block_q8_0 must be 34 bytes");

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float f32_from(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* -- scalar converters: the reference ------------------------------------ */

static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) return f32_from(sign | 0x7f800000u | man << 13);
    if (exp == 0) return f32_from(sign | f32_bits(ldexpf((float)man, -24)));  /* zero, subnormal */
    return f32_from(sign | (exp + 112) << 23 | man << 13);
}

/* Round to nearest even, as numpy's float16 cast and F16C. */
static uint16_t float_to_half(float f) {
    uint32_t x = f32_bits(f), ax = x & 0x7fffffffu;
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    if (ax >= 0x7f800000u) return sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0);  /* inf, quiet NaN */
    if (ax >= 0x477ff000u) return sign | 0x7c00;  /* >= 65520 rounds to inf */
    if (ax < 0x38800000u)  /* under 2^-14: a subnormal half, units of 2^-24 (lrintf rounds to even) */
        return sign | (uint16_t)lrintf(f32_from(ax) * 16777216.0f);
    ax += 0xc8000fffu + ((ax >> 13) & 1);  /* exponent rebias (-112 << 23) plus rounding */
    return sign | (uint16_t)(ax >> 13);
}

static uint16_t float_to_bf16(float f) {
    const uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

/* ggml's roundf: half away from zero, exact (x + 0.5 could round up first). */
static float round_away(float x) {
    const float a = fabsf(x), fl = floorf(a);
    return copysignf(fl + floorf(2.0f * (a - fl)), x);
}

static void q8_0_block_from_float(const float *x, kv_block_q8_0 *b) {
    float amax = 0.0f;
    for (int l = 0; l < QB; l++) amax = fabsf(x[l]) > amax ? fabsf(x[l]) : amax;
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    b->d = float_to_half(d);
    for (int l = 0; l < QB; l++) b->qs[l] = (int8_t)round_away(x[l] * id);
}

void pf_kv_row_to_float_scalar(int dtype, const void *src, float *dst, int64_t hd) {
    switch (dtype) {
    case PF_KV_F32: memcpy(dst, src, (size_t)hd * sizeof(float)); return;
    case PF_KV_F16:
        for (int64_t i = 0; i < hd; i++) dst[i] = half_to_float(((const uint16_t *)src)[i]);
        return;
    case PF_KV_BF16:
        for (int64_t i = 0; i < hd; i++) dst[i] = f32_from((uint32_t)((const uint16_t *)src)[i] << 16);
        return;
    case PF_KV_Q8_0:
        for (int64_t i = 0; i < hd / QB; i++) {
            const kv_block_q8_0 *b = (const kv_block_q8_0 *)src + i;
            const float d = half_to_float(b->d);
            for (int l = 0; l < QB; l++) dst[i * QB + l] = d * (float)b->qs[l];
        }
        return;
    }
}

void pf_kv_row_from_float_scalar(int dtype, const float *src, void *dst, int64_t hd) {
    switch (dtype) {
    case PF_KV_F32: memcpy(dst, src, (size_t)hd * sizeof(float)); return;
    case PF_KV_F16:
        for (int64_t i = 0; i < hd; i++) ((uint16_t *)dst)[i] = float_to_half(src[i]);
        return;
    case PF_KV_BF16:
        for (int64_t i = 0; i < hd; i++) ((uint16_t *)dst)[i] = float_to_bf16(src[i]);
        return;
    case PF_KV_Q8_0:
        for (int64_t i = 0; i < hd / QB; i++) q8_0_block_from_float(src + i * QB, (kv_block_q8_0 *)dst + i);
        return;
    }
}

int64_t pf_kv_row_bytes(int dtype, int64_t hd) {
    switch (dtype) {
    case PF_KV_F32: return hd * 4;
    case PF_KV_F16:
    case PF_KV_BF16: return hd * 2;
    case PF_KV_Q8_0: return hd % QB ? -1 : hd / QB * (int64_t)sizeof(kv_block_q8_0);
    default: return -1;
    }
}

/* -- SIMD converters ------------------------------------------------------ */

#ifdef KV_AVX2
static void bf16_to_float_avx2(const uint16_t *s, float *d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i)));
        _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
    for (; i < n; i++) d[i] = f32_from((uint32_t)s[i] << 16);
}

static void bf16_from_float_avx2(const float *s, uint16_t *d, int64_t n) {
    int64_t i = 0;
    const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x400000);
    for (; i + 8 <= n; i += 8) {
        __m256 f = _mm256_loadu_ps(s + i);
        __m256i x = _mm256_castps_si256(f);
        __m256i r = _mm256_add_epi32(x, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(x, 16), one)));
        __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
        r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r),
                                                 _mm256_castsi256_ps(_mm256_or_si256(x, quiet)), nan));
        r = _mm256_srli_epi32(r, 16);
        r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  /* 8 x u16 in the low 128 bits */
        _mm_storeu_si128((__m128i *)(d + i), _mm256_castsi256_si128(r));
    }
    for (; i < n; i++) d[i] = float_to_bf16(s[i]);
}

static void q8_0_to_float_avx2(const kv_block_q8_0 *b, float *d, int64_t n_blocks) {
    for (int64_t i = 0; i < n_blocks; i++, d += QB) {
        const __m256 scale = _mm256_set1_ps(half_to_float(b[i].d));
        for (int g = 0; g < QB; g += 8) {
            __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b[i].qs + g)));
            _mm256_storeu_ps(d + g, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(q)));
        }
    }
}

/* round_away on 8 lanes. */
static inline __m256 round_away8(__m256 x) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_andnot_ps(sign, x), fl = _mm256_floor_ps(a);
    __m256 r = _mm256_add_ps(fl, _mm256_floor_ps(_mm256_add_ps(_mm256_sub_ps(a, fl), _mm256_sub_ps(a, fl))));
    return _mm256_or_ps(r, _mm256_and_ps(sign, x));
}

static void q8_0_from_float_avx2(const float *s, kv_block_q8_0 *b, int64_t n_blocks) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n_blocks; i++, s += QB) {
        __m256 v[4], m = _mm256_setzero_ps();
        for (int g = 0; g < 4; g++) {
            v[g] = _mm256_loadu_ps(s + 8 * g);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[g]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float d = _mm_cvtss_f32(h) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        b[i].d = float_to_half(d);
        __m256i q[4];
        for (int g = 0; g < 4; g++) q[g] = _mm256_cvttps_epi32(round_away8(_mm256_mul_ps(v[g], _mm256_set1_ps(id))));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  /* undo the in-lane packs */
        _mm256_storeu_si256((__m256i *)b[i].qs, p);
    }
}
#endif

#ifdef KV_F16C
static void f16_to_float_f16c(const uint16_t *s, float *d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    for (; i < n; i++) d[i] = half_to_float(s[i]);
}

static void f16_from_float_f16c(const float *s, uint16_t *d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) d[i] = float_to_half(s[i]);
}
#endif

void pf_kv_row_to_float(int dtype, const void *src, float *dst, int64_t hd) {
    switch (dtype) {
#ifdef KV_F16C
    case PF_KV_F16: f16_to_float_f16c(src, dst, hd); return;
#endif
#ifdef KV_AVX2
    case PF_KV_BF16: bf16_to_float_avx2(src, dst, hd); return;
    case PF_KV_Q8_0: q8_0_to_float_avx2(src, dst, hd / QB); return;
#endif
    default: pf_kv_row_to_float_scalar(dtype, src, dst, hd);
    }
}

void pf_kv_row_from_float(int dtype, const float *src, void *dst, int64_t hd) {
    switch (dtype) {
#ifdef KV_F16C
    case PF_KV_F16: f16_from_float_f16c(src, dst, hd); return;
#endif
#ifdef KV_AVX2
    case PF_KV_BF16: bf16_from_float_avx2(src, dst, hd); return;
    case PF_KV_Q8_0: q8_0_from_float_avx2(src, dst, hd / QB); return;
#endif
    default: pf_kv_row_from_float_scalar(dtype, src, dst, hd);
    }
}
