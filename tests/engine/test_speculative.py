"""N-gram speculative decoding (engine/speculative.py) changes the speed, never the
output: greedy and seeded sampled requests (penalties, biases, min_tokens, grammars,
prompt logprobs beside them) produce the same tokens, finish reasons and logprobs
with and without it, on a random-weight model (whose greedy output loops, so drafts
are accepted), on stories260K and on the CUDA backend (emulated); every end-to-end
test also asserts that drafts were accepted, so none can pass by never speculating.
Rejected drafts leave no KV block behind (checked after every step) nor in the
prefix cache, max_tokens is never overshot, a stop token inside accepted drafts ends
the sequence there, and the sampling rule emits tokens distributed as p (chi-square
on a small vocabulary)."""
import dataclasses
import math
import re

import numpy as np
import pytest

from conftest import STORIES
from pyforge.engine.config import SpeculativeConfig
from pyforge.engine.engine import Engine
from pyforge.engine.sampler import Sampler
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.sequence import Sequence
from pyforge.engine.speculative import (FIRST_PAUSE, MISS_STREAK, DraftState, accepted_prefix, verify_rows)
from pyforge.synthetic import write_gguf
from pyforge.synthetic_copy import successors, walk

STORY_TEXTS = ["Once upon a time, there was a little girl. Once upon a time, there was a little",
               "The cat sat on the mat. The cat sat on the mat. The cat sat on the",
               "Tom said hello. Tom said hello. Tom said", "Lily and Ben went to the park to play."]
LOOP_TEXT = ("They saw a big box with a big box. They wanted to play with it. They wanted to play with the box. "
             "They wanted to play with the")

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
        "disable_by_batch_size": 64}
# repetitive prompts: their n-grams recur, and the random model's greedy output loops
PROMPTS = [[1] + [450, 4996, 17354, 29889] * 5, [1, 3118, 29871, 42, 7] * 4, [1, 910, 338, 263, 1243, 29889] * 3,
           [1, 22, 23, 24, 22, 23, 24, 22], [1, 5000, 6000], [1, 77, 78, 79, 80, 81, 82, 77, 78, 79]]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(write_gguf("tiny-gqa", tmp_path_factory.mktemp("model") / "tiny-gqa.gguf", "F32"))


def make_engine(path, spec=None, **kw):
    options = dict(n_threads=1, max_model_len=256, kv_cache_tokens=4096, block_size=16, max_num_seqs=16)
    return Engine(path, **{**options, **kw}, speculative_config=spec)


def run(engine, requests):
    """Step until the engine is idle: per request (tokens, logprobs, top logprobs, finish reason,
    tokens per step).
    Checks after every step that no running sequence holds a block past its tokens."""
    seqs = [engine.add_request(prompt, params) for prompt, params in requests]
    out = {s.seq_id: ([], [], [], None, []) for s in seqs}
    bs = engine.block_manager.block_size
    while engine.has_work:
        per_seq = {}
        for o in engine.step():
            if o.seq_id not in out:     # a request the caller added itself
                continue
            tokens, logprobs, tops, _, steps = out[o.seq_id]
            tokens.append(o.token_id)
            logprobs.append(o.logprob)
            tops.append(o.top_logprobs)
            per_seq[o.seq_id] = per_seq.get(o.seq_id, 0) + 1
            if o.finished:
                out[o.seq_id] = (tokens, logprobs, tops, o.finish_reason, steps)
        for seq_id, n in per_seq.items():
            out[seq_id][4].append(n)
        for seq in engine.scheduler.running:
            assert len(seq.block_table) <= -(-seq.num_tokens // bs) and not seq.draft_tokens
    assert engine.block_manager.num_free == engine.block_manager.n_blocks
    return [out[s.seq_id] for s in seqs]


def assert_same_outputs(plain, spec, logprob_tol=1e-4):
    assert len(plain) == len(spec)
    for (t0, lp0, top0, r0, _), (t1, lp1, top1, r1, _) in zip(plain, spec):
        assert t1 == t0 and r1 == r0
        np.testing.assert_allclose(lp1, lp0, rtol=logprob_tol, atol=logprob_tol)
        for a, b in zip(top0, top1):
            assert [t for t, _ in a] == [t for t, _ in b]
            np.testing.assert_allclose([lp for _, lp in b], [lp for _, lp in a], rtol=logprob_tol, atol=logprob_tol)


# -- the output is unchanged ------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 16])
def test_greedy_output_is_identical_with_and_without_speculation(model_path, batch):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)
    requests = [(PROMPTS[i % len(PROMPTS)], params) for i in range(batch)]
    plain = run(make_engine(model_path), requests)
    engine = make_engine(model_path, SPEC)
    spec = run(engine, requests)
    assert_same_outputs(plain, spec)
    assert engine.speculator.num_accepted_tokens > 0
    assert any(n > 1 for *_, steps in spec for n in steps)     # several tokens in one step did happen


def test_seeded_sampling_with_penalties_is_identical_with_and_without_speculation(model_path):
    """The draw at each output position uses the RNG state it would use without
    speculation: a seeded request's tokens do not change."""
    variants = [dict(temperature=0.7, seed=1), dict(temperature=0.5, top_p=0.9, seed=2),
                dict(temperature=0.8, top_k=5, min_p=0.05, seed=3),
                dict(temperature=0.6, repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.2, seed=4),
                dict(temperature=0.0, repetition_penalty=1.05, min_tokens=20, logit_bias={7: 3.0}),
                dict(temperature=0.4, seed=5, min_tokens=10, stop_token_ids=[29889])]
    requests = [(p, SamplingParams(max_tokens=32, logprobs=1, **v)) for v in variants for p in PROMPTS[:4]]
    plain = run(make_engine(model_path), requests)
    engine = make_engine(model_path, SPEC)
    assert_same_outputs(plain, run(engine, requests))
    assert engine.speculator.num_accepted_tokens > 0


@pytest.mark.parametrize("batch", [1, 16])
def test_a_copy_model_accepts_nearly_every_draft_and_keeps_its_greedy_output(tmp_path, batch):
    """The echo benchmark's model (synthetic_copy.py): prompts walking a token cycle, whose
    continuation goes on around it, so all but the first drafts land; the tokens and
    logprobs are those of plain decoding."""
    path = str(write_gguf("small-k-copy", tmp_path / "copy.gguf", "Q4_K_M"))
    nxt = successors("small-k-copy")
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=1)
    requests = [([1] + walk(nxt, 100 + 37 * i, 24), params) for i in range(batch)]
    plain = run(make_engine(path), requests)
    engine = make_engine(path, SPEC)
    spec = run(engine, requests)
    assert_same_outputs(plain, spec)
    assert engine.speculator.acceptance_rate > 0.9
    assert all(np.mean(steps[1:]) > 3 for *_, steps in spec)     # most steps emit k + 1 = 5 tokens


def stories_engine(spec=None):
    return Engine(STORIES, n_threads=1, max_num_seqs=16, speculative_config=spec)


def story_prompts(engine):
    return [engine.tokenizer.encode(text) for text in STORY_TEXTS]


def test_many_seeds_sample_the_same_tokens_with_and_without_speculation():
    """300 seeded samples at temperature 1 on a looping prompt, 16 tokens each: every
    seed's continuation is the same, token for token (so their distribution is too)."""
    params = [SamplingParams(temperature=1.0, top_p=0.95, seed=seed, max_tokens=16, ignore_eos=True)
              for seed in range(300)]
    plain_engine, engine = stories_engine(), stories_engine({**SPEC, "disable_by_batch_size": 300})
    prompt = engine.tokenizer.encode(LOOP_TEXT)
    plain = run(plain_engine, [(prompt, p) for p in params])
    spec = run(engine, [(prompt, p) for p in params])
    assert [s[0] for s in spec] == [p[0] for p in plain]
    assert engine.speculator.num_accepted_tokens > 300


def test_stories260k_greedy_is_identical_with_and_without_speculation():
    params = SamplingParams(temperature=0.0, max_tokens=60, logprobs=1)
    plain = run(plain_engine := stories_engine(), [(p, params) for p in story_prompts(plain_engine)])
    engine = stories_engine(SPEC)
    spec = run(engine, [(p, params) for p in story_prompts(engine)])
    assert_same_outputs(plain, spec)
    assert engine.speculator.num_accepted_tokens > 0


def test_prefix_cache_holds_only_accepted_tokens():
    """A prompt that extends a finished speculative generation reuses its blocks, which
    rejected drafts once wrote to: its output is that of a fresh plain engine."""
    engine = stories_engine(SPEC)
    prompt = story_prompts(engine)[3]
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    (first, *_), = run(engine, [(prompt, params)])
    assert engine.speculator.num_draft_tokens > engine.speculator.num_accepted_tokens > 0   # some were rejected
    longer = prompt + first[:-1]
    again = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=1)
    hits = engine.block_manager.prefix_hits
    cached = run(engine, [(longer, again)])
    bs = engine.block_manager.block_size
    assert engine.block_manager.prefix_hits - hits == (len(longer) - 1) // bs * bs     # every full block reused
    assert_same_outputs(run(stories_engine(), [(longer, again)]), cached)


def test_chunked_prefill_and_preemption_keep_the_output(model_path):
    """A KV cache too small for the batch preempts; a small token budget chunks the
    prompts and trims drafts: the tokens stay those of a roomy plain run."""
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    requests = [(PROMPTS[i % len(PROMPTS)] * 2, params) for i in range(12)]
    plain = run(make_engine(model_path), requests)
    engine = make_engine(model_path, SPEC, kv_cache_tokens=640, max_num_batched_tokens=24)
    spec = run(engine, requests)
    assert [s[0] for s in spec] == [p[0] for p in plain]
    assert engine.scheduler.num_preemptions > 0 and engine.speculator.num_accepted_tokens > 0


def test_prompt_logprobs_requests_share_steps_with_drafted_ones():
    """Entries with every row's logits (prompt logprobs, drafts) side by side in one batch:
    each gets its own rows back."""
    plain, spec = stories_engine(), stories_engine(SPEC)
    prompts = story_prompts(plain)
    greedy = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    echo = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=2, logprobs=2)
    recorded = []
    for engine in (plain, spec):
        first = [engine.add_request(p, greedy) for p in prompts[:2]]
        for _ in range(12):             # the first two are drafting by now
            engine.step()
        late = engine.add_request(prompts[1] + prompts[3], echo)
        drafts = engine.speculator.num_drafts if engine.speculator else 0
        engine.step()                   # the late prompt's prefill, beside the others' drafts
        assert late.prompt_logprobs and (engine is plain or engine.speculator.num_drafts > drafts)
        rest = run(engine, [(p, greedy) for p in prompts[2:]])
        recorded.append((late.prompt_logprobs, rest, [s.token_ids for s in first]))
    (plain_lp, plain_rest, plain_first), (spec_lp, spec_rest, spec_first) = recorded
    assert spec.speculator.num_accepted_tokens > 0 and spec_first == plain_first
    assert_same_outputs(plain_rest, spec_rest)
    assert [e.token_id for e in spec_lp] == [e.token_id for e in plain_lp]
    np.testing.assert_allclose([e.logprob for e in spec_lp], [e.logprob for e in plain_lp], rtol=1e-4, atol=1e-4)


def test_the_scheduler_trims_drafts_to_the_budget_and_drops_them_before_preempting():
    from pyforge.engine.block_manager import BlockManager
    from pyforge.engine.scheduler import Scheduler

    def decoding(seq_id, n_tokens, drafts):
        seq = Sequence(seq_id, list(range(10, 10 + n_tokens)), SamplingParams(max_tokens=50), 0, 1000)
        seq.num_computed_tokens = n_tokens - 1
        seq.draft_tokens = list(drafts)
        return seq

    blocks = BlockManager(4, 4)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=6)
    a, b = decoding(0, 3, [7, 8, 9]), decoding(1, 3, [7, 8, 9])
    for seq in (a, b):
        blocks.allocate(seq, 3)
        sched.running.append(seq)
    plan = sched.schedule()
    assert [(s.seq_id, n) for s, n in plan] == [(0, 4), (1, 2)]         # 6 tokens of budget
    assert a.draft_tokens == [7, 8, 9] and b.draft_tokens == [7]
    c = decoding(2, 4, [1, 2, 3, 4])        # needs a second block for its drafts; none is free
    blocks.allocate(c, 4)
    blocks.allocate(a, 7)
    sched.running = [c]
    assert blocks.num_free == 0
    assert sched.schedule() == [(c, 1)] and c.draft_tokens == [] and sched.num_preemptions == 0


# -- limits and stops --------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 5, 7, 10, 13])
def test_max_tokens_is_never_overshot(max_tokens):
    """stories260K copies a looping prompt, so drafts land from the second token on."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engine = stories_engine(SPEC)
    loop = engine.tokenizer.encode(LOOP_TEXT)
    results = run(engine, [(loop, params)] * 3)
    (plain, *_), = run(stories_engine(), [(loop, params)])
    for tokens, _, _, reason, _ in results:
        assert tokens == plain and len(tokens) == max_tokens and reason == "length"
    if max_tokens > 2:
        assert engine.speculator.num_accepted_tokens > 0


def test_a_stop_token_inside_accepted_drafts_ends_the_sequence_there():
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    engine = stories_engine(SPEC)
    prompt = story_prompts(engine)[3]
    (tokens, _, _, _, steps), = run(engine, [(prompt, params)])
    firsts, at = set(), 0           # where each step's tokens begin
    for n in steps:
        firsts.add(at)
        at += n
    # a token first emitted as an accepted draft (not the first token of its step)
    stop = next(t for i, t in enumerate(tokens) if i not in firsts and t not in tokens[:i])
    stopped = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, stop_token_ids=[stop])
    (plain_tokens, _, _, plain_reason, _), = run(stories_engine(), [(prompt, stopped)])
    (spec_tokens, _, _, reason, spec_steps), = run(stories_engine(SPEC), [(prompt, stopped)])
    assert spec_tokens == plain_tokens == tokens[:tokens.index(stop) + 1]
    assert reason == plain_reason == "stop" and spec_steps[-1] > 1


def test_aborts_mid_speculation_leave_no_blocks():
    engine = stories_engine(SPEC)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in story_prompts(engine) * 3]
    while engine.speculator.num_drafts < 10:
        engine.step()
    for seq in seqs:
        engine.abort(seq.seq_id)
    assert not engine.has_work and engine.block_manager.num_free == engine.block_manager.n_blocks


# -- who speculates ------------------------------------------------------------------------
def test_big_batches_and_opted_out_requests_do_not_speculate():
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    engine = stories_engine({**SPEC, "disable_by_batch_size": 2})
    prompts = story_prompts(engine)
    run(engine, [(p, params) for p in prompts[:3]])
    assert engine.speculator.num_drafts == 0            # three decoding sequences > 2
    run(engine, [(prompts[3], dataclasses.replace(params, max_drafts=0))])
    assert engine.speculator.num_drafts == 0
    run(engine, [(prompts[3], params)])
    assert engine.speculator.num_drafts > 0


def test_a_requests_max_drafts_caps_its_drafts_and_keeps_its_output(tmp_path):
    """llama-server's per-request speculative.n_max: at most that many drafts a step (so at
    most that many + 1 tokens), below the engine's num_speculative_tokens; refused below 0."""
    path = str(write_gguf("small-k-copy", tmp_path / "copy.gguf", "Q4_K_M"))
    nxt = successors("small-k-copy")
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    requests = [([1] + walk(nxt, 500, 24), dataclasses.replace(params, max_drafts=cap)) for cap in (1, 2, None)]
    plain = run(make_engine(path), requests)
    engine = make_engine(path, SPEC)
    spec = run(engine, requests)
    assert [s[0] for s in spec] == [p[0] for p in plain]
    assert [max(steps) for *_, steps in spec] == [2, 3, SPEC["num_speculative_tokens"] + 1]
    with pytest.raises(ValueError, match="max_drafts"):
        SamplingParams(max_drafts=-1)


@pytest.mark.parametrize("pattern", ["[A-Za-z .,]{1,400}", "[a-z .]{1,400}"])
def test_guided_requests_draft_only_what_the_grammar_allows(pattern):
    """Drafts are cut to what the grammar accepts and each verify row is masked with the
    grammar's state after the drafts before it: the output is plain guided decoding's.
    (The second pattern bans capitals, which the story's copies need: drafts get cut.)"""
    from pyforge.structured import grammar_for
    params = SamplingParams(temperature=0.0, max_tokens=60, grammar=grammar_for("regex", pattern), logprobs=1)
    sampled = SamplingParams(temperature=0.8, seed=5, max_tokens=60, grammar=grammar_for("regex", pattern))
    plain_engine, engine = stories_engine(), stories_engine(SPEC)
    requests = [(p, params) for p in story_prompts(engine)] + [(story_prompts(engine)[1], sampled)]
    plain, spec = run(plain_engine, requests), run(engine, requests)
    assert_same_outputs(plain, spec)
    assert engine.speculator.num_accepted_tokens > 0
    for tokens, *_ in spec:
        assert re.fullmatch(pattern, engine.tokenizer.decode(tokens))


def test_draft_length_adapts():
    state = DraftState(SpeculativeConfig(method="ngram", num_speculative_tokens=4))
    assert state.budget() == 4
    state.adapt(4, 1, 4)
    assert state.budget() == 2                  # accepted + 1
    state.adapt(2, 2, 4)
    assert state.budget() == 3                  # all accepted: one more
    for _ in range(MISS_STREAK):
        state.adapt(3, 0, 4)
    assert [state.budget() for _ in range(FIRST_PAUSE)] == [0] * (FIRST_PAUSE - 1) + [1]    # paused, then probes
    state.adapt(1, 0, 4)
    state.adapt(1, 0, 4)
    assert [state.budget() for _ in range(2 * FIRST_PAUSE)] == [0] * (2 * FIRST_PAUSE - 1) + [1]  # twice as long


# -- the sampling rule -----------------------------------------------------------------------
CHI2_999 = {5: 20.52, 7: 24.32}     # chi-square critical values at p = 0.001


def chi_square(counts, probs):
    expected = np.asarray(probs) * sum(counts)
    return float(((np.asarray(counts) - expected) ** 2 / expected).sum())


def filtered_softmax(logits, temperature, top_k):
    """The distribution the sampler draws from: temperature, then top-k."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    keep = np.argsort(-x, kind="stable")[:top_k]
    p = np.zeros_like(x)
    p[keep] = np.exp(x[keep] - x[keep].max())
    return p / p.sum()


def test_emitted_tokens_are_distributed_as_p_and_drafts_accepted_with_p_of_the_draft():
    """Two verification rows (a draft d0 after the last token, then the bonus row):
    the first emitted token follows p0 whatever the draft, d0 is accepted with
    probability p0(d0), and the token after an accepted d0 follows p1."""
    rng = np.random.default_rng(7)
    vocab, n = 8, 20000
    logits = rng.normal(0.0, 1.0, (2, vocab)).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_k=6, max_tokens=8)
    p0, p1 = filtered_softmax(logits[0], 0.9, 6), filtered_softmax(logits[1], 0.9, 6)
    d0 = int(np.argsort(-p0)[1])        # the second most likely token: accepted often, rejected often
    sampler = Sampler()
    seeds = np.random.default_rng(11).integers(0, 2**63, n)
    first, second, accepted = np.zeros(vocab), np.zeros(vocab), 0
    for seed in seeds.tolist():
        seq = Sequence(0, [1, 2, 3], params, sampler.seed_state(seed), 64)
        seq.draft_tokens = [d0]
        results = sampler.sample(logits, verify_rows(seq))
        tokens = [r.token_id for r in results]
        emitted = tokens[:accepted_prefix([d0], tokens)]
        first[emitted[0]] += 1
        if len(emitted) == 2:
            accepted += 1
            second[emitted[1]] += 1
    support0, support1 = p0 > 0, p1 > 0
    assert first[~support0].sum() == 0 and second[~support1].sum() == 0
    assert chi_square(first[support0], p0[support0]) < CHI2_999[5]
    assert chi_square(second[support1], p1[support1]) < CHI2_999[5]
    # acceptance ~ Binomial(n, p0(d0)): within 4 standard deviations
    assert abs(accepted - n * p0[d0]) < 4 * math.sqrt(n * p0[d0] * (1 - p0[d0]))
    assert accepted == first[d0]


def test_the_config_takes_vllms_json_and_names_what_is_wrong():
    spec = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert (spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min) == (3, 5, 2)
    assert SpeculativeConfig.parse('{"method": "ngram", "prompt_lookup_max": 1}').prompt_lookup_min == 1
    assert SpeculativeConfig.parse(spec.to_json()) == spec
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse("none") is None
    for bad, message in [('{"method": "eagle"}', "method must be one of ngram"),
                         ('{"num_speculative_tokens": 3}', 'needs "method"'),
                         ('{"method": "ngram", "model": "x"}', "unknown key"),
                         ('{"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 3}',
                          "prompt_lookup_min <="),
                         ('{"method": "ngram", "num_speculative_tokens": 0}', "integer >= 1"),
                         ('{"method": "ngram", "num_speculative_tokens": 99}', "<= 32"),
                         ("{method: ngram}", "not valid JSON"), ("[1]", "JSON object")]:
        with pytest.raises(ValueError, match=message):
            SpeculativeConfig.parse(bad)


# -- the CUDA backend ------------------------------------------------------------------------
def test_cuda_backend_on_the_emulator_keeps_the_greedy_output():
    """On the CUDA backend (tests/emulated_cupy.py: its kernels run by the CUDA emulator) a
    verify step is a small eager prefill among decode steps replayed as CUDA graphs."""
    import sys
    from emulated_cupy import make_emulated_cupy
    from pyforge.synthetic import ensure_model

    path = str(ensure_model("small-k", "F16"))
    params = SamplingParams(temperature=0.0, max_tokens=28, ignore_eos=True, logprobs=1)
    requests = [([1, 22, 23, 24, 22, 23, 24, 22], params)]      # its greedy output loops from token 10 on
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "cupy", make_emulated_cupy())
        options = dict(device="cuda", cuda_graphs=True, n_threads=1, max_model_len=256, kv_cache_tokens=1024)
        plain = run(Engine(path, **options), requests)
        engine = Engine(path, **options, speculative_config=SPEC)
        spec = run(engine, requests)
        replays = engine.backend.graphs.replays
    assert_same_outputs(plain, spec, logprob_tol=2e-3)
    assert engine.speculator.num_accepted_tokens > 0 and replays > 0
