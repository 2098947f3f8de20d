/* AVX-512 VNNI vec_dot kernels (matmul_vnni.c): the same dots as the AVX2
 * kernels in matmul.c, on the same activation rows, with vpdpbusd doing in one
 * instruction what maddubs + madd do in two, on 64-byte vectors. Compiled for
 * every x86-64 build with per-function targets; used only where the CPU and
 * OS have AVX-512 F/BW/VL + VNNI and PYFORGE_DISABLE_VNNI is unset.
 */
#ifndef PYFORGE_MATMUL_VNNI_H
#define PYFORGE_MATMUL_VNNI_H

#include "quants.h"

/* 1 when the VNNI kernels may run here (probed once). */
int pf_vnni_available(void);

/* The VNNI vec_dot for weights of ggml type `type`, or NULL where there is none
 * (or none built). */
pf_vec_dot_fn pf_vnni_vec_dot(int type);

/* Weights repacked 16 rows at a time (the x16 formats, laid out in
 * matmul_vnni.c: Q4_K, Q5_K, Q6_K, Q8_0, Q4_0) for GEMMs whose inner loop is
 * almost only vpdpbusd: each 64-byte weight vector holds 4 columns of each of
 * 16 rows, so one broadcast activation word feeds 16 rows' dots at once and no
 * horizontal sums remain. About 1.1x the stored bytes.
 *
 * Bytes of n_out x n_in weights of ggml type `type` repacked; -1 where the
 * type has no x16 format, n_out % 16 or n_in is not whole blocks. */
int64_t pf_x16_bytes(int type, int64_t n_out, int64_t n_in);
/* w: n_out stored rows of n_in weights -> dst (pf_x16_bytes bytes). 0, or -1 (as above). */
int pf_repack_x16(int type, const void *w, void *dst, int64_t n_out, int64_t n_in, int n_threads);
/* out[n_tok, n_out] = x[n_tok, n_in] @ W^T with W repacked; needs pf_vnni_available().
 * 0, -1 for a bad type or shape or no VNNI, -2 when out of memory. */
int pf_matmul_x16(int type, const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out,
                  float *out, int n_threads);

#endif
