"""Gemma's and the sliding window's config keys: transformers' defaults where a config.json
leaves them out, llama.cpp's rules for GGUF metadata, and a clear error for every bad value."""
import dataclasses
import math

import numpy as np
import pytest

from pyforge.backends.cpu import CpuBackend
from pyforge.loader import ModelFileError, load_model_file
from pyforge.loader.hf import config_from_hf
from pyforge.models.gemma import GemmaModel
from pyforge.models.gemma_options import from_gguf, windowed_layers
from pyforge.synthetic import get_config, hf_config_dict, write_gguf


def gemma_json(name="tiny-gemma2", **changes):
    cfg = hf_config_dict(get_config(name))
    for key, value in changes.items():
        if value is dataclasses.MISSING:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


def test_absent_keys_take_transformers_defaults():
    missing = dataclasses.MISSING
    c = config_from_hf(gemma_json(query_pre_attn_scalar=missing, sliding_window=missing, layer_types=missing,
                                  attn_logit_softcapping=missing, final_logit_softcapping=missing))
    assert (c.attention_scale, c.sliding_window, c.sliding_layers) == (256 ** -0.5, 4096, (0, 2))
    assert (c.attn_softcap, c.final_softcap, c.embedding_scale) == (50.0, 30.0, 8.0)
    c3 = config_from_hf(gemma_json("tiny-gemma3", layer_types=missing, rope_local_base_freq=missing,
                                   attn_logit_softcapping=None, sliding_window_pattern=3))
    assert (c3.sliding_layers, c3.rope_theta_local, c3.attn_softcap) == ((0, 1, 3, 4), 10000.0, 0.0)
    c1 = config_from_hf(gemma_json("tiny-gemma", head_dim=missing))
    assert (c1.head_dim, c1.attention_scale, c1.sliding_window, c1.tie_embeddings) == (256, None, 0, True)


def test_mistral_window():
    base = hf_config_dict(get_config("tiny-mistral"))
    assert config_from_hf(base).sliding_layers == (0, 1)
    assert config_from_hf({**base, "sliding_window": None}).sliding_window == 0
    absent = {k: v for k, v in base.items() if k != "sliding_window"}
    assert config_from_hf(absent).sliding_window == 4096          # MistralConfig's default


@pytest.mark.parametrize("changes,message", [
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
    ({"layer_types": ["sliding_attention"]}, "layer_types must list 4"),
    ({"layer_types": ["sliding_attention", "full_attention", "local", "full_attention"]}, "layer_types"),
    ({"sliding_window": -3}, "sliding_window must be"),
    ({"sliding_window": 2.5}, "sliding_window must be an integer"),
    ({"attn_logit_softcapping": "50"}, "attn_logit_softcapping must be a number"),
    ({"final_logit_softcapping": -1.0}, "final_softcap must be a non-negative number"),
    ({"query_pre_attn_scalar": True}, "query_pre_attn_scalar must be a number"),
    ({"layer_types": None, "sliding_window_pattern": 0}, "sliding_window_pattern must be a positive integer"),
])
def test_bad_gemma_keys_are_named(changes, message):
    with pytest.raises(ModelFileError, match=message):
        config_from_hf(gemma_json(**changes))


def test_image_text_gemma3_needs_its_text_config():
    with pytest.raises(ModelFileError, match="config.json of Gemma3ForConditionalGeneration has no text_config object"):
        config_from_hf({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": None})


def test_bad_mistral_window_is_named():
    with pytest.raises(ModelFileError, match="sliding_window must be a non-negative integer or null"):
        config_from_hf({**hf_config_dict(get_config("tiny-mistral")), "sliding_window": "4096"})


@pytest.mark.parametrize("field,value,message", [
    ("sliding_layers", (0, 9), "sliding_layers must be a tuple of layer indices below 4"),
    ("sliding_window", -1, "sliding_window must be an integer"),
    ("attn_softcap", math.inf, "attn_softcap must be a non-negative number"),
    ("attention_scale", 0.0, "attention_scale must be a positive number"),
    ("embedding_scale", -8.0, "embedding_scale must be a positive number"),
    ("rope_theta_local", math.nan, "rope_theta_local must be a positive number"),
])
def test_model_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_config("tiny-gemma2"), **{field: value}).validate()
    with pytest.raises(ValueError, match="sliding_layers are given but sliding_window is 0"):
        dataclasses.replace(get_config("tiny-gemma2"), sliding_window=0).validate()


def gguf_reader(meta):
    def number(key, kind, default=None):
        return kind(meta[key]) if key in meta else default
    return number


def test_gguf_follows_llama_cpp():
    """llama.cpp stores no query_pre_attn_scalar: head_dim, but hidden / heads for the 27B models
    (46 layers for Gemma 2, 62 for Gemma 3); the window pattern and Gemma 3's local rope base are
    fixed (2 and 6; 10000) unless the file says otherwise."""
    meta = {"embedding_length": 4608, "attention.head_count": 32, "attention.key_length": 128,
            "attention.sliding_window": 4096}
    assert from_gguf(2, gguf_reader(meta), 46)["attention_scale"] == 144 ** -0.5
    assert from_gguf(2, gguf_reader(meta), 42)["attention_scale"] == 128 ** -0.5
    g3 = from_gguf(3, gguf_reader(meta), 12)
    assert g3["sliding_layers"] == windowed_layers(12, 3) == (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)
    assert (g3["rope_theta_local"], g3["attn_softcap"]) == (10000.0, 0.0)
    assert from_gguf(2, gguf_reader(meta), 4)["attn_softcap"] == 50.0
    assert from_gguf(1, gguf_reader(meta), 4) == {"embedding_scale": math.sqrt(4608)}


@pytest.mark.parametrize("activation_bytes,dtype", [(4, np.float32), (2, np.float16)])
def test_embedding_scale_is_rounded_to_the_activation_dtype(activation_bytes, dtype, tmp_path):
    """transformers multiplies Gemma's embeddings by sqrt(hidden) as a tensor of the activation
    dtype; Granite's multipliers (a Python float) are not rounded, so the scale primitive is not."""
    backend = CpuBackend(n_threads=1)
    backend.activation_dtype_bytes = activation_bytes
    with load_model_file(write_gguf("tiny-gemma", tmp_path / "m.gguf", "F32")) as mf:
        mf.config = dataclasses.replace(mf.config, embedding_scale=math.sqrt(3072))
        model = GemmaModel(mf, backend)
    assert model.embedding_scale == float(dtype(math.sqrt(3072)))     # fp16: 55.4375, not 55.4256...
