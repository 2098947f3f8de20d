# cython: language_level=3, boundscheck=False, wraparound=False
"""Batched token sampler over the C kernels in sampler_kernels.c.

One `sample` call covers a whole engine step: raw logprobs, penalties, then
greedy or temperature / top-k / top-p / min-p and one draw from each row's
own SplitMix64 state. Arguments are checked here, with the GIL; the kernel
then runs without it, rows in parallel under OpenMP. The contract (order of
operations, RNG, tie rules) is written down in sampler_kernels.h.
"""
import numpy as np

from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc


cdef extern from "sampler_kernels.h" nogil:
    ctypedef struct pf_sampling_params:
        const float *temperature
        const int32_t *top_k
        const float *top_p
        const float *min_p
        const float *repetition_penalty
        const float *presence_penalty
        const float *frequency_penalty

    ctypedef struct pf_token_history:
        const int32_t *offsets
        const int32_t *ids
        const int32_t *counts

    ctypedef struct pf_logit_bias:
        const int32_t *offsets
        const int32_t *ids
        const float *values

    ctypedef struct pf_token_mask:
        const uint32_t *bits
        int32_t words
        const int32_t *mask_of

    ctypedef struct pf_sample_out:
        int32_t *tokens
        float *logprobs
        int32_t *top_ids
        float *top_logprobs
        int32_t n_top
        const uint8_t *want_logprobs

    uint64_t pf_rng_next(uint64_t *state)
    void pf_exp_nonpositive(const float *x, float *y, int32_t n)
    void pf_apply_penalties(float *row, float repetition, float presence, float frequency,
                            const int32_t *ids, const int32_t *counts, int32_t n)
    int pf_sample(float *logits, int32_t n_seq, int32_t vocab,
                  const pf_sampling_params *params, const pf_token_history *history,
                  const pf_logit_bias *bias, const pf_token_mask *mask, uint64_t *rng_state,
                  const pf_sample_out *out, int n_threads)


cdef int32_t _NO_TOKENS[1]


def _check_len(name, Py_ssize_t got, Py_ssize_t want):
    if got != want:
        raise ValueError(f"{name} has {got} entries; expected {want}")


cdef _check_csr(str name, const int32_t[::1] offsets, const int32_t[::1] ids, str values,
                Py_ssize_t n_values, Py_ssize_t n_seq, Py_ssize_t vocab):
    """Check CSR rows over token ids (the kernel indexes logits with them), with
    `values` (its name) holding one entry per id."""
    _check_len(f"{name}_offsets", offsets.shape[0], n_seq + 1)
    _check_len(values, n_values, ids.shape[0])
    cdef Py_ssize_t i
    if offsets[0] != 0 or offsets[n_seq] != ids.shape[0]:
        raise ValueError(f"{name}_offsets must start at 0 and end at len({name}_ids)")
    for i in range(n_seq):
        if offsets[i + 1] < offsets[i]:
            raise ValueError(f"{name}_offsets decrease at row {i}")
    for i in range(ids.shape[0]):
        if not 0 <= ids[i] < vocab:
            raise ValueError(f"{name}_ids[{i}] = {ids[i]} is outside the vocabulary (0..{vocab - 1})")


cdef pf_token_history _history(const int32_t[::1] offsets, const int32_t[::1] ids,
                               const int32_t[::1] counts, Py_ssize_t n_seq, Py_ssize_t vocab) except *:
    """Check the CSR history and view it."""
    _check_csr("history", offsets, ids, "history_counts", counts.shape[0], n_seq, vocab)
    cdef pf_token_history h
    h.offsets = &offsets[0]
    # an empty history still gets valid pointers: the kernel adds offsets to them
    h.ids = &ids[0] if ids.shape[0] else _NO_TOKENS
    h.counts = &counts[0] if counts.shape[0] else _NO_TOKENS
    return h


def sample(float[:, ::1] logits,
           const float[::1] temperature, const int32_t[::1] top_k, const float[::1] top_p,
           const float[::1] min_p, const float[::1] repetition_penalty,
           const float[::1] presence_penalty, const float[::1] frequency_penalty,
           const int32_t[::1] history_offsets, const int32_t[::1] history_ids,
           const int32_t[::1] history_counts, uint64_t[::1] rng_state,
           int n_top_logprobs=0, int n_threads=0, const uint8_t[::1] want_logprobs=None,
           const uint32_t[:, ::1] mask_bits=None, const int32_t[::1] mask_of=None,
           const int32_t[::1] bias_offsets=None, const int32_t[::1] bias_ids=None,
           const float[::1] bias_values=None):
    """Sample one token for each row of logits.

    logits              f32[n_seq, vocab], C-contiguous and writable: penalties
                        are applied in place and undone bit-exactly before return,
                        so the caller sees the array unchanged.
    temperature ...     one entry per row (f32, top_k int32). temperature < 1e-5
                        is greedy; top_k <= 0, top_p >= 1, min_p <= 0 disable
                        their filter; repetition 1, presence / frequency 0 none.
    history_*           CSR over rows: offsets int32[n_seq + 1]; ids int32[nnz],
                        tokens seen in prompt or output (unique per row); counts
                        int32[nnz], occurrences in the output (0: prompt only).
    rng_state           uint64[n_seq], advanced one step per row, in place.
    n_top_logprobs      K, how many top raw logprobs to return per row.
    n_threads           OpenMP threads; 0 takes OpenMP's default.
    want_logprobs       uint8[n_seq] or None (every row): rows with 0 skip the
                        raw log-softmax; their logprob is NaN and their top
                        lists stay 0. Tokens do not depend on it.
    mask_bits, mask_of  allowed-token bitmasks uint32[n_masks, words] (bit t % 32
                        of word t / 32: token t allowed) and, per row, the index
                        of its mask or -1 for none (int32[n_seq]); both or
                        neither. A row whose mask allows nothing gets token -1.
    bias_*              logit biases, CSR over rows like the history: offsets
                        int32[n_seq + 1]; ids int32[nnz] (unique per row);
                        values f32[nnz], added to the penalised logits (-inf
                        bans a token); all three or none.

    Returns (tokens int32[n_seq], logprobs f32[n_seq] (raw, of the chosen
    token), top_ids int32[n_seq, K], top_logprobs f32[n_seq, K]), top lists
    best first with ties to the lower id.
    """
    cdef Py_ssize_t n_seq = logits.shape[0], vocab = logits.shape[1], i
    if vocab < 1:
        raise ValueError("logits have an empty vocabulary axis")
    if not 0 <= n_top_logprobs <= vocab:
        raise ValueError(f"n_top_logprobs = {n_top_logprobs} must lie in 0..{vocab}")
    for name, arr in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                      ("min_p", min_p), ("repetition_penalty", repetition_penalty),
                      ("presence_penalty", presence_penalty),
                      ("frequency_penalty", frequency_penalty), ("rng_state", rng_state)):
        _check_len(name, arr.shape[0], n_seq)
    if want_logprobs is not None:
        _check_len("want_logprobs", want_logprobs.shape[0], n_seq)
    cdef pf_token_history history = _history(history_offsets, history_ids, history_counts,
                                             n_seq, vocab)
    cdef pf_logit_bias bias
    cdef pf_logit_bias *bias_ptr = NULL
    if not (bias_offsets is None) == (bias_ids is None) == (bias_values is None):
        raise ValueError("bias_offsets, bias_ids and bias_values go together")
    if bias_offsets is not None:
        _check_csr("bias", bias_offsets, bias_ids, "bias_values", bias_values.shape[0], n_seq, vocab)
        if bias_ids.shape[0]:
            bias.offsets = &bias_offsets[0]
            bias.ids = &bias_ids[0]
            bias.values = &bias_values[0]
            bias_ptr = &bias
    cdef pf_token_mask mask
    cdef pf_token_mask *mask_ptr = NULL
    if (mask_bits is None) != (mask_of is None):
        raise ValueError("mask_bits and mask_of go together")
    if mask_of is not None:
        _check_len("mask_of", mask_of.shape[0], n_seq)
        for i in range(n_seq):
            if not -1 <= mask_of[i] < mask_bits.shape[0]:
                raise ValueError(f"mask_of[{i}] = {mask_of[i]} names no mask (0..{mask_bits.shape[0] - 1})")
        if mask_bits.shape[0] and mask_bits.shape[1] < 1:
            raise ValueError("mask_bits rows must hold at least one word")
        if mask_bits.shape[0]:
            mask.bits = &mask_bits[0, 0]
            mask.words = <int32_t>mask_bits.shape[1]
            mask.mask_of = &mask_of[0]
            mask_ptr = &mask

    tokens = np.zeros(n_seq, dtype=np.int32)
    logprobs = np.zeros(n_seq, dtype=np.float32)
    top_ids = np.zeros((n_seq, n_top_logprobs), dtype=np.int32)
    top_logprobs = np.zeros((n_seq, n_top_logprobs), dtype=np.float32)
    if n_seq == 0:
        return tokens, logprobs, top_ids, top_logprobs

    cdef int32_t[::1] tokens_v = tokens
    cdef float[::1] logprobs_v = logprobs
    cdef int32_t[:, ::1] top_ids_v = top_ids
    cdef float[:, ::1] top_logprobs_v = top_logprobs
    cdef pf_sampling_params params
    params.temperature = &temperature[0]
    params.top_k = &top_k[0]
    params.top_p = &top_p[0]
    params.min_p = &min_p[0]
    params.repetition_penalty = &repetition_penalty[0]
    params.presence_penalty = &presence_penalty[0]
    params.frequency_penalty = &frequency_penalty[0]
    cdef pf_sample_out out
    out.tokens = &tokens_v[0]
    out.logprobs = &logprobs_v[0]
    out.top_ids = &top_ids_v[0, 0] if n_top_logprobs else NULL
    out.top_logprobs = &top_logprobs_v[0, 0] if n_top_logprobs else NULL
    out.n_top = n_top_logprobs
    out.want_logprobs = &want_logprobs[0] if want_logprobs is not None else NULL

    cdef int rc
    with nogil:
        rc = pf_sample(&logits[0, 0], <int32_t>n_seq, <int32_t>vocab, &params, &history,
                       bias_ptr, mask_ptr, &rng_state[0], &out, n_threads)
    if rc != 0:
        raise MemoryError("sampler scratch allocation failed")
    return tokens, logprobs, top_ids, top_logprobs


def sample_greedy(float[:, ::1] logits, uint64_t[::1] rng_state, const uint8_t[::1] want_logprobs=None,
                  int n_threads=0):
    """`sample` for rows that are all greedy with no penalties, biases, masks or top
    logprobs: the same kernel on parameter columns made here (temperature 0, no filters,
    no history), so the same tokens, logprobs and RNG steps, without the thirteen
    arrays the general call checks (on a small model that call was most of a step's
    sampling). Returns (tokens int32[n_seq], logprobs f32[n_seq])."""
    cdef Py_ssize_t n_seq = logits.shape[0], vocab = logits.shape[1], i
    if vocab < 1:
        raise ValueError("logits have an empty vocabulary axis")
    _check_len("rng_state", rng_state.shape[0], n_seq)
    if want_logprobs is not None:
        _check_len("want_logprobs", want_logprobs.shape[0], n_seq)
    tokens, logprobs = np.empty(n_seq, dtype=np.int32), np.empty(n_seq, dtype=np.float32)
    if n_seq == 0:
        return tokens, logprobs
    cdef int32_t[::1] tokens_v = tokens
    cdef float[::1] logprobs_v = logprobs
    cdef float *floats = <float *>malloc(3 * n_seq * sizeof(float))    # zeros, ones, ones
    cdef int32_t *ints = <int32_t *>calloc(2 * n_seq + 1, sizeof(int32_t))  # top_k, history offsets: zeros
    if floats == NULL or ints == NULL:
        free(floats)
        free(ints)
        raise MemoryError("sampler parameter columns")
    for i in range(n_seq):
        floats[i], floats[n_seq + i], floats[2 * n_seq + i] = 0.0, 1.0, 1.0
    cdef pf_sampling_params params
    params.temperature = params.min_p = params.presence_penalty = params.frequency_penalty = floats
    params.top_p = floats + n_seq
    params.repetition_penalty = floats + 2 * n_seq
    params.top_k = ints
    cdef pf_token_history history
    history.offsets, history.ids, history.counts = ints + n_seq, _NO_TOKENS, _NO_TOKENS
    cdef pf_sample_out out
    out.tokens, out.logprobs, out.top_ids, out.top_logprobs, out.n_top = &tokens_v[0], &logprobs_v[0], NULL, NULL, 0
    out.want_logprobs = &want_logprobs[0] if want_logprobs is not None else NULL
    cdef int rc
    with nogil:
        rc = pf_sample(&logits[0, 0], <int32_t>n_seq, <int32_t>vocab, &params, &history, NULL, NULL,
                       &rng_state[0], &out, n_threads)
    free(floats)
    free(ints)
    if rc != 0:
        raise MemoryError("sampler scratch allocation failed")
    return tokens, logprobs


def apply_penalties(float[:, ::1] logits, const float[::1] repetition_penalty,
                    const float[::1] presence_penalty, const float[::1] frequency_penalty,
                    const int32_t[::1] history_offsets, const int32_t[::1] history_ids,
                    const int32_t[::1] history_counts):
    """Apply the penalties `sample` applies, in place (for tests and debugging).

    Same argument conventions as `sample`.
    """
    cdef Py_ssize_t n_seq = logits.shape[0], vocab = logits.shape[1], i
    for name, arr in (("repetition_penalty", repetition_penalty),
                      ("presence_penalty", presence_penalty),
                      ("frequency_penalty", frequency_penalty)):
        _check_len(name, arr.shape[0], n_seq)
    cdef pf_token_history h = _history(history_offsets, history_ids, history_counts, n_seq, vocab)
    with nogil:
        for i in range(n_seq):
            pf_apply_penalties(&logits[i, 0], repetition_penalty[i], presence_penalty[i],
                               frequency_penalty[i], h.ids + h.offsets[i], h.counts + h.offsets[i],
                               h.offsets[i + 1] - h.offsets[i])


def rng_next(uint64_t state):
    """One SplitMix64 step: (output, new_state), for tests against reference values."""
    cdef uint64_t s = state
    cdef uint64_t value = pf_rng_next(&s)
    return value, s


def exp_nonpositive(const float[::1] x):
    """The kernel's e^x (valid for x <= 0) over an array, for accuracy tests."""
    y = np.empty(x.shape[0], dtype=np.float32)
    cdef float[::1] y_v = y
    if x.shape[0]:
        with nogil:
            pf_exp_nonpositive(&x[0], &y_v[0], <int32_t>x.shape[0])
    return y
