"""Copy models (pyforge/synthetic_copy.py): greedy decoding follows the configured token
cycles whatever the prompt, on the GGUF (Q4_K_M) and the HF folder alike."""
import numpy as np
import pytest

from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.synthetic import CONFIGS, write_gguf, write_hf_folder
from pyforge.synthetic_copy import COPY_CYCLES, FIRST_CYCLED, successors, walk


def test_successors_are_cycles_of_the_configured_length_that_skip_the_special_tokens():
    nxt = successors("small-k-copy")
    vocab, cycle = CONFIGS["small-k-copy"].vocab_size, COPY_CYCLES["small-k-copy"]
    cycled = nxt[FIRST_CYCLED:]
    assert sorted(cycled.tolist()) == list(range(FIRST_CYCLED, vocab))       # a permutation of 3 ..
    assert np.all(nxt[:FIRST_CYCLED] >= FIRST_CYCLED)
    lengths = []
    for start in (5, 1234, 31999):
        tokens = walk(nxt, start, 2 * cycle + 1)
        lengths.append(tokens[1:].index(start) + 1)
    assert all(1 < n <= cycle for n in lengths) and cycle in lengths
    assert np.array_equal(successors("small-k-copy"), nxt)                  # seeded: the same every time
    assert not np.array_equal(successors("small-k-copy", seed=1), nxt)


def test_only_copy_configs_have_successors():
    with pytest.raises(ValueError, match="not a copy config"):
        successors("small-k")


@pytest.fixture(scope="module")
def copy_gguf(tmp_path_factory):
    return str(write_gguf("small-k-copy", tmp_path_factory.mktemp("copy") / "m.gguf", "Q4_K_M"))


def greedy(path, prompts, max_tokens=24):
    engine = Engine(path, n_threads=1, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    out = {s.seq_id: [] for s in seqs}
    while engine.has_work:
        for o in engine.step():
            out[o.seq_id].append(o.token_id)
    return [out[s.seq_id] for s in seqs]


def test_greedy_decoding_follows_the_cycle_from_the_last_prompt_token(copy_gguf):
    nxt = successors("small-k-copy")
    rng = np.random.default_rng(0)
    prompts = [[1] + walk(nxt, 700, 20), [1, 2], [1] + rng.integers(3, 32000, 30).tolist(), [1]]
    for prompt, tokens in zip(prompts, greedy(copy_gguf, prompts)):
        assert tokens == walk(nxt, nxt[prompt[-1]], len(tokens))


def test_the_hf_folder_is_the_same_copy_model(tmp_path):
    nxt = successors("small-k-copy")
    folder = write_hf_folder("small-k-copy", tmp_path / "hf")
    prompt = [1] + walk(nxt, 42, 10)
    assert greedy(str(folder), [prompt])[0] == walk(nxt, nxt[prompt[-1]], 24)


def test_a_copy_model_is_not_the_plain_random_model(tmp_path, copy_gguf):
    nxt = successors("small-k-copy")
    plain = str(write_gguf("small-k", tmp_path / "plain.gguf", "Q4_K_M"))
    prompt = [1] + walk(nxt, 42, 10)
    assert greedy(plain, [prompt])[0] != greedy(copy_gguf, [prompt])[0]
