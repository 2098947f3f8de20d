"""Prompt logprobs (SamplingParams.prompt_logprobs) against a numpy reference: the
float64 log-softmax of the logits a single forward pass gives at every prompt
position (Engine.prompt_logits), taken at the next prompt token; top alternatives
from a stable argsort. The engine computes them in chunked prefill steps, alongside
other sequences, across preemption, and never from prefix-cached blocks."""
import numpy as np
import pytest

from conftest import STORIES
from pyforge.engine.engine import Engine
from pyforge.engine.requests import RequestTable
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.sequence import SequenceStatus

TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
        "One day, she saw a big, red ball.")


def engine(**options):
    return Engine(STORIES, n_threads=1, max_model_len=256, **{"kv_cache_tokens": 4096, **options})


def reference(eng, ids, k):
    x = eng.prompt_logits(ids).astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    rows = x[:-1]                   # position p predicts token p + 1; the last predicts the output
    picked = rows[np.arange(len(rows)), ids[1:]]
    top = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    return picked, top, np.take_along_axis(rows, top, axis=1)


def run(eng, requests):
    seqs = [eng.add_request(ids, params) for ids, params in requests]
    while eng.has_work:
        eng.step()
    return seqs


def check(seq, eng, k):
    ids = seq.token_ids[:seq.num_prompt_tokens]
    picked, top, top_lps = reference(engine(), ids, k)
    got = seq.prompt_logprobs
    assert [e.token_id for e in got] == ids[1:]
    np.testing.assert_allclose([e.logprob for e in got], picked, atol=1e-5)
    assert [[t for t, _ in e.top] for e in got] == top.tolist()
    np.testing.assert_allclose([[lp for _, lp in e.top] for e in got], top_lps, atol=1e-5)


def test_chunked_prefill_beside_other_sequences_matches_one_pass():
    eng = engine(max_num_batched_tokens=8)          # every prompt is prefilled over several steps
    ids = eng.tokenizer.encode(TEXT)
    other = eng.tokenizer.encode("The cat sat on the mat and looked at the dog.")
    seqs = run(eng, [(other, SamplingParams(temperature=0, max_tokens=5)),
                     (ids, SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=3)),
                     (other, SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=0))])
    assert seqs[0].prompt_logprobs is None
    check(seqs[1], eng, 3)
    check(seqs[2], eng, 0)
    # and sampling saw the right rows: the outputs are what the sequences get alone
    alone = run(engine(), [(ids, SamplingParams(temperature=0, max_tokens=5)),
                           (other, SamplingParams(temperature=0, max_tokens=5))])
    assert seqs[1].token_ids == alone[0].token_ids and seqs[2].token_ids == alone[1].token_ids


def test_a_preempted_sequence_records_each_position_once():
    eng = engine(kv_cache_tokens=96, block_size=16, max_num_batched_tokens=16)
    ids = eng.tokenizer.encode(TEXT)[:30]
    seqs = run(eng, [(ids, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=2)),
                     (ids[::-1], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=2))])
    assert eng.scheduler.num_preemptions > 0
    for seq in seqs:
        check(seq, eng, 2)


def test_prompt_logprobs_never_come_from_the_prefix_cache():
    eng = engine()
    ids = eng.tokenizer.encode(TEXT)
    [warm] = run(eng, [(ids, SamplingParams(temperature=0, max_tokens=2))])
    [plain] = run(eng, [(ids, SamplingParams(temperature=0, max_tokens=2))])
    [asked] = run(eng, [(ids, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))])
    assert plain.num_cached_prompt_tokens > 0 and asked.num_cached_prompt_tokens == 0
    check(asked, eng, 1)


class Recorder:
    def __init__(self):
        self.log = []

    def admitted(self, entry):
        self.log.append("admitted")

    def prompt_logprobs(self, entry, entries):
        self.log.append(("prompt", [e.token_id for e in entries]))

    def tokens(self, entry, out):
        self.log.append("token")

    def finished(self, entry, reason):
        self.log.append("finished")

    def failed(self, entry, kind, message):
        self.log.append("failed")


@pytest.mark.parametrize("budget", [4, 512])
def test_the_table_replies_prompt_logprobs_in_order_before_the_first_token(budget):
    eng = engine(max_num_batched_tokens=budget)
    table = RequestTable(eng, Recorder())
    ids = eng.tokenizer.encode(TEXT)[:13]
    table.admit(1, None, ids, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0))
    while eng.has_work:
        table.step()
    log = table.replies.log
    prompt = [item for item in log if isinstance(item, tuple)]
    assert sum((ids for _, ids in prompt), []) == ids[1:]
    assert len(prompt) == -(-(len(ids) - 1) // budget)      # one per chunk that holds prompt positions
    assert log[0] == "admitted" and log[-3:] == ["token", "token", "finished"]
    assert all(isinstance(item, tuple) for item in log[1:-3])


def test_a_scored_prompt_is_chunked_to_the_logits_rows_the_step_was_sized_for():
    eng = engine(max_num_seqs=4, max_num_batched_tokens=64)      # activations sized for 4 logits rows
    ids = eng.tokenizer.encode(TEXT)
    scored = eng.add_request(ids, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    plain = eng.add_request(ids[::-1], SamplingParams(temperature=0, max_tokens=1))
    plan = eng.scheduler.schedule()
    assert [(seq, n) for seq, n in plan] == [(scored, 4), (plain, len(ids))]
    for seq in (scored, plain):
        eng.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
