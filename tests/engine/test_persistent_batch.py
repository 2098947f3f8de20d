"""Batch invariance over the persistent decode batch (native/step_core.pyx): sequences
that join late, finish early (their rows refilled by others, out of plan order) or
are preempted and recomputed generate exactly what each generates alone, greedy
and seeded sampling alike."""
import pytest

from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams

PROMPTS = [[1, 450, 4996, 17354], [1, 3118, 29871, 42, 7], [1, 910, 338, 263, 1243, 29889], [1, 42],
           [1, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 9], [1, 2000, 3000]]


def params(i):
    """Lengths that end at different steps; every other request sampled with a seed."""
    if i % 2:
        return SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=5 + 4 * i, ignore_eos=True)
    return SamplingParams(temperature=0.0, max_tokens=5 + 4 * i, ignore_eos=True)


def make_engine(model_path, **options):
    return Engine(model_path, n_threads=1, max_model_len=128, block_size=4, **{"kv_cache_tokens": 1024, **options})


def alone(model_path, i):
    engine = make_engine(model_path)
    return [out.token_id for out in engine.generate(PROMPTS[i], params(i))]


def staggered(engine, joins):
    """Run every prompt, prompt i admitted before step joins[i]: {index: tokens}."""
    tokens, seq_index, step = {}, {}, 0
    while len(seq_index) < len(PROMPTS) or engine.has_work:
        for i, at in enumerate(joins):
            if at == step:
                seq_index[engine.add_request(PROMPTS[i], params(i)).seq_id] = i
        for out in engine.step():
            tokens.setdefault(seq_index[out.seq_id], []).append(out.token_id)
        step += 1
    return tokens


@pytest.mark.parametrize("joins", [[0, 0, 0, 0, 0, 0], [0, 3, 3, 6, 9, 10], [5, 0, 2, 2, 11, 1]])
def test_each_sequence_generates_what_it_generates_alone(model_path, joins):
    expected = {i: alone(model_path, i) for i in range(len(PROMPTS))}
    assert staggered(make_engine(model_path), joins) == expected


def test_preempted_sequences_generate_what_they_generate_alone(model_path):
    expected = {i: alone(model_path, i) for i in range(len(PROMPTS))}
    engine = make_engine(model_path, kv_cache_tokens=48)     # 12 blocks: decodes run out, the newest give way
    assert staggered(engine, [0, 0, 1, 1, 2, 2]) == expected
    assert engine.scheduler.num_preemptions > 0
