/* Weights repacked 16 rows at a time (the x16 formats, laid out in
 * x16_formats.h: Q4_K, Q5_K, Q6_K, Q8_0, Q4_0, and F32 up to 512 columns) for
 * GEMMs with no horizontal sums: each 64-byte weight vector holds 4 columns of
 * each of 16 rows (F32: one column), so one broadcast activation word feeds 16
 * rows' dots at once, and a row group's weights, unpacked once, serve several
 * tokens. About 1.1x the stored bytes (F32: 1x, up to 15 zero rows).
 *
 * Two kernel families run them, picked at run time: AVX-512 VNNI (vpdpbusd,
 * matmul_vnni.c) and AVX2 (vpmaddubsw over the two 8-row halves of each
 * vector, matmul_x16_avx2.c). PYFORGE_DISABLE_X16=1 turns both off (weights stay
 * as stored); PYFORGE_DISABLE_VNNI=1 leaves the AVX2 family.
 */
#ifndef PYFORGE_MATMUL_X16_H
#define PYFORGE_MATMUL_X16_H

#include <stdint.h>

/* Kernel families for pf_matmul_x16. */
enum { PF_X16_NONE = 0, PF_X16_AVX2 = 1, PF_X16_VNNI = 2 };

/* The best family this CPU, build and environment allow (probed once). */
int pf_x16_kernels(void);

/* Bytes of n_out x n_in weights of ggml type `type` repacked; -1 where the
 * type has no x16 format, n_in is not whole blocks, n_out % 16 (quantized
 * types) or n_in > PF_X16_F32_MAX_IN (F32). */
int64_t pf_x16_bytes(int type, int64_t n_out, int64_t n_in);
/* w: n_out stored rows of n_in weights -> dst (pf_x16_bytes bytes). 0, or -1 (as above). */
int pf_repack_x16(int type, const void *w, void *dst, int64_t n_out, int64_t n_in, int n_threads);
/* out[n_tok, n_out] = x[n_tok, n_in] @ W^T with W repacked, on the kernel
 * family `kernels` (PF_X16_*; PF_X16_NONE: the best one here). 0, -1 for a
 * bad type or shape or a family not available here, -2 when out of memory. */
int pf_matmul_x16(int type, const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out,
                  float *out, int n_threads, int kernels);

#endif
