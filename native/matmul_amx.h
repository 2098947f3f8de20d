/* Quantized matmul on Intel AMX tiles (int8 TMUL), for batches of tokens.
 *
 * Same contract as pf_matmul (matmul.h) for the weight types it supports.
 * The file is compiled for any x86-64 target (the AMX and AVX-512 code sits
 * behind a per-function target pragma) and runs only where the CPU has
 * AMX-INT8 and the kernel lets this process use tile data, so one build runs
 * on machines with and without AMX.
 */
#ifndef PYFORGE_MATMUL_AMX_H
#define PYFORGE_MATMUL_AMX_H

#include <stdint.h>

/* Below this many tokens the AVX2 kernels win (the tile work is padded to 16
 * tokens and decode is bound by reading the weights anyway). */
#define PF_AMX_MIN_TOKENS 9

/* 1 when this CPU has AMX-INT8, the OS granted tile data to this process,
 * and PYFORGE_DISABLE_AMX is not set. Asks the kernel once. */
int pf_amx_available(void);

/* 1 if pf_matmul_amx has kernels for weight type `type` with rows of n_in. */
int pf_amx_supports(int type, int64_t n_in);

/* out[t, r] = sum_k x[t, k] * W[r, k]; returns 0, -1 for an unsupported
 * type or shape, -2 when out of memory. Call only if pf_amx_available(). */
int pf_matmul_amx(const float *x, const void *w, int type, int64_t n_tok, int64_t n_in, int64_t n_out,
                  float *out, int n_threads);

#endif
