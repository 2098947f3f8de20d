/* Routed experts (mixture of experts): the FFN of every token through the
 * experts its router picked, tokens grouped by expert so each expert's
 * weights are read once per call whatever the batch.
 *
 *   out[t] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = ids[t, j]
 *
 * Each expert's three matrices are in their stored format (any pf_matmul type,
 * one type per matrix), multiplied by pf_matmul on the rows of its tokens, or
 * repacked 16 rows at a time (matmul_x16.h), multiplied by pf_matmul_x16.
 */
#ifndef PYFORGE_MOE_KERNELS_H
#define PYFORGE_MOE_KERNELS_H

#include <stdint.h>

typedef struct {
    const void *gate, *up, *down;     /* [n_ff, d], [n_ff, d], [d, n_ff] stored rows, or x16 blocks */
    int gate_type, up_type, down_type;
    int gate_x16, up_x16, down_x16;   /* nonzero: that matrix is repacked (pf_repack_x16) */
} pf_expert;

/*   x        float32 [n_tok, d]
 *   ids      int32   [n_tok, k]   expert of each pick (distinct per token), < n_experts
 *   weights  float32 [n_tok, k]   its routing weight
 *   experts  [n_experts]
 *   out      float32 [n_tok, d]   (must not overlap x)
 * kernels: pf_matmul's flags for stored matrices; repacked ones run on the best
 * x16 family here. Returns 0; -1 for bad arguments (an id out of range, a type
 * pf_matmul refuses, a repacked matrix with no x16 kernels here); -2 when out
 * of memory. */
int pf_moe_ffn(const float *x, int64_t n_tok, int64_t d, int64_t n_ff, const int32_t *ids, const float *weights,
               int k, const pf_expert *experts, int n_experts, float *out, int n_threads, int kernels);

#endif
