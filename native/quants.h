/* Weight storage formats, byte for byte as GGUF stores them, and the type
 * traits that drive dequantize / quantize / matmul dispatch.
 *
 * A quantized row is an array of blocks; each block holds its scale(s) and
 * the packed integers of a fixed number of weights. The structs below ARE the
 * file format (see the size asserts); fp16 fields are raw IEEE-half bits.
 */
#ifndef PYFORGE_QUANTS_H
#define PYFORGE_QUANTS_H

#include <stddef.h>
#include <stdint.h>

/* SIMD path: AVX2 integer dots + FMA. F16C is separate (half <-> float). */
#if defined(__AVX2__) && defined(__FMA__)
#define PF_AVX2 1
#endif
#if defined(__F16C__)
#define PF_F16C 1
#endif

/* ggml_type numbers (GGUF), as in pyforge/ggml_types.py. */
enum {
    PF_F32 = 0,
    PF_F16 = 1,
    PF_Q4_0 = 2,
    PF_Q8_0 = 8,
    PF_Q4_K = 12,
    PF_Q5_K = 13,
    PF_Q6_K = 14,
    PF_Q8_K = 15, /* activations only: what K-quant weights are dotted with */
    PF_BF16 = 30,
};

#define QK4_0 32
#define QK8_0 32
#define QK_K 256
#define K_SCALE_SIZE 12

typedef uint16_t pf_half; /* IEEE binary16 bits */

/* Q4_0: 32 weights, w = d * (q - 8), q in 0..15.
 * qs[l] holds weight l in its low nibble and weight l + 16 in its high one. */
typedef struct {
    pf_half d;
    uint8_t qs[QK4_0 / 2];
} block_q4_0;
_Static_assert(sizeof(block_q4_0) == 18, "block_q4_0 must be 18 bytes");

/* Q8_0: 32 weights, w = d * q, q in -128..127. */
typedef struct {
    pf_half d;
    int8_t qs[QK8_0];
} block_q8_0;
_Static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must be 34 bytes");

/* Q4_K: 256 weights in 8 sub-blocks of 32. Sub-block j has a 6-bit scale
 * sc[j] and a 6-bit min m[j]: w = d * sc[j] * q - dmin * m[j], q in 0..15.
 *
 * scales[12], bit by bit (sc = A..H, m = a..h, sub-block 0..7):
 *
 *   byte 0..3   E E A A A A A A    bits 0-5: sc[0..3]  bits 6-7: sc[4..7] bits 4-5
 *               F F B B B B B B
 *               G G C C C C C C
 *               H H D D D D D D
 *   byte 4..7   e e a a a a a a    bits 0-5: m[0..3]   bits 6-7: m[4..7] bits 4-5
 *               f f b b b b b b
 *               g g c c c c c c
 *               h h d d d d d d
 *   byte 8..11  e e e e E E E E    bits 0-3: sc[4..7] bits 0-3
 *               f f f f F F F F    bits 4-7: m[4..7]  bits 0-3
 *               g g g g G G G G
 *               h h h h H H H H
 *
 * qs[32*c + l] holds weight 64*c + l in its low nibble and 64*c + 32 + l in
 * its high nibble (c = 0..3), so one 32-byte load gives two sub-blocks. */
typedef struct {
    pf_half d;
    pf_half dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qs[QK_K / 2];
} block_q4_K;
_Static_assert(sizeof(block_q4_K) == 144, "block_q4_K must be 144 bytes");

/* Q5_K: Q4_K plus a fifth bit per weight: bit j of qh[l] is the high bit of
 * weight 32*j + l, so q in 0..31. Same scales packing as Q4_K. */
typedef struct {
    pf_half d;
    pf_half dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
} block_q5_K;
_Static_assert(sizeof(block_q5_K) == 176, "block_q5_K must be 176 bytes");

/* Q6_K: 256 weights in 16 sub-blocks of 16, w = d * scales[e/16] * (q - 32),
 * q in 0..63. Weight e = 128*h + 32*g + l (h = 0..1, g = 0..3, l = 0..31):
 *   low 4 bits  = nibble (g >= 2) of ql[64*h + 32*(g & 1) + l]
 *   high 2 bits = bits 2g..2g+1 of qh[32*h + l] */
typedef struct {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    pf_half d;
} block_q6_K;
_Static_assert(sizeof(block_q6_K) == 210, "block_q6_K must be 210 bytes");

/* Q8_K: activations for K-quant dots. a = d * q with q in -127..127 (never
 * -128, so the AVX2 sign trick stays exact); bsums[i] = sum of qs[16i..16i+15]
 * lets the dot subtract mins / offsets per sub-block without touching qs. */
typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
} block_q8_K;
_Static_assert(sizeof(block_q8_K) == 292, "block_q8_K must be 292 bytes");

/* -- half / bfloat16 ------------------------------------------------------ */
/* Portable converters, round to nearest even (used where F16C is missing). */
float pf_half_to_float_scalar(pf_half h);
pf_half pf_float_to_half_scalar(float f);
uint16_t pf_float_to_bf16(float f); /* round to nearest even, NaN stays NaN */

/* Inline: kernels convert a scale per block. */
#ifdef PF_F16C
#include <immintrin.h>
static inline float pf_half_to_float(pf_half h) { return _cvtsh_ss(h); }
static inline pf_half pf_float_to_half(float f) { return (pf_half)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
#else
static inline float pf_half_to_float(pf_half h) { return pf_half_to_float_scalar(h); }
static inline pf_half pf_float_to_half(float f) { return pf_float_to_half_scalar(f); }
#endif

/* -- traits --------------------------------------------------------------- */

/* dst[n] = the n weights at src (n a whole number of blocks). */
typedef void (*pf_to_float_fn)(const void *src, float *dst, int64_t n);
/* src[n] floats -> blocks at dst. */
typedef void (*pf_from_float_fn)(const float *src, void *dst, int64_t n);
/* out[j] = dot(weight row w, activation row j) for j < nr (1..4); row j starts
 * at a + j * a_stride bytes and is stored as the type's vec_dot_type, laid
 * out by matmul.c (the AVX2 Q4_0 / Q8_0 kernels also read the float copy of
 * the block scales that matmul.c keeps after the Q8_0 blocks of row 0). */
typedef void (*pf_vec_dot_fn)(int64_t n, const void *w, const void *a, size_t a_stride, int nr,
                              float *out);

/* out[4r + j] = dot(weight row r, activation row j) for r < tile_rows, j < 4:
 * a register tile for prefill (weight rows w_stride bytes apart). */
typedef void (*pf_vec_dot_tile_fn)(int64_t n, const void *w, size_t w_stride, const void *a, size_t a_stride,
                                   float *out);

typedef struct {
    const char *name;
    int block_size;            /* weights per block */
    int block_bytes;           /* bytes per block */
    pf_to_float_fn to_float;   /* dequantize; NULL for Q8_K (activations only) */
    pf_from_float_fn from_float; /* quantize; NULL where unsupported */
    int vec_dot_type;          /* how matmul stores activations for this weight type */
    pf_vec_dot_fn vec_dot;     /* scalar reference */
    pf_vec_dot_fn vec_dot_simd; /* AVX2 version, or the scalar one without AVX2 */
    int tile_rows;              /* > 0: vec_dot_tile (AVX2) exists for this many weight rows */
    pf_vec_dot_tile_fn vec_dot_tile;
} pf_type_traits;

/* The traits of ggml_type `type`, or NULL if pyforge does not know it. */
const pf_type_traits *pf_get_type_traits(int type);

/* Bytes of n weights of `type`, or -1 if type is unknown or n is not a whole
 * number of blocks (or negative). */
int64_t pf_row_bytes(int type, int64_t n);

/* Quantize n floats (a whole number of blocks) with n_threads OpenMP threads.
 * Returns 0, or -1 if `type` cannot be quantized. */
int pf_quantize(const float *src, void *dst, int type, int64_t n, int n_threads);

/* Per-type conversions (quants.c); the traits table points at these. */
void pf_f32_to_float(const void *src, float *dst, int64_t n);
void pf_f16_to_float(const void *src, float *dst, int64_t n);
void pf_bf16_to_float(const void *src, float *dst, int64_t n);
void pf_q4_0_to_float(const void *src, float *dst, int64_t n);
void pf_q8_0_to_float(const void *src, float *dst, int64_t n);
void pf_q4_K_to_float(const void *src, float *dst, int64_t n);
void pf_q5_K_to_float(const void *src, float *dst, int64_t n);
void pf_q6_K_to_float(const void *src, float *dst, int64_t n);

void pf_f32_from_float(const float *src, void *dst, int64_t n);
void pf_f16_from_float(const float *src, void *dst, int64_t n);
void pf_bf16_from_float(const float *src, void *dst, int64_t n);
void pf_q4_0_from_float(const float *src, void *dst, int64_t n);
void pf_q8_0_from_float(const float *src, void *dst, int64_t n);
void pf_q4_K_from_float(const float *src, void *dst, int64_t n);
void pf_q5_K_from_float(const float *src, void *dst, int64_t n);
void pf_q6_K_from_float(const float *src, void *dst, int64_t n);
void pf_q8_K_from_float(const float *src, void *dst, int64_t n);

/* Q4_K / Q5_K: the 6-bit scales and mins of the 8 sub-blocks. */
void pf_unpack_k_scales(const uint8_t packed[K_SCALE_SIZE], uint8_t sc[8], uint8_t m[8]);
/* Q6_K: the 256 weights of one block as q - 32 (-32..31). */
void pf_q6_K_values(const block_q6_K *b, int8_t q[QK_K]);

#endif
