"""Logits against Hugging Face transformers (torch, CPU, float32) on synthetic
safetensors models: GQA, MHA, Qwen2 biases + tied head, Llama 3 rope scaling, and
two configs of each other family models/llama.py runs (Qwen3's per-head q/k norms
and head_dim apart from hidden / heads, Phi-3's fused tensors, Granite's
multipliers, OLMo 2's post-norms and whole-projection q/k norms, SmolLM3's NoPE
layers, GLM-4's partial interleaved rope, biases and sandwich norms)."""
import numpy as np
import pytest

from conftest import require_module
from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.sequence import Sequence
from pyforge.synthetic import write_hf_folder

CONFIGS = ["tiny-gqa", "tiny-mha", "tiny-qwen2", "tiny-llama3", "tiny-qwen3", "tiny-qwen3-mha", "tiny-phi3",
           "tiny-granite", "tiny-granite-mha", "tiny-olmo2", "tiny-olmo2-gqa", "tiny-smollm3", "tiny-smollm3-nope",
           "tiny-glm4", "tiny-glm4-mha"]
GREEDY_TOKENS = 32
REL_TOL = 1e-4


def rel_err(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module", params=CONFIGS)
def pair(request, tmp_path_factory):
    torch = require_module("torch")
    transformers = require_module("transformers")
    folder = write_hf_folder(request.param, tmp_path_factory.mktemp(request.param), dtype="float32", seed=7)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ref.eval()
    engine = Engine(str(folder), n_threads=2, max_model_len=512, kv_cache_tokens=2048, block_size=16)

    def reference(ids):
        with torch.no_grad():
            return ref(torch.tensor([ids])).logits[0].double().numpy()

    return engine, reference


def prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in (1, 7, 40, 100)]


def test_prompt_logits_match(pair):
    engine, reference = pair
    for ids in prompts(engine.config.vocab_size):
        assert rel_err(engine.prompt_logits(ids), reference(ids)) < REL_TOL


def new_sequence(engine, ids, seq_id):
    return Sequence(seq_id, ids, SamplingParams(max_tokens=1), 0, engine.max_model_len)


def test_flattened_batch_with_cached_prefix_matches(pair):
    """Three sequences in one varlen batch: one prefill from scratch, one chunk
    after a cached prefix (paged blocks shuffled in the pool), one decode row."""
    engine, reference = pair
    rng = np.random.default_rng(1)
    vocab = engine.config.vocab_size
    a, b, c = (rng.integers(3, vocab, n).tolist() for n in (23, 50, 18))
    seqs = [new_sequence(engine, ids, i) for i, ids in enumerate((a, b, c))]
    bm, runner = engine.block_manager, engine.runner
    # claim some blocks first so the sequences' blocks are scattered in the pool
    filler = new_sequence(engine, list(range(3, 3 + 64)), 99)
    bm.allocate(filler, 64)
    try:
        # step 1: cache the first 33 tokens of b and the first 17 of c
        for seq, n in ((seqs[1], 33), (seqs[2], 17)):
            bm.allocate(seq, n)
        runner.run([(seqs[1], 33), (seqs[2], 17)])
        seqs[1].num_computed_tokens, seqs[2].num_computed_tokens = 33, 17
        # step 2: a from scratch, b's remaining 17, c's last token, all in one batch
        plan = [(seqs[0], 23), (seqs[1], 17), (seqs[2], 1)]
        for seq, n in plan:
            bm.allocate(seq, seq.num_computed_tokens + n)
        logits, _ = runner.run(plan, all_logits=True)
        expected = np.concatenate([reference(a), reference(b)[33:], reference(c)[17:]])
        assert rel_err(logits, expected) < REL_TOL
    finally:
        for seq in (*seqs, filler):
            bm.release(seq)
    assert bm.num_free == bm.n_blocks


def test_greedy_generation_matches(pair):
    engine, reference = pair
    ids = prompts(engine.config.vocab_size, seed=3)[2]
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    ours = [out.token_id for out in engine.generate(ids, params)]
    expected, context = [], list(ids)
    for _ in range(GREEDY_TOKENS):
        nxt = int(np.argmax(reference(context)[-1]))
        expected.append(nxt)
        context.append(nxt)
    assert ours == expected
