"""The native batched sampler against external references: numpy argmax /
log_softmax / argsort, the OpenAI penalty formula, Hugging Face's logits
processors, Rosetta Code's SplitMix64 outputs, and float64 distributions.

Statistical tests use fixed seeds, so they are deterministic: a correct
sampler passes them every run, a wrong one fails them every run."""
import numpy as np
import pytest
from conftest import require_module

from pyforge.engine.sampler import Sampler
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.sequence import Sequence
from pyforge.native import sampler as ns

GOLDEN_GAMMA = 0x9E3779B97F4A7C15   # SplitMix64's state increment
U64 = (1 << 64) - 1


def no_history(n):
    return np.zeros(n + 1, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32)


def history_csr(rows):
    """rows: [(prompt ids, output ids)] -> (offsets, unique ids, output counts)."""
    ids, counts, offsets = [], [], [0]
    for prompt, output in rows:
        seen = np.unique(np.concatenate([prompt, output]))
        ids.append(seen)
        counts.append(np.array([np.count_nonzero(np.asarray(output) == t) for t in seen]))
        offsets.append(offsets[-1] + len(seen))
    return (np.array(offsets, np.int32), np.concatenate(ids).astype(np.int32),
            np.concatenate(counts).astype(np.int32))


def sample(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
           presence_penalty=0.0, frequency_penalty=0.0, history=None, seeds=0, n_top=0, n_threads=0,
           want_logprobs=None, mask_bits=None, mask_of=None):
    """Call the kernel, broadcasting scalar params over rows. Returns
    (tokens, logprobs, top_ids, top_logprobs, rng_state after)."""
    n = logits.shape[0]

    def rows(value, dtype):
        return np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=dtype), (n,)))

    state = rows(seeds, np.uint64).copy()
    out = ns.sample(
        logits, rows(temperature, np.float32), rows(top_k, np.int32), rows(top_p, np.float32),
        rows(min_p, np.float32), rows(repetition_penalty, np.float32),
        rows(presence_penalty, np.float32), rows(frequency_penalty, np.float32),
        *(history if history is not None else no_history(n)), state,
        n_top_logprobs=n_top, n_threads=n_threads,
        want_logprobs=None if want_logprobs is None else np.asarray(want_logprobs, np.uint8),
        mask_bits=mask_bits, mask_of=None if mask_of is None else np.asarray(mask_of, np.int32),
    )
    return (*out, state)


def log_softmax64(logits):
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ---- RNG ---------------------------------------------------------------------

def test_rng_is_splitmix64():
    # Rosetta Code, "Pseudo-random numbers/Splitmix64": the first five outputs for seed 1234567
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423,
                4593380528125082431, 16408922859458223821]
    state, got = 1234567, []
    for _ in expected:
        value, state = ns.rng_next(state)
        got.append(value)
    assert got == expected


def test_every_row_advances_one_step_greedy_included():
    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32)
    seeds = np.array([0, 1, U64, 12345], np.uint64)
    *_, state = sample(logits, temperature=[0.0, 1.0, 0.7, 0.0], seeds=seeds)
    assert state.tolist() == [(int(s) + GOLDEN_GAMMA) & U64 for s in seeds]


# ---- greedy and logprobs -------------------------------------------------------

def test_greedy_is_numpy_argmax_ties_to_lowest_id():
    logits = (np.random.default_rng(1).standard_normal((64, 5000)) * 4).astype(np.float32)
    logits[3, [10, 20, 30]] = logits[3].max() + 1     # a three-way tie
    logits[4, :] = 0.0                               # all tied
    logits[5, :100] = -np.inf
    tokens, *_ = sample(logits, temperature=0.0)
    np.testing.assert_array_equal(tokens, logits.argmax(axis=1))
    assert tokens[3] == 10 and tokens[4] == 0
    tiny_t, *_ = sample(logits, temperature=1e-6)   # below 1e-5 counts as greedy (vLLM)
    np.testing.assert_array_equal(tiny_t, tokens)


def test_the_greedy_entry_is_the_general_call():
    """sample_greedy (all rows greedy, no penalties, biases, masks or top logprobs) gives the
    general call's tokens, logprobs and RNG states bit for bit, rows with and without logprobs."""
    logits = (np.random.default_rng(2).standard_normal((9, 3000)) * 3).astype(np.float32)
    logits[1, [7, 70]] = logits[1].max() + 1
    logits[2, :1500] = np.nan
    want = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0], np.uint8)
    seeds = np.arange(9, dtype=np.uint64) * 977
    for wants in (None, want):
        tokens, logprobs, _, _, state = sample(logits, temperature=0.0, seeds=seeds, want_logprobs=wants, n_threads=2)
        fast_state = seeds.copy()
        fast_tokens, fast_logprobs = ns.sample_greedy(logits, fast_state, wants, n_threads=2)
        np.testing.assert_array_equal(fast_tokens, tokens)
        np.testing.assert_array_equal(fast_logprobs, logprobs)      # NaN where not wanted, on both
        np.testing.assert_array_equal(fast_state, state)
    assert ns.sample_greedy(logits[:0], np.zeros(0, np.uint64))[0].shape == (0,)
    with pytest.raises(ValueError, match="rng_state has 2 entries"):
        ns.sample_greedy(logits, np.zeros(2, np.uint64))


@pytest.mark.parametrize("vocab", [32000, 151936])
def test_logprobs_are_log_softmax_of_the_raw_logits(vocab):
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((6, vocab)) * 6 + 30).astype(np.float32)   # offset: stability
    logits[1, rng.choice(vocab, vocab // 2, replace=False)] = -np.inf      # a grammar-style mask
    # penalties must not leak into the reported logprobs
    hist = history_csr([(rng.integers(0, vocab, 50), rng.integers(0, vocab, 20)) for _ in range(6)])
    temperature = [0.0, 1.0, 0.7, 1.3, 0.0, 1.0]
    tokens, logprobs, top_ids, top_lps, _ = sample(
        logits, temperature=temperature, top_p=0.9, repetition_penalty=1.3, frequency_penalty=0.5,
        history=hist, seeds=np.arange(6), n_top=20)
    ref = log_softmax64(logits)
    rows = np.arange(6)
    np.testing.assert_allclose(logprobs, ref[rows, tokens], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(top_ids, np.argsort(-ref, axis=1, kind="stable")[:, :20])
    np.testing.assert_allclose(top_lps, np.take_along_axis(ref, top_ids, axis=1), rtol=0, atol=1e-5)
    assert np.isfinite(logits[1, tokens[1]])


def test_rows_that_want_no_logprobs_draw_the_same_tokens():
    rng = np.random.default_rng(12)
    logits = (rng.standard_normal((8, 4000)) * 3).astype(np.float32)
    hist = history_csr([(rng.integers(0, 4000, 20), rng.integers(0, 4000, 5)) for _ in range(8)])
    params = dict(temperature=[0.0, 0.8, 0.0, 1.2, 0.0, 0.5, 0.0, 1.0], top_k=[0, 50, 0, 0, 5, 0, 0, 20],
                  top_p=0.95, repetition_penalty=[1.0, 1.3, 1.0, 1.0, 1.2, 1.0, 1.0, 1.0], history=hist,
                  seeds=np.arange(8), n_top=4)
    want = [1, 0, 0, 1, 0, 1, 0, 0]
    full = sample(logits, **params)
    some = sample(logits, want_logprobs=want, **params)
    np.testing.assert_array_equal(some[0], full[0])                  # tokens
    np.testing.assert_array_equal(some[4], full[4])                  # rng states
    w = np.array(want, bool)
    np.testing.assert_array_equal(some[1][w], full[1][w])
    assert np.isnan(some[1][~w]).all()
    np.testing.assert_array_equal(some[2][w], full[2][w])
    np.testing.assert_array_equal(some[3][w], full[3][w])
    with pytest.raises(ValueError, match="want_logprobs"):
        sample(logits, want_logprobs=[1, 0], **params)


def test_top_logprob_ties_go_to_the_lower_id():
    logits = np.array([[1, 3, 3, 2, 3, 0, 3]], np.float32)
    _, _, top_ids, top_lps, _ = sample(logits, n_top=6)
    assert top_ids[0].tolist() == np.argsort(-logits[0], kind="stable")[:6].tolist() == [1, 2, 4, 6, 3, 0]
    np.testing.assert_allclose(top_lps[0], log_softmax64(logits)[0, top_ids[0]], atol=1e-6)
    _, _, top_ids, _, _ = sample(np.array([[3, 3, 3, 1]], np.float32), n_top=2)
    assert top_ids[0].tolist() == [0, 1]


@pytest.mark.parametrize("case, cut", [(dict(top_k=40), 40), (dict(top_k=300), 300), (dict(top_p=0.45), 270)])
def test_filter_ties_go_to_the_lower_id(case, cut):
    tokens, *_ = sample(np.zeros((3000, 600), np.float32), seeds=np.arange(3000), **case)
    assert tokens.max() == cut - 1 and tokens.min() == 0


def test_logits_are_left_unchanged():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((8, 300)).astype(np.float32)
    before = logits.copy()
    hist = history_csr([(rng.integers(0, 300, 40), rng.integers(0, 300, 40)) for _ in range(8)])
    sample(logits, repetition_penalty=1.7, presence_penalty=1.0, frequency_penalty=-0.5,
           history=hist, top_k=5, top_p=0.8)
    assert logits.tobytes() == before.tobytes()


def test_exp_kernel_is_accurate():
    x = np.concatenate([np.linspace(-86.9, 0, 200_001), [-1e-7, -87.5, -1e4, -np.inf]]).astype(np.float32)
    y = ns.exp_nonpositive(x)
    ref = np.exp(x.astype(np.float64))
    finite = x > -87
    np.testing.assert_allclose(y[finite], ref[finite], rtol=3 * 2.0 ** -23, atol=0)
    assert not y[~finite].any()


# ---- penalties ---------------------------------------------------------------

def penalty_case(seed=3, n=8, vocab=300):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, vocab)) * 3).astype(np.float32)
    logits[:, 0] = 0.0   # the x > 0 / x <= 0 split at exactly zero
    rows = [(rng.integers(0, 60, 30), rng.integers(0, 60, rng.integers(0, 40))) for _ in range(n)]
    rows[0] = (rows[0][0], np.zeros(0, np.int64))    # nothing generated yet
    rows[1] = (np.array([0, 5]), np.array([5, 5, 0, 7]))
    rep = rng.uniform(0.5, 2.0, n).astype(np.float32)
    rep[2] = 1.0
    pres = rng.uniform(-2, 2, n).astype(np.float32)
    freq = rng.uniform(-2, 2, n).astype(np.float32)
    return logits, rows, rep, pres, freq


def test_penalties_match_hf_repetition_and_openai_formulas():
    logits, rows, rep, pres, freq = penalty_case()
    got = logits.copy()
    ns.apply_penalties(got, rep, pres, freq, *history_csr(rows))
    want = logits.astype(np.float64)
    for i, (prompt, output) in enumerate(rows):
        seen = np.unique(np.concatenate([prompt, output])).astype(np.int64)
        score = want[i, seen]   # HF RepetitionPenaltyLogitsProcessor: gather, scale, scatter
        want[i, seen] = np.where(score < 0, score * rep[i], score / rep[i])
        counts = np.bincount(np.asarray(output, np.int64), minlength=logits.shape[1])
        want[i] -= counts * freq[i] + (counts > 0) * pres[i]   # OpenAI's formula
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_repetition_penalty_matches_transformers():
    torch = require_module("torch")
    lp = require_module("transformers.generation.logits_process")
    logits, rows, rep, _, _ = penalty_case(seed=4)
    zeros = np.zeros(len(rows), np.float32)
    got = logits.copy()
    ns.apply_penalties(got, rep, zeros, zeros, *history_csr(rows))
    for i, (prompt, output) in enumerate(rows):
        ids = torch.tensor(np.concatenate([prompt, output]).astype(np.int64))[None]
        processor = lp.RepetitionPenaltyLogitsProcessor(penalty=float(rep[i]))
        want = processor(ids, torch.tensor(logits[i : i + 1].copy()))[0].numpy()
        np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6)


def test_penalties_flip_the_greedy_choice():
    logits = np.array([[5.0, 4.9, 1.0, -1.0]], np.float32)
    hist = history_csr([([0], [0, 0])])
    tokens, *_ = sample(logits, temperature=0.0, frequency_penalty=0.1, history=hist)
    assert tokens[0] == 1


def test_history_is_checked():
    logits = np.zeros((2, 10), np.float32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(logits, history=history_csr([([1], [10]), ([], [])]))
    with pytest.raises(ValueError, match="history_offsets"):
        sample(logits, history=(np.array([0, 2, 1], np.int32), np.zeros(1, np.int32), np.zeros(1, np.int32)))
    with pytest.raises(ValueError, match="top_k"):
        ns.sample(logits, *[np.ones(2, np.float32)], np.zeros(3, np.int32), *[np.ones(2, np.float32)] * 5,
                  *no_history(2), np.zeros(2, np.uint64))


# ---- distributions -------------------------------------------------------------

LOGITS8 = np.array([2.0, 1.6, 1.1, 0.7, 0.2, -0.4, -1.0, -2.5])


def expected_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Float64 reference: temperature, top-k, top-p over the top-k survivors
    renormalised (the token crossing top_p is kept), then min-p."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-z, kind="stable")
    if 0 < top_k < len(z):
        p[order[top_k:]] = 0
        p /= p.sum()
    if top_p < 1:
        ranked = p[order]
        p[order[np.cumsum(ranked) - ranked >= top_p]] = 0
        p /= p.sum()
    if min_p > 0:
        p[p < min_p * p.max()] = 0
        p /= p.sum()
    return p


def assert_distribution(tokens, probs):
    """Filtered tokens never drawn; chi-square over the rest below df + 6 sd.
    Seeds are fixed, so this is deterministic; a correct sampler sits near df."""
    counts = np.bincount(tokens, minlength=len(probs))
    assert counts[probs == 0].sum() == 0, "drew a token the filters remove"
    support = probs > 0
    expected = probs[support] * len(tokens)
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    df = max(int(support.sum()) - 1, 1)
    assert chi2 < df + 6 * np.sqrt(2 * df), f"chi2 {chi2:.1f} for {df} degrees of freedom"


CASES = [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=1.5, top_k=3),
    dict(top_p=0.75),
    dict(min_p=0.2),
    dict(temperature=0.8, top_k=3, top_p=0.8),   # top-p over the top-k survivors: 2 tokens, not 3
    dict(top_p=0.75, min_p=0.3),                 # min-p after top-p: 3 tokens, not 2
]


def case_id(case):
    return ",".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_small_vocab_distribution(case):
    n = 20_000
    logits = np.ascontiguousarray(np.broadcast_to(LOGITS8.astype(np.float32), (n, 8)))
    tokens, *_ = sample(logits, seeds=np.arange(n) * 7919 + 11, **case)
    assert_distribution(tokens, expected_probs(LOGITS8, **case))


def test_reference_distribution_matches_transformers_warpers():
    torch = require_module("torch")
    lp = require_module("transformers.generation.logits_process")
    for case in CASES:
        scores = torch.tensor(LOGITS8[None], dtype=torch.float64)
        warpers = [lp.TemperatureLogitsWarper(case.get("temperature", 1.0))]
        if case.get("top_k"):
            warpers.append(lp.TopKLogitsWarper(case["top_k"]))
        if case.get("top_p"):
            warpers.append(lp.TopPLogitsWarper(case["top_p"]))
        if case.get("min_p"):
            warpers.append(lp.MinPLogitsWarper(case["min_p"]))
        for warper in warpers:
            scores = warper(None, scores)
        hf = torch.softmax(scores, dim=-1)[0].numpy()
        np.testing.assert_allclose(expected_probs(LOGITS8, **case), hf, atol=1e-9)


@pytest.mark.parametrize("case", [
    dict(top_p=0.6),                     # nucleus of ~150: the quickselect path
    dict(temperature=0.7, top_k=40),     # small k: one scan with a sorted list
    dict(top_k=300),                     # large k: quickselect
    dict(top_k=300, top_p=0.7, min_p=0.05),
], ids=case_id)
def test_large_vocab_distribution(case):
    n, vocab = 12_000, 600
    row = np.random.default_rng(5).standard_normal(vocab).astype(np.float32)
    logits = np.ascontiguousarray(np.broadcast_to(row, (n, vocab)))
    tokens, *_ = sample(logits, seeds=np.arange(n) + 10**9, **case)
    assert_distribution(tokens, expected_probs(row, **case))


# ---- seeds and batches -----------------------------------------------------------

def test_same_seed_same_tokens_alone_or_in_a_batch():
    rng = np.random.default_rng(6)
    steps, batch, vocab, me = 10, 16, 3000, 5
    logits = (rng.standard_normal((steps, batch, vocab)) * 2).astype(np.float32)
    params = dict(
        temperature=rng.uniform(0.3, 1.5, batch), top_k=rng.choice([0, -1, 5, 200], batch),
        top_p=rng.uniform(0.5, 1.0, batch), min_p=rng.uniform(0, 0.1, batch),
        repetition_penalty=rng.uniform(1.0, 1.5, batch),
    )
    history = history_csr([(rng.integers(0, vocab, 30), rng.integers(0, vocab, 10)) for _ in range(batch)])
    mine = {k: v[me : me + 1] for k, v in params.items()}
    my_history = history_csr([(np.zeros(0, np.int64), np.zeros(0, np.int64))])
    mine["repetition_penalty"] = params["repetition_penalty"][me : me + 1] = 1.0   # no history alone
    alone, together = [], []
    state_alone = np.array([987654321], np.uint64)
    state_batch = (np.arange(batch, dtype=np.uint64) * 1000003 + 17)
    state_batch[me] = state_alone[0]
    for s in range(steps):
        tok, *_, state_alone = sample(logits[s, me : me + 1].copy(), history=my_history, seeds=state_alone, **mine)
        alone.append(tok[0])
        toks, *_, state_batch = sample(logits[s], history=history, seeds=state_batch,
                                       n_threads=1 + s % 2, **params)
        together.append(toks[me])
    assert alone == together
    assert len(set(alone)) > 1


def test_a_batch_big_enough_for_threads_samples_as_one_thread_does():
    # 1400 x 3000 logits pass PARALLEL_MIN_LOGITS (2^22): the only batches sampled by a team
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((1400, 3000)) * 2).astype(np.float32)
    params = dict(temperature=np.where(np.arange(1400) % 3 == 0, 0.0, 0.8), top_k=40, top_p=0.9, n_top=3,
                  seeds=np.arange(1400))
    one = sample(logits, n_threads=1, **params)
    two = sample(logits, n_threads=2, **params)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_different_seeds_draw_differently():
    logits = np.zeros((2, 1000), np.float32)   # uniform: any two streams agree 1 time in 1000
    state = np.array([1, 2], np.uint64)
    agree = 0
    for _ in range(200):
        tokens, *_, state = sample(logits, seeds=state)
        agree += tokens[0] == tokens[1]
    assert agree <= 3
    many, *_ = sample(np.zeros((2000, 1000), np.float32), seeds=np.arange(2000))
    assert len(np.unique(many)) > 800   # ~865 distinct expected for 2000 uniform draws


# ---- the Python glue ---------------------------------------------------------------

def make_seq(prompt, output, params, seed):
    seq = Sequence(0, list(prompt), params, Sampler.seed_state(seed), 10_000)
    seq.token_ids.extend(output)
    return seq


def test_sampler_glue_packs_params_history_and_logprobs():
    rng = np.random.default_rng(8)
    vocab = 500
    logits = rng.standard_normal((3, vocab)).astype(np.float32)
    logits[0, 7] = logits[0].max() + 0.5     # greedy pick unless penalised
    seqs = [
        make_seq([7, 1, 2], [3], SamplingParams(temperature=0, repetition_penalty=50.0, logprobs=3), 1),
        make_seq([4], [9, 9], SamplingParams(temperature=0.7, top_k=10, seed=5), 5),
        make_seq([4], [], SamplingParams(temperature=0, presence_penalty=2.0, logprobs=0), 2),
    ]
    before = logits.copy()
    results = Sampler().sample(logits, seqs)
    assert logits.tobytes() == before.tobytes()
    pen = logits[0].astype(np.float64)
    pen[[1, 2, 3, 7]] = np.where(pen[[1, 2, 3, 7]] < 0, pen[[1, 2, 3, 7]] * 50, pen[[1, 2, 3, 7]] / 50)
    assert results[0].token_id == int(np.argmax(pen)) != 7
    assert results[2].token_id == int(np.argmax(logits[2]))   # presence: no output yet
    ref = log_softmax64(logits)
    for res, row in zip(results, ref):
        assert abs(res.logprob - row[res.token_id]) < 1e-5
    assert [t for t, _ in results[0].top_logprobs] == np.argsort(-ref[0], kind="stable")[:3].tolist()
    assert results[1].top_logprobs == [] and results[2].top_logprobs == []
    assert [s.rng_state for s in seqs] == [(x + GOLDEN_GAMMA) & U64 for x in (1, 5, 2)]


def test_glue_skips_logprobs_nobody_asked_for_when_told():
    logits = np.random.default_rng(13).standard_normal((3, 300)).astype(np.float32)
    seqs = lambda: [make_seq([1], [], SamplingParams(temperature=0, logprobs=2), 1),    # noqa: E731
                    make_seq([1], [], SamplingParams(temperature=0.9, seed=3), 3),
                    make_seq([1], [], SamplingParams(temperature=0), 4)]
    full = Sampler().sample(logits, seqs())
    some = Sampler(all_logprobs=False).sample(logits, seqs())
    assert [r.token_id for r in some] == [r.token_id for r in full]
    assert some[0] == full[0] and len(some[0].top_logprobs) == 2
    assert np.isnan(some[1].logprob) and np.isnan(some[2].logprob) and some[1].top_logprobs == []


def test_glue_same_seed_replays():
    logits = np.random.default_rng(9).standard_normal((1, 100)).astype(np.float32)
    params = SamplingParams(temperature=1.0, seed=42)
    runs = []
    for _ in range(2):
        seq = make_seq([1], [], params, params.seed)
        runs.append([Sampler().sample(logits, [seq])[0].token_id for _ in range(20)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


def test_seed_state():
    assert Sampler.seed_state(5) == 5
    assert Sampler.seed_state(-1) == U64
    assert 0 <= Sampler.seed_state(None) <= U64


# ---- allowed-token masks (structured output) -------------------------------------

def pack_mask(allowed, words=None):
    """Bool rows [n, vocab] -> uint32 bitmask rows (bit t % 32 of word t // 32), as
    llguidance lays them out; `words` may cut the mask short of the vocabulary."""
    allowed = np.atleast_2d(allowed)
    words = words or (allowed.shape[1] + 31) // 32
    padded = np.zeros((allowed.shape[0], words * 32), bool)
    cut = min(words * 32, allowed.shape[1])
    padded[:, :cut] = allowed[:, :cut]
    weights = (1 << np.arange(32, dtype=np.uint64))
    return (padded.reshape(len(padded), words, 32) * weights).sum(axis=2).astype(np.uint32)


def test_masked_greedy_is_argmax_over_the_allowed_tokens():
    rng = np.random.default_rng(21)
    n, vocab = 12, 1000
    logits = rng.standard_normal((n, vocab)).astype(np.float32)
    allowed = rng.random((n, vocab)) < 0.05
    allowed[:, 0] = False            # the unmasked argmax must not sneak through
    tokens, *_ = sample(logits.copy(), temperature=0.0, mask_bits=pack_mask(allowed), mask_of=np.arange(n))
    reference = np.where(allowed, logits, -np.inf).argmax(axis=1)
    np.testing.assert_array_equal(tokens, reference)


def test_masked_draws_follow_the_renormalised_allowed_distribution():
    n, vocab = 20_000, 8
    allowed = np.array([True, False, True, True, False, False, True, False])
    logits = np.ascontiguousarray(np.broadcast_to(LOGITS8.astype(np.float32), (n, vocab)))
    bits = pack_mask(allowed)
    for case in (dict(temperature=1.0), dict(temperature=0.7, top_k=3), dict(top_p=0.8)):
        tokens, *_ = sample(logits.copy(), seeds=np.arange(n) * 31 + 7, mask_bits=bits, mask_of=np.zeros(n), **case)
        assert_distribution(tokens, expected_probs(np.where(allowed, LOGITS8, -np.inf), **case))


def test_masks_leave_logprobs_raw_and_unmasked_rows_alone():
    """Logprobs stay the model's own (OpenAI / vLLM report raw ones); a row with
    mask -1 draws exactly what it draws with no mask at all."""
    rng = np.random.default_rng(22)
    n, vocab = 6, 500
    logits = rng.standard_normal((n, vocab)).astype(np.float32)
    allowed = rng.random((2, vocab)) < 0.1
    mask_of = np.array([0, -1, 1, -1, 0, -1])
    seeds = np.arange(n) + 99
    masked = sample(logits.copy(), seeds=seeds, n_top=3, mask_bits=pack_mask(allowed), mask_of=mask_of)
    plain = sample(logits.copy(), seeds=seeds, n_top=3)
    free = mask_of < 0
    np.testing.assert_array_equal(masked[0][free], plain[0][free])
    for i in np.flatnonzero(~free):
        assert allowed[mask_of[i], masked[0][i]]
    reference = log_softmax64(logits)
    np.testing.assert_allclose(masked[1], reference[np.arange(n), masked[0]], atol=1e-5)
    np.testing.assert_array_equal(masked[2], plain[2])     # top logprobs: the raw distribution's


def test_tokens_past_the_mask_and_empty_masks():
    """A mask shorter than the vocabulary (the model pads its vocabulary past the
    tokenizer's) never allows the tokens it does not cover; a mask that allows
    nothing gives -1, the engine's signal to end that row."""
    vocab = 100
    logits = np.zeros((2, vocab), np.float32)
    logits[:, 90:] = 10.0            # the best tokens lie past the mask
    allowed = np.zeros((2, vocab), bool)
    allowed[0, [3, 40]] = True
    tokens, logprobs, *_ = sample(logits, temperature=0.0, mask_bits=pack_mask(allowed, words=2),
                                  mask_of=[0, 1])
    assert tokens.tolist() == [3, -1]
    assert np.isnan(logprobs[1])


def test_masks_are_checked():
    logits = np.zeros((2, 64), np.float32)
    bits = pack_mask(np.ones((1, 64), bool))
    with pytest.raises(ValueError, match="together"):
        sample(logits, mask_bits=bits)
    with pytest.raises(ValueError, match="names no mask"):
        sample(logits, mask_bits=bits, mask_of=[0, 1])
    with pytest.raises(ValueError, match="mask_of"):
        sample(logits, mask_bits=bits, mask_of=[0])
