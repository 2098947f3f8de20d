"""Longrope (Phi-3) against transformers (torch, CPU, float32): the long factors past the
pretraining length, the short ones within it, the attention factor as transformers
computes it, on whole and on partially rotated heads (Phi-4-mini)."""
import json

import numpy as np
import pytest

from conftest import require_module
from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.loader.hf import config_from_hf
from pyforge.models.rope_scaling import longrope_attention_factor, uses_long_factors
from pyforge.synthetic import write_hf_folder

REL_TOL = 1e-4
ORIGINAL = 64      # tiny-phi3-longrope's original_max_position_embeddings


def rel_err(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def engine_and_reference(folder):
    torch = require_module("torch")
    transformers = require_module("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ref.eval()
    engine = Engine(str(folder), n_threads=2, kv_cache_tokens=1024, block_size=16)

    def reference(ids):
        with torch.no_grad():
            return ref(torch.tensor([ids])).logits[0].double().numpy()

    return engine, reference


def random_ids(n, seed):
    return np.random.default_rng(seed).integers(3, 32000, n).tolist()


def test_long_factors_past_the_pretraining_length(tmp_path):
    """Context 256 > 64: we use the long factors (as llama.cpp does), which transformers uses
    for every sequence longer than 64 tokens; its attention factor sqrt(1 + ln 4 / ln 64) too."""
    engine, reference = engine_and_reference(write_hf_folder("tiny-phi3-longrope", tmp_path / "m", seed=3))
    assert uses_long_factors(engine.config) and longrope_attention_factor(engine.config) > 1.1
    for n in (ORIGINAL + 1, 120, 200):
        ids = random_ids(n, n)
        assert rel_err(engine.prompt_logits(ids), reference(ids)) < REL_TOL
    ids = random_ids(ORIGINAL + 6, 1)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    ours = [out.token_id for out in engine.generate(ids, params)]
    expected, context = [], list(ids)
    for _ in range(32):
        expected.append(int(np.argmax(reference(context)[-1])))
        context.append(expected[-1])
    assert ours == expected


def test_short_factors_within_the_pretraining_length(tmp_path):
    """Context == the pretraining length: the short factors, and no attention factor."""
    folder = write_hf_folder("tiny-phi3-longrope", tmp_path / "m", seed=4)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": ORIGINAL}))
    engine, reference = engine_and_reference(folder)
    assert not uses_long_factors(engine.config) and longrope_attention_factor(engine.config) == 1.0
    for n in (1, 20, ORIGINAL):
        ids = random_ids(n, n)
        assert rel_err(engine.prompt_logits(ids), reference(ids)) < REL_TOL


@pytest.mark.parametrize("max_positions,original,attention_factor", [
    (131072, 4096, None), (4096, 4096, None), (8192, 2048, None), (131072, 4096, 1.3)])
def test_attention_factor_as_transformers_computes_it(max_positions, original, attention_factor):
    transformers = require_module("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [3.0] * 8}
    if attention_factor is not None:
        scaling["attention_factor"] = attention_factor
    hf = transformers.Phi3Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=128,
                                 vocab_size=100, max_position_embeddings=max_positions,
                                 original_max_position_embeddings=original, rope_scaling=scaling, pad_token_id=0)
    _, expected = ROPE_INIT_FUNCTIONS["longrope"](hf, None)
    ours = config_from_hf(hf.to_dict())
    assert ours.rope_scaling["original_max_position_embeddings"] == original
    assert longrope_attention_factor(ours) == pytest.approx(expected, rel=1e-12)


def test_su_is_longrope_and_factor_lists_are_checked():
    base = {"architectures": ["Phi3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 256,
            "original_max_position_embeddings": 64}
    su = {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    assert config_from_hf({**base, "rope_scaling": su}).rope_scaling["rope_type"] == "longrope"
    with pytest.raises(ValueError, match=r"long_factor.*list of 8 positive numbers"):
        config_from_hf({**base, "rope_scaling": {**su, "long_factor": [2.0] * 7}})
    with pytest.raises(ValueError, match=r"short_factor.*list of 8 positive numbers"):
        config_from_hf({**base, "rope_scaling": {**su, "short_factor": [1.0] * 7 + [-1.0]}})
    with pytest.raises(ValueError, match="longrope rope_scaling needs long_factor"):
        config_from_hf({**base, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8}})


def test_partially_rotated_longrope_matches_transformers(tmp_path):
    """Phi-4-mini's case (3/4 of each head rotated): the attention factor scales only the rotated dims."""
    engine, reference = engine_and_reference(write_hf_folder("tiny-phi4-mini", tmp_path / "m", seed=5))
    assert engine.config.n_rot == 24 < engine.config.head_dim and longrope_attention_factor(engine.config) > 1.1
    for n in (ORIGINAL + 1, 150):
        ids = random_ids(n, n)
        assert rel_err(engine.prompt_logits(ids), reference(ids)) < REL_TOL
