/* Matrix times stored weights: out[t, r] = sum_k x[t, k] * W[r, k].
 *
 * x is float32; W stays in its storage format. Activation rows are first
 * quantized once to the weight type's vec_dot_type (Q8_0 / Q8_K; F32 types
 * use x as is), then every output is one vec_dot between a weight row and an
 * activation row, computed up to 4 activation rows per pass over the weights.
 */
#ifndef PYFORGE_MATMUL_H
#define PYFORGE_MATMUL_H

#include <stddef.h>
#include <stdint.h>

/* 1 when the AVX2/FMA kernels were compiled in. */
int pf_simd_available(void);

/* Which kernels pf_matmul may use, as flags; each family runs only where the
 * CPU has it (runtime-detected), else the next one down. No flag: the scalar
 * references. VNNI: AVX-512 VNNI dots for K-quants (matmul_vnni.h); AMX: tiles
 * for batches (matmul_amx.h). */
enum { PF_KERNELS_SCALAR = 0, PF_KERNELS_AVX2 = 1, PF_KERNELS_VNNI = 2, PF_KERNELS_AMX = 4, PF_KERNELS_BEST = 7 };

/*   x    float32 [n_tok, n_in]
 *   w    n_out rows of n_in weights of ggml_type `type`, row after row
 *   out  float32 [n_tok, n_out]   (must not overlap x)
 * n_threads OpenMP threads; kernels is PF_KERNELS_* flags.
 * Returns 0; -1 for an unknown type or n_in not a whole number of blocks;
 * -2 when out of memory. The caller checks buffer sizes. */
int pf_matmul(const float *x, const void *w, int type, int64_t n_tok, int64_t n_in, int64_t n_out,
              float *out, int n_threads, int kernels);

/* vec_dot kernels (pf_vec_dot_fn, see quants.h): scalar reference and AVX2. */
#define PF_DECLARE_VEC_DOT(name)                                                                   \
    void pf_vec_dot_##name(int64_t n, const void *w, const void *a, size_t a_stride, int nr,       \
                           float *out);                                                            \
    void pf_vec_dot_##name##_avx2(int64_t n, const void *w, const void *a, size_t a_stride,        \
                                  int nr, float *out);

/* Dense weights also have a register tile of PF_DENSE_TILE_ROWS rows x 4
 * activation rows for prefill (pf_vec_dot_tile_fn). */
#define PF_DENSE_TILE_ROWS 3
void pf_vec_dot_f32_tile_avx2(int64_t n, const void *w, size_t ws, const void *a, size_t as, float *out);
void pf_vec_dot_f16_tile_avx2(int64_t n, const void *w, size_t ws, const void *a, size_t as, float *out);
void pf_vec_dot_bf16_tile_avx2(int64_t n, const void *w, size_t ws, const void *a, size_t as, float *out);

PF_DECLARE_VEC_DOT(f32)
PF_DECLARE_VEC_DOT(f16)
PF_DECLARE_VEC_DOT(bf16)
PF_DECLARE_VEC_DOT(q4_0)
PF_DECLARE_VEC_DOT(q8_0)
PF_DECLARE_VEC_DOT(q4_K)
PF_DECLARE_VEC_DOT(q5_K)
PF_DECLARE_VEC_DOT(q6_K)

#endif
