/* Element types of the paged KV cache: how a cached row of head_dim values is
 * stored, converted from float32 on write (kv_store) and back on read
 * (attention). One row is one position of one kv head.
 *
 *   F32   float32                       4 bytes a value
 *   F16   IEEE half                     2
 *   BF16  bfloat16 (float32's top half) 2
 *   Q8_0  ggml's block_q8_0: per 32 values a half scale d and 32 int8 q,
 *         value = d * q, d = max|x| / 127  (34 bytes per 32 values)
 *
 * Each conversion has an AVX2 (F16C for half) body and a scalar loop that is
 * the reference and the portable build; rounding matches numpy's float16
 * cast, round-to-nearest-even bfloat16 and ggml's quantize_row_q8_0_ref. */
#ifndef PYFORGE_KV_DTYPES_H
#define PYFORGE_KV_DTYPES_H

#include <stdint.h>

typedef enum { PF_KV_F32 = 0, PF_KV_F16 = 1, PF_KV_BF16 = 2, PF_KV_Q8_0 = 3 } PfKvDtype;

#define PF_KV_Q8_0_BLOCK 32  /* values per Q8_0 block */

/* Bytes of one cached row of hd values (Q8_0: hd a multiple of 32), or -1
 * for an unknown dtype or a Q8_0 row that is not whole blocks. */
int64_t pf_kv_row_bytes(int dtype, int64_t hd);

/* dst[hd] = the row at src as float32. */
void pf_kv_row_to_float(int dtype, const void *src, float *dst, int64_t hd);

/* The row at dst = src[hd] in dtype (rounded as described above). */
void pf_kv_row_from_float(int dtype, const float *src, void *dst, int64_t hd);

/* The scalar references, whatever the build (the tests compare both). */
void pf_kv_row_to_float_scalar(int dtype, const void *src, float *dst, int64_t hd);
void pf_kv_row_from_float_scalar(int dtype, const float *src, void *dst, int64_t hd);

#endif
