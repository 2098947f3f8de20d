"""Model families as registry entries: every family round-trips through the files
we write and read, lookups fail clearly, and no code outside the registry asks
which family a model is."""
import dataclasses
import re
from pathlib import Path

import pytest

from pyforge.loader.hf import config_from_hf
from pyforge.loader.names import canonical_to_hf, hf_to_canonical
from pyforge.models.llama import LlamaModel
from pyforge.models.registry import FAMILIES, SUPPORTED, family, family_of_hf_config
from pyforge.synthetic import CONFIGS, hf_config_dict

PACKAGE = Path(__file__).resolve().parents[2] / "pyforge"


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_a_family_survives_its_own_config_json(arch):
    cfg = dataclasses.replace(CONFIGS["tiny-gqa"], arch=arch, attn_bias=FAMILIES[arch].qkv_bias)
    written = hf_config_dict(cfg)
    assert family_of_hf_config(written) is FAMILIES[arch]
    read = config_from_hf(written)
    assert (read.arch, read.attn_bias, read.hidden_size) == (arch, FAMILIES[arch].qkv_bias, cfg.hidden_size)


def test_lookups():
    assert family("qwen2").qkv_bias and family("qwen2").gguf_rope_neox
    assert family("llama").model_class() is LlamaModel
    assert family_of_hf_config({"architectures": ["MistralForCausalLM"]}).arch == "mistral"
    assert family_of_hf_config({"architectures": ["SomethingElse"], "model_type": "llama"}).arch == "llama"
    assert family_of_hf_config({"model_type": "gpt2"}) is None
    assert SUPPORTED.startswith("llama, mistral, qwen2, qwen3") and "gemma, gemma2, gemma3" in SUPPORTED
    with pytest.raises(ValueError, match=re.escape(f"unsupported architecture 'gpt2' (supported: {SUPPORTED})")):
        family("gpt2")


def test_a_family_renames_hf_tensors_of_its_own():
    """Gemma 2's post_attention_layernorm is a post-norm; Llama's is the FFN's pre-norm."""
    name = "model.layers.3.post_attention_layernorm.weight"
    assert hf_to_canonical(name) == hf_to_canonical(name, family("gemma")) == "blk.3.ffn_norm.weight"
    assert hf_to_canonical(name, family("gemma2")) == "blk.3.post_attention_norm.weight"
    assert hf_to_canonical("model.layers.0.pre_feedforward_layernorm.weight", family("gemma3")) == "blk.0.ffn_norm.weight"
    assert canonical_to_hf("blk.1.post_ffw_norm.weight", family("gemma2")) == \
        "model.layers.1.post_feedforward_layernorm.weight"
    assert hf_to_canonical("model.layers.0.pre_feedforward_layernorm.weight") is None


def test_no_code_outside_the_registry_asks_for_a_family_by_name():
    asks = re.compile(r"\barch\s*(?:==|!=|in\b|not in\b)|\b(?:arch|ARCHS)\s*=\s*\(")
    offenders = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py") if p.name != "registry.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if asks.search(line)]
    assert offenders == []
