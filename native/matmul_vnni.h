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

/* Q4_K weights repacked 16 rows at a time (Q4_K_X16, laid out in
 * matmul_vnni.c) for a GEMM whose inner loop is almost only vpdpbusd: each
 * 64-byte weight vector holds 4 weights of each of 16 rows, so one broadcast
 * activation word feeds 16 rows' dots at once and no horizontal sums remain.
 *
 * Bytes of n_out x n_in Q4_K weights as Q4_K_X16; -1 unless n_out % 16 == 0
 * and n_in % 256 == 0. */
int64_t pf_q4_K_x16_bytes(int64_t n_out, int64_t n_in);
/* w: n_out Q4_K rows of n_in weights -> dst (pf_q4_K_x16_bytes bytes). 0, or -1 for a bad shape. */
int pf_repack_q4_K_x16(const void *w, void *dst, int64_t n_out, int64_t n_in, int n_threads);
/* out[n_tok, n_out] = x[n_tok, n_in] @ W^T with W repacked; needs pf_vnni_available().
 * 0, -1 for a bad shape or no VNNI, -2 when out of memory. */
int pf_matmul_q4_K_x16(const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out, float *out,
                       int n_threads);

/* The same for Q5_K (Q5_K_X16, 1.09x the Q5_K bytes): n_out % 16 == 0, n_in % 256 == 0. */
int64_t pf_q5_K_x16_bytes(int64_t n_out, int64_t n_in);
int pf_repack_q5_K_x16(const void *w, void *dst, int64_t n_out, int64_t n_in, int n_threads);
int pf_matmul_q5_K_x16(const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out, float *out,
                       int n_threads);

/* The same for Q6_K (Q6_K_X16, 1.09x the Q6_K bytes): n_out % 16 == 0, n_in % 256 == 0. */
int64_t pf_q6_K_x16_bytes(int64_t n_out, int64_t n_in);
int pf_repack_q6_K_x16(const void *w, void *dst, int64_t n_out, int64_t n_in, int n_threads);
int pf_matmul_q6_K_x16(const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out, float *out,
                       int n_threads);

/* The same for Q8_0 and Q4_0 (Q8_0_X16, Q4_0_X16: 1.06x / 1.11x the stored
 * bytes): n_out % 16 == 0, n_in % 32 == 0. */
int64_t pf_q8_0_x16_bytes(int64_t n_out, int64_t n_in);
int pf_repack_q8_0_x16(const void *w, void *dst, int64_t n_out, int64_t n_in, int n_threads);
int pf_matmul_q8_0_x16(const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out, float *out,
                       int n_threads);
int64_t pf_q4_0_x16_bytes(int64_t n_out, int64_t n_in);
int pf_repack_q4_0_x16(const void *w, void *dst, int64_t n_out, int64_t n_in, int n_threads);
int pf_matmul_q4_0_x16(const float *x, const void *packed, int64_t n_tok, int64_t n_in, int64_t n_out, float *out,
                       int n_threads);

#endif
