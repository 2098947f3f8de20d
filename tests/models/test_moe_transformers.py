"""Mixture-of-experts models against Hugging Face transformers (torch, CPU, float32) on
synthetic safetensors models: Mixtral (top-k renormalised; GQA with 4 experts, MHA with a
tied head, 8 experts, 3 picks) and Qwen3-MoE (per-head q/k norms and head_dim apart from
hidden / heads; all layers routed, or dense layers by decoder_sparse_step and
mlp_only_layers with the top-k weights not renormalised). Logits, the experts each token
is routed to (token for token, every MoE layer), a flattened batch after cached prefixes
and 32 greedy tokens; llama.cpp's older per-expert GGUF layout against the same weights."""
import numpy as np
import pytest

from conftest import require_module
from reference_checks import check_cached_prefix_batch, prompts, reference_greedy, rel_err
from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.loader.gguf import read_gguf
from pyforge.synthetic import write_gguf, write_hf_folder

CONFIGS = ["tiny-mixtral", "tiny-mixtral-mha", "tiny-qwen3-moe", "tiny-qwen3-moe-dense"]
GREEDY_TOKENS = 32
REL_TOL = 1e-4
ENGINE_ARGS = dict(n_threads=2, max_model_len=512, kv_cache_tokens=2048, block_size=16)



class Reference:
    """transformers' model of a folder: logits, and the top-k experts of each MoE layer."""

    def __init__(self, folder):
        self.torch = require_module("torch")
        transformers = require_module("transformers")
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=self.torch.float32).eval()
        self.k = self.model.config.num_experts_per_tok

    def logits(self, ids):
        with self.torch.no_grad():
            return self.model(self.torch.tensor([ids])).logits[0].double().numpy()

    def routing(self, ids):
        """[per MoE layer: int [n, k] expert ids, by descending weight]."""
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids]), output_router_logits=True)
        return [self.torch.topk(r.reshape(len(ids), -1), self.k, dim=-1).indices.numpy() for r in out.router_logits]


@pytest.fixture(scope="module", params=CONFIGS)
def pair(request, tmp_path_factory):
    folder = write_hf_folder(request.param, tmp_path_factory.mktemp(request.param), dtype="float32", seed=7)
    reference = Reference(folder)
    return Engine(str(folder), **ENGINE_ARGS), reference


def test_prompt_logits_match(pair):
    engine, reference = pair
    for ids in prompts(engine.config.vocab_size):
        assert rel_err(engine.prompt_logits(ids), reference.logits(ids)) < REL_TOL


def test_routing_matches_token_for_token(pair):
    engine, reference = pair
    model = engine.model
    ids = prompts(engine.config.vocab_size, seed=4)[3]
    model.routing_log = []
    try:
        engine.prompt_logits(ids)
        ours = model.routing_log
    finally:
        model.routing_log = None
    expected = reference.routing(ids)
    assert len(ours) == len(expected) == len(engine.config.moe_layers)
    for layer, (got, want) in enumerate(zip(ours, expected)):
        assert got.shape == want.shape == (len(ids), engine.config.n_experts_used)
        mismatched = np.flatnonzero((got != want).any(axis=1))
        assert not len(mismatched), f"MoE layer {layer}: tokens {mismatched.tolist()} routed differently"



def test_flattened_batch_with_cached_prefix_matches(pair):
    """Three sequences in one varlen batch: a prefill from scratch, a chunk after a cached
    prefix (blocks scattered in the pool), a decode row: their tokens share the experts."""
    engine, reference = pair
    check_cached_prefix_batch(engine, reference.logits, REL_TOL)



def test_greedy_generation_matches(pair):
    engine, reference = pair
    ids = prompts(engine.config.vocab_size, seed=3)[2]
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    ours = [out.token_id for out in engine.generate(ids, params)]
    assert ours == reference_greedy(reference.logits, ids, GREEDY_TOKENS)


@pytest.mark.parametrize("config", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_per_expert_gguf_layout_matches_transformers(config, tmp_path):
    """llama.cpp's older layout (blk.{i}.ffn_gate.{e}.weight, which llama-cpp-python 0.3.36 no longer
    loads): the same weights as the HF folder of that seed, so transformers is the reference."""
    folder = write_hf_folder(config, tmp_path / "hf", dtype="float32", seed=5)
    path = write_gguf(config, tmp_path / "m.gguf", "F32", seed=5, merged_experts=False)
    gf = read_gguf(path)
    names = {t.name for t in gf.tensors}
    gf.close()
    assert "blk.0.ffn_gate.1.weight" in names and "blk.0.ffn_gate_exps.weight" not in names
    engine = Engine(str(path), **ENGINE_ARGS)
    ids = prompts(engine.config.vocab_size, seed=6)[2]
    assert rel_err(engine.prompt_logits(ids), Reference(folder).logits(ids)) < REL_TOL
