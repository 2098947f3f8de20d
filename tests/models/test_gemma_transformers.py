"""Gemma 1, 2, 3 and Mistral's sliding window: logits against Hugging Face transformers (torch,
CPU, float32) on synthetic safetensors models, prompts longer than the window (24 or 7
positions), a flattened batch whose cached prefix lies partly outside the window, greedy
generation, and the CUDA backend on the emulator for Gemma 2."""
import json
import shutil
import sys

import numpy as np
import pytest
from emulated_cupy import make_emulated_cupy

from conftest import require_module
from reference_checks import check_cached_prefix_batch, prompts, reference_greedy, rel_err
from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.loader.hf import config_from_hf
from pyforge.synthetic import TOKENIZER_FILES, get_config, shared_dir, write_hf_folder

# tiny-gemma: MQA, head_dim 32 != hidden / heads; tiny-gemma2: GQA, windows on even layers, soft
# caps that bend; tiny-gemma3: q/k norms, 5 of 6 layers windowed, local rope base, linear scaling;
# the -b configs: MHA, a query_pre_attn_scalar that is not head_dim, window 7, transformers'
# default caps (Gemma 2) / an explicit layer_types with the global layer first (Gemma 3)
CONFIGS = ["tiny-gemma", "tiny-gemma-b", "tiny-gemma2", "tiny-gemma2-b", "tiny-gemma3", "tiny-gemma3-b",
           "tiny-mistral"]
REL_TOL = 1e-4
ENGINE_ARGS = dict(n_threads=2, max_model_len=512, kv_cache_tokens=2048, block_size=16)



def load_reference(folder, **overrides):
    torch = require_module("torch")
    transformers = require_module("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **overrides).eval()

    def logits(ids):
        with torch.no_grad():
            return ref(torch.tensor([ids])).logits[0].double().numpy()
    return ref, logits


@pytest.fixture(scope="module", params=CONFIGS)
def pair(request, tmp_path_factory):
    folder = write_hf_folder(request.param, tmp_path_factory.mktemp(request.param), dtype="float32", seed=7)
    ref, reference = load_reference(folder)
    return Engine(str(folder), **ENGINE_ARGS), reference, folder, ref, request.param


def test_prompt_logits_match(pair):
    engine, reference, *_ = pair
    for ids in prompts(engine.config.vocab_size):
        assert rel_err(engine.prompt_logits(ids), reference(ids)) < REL_TOL


def test_the_window_shapes_long_prompts(pair):
    """A transformers model without the window is far from ours past the window: the prompts
    above test the window, not a context that happens to fit it."""
    engine, _, folder, *_ = pair
    if not engine.config.sliding_window:
        pytest.skip("no sliding window in this config")
    _, unwindowed = load_reference(folder, sliding_window=4096)
    ids = prompts(engine.config.vocab_size)[3]
    assert rel_err(engine.prompt_logits(ids), unwindowed(ids)) > 100 * REL_TOL


def test_transformers_config_reads_back(pair):
    """The config.json transformers writes (transformers 5: rope_parameters per layer type,
    layer_types) gives the config we generated from."""
    *_, ref, name = pair
    written = json.loads(ref.config.to_json_string())
    assert config_from_hf(written) == get_config(name)


def test_image_text_gemma3_runs_its_text_model(tmp_path):
    """Gemma 3 4B and up ship as Gemma3ForConditionalGeneration (a vision tower beside the text
    model, the text config nested): written by transformers itself, we load the text model alone
    and match its text-only logits."""
    torch = require_module("torch")
    transformers = require_module("transformers")
    torch.manual_seed(0)
    text = transformers.Gemma3TextConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=7, layer_types=["sliding_attention", "full_attention",
                                                                            "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    model = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4))
    with torch.no_grad():       # transformers initialises the norms to 0 (a scale of 1): make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and "language_model" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path / "mm")
    for fname in TOKENIZER_FILES:       # a 32000-token vocabulary for the engine
        if (shared_dir() / "models" / "TinyLlama-1.1B-Chat-v1.0" / fname).exists():
            shutil.copyfile(shared_dir() / "models" / "TinyLlama-1.1B-Chat-v1.0" / fname, tmp_path / "mm" / fname)
    ref, reference = load_reference(tmp_path / "mm")
    engine = Engine(str(tmp_path / "mm"), **ENGINE_ARGS)
    assert (engine.config.arch, engine.config.sliding_layers, engine.config.rope_theta_local) == ("gemma3", (0, 2), 1e4)
    for ids in prompts(engine.config.vocab_size)[2:]:
        assert rel_err(engine.prompt_logits(ids), reference(ids)) < REL_TOL



def test_flattened_batch_with_cached_prefix_matches(pair):
    """Three sequences in one varlen batch: a prefill from scratch, a chunk after a cached prefix
    of 33 tokens (its first blocks outside every window), a decode row; blocks scattered."""
    engine, reference, *_ = pair
    check_cached_prefix_batch(engine, reference, REL_TOL)



def test_greedy_generation_matches(pair):
    """32 tokens past a 40-token prompt: decode steps run past the window."""
    engine, reference, *_ = pair
    ids = prompts(engine.config.vocab_size, seed=3)[2]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    ours = [out.token_id for out in engine.generate(ids, params)]
    assert ours == reference_greedy(reference, ids, 32)


def test_prefix_cache_hit_past_the_window(pair):
    """A request whose first 96 positions come from the prefix cache (an earlier request's blocks,
    most of them outside every window by now) generates transformers' greedy tokens."""
    engine, reference, *_ = pair
    rng = np.random.default_rng(9)
    first = rng.integers(3, engine.config.vocab_size, 100).tolist()
    second = first + rng.integers(3, engine.config.vocab_size, 20).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    list(engine.generate(first, SamplingParams(max_tokens=1)))
    hits = engine.block_manager.prefix_hits
    ours = [out.token_id for out in engine.generate(second, params)]
    assert engine.block_manager.prefix_hits - hits == 96      # tokens: six whole blocks of 16
    expected, context = [], list(second)
    for _ in range(6):
        expected.append(int(np.argmax(reference(context)[-1])))
        context.append(expected[-1])
    assert ours == expected


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3-b"])      # head_dim 32: the CUDA kernels'
def test_cuda_backend_on_the_emulator(name, tmp_path):
    """Gemma 2 (GeGLU, sandwich norms, windows, both soft caps) and Gemma 3 (q/k norms, two ropes)
    through the CUDA kernels run by the emulator, fp16 activations: the bound of
    tests/backends/test_cuda_backend.py; decode steps replayed as CUDA graphs give the same tokens."""
    folder = write_hf_folder(name, tmp_path / "hf", dtype="float32", seed=5)
    _, reference = load_reference(folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "cupy", make_emulated_cupy())
        cuda = Engine(str(folder), device="cuda", **ENGINE_ARGS)
        for ids in prompts(cuda.config.vocab_size, seed=4)[::3]:     # 1 token (decode kernels), 100 (prefill)
            assert rel_err(cuda.prompt_logits(ids), reference(ids)) < 5e-3
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        ids = prompts(cuda.config.vocab_size, seed=4)[2]
        cuda_tokens = [out.token_id for out in cuda.generate(ids, params)]   # decode past the window
        graphs = Engine(str(folder), device="cuda", cuda_graphs=True, **ENGINE_ARGS)
        assert [out.token_id for out in graphs.generate(ids, params)] == cuda_tokens
    context = list(ids)
    for tok in cuda_tokens:
        row = reference(context)[-1]
        assert row[tok] >= row.max() - 1e-2 * row.std(), "a CUDA greedy token that is no near-tie of the top one"
        context.append(tok)
