/* Routed experts: see moe_kernels.h. */
#include "moe_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "matmul.h"
#include "matmul_x16.h"

/* Token rows grouped by expert (a counting sort): expert e owns picks
 * order[start[e] .. start[e + 1]), each a flat index t * k + j into ids. */
static int group_by_expert(const int32_t *ids, int64_t n_picks, int n_experts, int64_t *start, int64_t *order) {
    memset(start, 0, sizeof(int64_t) * (n_experts + 1));
    for (int64_t p = 0; p < n_picks; p++) {
        if (ids[p] < 0 || ids[p] >= n_experts) return -1;
        start[ids[p] + 1]++;
    }
    for (int e = 0; e < n_experts; e++) start[e + 1] += start[e];
    int64_t *next = malloc(sizeof(int64_t) * n_experts);
    if (!next) return -2;
    memcpy(next, start, sizeof(int64_t) * n_experts);
    for (int64_t p = 0; p < n_picks; p++) order[next[ids[p]]++] = p;
    free(next);
    return 0;
}

/* out [m, n_out] = x [m, n_in] @ W^T, W stored or repacked (x16). */
static int expert_matmul(const float *x, const void *w, int type, int x16, int64_t m, int64_t n_in, int64_t n_out,
                         float *out, int n_threads, int kernels) {
    if (x16) return pf_matmul_x16(type, x, w, m, n_in, n_out, out, n_threads, PF_X16_NONE);
    return pf_matmul(x, w, type, m, n_in, n_out, out, n_threads, kernels);
}

/* One expert on its m gathered rows xs [m, d]: ys [m, d] = down(silu(gate xs) * up xs). */
static int run_expert(const pf_expert *ex, const float *xs, int64_t m, int64_t d, int64_t n_ff,
                      float *g, float *u, float *ys, int n_threads, int kernels) {
    int rc = expert_matmul(xs, ex->gate, ex->gate_type, ex->gate_x16, m, d, n_ff, g, n_threads, kernels);
    if (!rc) rc = expert_matmul(xs, ex->up, ex->up_type, ex->up_x16, m, d, n_ff, u, n_threads, kernels);
    if (rc) return rc;
    const int64_t n = m * n_ff;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1 && n >= 16384)
    for (int64_t i = 0; i < n; i++) g[i] = g[i] * u[i] / (1.0f + expf(-g[i]));
    return expert_matmul(g, ex->down, ex->down_type, ex->down_x16, m, n_ff, d, ys, n_threads, kernels);
}

int pf_moe_ffn(const float *x, int64_t n_tok, int64_t d, int64_t n_ff, const int32_t *ids, const float *weights,
               int k, const pf_expert *experts, int n_experts, float *out, int n_threads, int kernels) {
    const int64_t n_picks = n_tok * k;
    int64_t *start = malloc(sizeof(int64_t) * (n_experts + 1));
    int64_t *order = malloc(sizeof(int64_t) * (n_picks ? n_picks : 1));
    int rc = (start && order) ? group_by_expert(ids, n_picks, n_experts, start, order) : -2;
    int64_t most = 0;
    for (int e = 0; !rc && e < n_experts; e++)
        if (start[e + 1] - start[e] > most) most = start[e + 1] - start[e];
    /* scratch for the largest group: gathered rows, gate, up, expert output */
    float *xs = rc ? NULL : malloc(sizeof(float) * (most * (2 * d + 2 * n_ff) + 1));
    if (!rc && !xs) rc = -2;
    memset(out, 0, sizeof(float) * n_tok * d);
    for (int e = 0; !rc && e < n_experts; e++) {
        const int64_t m = start[e + 1] - start[e];
        if (!m) continue;                      /* an expert nobody picked is never read */
        const int64_t *picks = order + start[e];
        float *g = xs + most * d, *u = g + most * n_ff, *ys = u + most * n_ff;
        for (int64_t r = 0; r < m; r++) memcpy(xs + r * d, x + (picks[r] / k) * d, sizeof(float) * d);
        rc = run_expert(&experts[e], xs, m, d, n_ff, g, u, ys, n_threads, kernels);
        if (rc) break;
        /* a token picks an expert at most once: rows of one group never collide */
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1 && m * d >= 16384)
        for (int64_t r = 0; r < m; r++) {
            const float w = weights[picks[r]];
            float *o = out + (picks[r] / k) * d;
            const float *y = ys + r * d;
            for (int64_t i = 0; i < d; i++) o[i] += w * y[i];
        }
    }
    free(xs);
    free(order);
    free(start);
    return rc;
}
