"""Logit biases in the native sampler (OpenAI logit_bias, and the bans min_tokens
puts on EOS) against a plain numpy reference: softmax / argmax of the logits with
the bias added after the penalties. Statistical tests use fixed seeds, so they are
deterministic."""
import numpy as np
import pytest

from pyforge.engine.sampler import Sampler
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.sequence import Sequence
from pyforge.native import sampler as ns


def bias_csr(rows):
    """rows: [{token id: bias}] -> (offsets, ids, values)."""
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    ids = np.array([t for r in rows for t in r], np.int32)
    values = np.array([b for r in rows for b in r.values()], np.float32)
    return offsets, ids, values


def sample(logits, bias_rows=None, *, temperature=1.0, seeds=0, n_top=0, history=None,
           repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0):
    n = logits.shape[0]

    def rows(value, dtype):
        return np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=dtype), (n,)))

    state = rows(seeds, np.uint64).copy()
    if history is None:
        history = (np.zeros(n + 1, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32))
    offsets, ids, values = bias_csr(bias_rows) if bias_rows is not None else (None, None, None)
    return ns.sample(logits, rows(temperature, np.float32), rows(0, np.int32), rows(1.0, np.float32),
                     rows(0.0, np.float32), rows(repetition_penalty, np.float32),
                     rows(presence_penalty, np.float32), rows(frequency_penalty, np.float32),
                     *history, state, n_top_logprobs=n_top,
                     bias_offsets=offsets, bias_ids=ids, bias_values=values)


def dense(rows, vocab):
    out = np.zeros((len(rows), vocab), np.float64)
    for i, row in enumerate(rows):
        for t, b in row.items():
            out[i, t] += b
    return out


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_is_numpy_argmax_of_logits_plus_bias():
    rng = np.random.default_rng(31)
    n, vocab = 24, 700
    logits = rng.standard_normal((n, vocab)).astype(np.float32) * 3
    rows = [{int(t): float(b) for t, b in zip(rng.choice(vocab, k, replace=False), rng.uniform(-8, 8, k))}
            for k in rng.integers(0, 12, n)]
    rows[0] = {}                                    # a row without biases among rows with them
    before = logits.copy()
    tokens, *_ = sample(logits, rows, temperature=0.0)
    reference = (logits.astype(np.float64) + dense(rows, vocab)).argmax(axis=1)
    np.testing.assert_array_equal(tokens, reference)
    assert logits.tobytes() == before.tobytes()     # biases are undone, bit for bit


def test_minus_100_bans_and_plus_100_forces_under_greedy():
    rng = np.random.default_rng(32)
    logits = rng.standard_normal((3, 300)).astype(np.float32) * 4
    best = logits.argmax(axis=1)
    rows = [{int(best[0]): -100.0}, {17: 100.0}, {int(best[2]): float("-inf")}]
    tokens, *_ = sample(logits, rows, temperature=0.0)
    assert tokens[0] == np.argsort(-logits[0], kind="stable")[1]
    assert tokens[1] == 17
    assert tokens[2] != best[2]


def test_draws_follow_softmax_of_logits_plus_bias():
    n, vocab = 20_000, 8
    base = np.array([2.0, 1.6, 1.1, 0.7, 0.2, -0.4, -1.0, -2.5])
    bias = {0: -1.5, 5: 2.0, 7: float("-inf")}
    logits = np.ascontiguousarray(np.broadcast_to(base.astype(np.float32), (n, vocab)))
    tokens, *_ = sample(logits, [bias] * n, temperature=0.9, seeds=np.arange(n) * 7919 + 11)
    probs = softmax64((base + dense([bias], vocab)[0]) / 0.9)
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[7] == 0                           # banned: never drawn
    support = probs > 0
    expected = probs[support] * n
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    assert chi2 < df + 6 * np.sqrt(2 * df), f"chi2 {chi2:.1f} for {df} degrees of freedom"


def test_bias_adds_after_the_penalties_and_logprobs_stay_raw():
    rng = np.random.default_rng(33)
    vocab = 200
    logits = rng.standard_normal((2, vocab)).astype(np.float32) * 2
    history = (np.array([0, 2, 2], np.int32), np.array([5, 9], np.int32), np.array([1, 3], np.int32))
    rows = [{5: 3.0, 9: 1.0, 40: 2.5}, {40: -0.5}]
    tokens, logprobs, top_ids, top_lps = sample(logits, rows, temperature=0.0, n_top=3, history=history,
                                                repetition_penalty=1.3, frequency_penalty=0.4)
    x = logits.astype(np.float64)
    for t, count in ((5, 1), (9, 3)):               # HF repetition, then OpenAI frequency
        x[0, t] = (x[0, t] / 1.3 if x[0, t] > 0 else x[0, t] * 1.3) - 0.4 * count
    x += dense(rows, vocab)
    np.testing.assert_array_equal(tokens, x.argmax(axis=1))
    raw = logits.astype(np.float64)
    raw = raw - raw.max(axis=1, keepdims=True)
    raw = raw - np.log(np.exp(raw).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(logprobs, raw[np.arange(2), tokens], atol=1e-5)
    np.testing.assert_array_equal(top_ids, np.argsort(-raw, axis=1, kind="stable")[:, :3])


def test_rows_without_bias_draw_what_they_draw_without_the_argument():
    rng = np.random.default_rng(34)
    logits = rng.standard_normal((6, 400)).astype(np.float32)
    seeds = np.arange(6) + 5
    plain, *_ = sample(logits.copy(), None, seeds=seeds)
    biased, *_ = sample(logits.copy(), [{}, {3: 50.0}, {}, {}, {}, {8: 50.0}], seeds=seeds)
    np.testing.assert_array_equal(biased[[0, 2, 3, 4]], plain[[0, 2, 3, 4]])
    assert biased[1] == 3 and biased[5] == 8


def test_biases_are_checked():
    logits = np.zeros((2, 10), np.float32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(logits, [{10: 1.0}, {}])
    offsets, ids, values = bias_csr([{1: 1.0}, {2: 1.0}])
    state = np.zeros(2, np.uint64)
    args = (logits, *[np.ones(2, np.float32)], np.zeros(2, np.int32), *[np.ones(2, np.float32)] * 5,
            np.zeros(3, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32), state)
    with pytest.raises(ValueError, match="go together"):
        ns.sample(*args, bias_offsets=offsets, bias_ids=ids)
    with pytest.raises(ValueError, match="bias_values"):
        ns.sample(*args, bias_offsets=offsets, bias_ids=ids, bias_values=values[:1])
    with pytest.raises(ValueError, match="bias_offsets"):
        ns.sample(*args, bias_offsets=offsets[:2], bias_ids=ids, bias_values=values)


# ---- the Python glue: SamplingParams.logit_bias and min_tokens ----------------------

def seq_with(params, output=(), prompt=(1, 2)):
    seq = Sequence(0, list(prompt), params, Sampler.seed_state(params.seed or 0), 10_000)
    seq.token_ids.extend(output)
    return seq


def test_glue_applies_logit_bias_from_params():
    logits = np.random.default_rng(35).standard_normal((2, 50)).astype(np.float32)
    seqs = [seq_with(SamplingParams(temperature=0, logit_bias={7: 100})),
            seq_with(SamplingParams(temperature=0, logit_bias={int(logits[1].argmax()): -100}))]
    results = Sampler().sample(logits, seqs)
    assert results[0].token_id == 7
    assert results[1].token_id == int(np.argsort(-logits[1], kind="stable")[1])


def test_glue_bans_eos_and_stop_ids_until_min_tokens():
    eos, stop = 2, 9
    logits = np.zeros((1, 20), np.float32)
    logits[0, [eos, stop, 4]] = [5.0, 4.0, 3.0]
    sampler = Sampler(eos_ids=(eos,))
    params = SamplingParams(temperature=0, min_tokens=3, max_tokens=10, stop_token_ids=[stop])
    picks = [sampler.sample(logits, [seq_with(params, output=[4] * k)])[0].token_id for k in range(5)]
    assert picks == [4, 4, 4, eos, eos]         # 0, 1, 2 outputs: both banned; from 3 on free
    ignoring = SamplingParams(temperature=0, min_tokens=3, max_tokens=10, ignore_eos=True, stop_token_ids=[stop])
    assert sampler.sample(logits, [seq_with(ignoring)])[0].token_id == eos   # EOS is no stop for it
    assert sampler.sample(logits, [seq_with(params)])[0].token_id == 4
