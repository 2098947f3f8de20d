"""Guided decoding in the engine, on a random-weight model (a constraint must hold
whatever the weights): outputs validate with `jsonschema` / `re`, a constrained
greedy request is batch-invariant, the grammar decides when it is done, and
aborts and failures leave no KV block behind."""
import json
import re

import pytest

from pyforge.engine.engine import Engine, StepError
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.sequence import SequenceStatus
from pyforge.structured import ConstraintError, grammar_for

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}
PROMPTS = [[1, 450, 4996, 17354], [1, 3118, 29871, 42, 7], [1, 910, 338, 263, 1243, 29889]]


@pytest.fixture(scope="module")
def engine(model_path):
    return Engine(model_path, n_threads=1, max_model_len=512, kv_cache_tokens=8192, max_num_seqs=32)


def run(engine, seqs):
    """Step until every sequence is done: {seq_id: (token ids, finish_reason)}."""
    out = {seq.seq_id: ([], None) for seq in seqs}
    while engine.has_work:
        for o in engine.step():
            if o.seq_id in out:
                out[o.seq_id][0].append(o.token_id)
                if o.finished:
                    out[o.seq_id] = (out[o.seq_id][0], o.finish_reason)
    return out


def text_of(engine, ids):
    return engine.tokenizer.decode(ids)


def test_json_schema_outputs_validate_greedy_and_sampled(engine):
    grammar = grammar_for("json_schema", SCHEMA)
    seqs = [engine.add_request(p, SamplingParams(temperature=t, seed=s, max_tokens=200, grammar=grammar))
            for p in PROMPTS for t, s in ((0.0, None), (1.0, 1), (1.3, 2))]
    for ids, reason in run(engine, seqs).values():
        assert reason == "stop"
        jsonschema.validate(json.loads(text_of(engine, ids)), SCHEMA)
    assert engine.block_manager.num_free == engine.block_manager.n_blocks


def test_regex_and_choice_hold(engine):
    cases = [(grammar_for("regex", r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
             (grammar_for("choice", ["cat", "category", "dog"]), lambda t: t in ("cat", "category", "dog"))]
    for grammar, holds in cases:
        seqs = [engine.add_request(PROMPTS[0], SamplingParams(temperature=1.0, seed=s, max_tokens=50, grammar=grammar))
                for s in range(8)]
        for ids, reason in run(engine, seqs).values():
            assert reason == "stop" and holds(text_of(engine, ids)), text_of(engine, ids)


def test_a_constrained_greedy_request_is_the_same_alone_and_in_a_mixed_batch(engine):
    grammar = grammar_for("json_schema", SCHEMA)
    params = SamplingParams(temperature=0.0, max_tokens=200, grammar=grammar)
    alone = engine.add_request(PROMPTS[1], params)
    expected = run(engine, [alone])[alone.seq_id]
    others = [engine.add_request(PROMPTS[i % 3], SamplingParams(temperature=1.0, seed=i, max_tokens=40,
                                                                grammar=grammar if i % 2 else None))
              for i in range(15)]
    again = engine.add_request(PROMPTS[1], params)
    assert run(engine, [again, *others])[again.seq_id] == expected


def test_max_tokens_cuts_a_constrained_answer_with_length(engine):
    grammar = grammar_for("json_schema", {"type": "array", "items": {"type": "integer"}, "minItems": 50})
    seq = engine.add_request(PROMPTS[0], SamplingParams(temperature=1.0, seed=3, max_tokens=5, grammar=grammar))
    ids, reason = run(engine, [seq])[seq.seq_id]
    assert reason == "length" and len(ids) == 5


def test_eos_only_where_the_grammar_accepts(engine):
    """The grammar, not the model, decides the end: with every EOS id allowed only at
    the end, an answer is never cut short by EOS (finish_reason stop, and it parses)."""
    grammar = grammar_for("json_schema", {"type": "array", "items": {"enum": [1, 2]}, "minItems": 3, "maxItems": 3})
    seqs = [engine.add_request(PROMPTS[2], SamplingParams(temperature=1.0, seed=s, max_tokens=100, grammar=grammar))
            for s in range(6)]
    for ids, reason in run(engine, seqs).values():
        assert reason == "stop" and len(json.loads(text_of(engine, ids))) == 3
        assert all(t not in engine.tokenizer.eos_ids for t in ids[:-1])


def test_a_grammar_that_does_not_compile_is_refused_at_admission(engine):
    with pytest.raises(ConstraintError, match="regex"):
        engine.add_request(PROMPTS[0], SamplingParams(grammar=grammar_for("regex", "(")))
    assert not engine.has_work


def test_aborted_constrained_requests_free_their_blocks(engine):
    grammar = grammar_for("json_schema", {"type": "array", "items": {"type": "string", "maxLength": 4}})
    seqs = [engine.add_request(p, SamplingParams(temperature=1.0, seed=1, max_tokens=300, grammar=grammar))
            for p in PROMPTS * 3]
    for _ in range(3):
        engine.step()
    for seq in seqs:
        engine.abort(seq.seq_id)
    run(engine, [])
    assert engine.block_manager.num_free == engine.block_manager.n_blocks


def test_a_row_whose_grammar_refuses_the_token_ends_alone(engine):
    """A matcher that refuses the sampled token (a bug upstream, or a vocabulary
    mismatch) ends that sequence with a StepError; its batch mates carry on."""
    grammar = grammar_for("regex", "[a-z]{1,40}")
    good = engine.add_request(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    bad = engine.add_request(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=6, grammar=grammar))
    engine.step()           # both prefilled and sampled once
    bad.matcher.consume_token(engine.tokenizer.encode("7", add_bos=False)[-1])   # knock it off its grammar
    with pytest.raises(StepError) as raised:
        engine.step()
    assert raised.value.seq_ids == [bad.seq_id] and [o.seq_id for o in raised.value.outputs] == [good.seq_id]
    assert bad.status == SequenceStatus.FINISHED_ABORTED
    run(engine, [good])
    assert engine.block_manager.num_free == engine.block_manager.n_blocks
