/* Non-matmul model primitives for the CPU backend: norms, rope, activations,
 * the paged KV cache and attention over it.
 *
 * All tensors are C-contiguous float32 unless noted. Callers (native/ops.pyx)
 * validate shapes and index ranges; these kernels trust their arguments.
 * Each kernel has an AVX2/FMA path and a portable scalar path.
 */
#ifndef PYFORGE_OPS_KERNELS_H
#define PYFORGE_OPS_KERNELS_H

#include <stdint.h>

#include "kv_dtypes.h"

/* out[n, d] = x[n, d] / sqrt(mean(x^2) + eps) * w[d]  (out may alias x) */
void pf_rmsnorm(const float *x, const float *w, float eps, float *out,
                int64_t n, int64_t d, int n_threads);

/* out[n, d] = (x - mean(x)) / sqrt(var(x) + eps) * w[d] + b[d]  (LayerNorm; out may alias x) */
void pf_layernorm(const float *x, const float *w, const float *b, float eps, float *out,
                  int64_t n, int64_t d, int n_threads);

/* Rotary embedding in place on x[n_tok, n_heads, head_dim]: the first n_rot
 * dims of every head. Pair i turns by pos * theta^(-2i/n_rot) / freq_factors[i].
 * neox = 0: pairs (2i, 2i+1) (GGUF "normal"); neox = 1: pairs (i, i + n_rot/2).
 * freq_factors is float[n_rot/2] or NULL; the rotated dims are multiplied by
 * mscale (longrope's attention factor; 1: plain rope). Returns 0, or -1 if out of memory. */
int pf_rope(float *x, const int32_t *positions, int64_t n_tok, int64_t n_heads,
            int64_t head_dim, int n_rot, double theta, int neox,
            const float *freq_factors, double mscale, int n_threads);

/* out[n] = silu(gate[n]) * up[n]  (out may alias gate or up) */
void pf_silu_mul(const float *gate, const float *up, float *out, int64_t n, int n_threads);

/* out[n] = gelu_tanh(gate[n]) * up[n] (GeGLU; out may alias gate or up), with
 * gelu_tanh(g) = g/2 (1 + tanh(u)) = g / (1 + e^(-2u)), u = sqrt(2/pi) (g + 0.044715 g^3) */
void pf_gelu_tanh_mul(const float *gate, const float *up, float *out, int64_t n, int n_threads);

/* x[n] = cap * tanh(x[n] / cap), in place (logit soft-capping; cap > 0) */
void pf_softcap(float *x, int64_t n, float cap);

/* x[n] += y[n] */
void pf_add_inplace(float *x, const float *y, int64_t n);

/* Rows of x[n, d] become softmax(row), in place. */
void pf_softmax_rows(float *x, int64_t n, int64_t d);

/* out[n] = index of the first maximum of each row of x[n, d] (d >= 1). */
void pf_argmax_rows(const float *x, int64_t n, int64_t d, int32_t *out);

/* Token t of k, v [n_tok, n_kv, head_dim] goes to slot slot_mapping[t] = block
 * * block_size + offset of the caches [n_blocks, n_kv, block_size, head_dim],
 * converted to kv_dtype (a PfKvDtype; rows of pf_kv_row_bytes each):
 * head-major blocks, so one kv head's positions in a block are contiguous
 * (position-major rows n_kv * head_dim apart alias in L1 when attention walks
 * a chunk of positions: 4 kv heads x 64 floats = 1 KB strides used 4 sets). */
void pf_kv_store(const float *k, const float *v, void *k_cache, void *v_cache,
                 const int32_t *slot_mapping, int64_t n_tok, int64_t n_kv, int64_t head_dim, int64_t block_size,
                 int kv_dtype);

/* The sizes of one paged-attention call. */
typedef struct {
    int64_t n_tok;       /* query rows, all sequences back to back */
    int64_t n_heads;     /* query heads */
    int64_t n_kv;        /* kv heads; n_heads % n_kv == 0 */
    int64_t head_dim;
    int64_t block_size;  /* tokens per cache block */
    int64_t n_seq;
    int64_t max_blocks;  /* columns of block_tables */
    float scale;         /* applied to q.k before softmax */
    float softcap;       /* > 0: scores become softcap * tanh(score / softcap) (Gemma 2); 0: off */
    int64_t window;      /* > 0: a query at position p sees only positions (p - window, p]; 0: all */
    int kv_dtype;        /* PfKvDtype of the caches */
} PagedAttnDims;

/* Causal attention of a varlen batch over the paged cache.
 *   q, out        [n_tok, n_heads, head_dim]
 *   k/v_cache     [n_blocks, n_kv, block_size, head_dim] of dims->kv_dtype
 *   block_tables  int32 [n_seq, max_blocks]
 *   context_lens  int32 [n_seq]     L_s, cached tokens incl. this step's
 *   query_start   int32 [n_seq + 1] sequence s owns rows query_start[s] ..
 * Query row j of sequence s (n_q rows) sits at position L_s - n_q + j and sees
 * positions 0 ..= that one (the last `window` of them when window > 0), its
 * scores soft-capped when softcap > 0. Decode rows are work items of their own; a
 * sequence with several query rows (prefill) goes in tiles of consecutive rows
 * x the heads of one kv head, which read each cached row once per tile.
 * PYFORGE_ATTN_TILES=0 puts every row on the per-row path, =avx2 keeps the
 * tiles off the AVX-512 kernels (read at each call; to compare and to test).
 * A cache in another dtype than F32 is read a chunk of positions at a time,
 * converted to float32 in an L1-sized buffer that every head of the kv head
 * then uses, so the float kernels serve every dtype. */
void pf_paged_attention(const float *q, const void *k_cache, const void *v_cache,
                        const int32_t *block_tables, const int32_t *context_lens,
                        const int32_t *query_start, float *out,
                        const PagedAttnDims *dims, int n_threads);

#endif
