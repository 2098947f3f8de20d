/* The x16 block layouts (16 weight rows interleaved per block of columns) and
 * what the GEMM drivers (matmul_x16.c) hand each kernel family's tiles
 * (matmul_vnni.c, matmul_x16_avx2.c). Lane r of a 64-byte weight vector is
 * row r; its 32-byte halves are rows 0-7 and 8-15 (the AVX2 tiles' halves).
 */
#ifndef PYFORGE_X16_FORMATS_H
#define PYFORGE_X16_FORMATS_H

#include "quants.h"

/* -- Q4_K_X16: 16 Q4_K rows interleaved, one block of 256 columns ----------
 * Weight 8g + j (j < 4) of row r is the low nibble of qs[g][4r + j], weight
 * 8g + 4 + j its high nibble: a 64-byte load of qs[g] gives, after the nibble
 * split, lane r = 4 consecutive weights of row r, two vectors per 8 columns.
 * The scales come unpacked, row-minor, so a sub-block's 16 row scales are one
 * 16-byte load, and the mins as int16 pairs (sub-blocks 2p, 2p+1) per row. */
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

/* Q6_K_X16: 16 Q6_K rows, one block of 256 columns. The 6-bit weights q
 * (0..63) split as Q4_K_X16's nibbles (lo, qs[32][64]) plus two high bits:
 * hb[h][4r + j] holds those of row r's columns 16h + j, 16h + 4 + j, 16h + 8 +
 * j, 16h + 12 + j in bit pairs 0-1, 2-3, 4-5, 6-7 (k-group 2h's low and high
 * half, then 2h+1's). The 16 sub-block scales as int16 pairs per row
 * (sub-blocks 2p, 2p+1). */
typedef struct {
    float d[16];
    int16_t sc[8][16][2];   /* sc[p][r] = the scales of sub-blocks 2p, 2p+1 in row r */
    uint8_t qs[32][64];
    uint8_t hb[16][64];
} block_q6_K_x16;
_Static_assert(sizeof(block_q6_K_x16) == 3648, "block_q6_K_x16 must be 3648 bytes");

/* Q8_0_X16 and Q4_0_X16: 16 rows, one block of 32 columns: the row scales as
 * floats, and the weights as unsigned bytes: Q8_0's + 128, one byte each,
 * column 4g + j of row r at qs[g][4r + j]; Q4_0's q (w = d * (q - 8)) as
 * nibbles, columns 8g + j / 8g + 4 + j of row r in the low / high nibble of
 * qs[g][4r + j]. */
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

/* F32_X16: 16 F32 rows, one column per 64-byte block (lane r = row r), for
 * matrices of at most PF_X16_F32_MAX_IN columns, where a row dot's horizontal
 * sum costs as much as its multiply-adds (stories260K's 64-wide layers). The
 * last group's rows past n_out are zeros and never stored. A tile sums each
 * output in two chains, even and odd columns, each in column order, then adds
 * them: the same arithmetic for every token count and on both families. */
#define PF_X16_F32_MAX_IN 512

/* Tokens per tile call: a row group's unpacked weights serve this many. */
#define PF_X16_TOKENS 8

/* One GEMM for the tiles: activations quantized by the driver, [n_tok][nb] blocks. */
typedef struct {
    const void *w;          /* the x16 blocks, row group after row group */
    const void *act;        /* block_q8_K (K-quants), block_q8_0 (Q8_0, Q4_0) or float (F32: [n_tok][nb]) */
    const int16_t *k_sums;  /* Q4_K / Q5_K: sums per 32 activations, [n_tok][nb][8] */
    const float *da;        /* Q8_0 / Q4_0: the activation scales as floats, [n_tok][nb] */
    const int32_t *q_sums;  /* Q8_0 / Q4_0: the sum of each activation block, [n_tok][nb] */
    float *out;             /* [n_tok][n_out] */
    int64_t nb, n_out;      /* blocks per row (F32: columns); output rows */
} pf_x16_job;

/* out[t0 .. t0 + n_tok) x rows [16 group, 16 group + 16), n_tok <= PF_X16_TOKENS. */
typedef void (*pf_x16_tile_fn)(const pf_x16_job *job, int64_t group, int64_t t0, int n_tok);

/* A family's tile for ggml type `type`, or NULL where it has none (or it is not built). */
pf_x16_tile_fn pf_vnni_x16_tile(int type);
pf_x16_tile_fn pf_avx2_x16_tile(int type);

#endif
