/* Sampling on the device, for the steps that need no host sampler: all rows
 * greedy, with no penalties, biases, masks or top logprobs (engine.py decides).
 * Their logits then stay on the GPU; the host gets n tokens and n logprobs
 * instead of n x vocab floats (at 256 rows of a 32k vocabulary, 32 MB a step).
 *
 * The result is native/sampler_kernels.c's for a greedy row, token for token:
 * the max skips NaN (a NaN never compares greater), ties go to the lower id,
 * a row with no number above -inf picks the first -inf, or id 0 when there is
 * none (all NaN); the logprob is the raw logit minus the row's log-sum-exp,
 * NaN logits counting for nothing.
 */
#include "common.cuh"

/* (value, id) pairs ordered as the host's argmax: the larger value, then the
 * lower id; NaN values never win (a row's pairs start at (-inf, n) and only
 * a value that is >= the best, and not NaN, replaces it). */
__device__ __forceinline__ void pf_better(float v, int id, float *best, int *best_id) {
    if (v > *best || (v == *best && id < *best_id)) *best = v, *best_id = id;
}

__device__ __forceinline__ void pf_warp_best(float *v, int *id) {
#pragma unroll
    for (int o = PF_WARP / 2; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, *v, o);
        const int oid = __shfl_xor_sync(0xffffffffu, *id, o);
        pf_better(ov, oid, v, id);
    }
}

/* greedy_tokens_{f32,f16}(logits, vocab, tokens, logprobs)
 *   logits [n, vocab]; tokens int [n]; logprobs float [n]
 *   grid (n), block (multiple of 32, <= 1024; 256): one block per row. */
template <typename T>
__device__ void greedy_row(const T *logits, int vocab, int *tokens, float *logprobs) {
    __shared__ float best_v[32], scratch[32];
    __shared__ int best_i[32];
    const T *row = logits + (pf_i64)blockIdx.x * vocab;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    float v = PF_NEG_INF;
    int id = vocab;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) pf_better(pf_load(row + j), j, &v, &id);
    pf_warp_best(&v, &id);
    if (lane == 0) best_v[warp] = v, best_i[warp] = id;
    __syncthreads();
    v = lane < n_warps ? best_v[lane] : PF_NEG_INF;
    id = lane < n_warps ? best_i[lane] : vocab;
    pf_warp_best(&v, &id);          /* every warp reduces the same values: all threads agree */
    const float max = v;
    float sum = 0.0f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float x = pf_load(row + j);
        if (x == x) sum += expf(x - max);   /* a NaN logit adds nothing, as on the host */
    }
    sum = pf_block_sum(sum, scratch);
    if (threadIdx.x == 0) {
        const int token = id < vocab ? id : 0;
        tokens[blockIdx.x] = token;
        logprobs[blockIdx.x] = pf_load(row + token) - (max + logf(sum));
    }
}

extern "C" __global__ void greedy_tokens_f32(const float *logits, int vocab, int *tokens, float *logprobs) {
    greedy_row(logits, vocab, tokens, logprobs);
}
extern "C" __global__ void greedy_tokens_f16(const __half *logits, int vocab, int *tokens, float *logprobs) {
    greedy_row(logits, vocab, tokens, logprobs);
}
