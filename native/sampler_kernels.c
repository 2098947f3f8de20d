/* Batched token sampler kernels; the contract is in sampler_kernels.h. */
#include "sampler_kernels.h"

/* GCC keeps a loop with a float compare-and-select scalar while it must
 * preserve FP exception flags (-ftrapping-math, the default); nothing here
 * reads those flags, and without this the exp loops do not vectorise. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Below this many logits in a batch (~2 ms of work on one core: 128 rows of a
 * 32k vocabulary) the batch is sampled on one thread. A parallel region saves
 * less than that, and costs far more when the cores are shared: on the
 * serving machine the HTTP worker and the clients run beside the engine, and
 * a team waits at its barrier for any member the OS has put aside (a whole
 * time slice, milliseconds). */
#define PARALLEL_MIN_LOGITS (1 << 22)
/* Row scans keep this many independent partial results (max, sums, flags):
 * a single vector accumulator would wait on its own add or max every step. */
#define LANES 32
/* sum_exp adds float lanes over blocks this long, then each block in double. */
#define SUM_BLOCK 2048
/* Quickselect hands ranges this small to an insertion sort. */
#define SMALL_RANGE 16
/* Up to this k, top-k scans the logits with a sorted list instead of
 * weighing every token and quickselecting. */
#define SMALL_TOP_K 128

/* ---- RNG: SplitMix64 ---------------------------------------------------- */

uint64_t pf_rng_next(uint64_t *state)
{
    uint64_t z = (*state += PF_RNG_GAMMA);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double pf_rng_uniform(uint64_t *state)
{
    return (double)(pf_rng_next(state) >> 11) * 0x1.0p-53;
}

/* ---- exp ---------------------------------------------------------------- */

/* a * b + c: one fused instruction where the CPU has FMA. ISO C mode
 * (-std=c11) never contracts a * b + c by itself, so say it where it pays. */
#ifdef __FMA__
#define MADD(a, b, c) fmaf(a, b, c)
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

/* e^x for x <= 0, within 2 ulp; 0 from -87 down, where floats turn subnormal
 * (such tokens weigh < 1e-37 of the best one). libm's expf does not vectorise
 * without -ffast-math and was half the sampler's time; this one is plain C
 * the compiler turns into 8-wide AVX2 FMA. Cody-Waite reduction x = n ln2 + r,
 * |r| <= ln2 / 2, then a degree-6 Taylor polynomial (error r^7/7! < 2.4e-7). */
static inline float exp_nonpositive(float x)
{
    const float log2e = 1.44269504f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    const float round_magic = 12582912.0f;   /* 1.5 * 2^23: adding it rounds to an integer */
    float xc = x > -87.0f ? x : -87.0f;      /* -inf and NaN land here too */
    float n = MADD(xc, log2e, round_magic) - round_magic;
    float r = MADD(n, -ln2_lo, MADD(n, -ln2_hi, xc));
    float p = 1.0f / 720;
    p = MADD(p, r, 1.0f / 120);
    p = MADD(p, r, 1.0f / 24);
    p = MADD(p, r, 1.0f / 6);
    p = MADD(p, r, 0.5f);
    p = MADD(p, r, 1.0f);
    p = MADD(p, r, 1.0f);
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};   /* 2^n, n in [-126, 0] */
    return x > -87.0f ? p * scale.f : 0.0f;
}

void pf_exp_nonpositive(const float *x, float *y, int32_t n)
{
#pragma omp simd
    for (int32_t i = 0; i < n; i++)
        y[i] = exp_nonpositive(x[i]);
}

/* ---- raw logprobs ------------------------------------------------------- */

static float max_value(const float *row, int32_t vocab)
{
    float lane[LANES];
    for (int j = 0; j < LANES; j++)
        lane[j] = -INFINITY;
    int32_t i = 0;
    for (; i + LANES <= vocab; i += LANES) {
        const float *x = row + i;   /* x[j], not row[i + j]: -fwrapv (Python's flags) would keep that scalar */
        for (int j = 0; j < LANES; j++)
            lane[j] = x[j] > lane[j] ? x[j] : lane[j];
    }
    float m = -INFINITY;
    for (int j = 0; j < LANES; j++)
        m = lane[j] > m ? lane[j] : m;
    for (; i < vocab; i++)
        m = row[i] > m ? row[i] : m;
    return m;
}

/* First index holding `value` (the argmax when value is the max: ties go to
 * the lower id); 0 when none does (a NaN max). Finds the first LANES-long
 * stretch that holds it with vector compares, then the index in it. */
static int32_t first_index_of(const float *row, int32_t vocab, float value)
{
    int32_t i = 0;
    for (; i + LANES <= vocab; i += LANES) {
        const float *x = row + i;
        int hit = 0;
        for (int j = 0; j < LANES; j++)
            hit |= x[j] == value;
        if (hit)
            break;
    }
    for (; i < vocab; i++)
        if (row[i] == value)
            return i;
    return 0;
}

/* Sum of exp(x - max). Float lanes add at most SUM_BLOCK / LANES terms each
 * (all <= 1) before the block's total goes into a double: plain float sums
 * over 150k terms could drift past the 1e-5 we promise on logprobs. */
static double sum_exp(const float *row, int32_t vocab, float max)
{
    double total = 0.0;
    int32_t i = 0;
    while (i + LANES <= vocab) {
        float lane[LANES] = {0};
        int32_t end = vocab - i > SUM_BLOCK ? i + SUM_BLOCK : vocab;
        for (; i + LANES <= end; i += LANES) {
            const float *x = row + i;
            for (int j = 0; j < LANES; j++)
                lane[j] += exp_nonpositive(x[j] - max);
        }
        for (int j = 0; j < LANES; j++)
            total += lane[j];
    }
    for (; i < vocab; i++)
        total += exp_nonpositive(row[i] - max);
    return total;
}

/* Put (x, id) into the best-first list ids/vals[0..pos], shifting worse
 * entries down over slot pos. Ids arrive in increasing order and only a
 * strictly greater x moves up, so ties keep the lower id first. */
static void insert_sorted(int32_t *ids, float *vals, int32_t pos, float x, int32_t id)
{
    int32_t j = pos;
    for (; j > 0 && x > vals[j - 1]; j--) {
        vals[j] = vals[j - 1];
        ids[j] = ids[j - 1];
    }
    vals[j] = x;
    ids[j] = id;
}

/* The n largest logits, best first, in one pass. n is small (20 top logprobs,
 * SMALL_TOP_K for top-k), so a sorted list does, and most tokens fail the
 * first comparison. */
static void top_n(const float *row, int32_t vocab, int32_t n, int32_t *ids, float *vals)
{
    for (int32_t i = 0; i < n; i++)
        insert_sorted(ids, vals, i, row[i], i);
    for (int32_t i = n; i < vocab; i++)
        if (row[i] > vals[n - 1])
            insert_sorted(ids, vals, n - 1, row[i], i);
}

/* Chosen-token and top-n logprobs come from the unmodified model output (what
 * OpenAI and vLLM report by default). Fills top ids / logprobs; returns the
 * log-sum-exp of the row. */
static double raw_logprobs(const float *row, int32_t vocab, int32_t n_top,
                           int32_t *top_ids, float *top_logprobs, float *row_max)
{
    float max = *row_max = max_value(row, vocab);
    double lse = (double)max + log(sum_exp(row, vocab, max));
    if (n_top > 0) {
        top_n(row, vocab, n_top, top_ids, top_logprobs);
        for (int32_t j = 0; j < n_top; j++)
            top_logprobs[j] = (float)(top_logprobs[j] - lse);
    }
    return lse;
}

/* ---- penalties ---------------------------------------------------------- */

void pf_apply_penalties(float *row, float repetition, float presence, float frequency,
                        const int32_t *ids, const int32_t *counts, int32_t n)
{
    for (int32_t j = 0; j < n; j++) {
        float x = row[ids[j]];
        if (repetition != 1.0f)
            x = x > 0.0f ? x / repetition : x * repetition;
        if (counts[j] > 0) {   /* two steps, in vLLM's order, so rounding matches */
            x -= frequency * (float)counts[j];
            x -= presence;
        }
        row[ids[j]] = x;
    }
}

/* ---- candidate selection ------------------------------------------------ */

/* A token still in the running, with its unnormalised probability
 * w = exp((x - max) / T) in (0, 1]; the best token has w = 1 exactly. */
typedef struct {
    float w;
    int32_t id;
} cand_t;

/* Rank order: more probable first, ties to the lower id. It is total, so each
 * selection below is defined by the data alone, whatever the algorithm. */
static inline int ranks_above(cand_t a, cand_t b)
{
    /* bitwise, not short-circuit: partition runs it on random data, where
     * a branch would mispredict half the time */
    return (a.w > b.w) | ((a.w == b.w) & (a.id < b.id));
}

static inline void swap_cand(cand_t *a, cand_t *b)
{
    cand_t t = *a;
    *a = *b;
    *b = t;
}

static double sum_w(const cand_t *c, int32_t n)
{
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int32_t i = 0; i < n; i++)
        s += c[i].w;
    return s;
}

/* Partition c[lo, hi) around the median of its first, middle and last entries:
 * afterwards c[lo, p) rank above c[p] and c[p+1, hi) below it. Returns p. */
static int32_t partition(cand_t *c, int32_t lo, int32_t hi)
{
    int32_t mid = lo + (hi - lo) / 2, last = hi - 1;
    if (ranks_above(c[mid], c[lo]))
        swap_cand(&c[mid], &c[lo]);
    if (ranks_above(c[last], c[lo]))
        swap_cand(&c[last], &c[lo]);      /* c[lo] is now the best of three */
    if (ranks_above(c[mid], c[last]))
        swap_cand(&c[mid], &c[last]);     /* and the median sits at last */
    /* Branch-free Lomuto: always swap, advance p only past a winner. */
    cand_t pivot = c[last];
    int32_t p = lo;
    for (int32_t i = lo; i < last; i++) {
        cand_t x = c[i];
        c[i] = c[p];
        c[p] = x;
        p += ranks_above(x, pivot);
    }
    swap_cand(&c[p], &c[last]);
    return p;
}

static void sort_ranked(cand_t *c, int32_t n)
{
    for (int32_t i = 1; i < n; i++) {
        cand_t v = c[i];
        int32_t j = i;
        for (; j > 0 && ranks_above(v, c[j - 1]); j--)
            c[j] = c[j - 1];
        c[j] = v;
    }
}

/* Keep the candidates with w >= floor, in order. */
static int32_t drop_below(cand_t *c, int32_t n, double floor)
{
    int32_t kept = 0;
    for (int32_t i = 0; i < n; i++) {
        /* Branch-free: always write, advance past a keeper. Reading c[i]
         * before the write keeps the load off the store's dependency chain. */
        cand_t x = c[i];
        c[kept] = x;
        kept += x.w >= floor;
    }
    return kept;
}

/* Every token, weighed. Zero weights stay for now (dropped by `choose`, in
 * the one compaction pass). A separate loop so the exp vectorises. */
static void weigh_all(const float *row, int32_t vocab, float max, float temperature, cand_t *c)
{
#pragma omp simd
    for (int32_t i = 0; i < vocab; i++)
        c[i] = (cand_t){exp_nonpositive((row[i] - max) / temperature), i};
}

/* Small top-k: the k best logits in one pass (top_n), exp for those only.
 * Ranking by logit equals ranking by w except where two logits round to the
 * same w; a tie at the cut is then fair either way. */
static void weigh_top_k(const float *row, int32_t vocab, int32_t k, float max,
                        float temperature, cand_t *c)
{
    int32_t ids[SMALL_TOP_K];
    float vals[SMALL_TOP_K];
    top_n(row, vocab, k, ids, vals);
    for (int32_t j = 0; j < k; j++)
        c[j] = (cand_t){exp_nonpositive((vals[j] - max) / temperature), ids[j]};
}

/* Top-k: move the k best of c[0, n) to c[0, k), in no order. Quickselect,
 * O(n) expected, instead of sorting a 150k vocabulary. */
static void select_top(cand_t *c, int32_t n, int32_t k)
{
    int32_t lo = 0, hi = n;   /* c[0, lo) rank above c[lo, n); c[hi, n) below c[0, hi) */
    while (hi - lo > 1) {
        int32_t p = partition(c, lo, hi);
        if (p == k || p == k - 1)
            return;
        if (p < k)
            lo = p + 1;
        else
            hi = p;
    }
}

/* The top-k survivors (every token when k is off), weighed, in c[0, n). */
static int32_t top_k_candidates(const float *row, int32_t vocab, int32_t k, float max,
                                float temperature, cand_t *c)
{
    if (k <= 0 || k >= vocab) {
        weigh_all(row, vocab, max, temperature, c);
        return vocab;
    }
    if (k <= SMALL_TOP_K) {
        weigh_top_k(row, vocab, k, max, temperature, c);
    } else {
        weigh_all(row, vocab, max, temperature, c);
        select_top(c, vocab, k);
    }
    return k;
}

/* Top-p: the nucleus is the shortest best-first prefix whose mass reaches
 * target (so the token that crosses it is kept, as in HF and vLLM). Returns its
 * length L with those tokens moved to c[0, L); when all of c[0, n) falls
 * short, L = n. Quickselect on mass: a flat distribution's nucleus can be
 * most of the vocabulary, and this never sorts more than SMALL_RANGE entries. */
static int32_t select_nucleus(cand_t *c, int32_t n, double target)
{
    int32_t lo = 0, hi = n;
    double above = 0.0;   /* mass of c[0, lo), which all rank above c[lo, hi); < target */
    while (hi - lo > SMALL_RANGE) {
        int32_t p = partition(c, lo, hi);
        double upto = above + sum_w(c + lo, p - lo);   /* mass of c[0, p) */
        if (upto >= target) {
            hi = p;
        } else if (upto + c[p].w >= target) {
            return p + 1;
        } else {
            above = upto + c[p].w;
            lo = p + 1;
        }
    }
    sort_ranked(c + lo, hi - lo);
    for (int32_t i = lo; i < hi; i++) {
        above += c[i].w;
        if (above >= target)
            return i + 1;
    }
    return hi;
}

/* Inverse-CDF draw from the renormalised candidates, u in [0, 1). */
static int32_t draw(const cand_t *c, int32_t n, double u)
{
    double target = u * sum_w(c, n), acc = 0.0;
    for (int32_t i = 0; i < n - 1; i++) {
        acc += c[i].w;
        if (acc > target)
            return c[i].id;
    }
    return c[n - 1].id;
}

/* ---- one row ------------------------------------------------------------ */

/* The lowest weight worth keeping after top-k, from three floors that each
 * keep a best-first prefix (so applying them together, before the nucleus,
 * gives what applying them in order would):
 *   w > 0        a zero weight can never be drawn (-inf masks, NaN, underflow);
 *   min_p        w = p / p_max, the min-p rule; the best token (w = 1) stays;
 *   (1-top_p)*total/n
 *                tokens this light weigh less than (1 - top_p) * total all
 *                together, so the heavier ones alone reach the top-p target and
 *                hold the whole nucleus. Halved for rounding slack. With a
 *                peaked distribution this leaves a few dozen candidates. */
static double keep_floor(float top_p, float min_p, double total, int32_t n)
{
    double floor = FLT_TRUE_MIN;
    if (min_p > floor)
        floor = min_p;
    if (top_p < 1.0f && 0.5 * (1.0 - top_p) * total / n > floor)
        floor = 0.5 * (1.0 - top_p) * total / n;
    return floor;
}

/* The token for a row of penalised logits whose largest value is max, given
 * the row's uniform u. */
static int32_t choose(const float *row, int32_t vocab, float max, const pf_sampling_params *p, int32_t i,
                      double u, cand_t *cand)
{
    float t = p->temperature[i], top_p = p->top_p[i];
    if (!(t >= PF_GREEDY_TEMPERATURE) || !isfinite(max))
        return first_index_of(row, vocab, max);
    int32_t n = top_k_candidates(row, vocab, p->top_k[i], max, t, cand);
    double total = sum_w(cand, n);   /* top-p's mass is over the top-k survivors */
    n = drop_below(cand, n, keep_floor(top_p, p->min_p[i], total, n));
    if (top_p < 1.0f)
        n = select_nucleus(cand, n, top_p * total);
    return draw(cand, n, u);
}

typedef struct {
    cand_t *cand;   /* [vocab] */
    float *saved;   /* [longest history row + longest bias row] raw logits penalties and biases overwrite */
    float *masked;  /* [vocab] a constrained row's logits with disallowed ones -inf */
} scratch_t;

/* dst = src where the mask allows the token, -inf elsewhere (the row itself
 * stays untouched: the caller sees its logits unchanged). */
static void apply_mask(const float *src, int32_t vocab, const uint32_t *bits, int32_t words, float *dst)
{
    int32_t whole = vocab / 32 < words ? vocab / 32 : words;
    /* Word at a time: a grammar's mask is mostly all-clear words (structure) or
     * all-set ones (inside a string), and those two are plain fills and copies. */
    for (int32_t w = 0; w < whole; w++) {
        uint32_t m = bits[w];
        const float *s = src + (size_t)w * 32;
        float *d = dst + (size_t)w * 32;
        if (m == 0u) {
            for (int j = 0; j < 32; j++)
                d[j] = -INFINITY;
        } else if (m == ~0u) {
            memcpy(d, s, 32 * sizeof(float));
        } else {
            for (int j = 0; j < 32; j++)
                d[j] = (m >> j) & 1u ? s[j] : -INFINITY;
        }
    }
    for (int32_t t = whole * 32; t < vocab; t++)
        dst[t] = t < words * 32 && ((bits[t >> 5] >> (t & 31)) & 1u) ? src[t] : -INFINITY;
}

/* Greedy over a masked row without building the masked copy: the lowest allowed
 * id of the largest allowed logit; the lowest allowed id when no allowed logit
 * compares (all -inf or NaN); -1 when nothing is allowed. All-clear words cost
 * one test, all-set ones a 32-wide max. */
static int32_t masked_argmax(const float *row, int32_t vocab, const uint32_t *bits, int32_t words)
{
    int32_t whole = vocab / 32 < words ? vocab / 32 : words, best = -1, first = -1;
    float best_v = -INFINITY;
    for (int32_t w = 0; w < whole; w++) {
        uint32_t m = bits[w];
        const float *x = row + (size_t)w * 32;
        if (m == 0u)
            continue;
        if (first < 0)
            first = w * 32 + __builtin_ctz(m);
        if (m == ~0u) {
            float wm = -INFINITY;
            for (int j = 0; j < 32; j++)
                wm = x[j] > wm ? x[j] : wm;
            if (wm > best_v) {
                best_v = wm;
                best = w * 32 + first_index_of(x, 32, wm);
            }
            continue;
        }
        for (; m; m &= m - 1) {
            int j = __builtin_ctz(m);
            if (x[j] > best_v) {
                best_v = x[j];
                best = w * 32 + j;
            }
        }
    }
    int32_t covered = words * 32 < vocab ? words * 32 : vocab;
    for (int32_t t = whole * 32; t < covered; t++) {
        if (!((bits[t >> 5] >> (t & 31)) & 1u))
            continue;
        if (first < 0)
            first = t;
        if (row[t] > best_v) {
            best_v = row[t];
            best = t;
        }
    }
    return best >= 0 ? best : first;
}

/* The row's mask, or NULL when it is unconstrained. */
static const uint32_t *row_mask(const pf_token_mask *mask, int32_t i)
{
    if (mask == NULL || mask->mask_of[i] < 0)
        return NULL;
    return mask->bits + (size_t)mask->mask_of[i] * (size_t)mask->words;
}

static void sample_row(float *row, int32_t vocab, int32_t i, const pf_sampling_params *p,
                       const pf_token_history *h, const pf_logit_bias *bias, const pf_token_mask *mask,
                       uint64_t *rng_state, const pf_sample_out *out, scratch_t *s)
{
    size_t top_at = (size_t)i * (size_t)out->n_top;
    int want = out->want_logprobs == NULL || out->want_logprobs[i];
    float max;
    double lse = 0.0;
    if (want)
        lse = raw_logprobs(row, vocab, out->n_top, out->top_ids + top_at, out->top_logprobs + top_at, &max);
    else
        max = max_value(row, vocab);

    const int32_t *ids = h->ids + h->offsets[i], *counts = h->counts + h->offsets[i];
    int32_t n_hist = h->offsets[i + 1] - h->offsets[i];
    int32_t n_bias = bias != NULL ? bias->offsets[i + 1] - bias->offsets[i] : 0;
    const int32_t *bias_ids = n_bias ? bias->ids + bias->offsets[i] : NULL;
    const float *bias_values = n_bias ? bias->values + bias->offsets[i] : NULL;
    /* all saved before any is changed: a token in both lists (or twice) restores too */
    for (int32_t j = 0; j < n_hist; j++)
        s->saved[j] = row[ids[j]];
    for (int32_t j = 0; j < n_bias; j++)
        s->saved[n_hist + j] = row[bias_ids[j]];
    pf_apply_penalties(row, p->repetition_penalty[i], p->presence_penalty[i],
                       p->frequency_penalty[i], ids, counts, n_hist);
    for (int32_t j = 0; j < n_bias; j++)
        row[bias_ids[j]] += bias_values[j];

    double u = pf_rng_uniform(&rng_state[i]);   /* greedy rows step too: one step per call */
    const float *pick = row;
    const uint32_t *bits = row_mask(mask, i);
    int32_t token;
    if (bits != NULL && !(p->temperature[i] >= PF_GREEDY_TEMPERATURE)) {
        token = masked_argmax(row, vocab, bits, mask->words);
    } else {
        if (bits != NULL) {
            apply_mask(row, vocab, bits, mask->words, s->masked);
            pick = s->masked;
        }
        if (n_hist > 0 || n_bias > 0 || bits != NULL)   /* penalties, biases or the mask moved logits */
            max = max_value(pick, vocab);
        token = (bits != NULL && max == -INFINITY) ? -1 : choose(pick, vocab, max, p, i, u, s->cand);
    }

    for (int32_t j = 0; j < n_bias; j++)
        row[bias_ids[j]] = s->saved[n_hist + j];
    for (int32_t j = 0; j < n_hist; j++)
        row[ids[j]] = s->saved[j];
    out->tokens[i] = token;
    out->logprobs[i] = want && token >= 0 ? (float)(row[token] - lse) : NAN;
}

/* ---- the batch ---------------------------------------------------------- */

static int32_t longest_row(const int32_t *offsets, int32_t n_seq)
{
    int32_t m = 0;
    for (int32_t i = 0; i < n_seq; i++)
        if (offsets[i + 1] - offsets[i] > m)
            m = offsets[i + 1] - offsets[i];
    return m;
}

static int team_size(int32_t n_seq, int32_t vocab, int n_threads)
{
#ifdef _OPENMP
    int t = n_threads > 0 ? n_threads : omp_get_max_threads();
    if ((int64_t)n_seq * vocab < PARALLEL_MIN_LOGITS)
        t = 1;
    return t < n_seq ? t : (n_seq > 0 ? n_seq : 1);
#else
    (void)n_seq; (void)vocab; (void)n_threads;
    return 1;
#endif
}

static inline int thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* 1 if some row draws (is not greedy), so needs the candidate scratch. */
static int any_draws(const float *temperature, int32_t n_seq)
{
    for (int32_t i = 0; i < n_seq; i++)
        if (temperature[i] >= PF_GREEDY_TEMPERATURE)
            return 1;
    return 0;
}

/* 1 if some row has a mask, so needs the masked-row scratch. */
static int any_masked(const pf_token_mask *mask, int32_t n_seq)
{
    for (int32_t i = 0; mask != NULL && i < n_seq; i++)
        if (mask->mask_of[i] >= 0)
            return 1;
    return 0;
}

int pf_sample(float *logits, int32_t n_seq, int32_t vocab,
              const pf_sampling_params *params, const pf_token_history *history,
              const pf_logit_bias *bias, const pf_token_mask *mask, uint64_t *rng_state,
              const pf_sample_out *out, int n_threads)
{
    int team = team_size(n_seq, vocab, n_threads);
    size_t n_saved = (size_t)longest_row(history->offsets, n_seq) + 1
                     + (bias != NULL ? (size_t)longest_row(bias->offsets, n_seq) : 0);
    /* greedy rows never touch candidates: an all-greedy batch skips the
     * (vocab-sized, so mmap'd) block */
    size_t n_cand = any_draws(params->temperature, n_seq) ? (size_t)vocab : 0;
    /* One block per call, carved per thread, allocated before the parallel
     * region so a failed malloc cannot strand threads at a worksharing loop. */
    cand_t *cand = n_cand ? malloc((size_t)team * n_cand * sizeof(cand_t)) : NULL;
    float *saved = malloc((size_t)team * n_saved * sizeof(float));
    size_t n_masked = any_masked(mask, n_seq) ? (size_t)vocab : 0;
    float *masked = n_masked ? malloc((size_t)team * n_masked * sizeof(float)) : NULL;
    if ((n_cand && !cand) || !saved || (n_masked && !masked)) {
        free(cand);
        free(saved);
        free(masked);
        return -1;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(team) if (team > 1)
    for (int32_t i = 0; i < n_seq; i++) {
        int tid = thread_id();
        scratch_t s = {cand ? cand + (size_t)tid * n_cand : NULL, saved + (size_t)tid * n_saved,
                       masked ? masked + (size_t)tid * n_masked : NULL};
        sample_row(logits + (size_t)i * (size_t)vocab, vocab, i, params, history, bias, mask, rng_state, out, &s);
    }
    free(cand);
    free(saved);
    free(masked);
    return 0;
}
