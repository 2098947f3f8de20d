/* Batched token sampler: one call samples the next token of every sequence.
 *
 * Per row, in this order (vLLM / OpenAI semantics):
 *   1. logprobs from the raw logits (log_softmax of the model output): the
 *      chosen token's and the top-n (ids best first, ties to the lower id);
 *   2. penalties over the row's token history: repetition (HF: divide positive
 *      logits, multiply negative ones, for tokens in prompt or output), then
 *      presence/frequency (OpenAI: subtract presence*[count>0] + frequency*count,
 *      counts over the output only);
 *   3. the row's logit biases, if it has any (OpenAI logit_bias; -inf bans a
 *      token), added to the penalised logits;
 *   4. the row's allowed-token mask, if it has one (a grammar's: structured
 *      output): every token it does not allow is out of the draw, as if its
 *      logit were -inf. Logprobs stay those of step 1, the model's own;
 *   5. temperature < PF_GREEDY_TEMPERATURE: argmax, ties to the lower id;
 *      otherwise temperature, top-k, top-p (nucleus over the top-k-renormalised
 *      distribution), min-p (drop p < min_p * p_max), then one draw from the
 *      renormalised survivors with the row's RNG. Filters rank tokens by
 *      probability, ties to the lower id.
 *
 * RNG: SplitMix64 (Steele, Lea, Flood 2014), 64 bits of state per sequence,
 * held by the caller and advanced by exactly one step per call, greedy rows
 * included. The state is the seed itself (mod 2^64). A row's result depends
 * only on its own logits, params, history and state, never on the batch.
 */
#ifndef PYFORGE_SAMPLER_KERNELS_H
#define PYFORGE_SAMPLER_KERNELS_H

#include <stdint.h>

/* Below this a temperature means greedy (vLLM's _SAMPLING_EPS): dividing by
 * it would overflow the scaled logits. */
#define PF_GREEDY_TEMPERATURE 1e-5f

/* Per-sequence parameters, each an array [n_seq]. */
typedef struct {
    const float *temperature;          /* < PF_GREEDY_TEMPERATURE: greedy */
    const int32_t *top_k;              /* <= 0 or >= vocab: disabled */
    const float *top_p;                /* >= 1: disabled */
    const float *min_p;                /* <= 0: disabled */
    const float *repetition_penalty;   /* 1: none */
    const float *presence_penalty;     /* 0: none */
    const float *frequency_penalty;    /* 0: none */
} pf_sampling_params;

/* Token history as CSR: row i owns entries offsets[i] .. offsets[i+1]-1.
 * An entry is a token seen in the prompt or the output (repetition penalty
 * applies) with its number of occurrences in the output (presence/frequency
 * apply when > 0). Ids must lie in [0, vocab); they should be unique per row
 * (a duplicate is penalised twice). */
typedef struct {
    const int32_t *offsets;   /* [n_seq + 1] */
    const int32_t *ids;       /* [nnz] */
    const int32_t *counts;    /* [nnz] */
} pf_token_history;

/* Additive logit biases as CSR: row i owns entries offsets[i] .. offsets[i+1]-1,
 * each a token id in [0, vocab) (unique per row) and the value added to its
 * logit after the penalties; -INFINITY bans the token. Rows without entries
 * cost nothing. */
typedef struct {
    const int32_t *offsets;   /* [n_seq + 1] */
    const int32_t *ids;       /* [nnz] */
    const float *values;      /* [nnz] */
} pf_logit_bias;

typedef struct {
    int32_t *tokens;          /* [n_seq] */
    float *logprobs;          /* [n_seq] raw log-softmax of the chosen token */
    int32_t *top_ids;         /* [n_seq, n_top] best first */
    float *top_logprobs;      /* [n_seq, n_top] */
    int32_t n_top;            /* 0..vocab; cost grows with it, meant for <= 20 */
    /* [n_seq], or NULL for every row: rows with 0 skip the raw log-softmax
     * (most of a greedy row's cost), get logprob NaN and leave their top
     * entries alone. The tokens drawn do not depend on it. */
    const uint8_t *want_logprobs;
} pf_sample_out;

/* Allowed tokens per constrained row, as bitmasks: bit (t % 32) of word
 * bits[r * words + t / 32] is set when token t is allowed by mask r; tokens
 * at or past words * 32 are never allowed. Row i of the batch uses mask
 * mask_of[i], or none when mask_of[i] < 0. A row whose mask allows no token
 * gets token -1 (the caller decides what that means; it is a bug upstream). */
typedef struct {
    const uint32_t *bits;     /* [n_masks, words] */
    int32_t words;
    const int32_t *mask_of;   /* [n_seq] */
} pf_token_mask;

/* SplitMix64: advance *state (by PF_RNG_GAMMA), return the next 64-bit output. */
#define PF_RNG_GAMMA 0x9E3779B97F4A7C15ull
uint64_t pf_rng_next(uint64_t *state);

/* Uniform double in [0, 1) from the top 53 bits of one pf_rng_next. */
double pf_rng_uniform(uint64_t *state);

/* y = e^x for x <= 0 (the sampler's vectorised exp), exposed for tests. */
void pf_exp_nonpositive(const float *x, float *y, int32_t n);

/* Apply repetition / presence / frequency penalties to one row in place. */
void pf_apply_penalties(float *row, float repetition, float presence, float frequency,
                        const int32_t *ids, const int32_t *counts, int32_t n);

/* Sample one token per row of logits [n_seq, vocab] (row-major).
 * logits serve as scratch for the penalties and are restored bit-exactly
 * before returning, so the caller sees them unchanged; they must be writable.
 * bias: NULL when no row has a logit bias; mask: NULL when no row is constrained.
 * rng_state [n_seq] is advanced in place. n_threads <= 0: OpenMP's default.
 * Returns 0, or -1 when scratch memory could not be allocated. Thread-safe,
 * touches no global state, needs no GIL. */
int pf_sample(float *logits, int32_t n_seq, int32_t vocab,
              const pf_sampling_params *params, const pf_token_history *history,
              const pf_logit_bias *bias, const pf_token_mask *mask, uint64_t *rng_state,
              const pf_sample_out *out, int n_threads);

#endif /* PYFORGE_SAMPLER_KERNELS_H */
