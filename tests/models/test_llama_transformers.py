"""Logits against Hugging Face transformers (torch, CPU, float32) on synthetic
safetensors models: GQA, MHA, Qwen2 biases + tied head, Llama 3 rope scaling, and
two configs of each other family models/llama.py runs (Qwen3's per-head q/k norms
and head_dim apart from hidden / heads, Phi-3's fused tensors, Granite's
multipliers, OLMo 2's post-norms and whole-projection q/k norms, SmolLM3's NoPE
layers, GLM-4's partial interleaved rope, biases and sandwich norms, StableLM 2's
LayerNorms and partial rotate-half rope, with and without q/k/v biases)."""
import pytest

from conftest import require_module
from reference_checks import check_cached_prefix_batch, prompts, reference_greedy, rel_err
from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.synthetic import write_hf_folder

CONFIGS = ["tiny-gqa", "tiny-mha", "tiny-qwen2", "tiny-llama3", "tiny-qwen3", "tiny-qwen3-mha", "tiny-phi3",
           "tiny-granite", "tiny-granite-mha", "tiny-olmo2", "tiny-olmo2-gqa", "tiny-smollm3", "tiny-smollm3-nope",
           "tiny-glm4", "tiny-glm4-mha", "tiny-stablelm", "tiny-stablelm-gqa"]
GREEDY_TOKENS = 32
REL_TOL = 1e-4



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


def test_prompt_logits_match(pair):
    engine, reference = pair
    for ids in prompts(engine.config.vocab_size):
        assert rel_err(engine.prompt_logits(ids), reference(ids)) < REL_TOL



def test_flattened_batch_with_cached_prefix_matches(pair):
    """Three sequences in one varlen batch: one prefill from scratch, one chunk
    after a cached prefix (paged blocks shuffled in the pool), one decode row."""
    engine, reference = pair
    check_cached_prefix_batch(engine, reference, REL_TOL)



def test_greedy_generation_matches(pair):
    engine, reference = pair
    ids = prompts(engine.config.vocab_size, seed=3)[2]
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    ours = [out.token_id for out in engine.generate(ids, params)]
    assert ours == reference_greedy(reference, ids, GREEDY_TOKENS)
