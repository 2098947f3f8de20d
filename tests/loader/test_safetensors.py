"""Our safetensors reader and HF folder loader against `safetensors` and
`transformers`, and on hostile files."""
import json
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import require_module
from pyforge.ggml_types import GGMLType
from pyforge.loader import ModelFileError, load_model_file
from pyforge.loader.hf import config_from_hf
from pyforge.loader.names import canonical_to_hf
from pyforge.loader.safetensors import read_safetensors

SHARED = Path(__file__).resolve().parents[3] / "shared"
HF_CONFIGS = sorted((SHARED / "models" / "hf-configs").glob("*/config.json")) + [
    SHARED / "models" / "TinyLlama-1.1B-Chat-v1.0" / "config.json"]


# -- reader vs safetensors.numpy ---------------------------------------------
def test_matches_safetensors_load_file(tmp_path):
    st = require_module("safetensors.numpy")
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((3, 5), dtype=np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "f64": rng.standard_normal((2, 2, 2)),
        "i64": rng.integers(-9, 9, (4, 1)),
        "i32": rng.integers(-9, 9, (3,)).astype(np.int32),
        "i8": rng.integers(-9, 9, (5,)).astype(np.int8),
        "u8": rng.integers(0, 255, (6,)).astype(np.uint8),
        "bool": rng.integers(0, 2, (3,)).astype(bool),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    path = tmp_path / "x.safetensors"
    st.save_file(arrays, str(path), metadata={"note": "hi"})
    ref = st.load_file(str(path))
    sf = read_safetensors(path)
    try:
        assert sf.entries.keys() == ref.keys()
        assert sf.metadata == {"note": "hi"}
        for name, expect in ref.items():
            got = sf.array(name)
            assert got.dtype == expect.dtype and got.shape == expect.shape, name
            assert np.array_equal(got, expect), name
            if got.size:
                assert not got.flags.owndata and not got.flags.writeable, name
    finally:
        sf.close()


def test_bf16_bits_match_torch(tmp_path):
    torch = require_module("torch")
    st_torch = require_module("safetensors.torch")
    t = torch.randn(4, 6).to(torch.bfloat16)
    path = tmp_path / "bf.safetensors"
    st_torch.save_file({"w": t}, str(path))
    sf = read_safetensors(path)
    ref = sf.tensor_ref("w")
    assert ref.ggml_type == GGMLType.BF16 and ref.shape == (4, 6) and ref.data.dtype == np.uint16
    assert np.array_equal(ref.data, t.view(torch.int16).numpy().view(np.uint16))
    sf.close()


# -- HF folders ---------------------------------------------------------------
@pytest.mark.parametrize("config,dtype,shards", [("tiny-gqa", "bfloat16", 3), ("tiny-qwen2", "float16", None)])
def test_hf_folder_tensors_match_safetensors(config, dtype, shards, tmp_path):
    st = require_module("safetensors.numpy")
    from pyforge.synthetic import CONFIGS, write_hf_folder

    folder = write_hf_folder(config, tmp_path / config, dtype=dtype, seed=1, shards=shards)
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == (shards or 1)
    with load_model_file(folder) as mf:
        ref = {}
        for f in files:
            if dtype == "bfloat16":      # numpy has no bfloat16: compare the bits via the raw loader
                sf = read_safetensors(f)
                ref.update({k: sf.array(k) for k in sf.entries})
            else:
                ref.update(st.load_file(str(f)))
        assert mf.tokenizer_source == ("hf", str(folder)) and mf.metadata == {}
        assert mf.config.rope_neox is True
        cfg = CONFIGS[config]
        for field in ("hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_size", "vocab_size",
                      "rms_eps", "rope_theta", "tie_embeddings", "attn_bias", "context_length", "rope_scaling"):
            assert getattr(mf.config, field) == getattr(cfg, field), field
        assert ("output.weight" in mf.tensors) == (not cfg.tie_embeddings)
        for name, t in mf.tensors.items():
            assert np.array_equal(t.data, ref[canonical_to_hf(name)]), name
            assert t.ggml_type == {"bfloat16": GGMLType.BF16, "float16": GGMLType.F16}[dtype]


def hf_field(ref, name):
    value = getattr(ref, name, None)
    params = getattr(ref, "rope_parameters", None) or {}
    if name == "rope_theta" and value is None:
        value = params.get("rope_theta")
    return value


@pytest.mark.parametrize("path", HF_CONFIGS, ids=lambda p: p.parent.name)
def test_config_matches_transformers(path):
    transformers = require_module("transformers")
    ref = transformers.AutoConfig.from_pretrained(str(path.parent))
    ours = config_from_hf(json.loads(path.read_text()), str(path))
    assert ours.hidden_size == ref.hidden_size
    assert ours.n_layers == ref.num_hidden_layers
    assert ours.n_heads == ref.num_attention_heads
    assert ours.n_kv_heads == ref.num_key_value_heads
    assert ours.head_dim == (getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads)
    assert ours.ffn_size == ref.intermediate_size
    assert ours.vocab_size == ref.vocab_size
    assert ours.rms_eps == ref.rms_norm_eps
    assert ours.rope_theta == hf_field(ref, "rope_theta")
    assert ours.context_length == ref.max_position_embeddings
    assert ours.tie_embeddings == ref.tie_word_embeddings
    assert ours.attn_bias == (ref.model_type == "qwen2")
    scaling = getattr(ref, "rope_parameters", None) or getattr(ref, "rope_scaling", None) or {}
    if scaling.get("rope_type", "default") == "default":
        assert ours.rope_scaling is None
    else:
        for key, value in ours.rope_scaling.items():
            assert scaling[key] == value, key


FAMILY_CONFIGS = ["tiny-qwen2", "tiny-llama3", "tiny-qwen3", "tiny-qwen3-mha", "tiny-phi3", "tiny-phi3-longrope",
                  "tiny-phi4-mini",
                  "tiny-granite", "tiny-olmo2", "tiny-smollm3", "tiny-smollm3-nope", "tiny-glm4"]


def rotary_dims(ref):
    factor = (getattr(ref, "rope_parameters", None) or {}).get("partial_rotary_factor")
    return int(ref.head_dim * (factor or getattr(ref, "partial_rotary_factor", None) or 1.0))


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_synthetic_configs_match_transformers(name, tmp_path):
    """transformers reads the config.json we write as we do (family keys included)."""
    transformers = require_module("transformers")
    from pyforge.synthetic import CONFIGS, hf_config_dict

    cfg = CONFIGS[name]
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    ref = transformers.AutoConfig.from_pretrained(str(tmp_path))
    ours = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert ours == cfg
    assert ours.head_dim == ref.head_dim and ours.rope_theta == hf_field(ref, "rope_theta")
    assert ours.tie_embeddings == ref.tie_word_embeddings and ours.n_rot == rotary_dims(ref)
    assert ours.nope_layers == tuple(i for i, rope in enumerate(getattr(ref, "no_rope_layers", [])) if not rope)
    for ours_name, hf_name in (("embedding_scale", "embedding_multiplier"), ("residual_scale", "residual_multiplier"),
                               ("attention_scale", "attention_multiplier"), ("logit_scale", "logits_scaling")):
        if hasattr(ref, hf_name):
            assert getattr(ours, ours_name) == getattr(ref, hf_name), hf_name


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_configs_saved_by_transformers_read_the_same(name, tmp_path):
    """The installed transformers writes its own keys (5.x: rope_parameters, dtype, layer_types;
    4.x: rope_theta, rope_scaling, torch_dtype): the same model either way."""
    transformers = require_module("transformers")
    from pyforge.synthetic import CONFIGS, hf_config_dict

    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(CONFIGS[name])))
    transformers.AutoConfig.from_pretrained(str(tmp_path)).save_pretrained(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert "rope_parameters" in saved and "dtype" in saved
    assert config_from_hf(saved) == CONFIGS[name]


def test_layer_types_with_a_sliding_layer_cap_the_context():
    from pyforge.synthetic import CONFIGS, hf_config_dict

    written = {**hf_config_dict(CONFIGS["tiny-qwen3"]), "sliding_window": 512}
    assert config_from_hf({**written, "layer_types": ["full_attention"] * 2}).context_length == 2048
    assert config_from_hf({**written, "layer_types": ["full_attention", "sliding_attention"]}).context_length == 512
    with pytest.raises(ModelFileError, match="layer_types"):
        config_from_hf({**written, "layer_types": ["full_attention", "chunked_attention"]})
    with pytest.raises(ModelFileError, match="layer_types"):
        config_from_hf({**written, "layer_types": ["full_attention"]})


# -- hostile safetensors files --------------------------------------------------
def st_bytes(header, data=b"", n=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE = {
    "empty": (b"", ["empty"]),
    "short": (b"\x01\x02\x03", ["truncated"]),
    "header-length-2^63": (st_bytes({}, n=1 << 63), ["header length"]),
    "header-length-200MB": (st_bytes({}, n=200_000_000), ["limit"]),
    "header-past-eof": (st_bytes({}, n=1000), ["runs past"]),
    "bad-json": (st_bytes(b'{"a": '), ["not valid json"]),
    "deep-json": (st_bytes(b"[" * 200_000 + b"]" * 200_000), ["not valid json"]),
    "bad-utf8": (st_bytes(b'{"\xff": 1}'), ["not valid json"]),
    "not-an-object": (st_bytes([1, 2]), ["object"]),
    "duplicate-key": (st_bytes(b'{"a": {}, "a": {}}'), ["duplicate"]),
    "bad-metadata": (st_bytes({"__metadata__": {"k": 1}}), ["__metadata__"]),
    "unknown-dtype": (st_bytes({"w": entry("Q9")}, b"\0" * 8), ["unknown dtype"]),
    "unsupported-dtype": (st_bytes({"w": entry("F8_E4M3", offsets=(0, 2))}, b"\0" * 8), ["unsupported dtype"]),
    "negative-dim": (st_bytes({"w": entry(shape=(-2,))}, b"\0" * 8), ["bad shape"]),
    "huge-dim": (st_bytes({"w": entry(shape=(1 << 50, 1 << 50))}, b"\0" * 8), ["bad shape"]),
    "bool-dim": (st_bytes({"w": entry(shape=(True,))}, b"\0" * 8), ["bad shape"]),
    "offsets-outside": (st_bytes({"w": entry(offsets=(0, 1 << 40))}, b"\0" * 8), ["outside"]),
    "offsets-reversed": (st_bytes({"w": entry(offsets=(8, 0))}, b"\0" * 8), ["outside"]),
    "offsets-not-ints": (st_bytes({"w": entry(offsets=(0, "8"))}, b"\0" * 8), ["data_offsets"]),
    "offsets-vs-shape": (st_bytes({"w": entry(shape=(3,))}, b"\0" * 16), ["needs"]),
    "overlap": (st_bytes({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, b"\0" * 16), ["overlap"]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_safetensors(case, tmp_path):
    data, words = HOSTILE[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(data)
    expect_error(path, words, read_safetensors)


def expect_error(path, words, fn=load_model_file):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ModelFileError) as err:
            fn(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(err.value)
    assert msg.startswith(str(path)), msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    assert time.perf_counter() - start < 2.0
    assert peak < 32 << 20, f"{peak} bytes allocated"
    return msg


# -- hostile HF folders ----------------------------------------------------------
MICRO_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
                "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "vocab_size": 4, "rms_norm_eps": 1e-5, "max_position_embeddings": 64}


def micro_weights(cfg=MICRO_CONFIG):
    h, f, v, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], 4 * cfg["num_key_value_heads"]
    w = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                  p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                  p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                  p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                  p + "mlp.down_proj.weight": (h, f)})
    return {k: np.ones(s, dtype=np.float32) for k, s in w.items()}


def micro_folder(folder, config=None, weights=None, index=None, files=None):
    st = require_module("safetensors.numpy")
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config or MICRO_CONFIG))
    weights = micro_weights() if weights is None else weights
    for fname, names in ({"model.safetensors": list(weights)} if files is None else files).items():
        st.save_file({k: weights[k] for k in names}, str(folder / fname))
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return folder


def test_micro_folder_loads(tmp_path):
    with load_model_file(micro_folder(tmp_path / "m")) as mf:
        assert mf.config.n_kv_heads == 1 and mf.config.head_dim == 4
        assert mf.tensors["blk.1.attn_k.weight"].shape == (4, 8)


def drop(name):
    w = micro_weights()
    del w[name]
    return w


def replace(name, shape=None, dtype=np.float32):
    w = micro_weights()
    w[name] = np.ones(shape or w[name].shape, dtype=dtype)
    return w


HOSTILE_FOLDERS = {
    "empty-config": (dict(config="{}"), ["unsupported model"]),
    "config-bad-json": (dict(config="{nope"), ["config.json is not valid json"]),
    "config-not-object": (dict(config="[1]"), ["object"]),
    "unsupported-arch": (dict(config={**MICRO_CONFIG, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}),
                         ["unsupported model"]),
    "gelu": (dict(config={**MICRO_CONFIG, "hidden_act": "gelu"}), ["hidden_act"]),
    "absurd-layers": (dict(config={**MICRO_CONFIG, "num_hidden_layers": 10**9}), ["n_layers"]),
    "string-size": (dict(config={**MICRO_CONFIG, "hidden_size": "8"}), ["hidden_size", "integer"]),
    "heads-not-divisible": (dict(config={**MICRO_CONFIG, "num_key_value_heads": 3}), ["n_kv_heads"]),
    "missing-tensor": (dict(weights=drop("model.layers.1.mlp.up_proj.weight")),
                       ["missing tensor blk.1.ffn_up.weight (model.layers.1.mlp.up_proj.weight)"]),
    "wrong-shape": (dict(weights=replace("model.layers.0.self_attn.k_proj.weight", (8, 8))),
                    ["blk.0.attn_k.weight", "shape (8, 8)"]),
    "int-weight": (dict(weights=replace("model.norm.weight", dtype=np.int32)), ["dtype i32"]),
    "unexpected": (dict(weights={**micro_weights(), "model.layers.0.self_attn.o_proj.bias": np.ones(8, np.float32)}),
                   ["unexpected tensor model.layers.0.self_attn.o_proj.bias"]),
    "index-escape": (dict(index={"model.norm.weight": "../evil.safetensors"}), ["bad file name"]),
    "index-missing-shard": (dict(index={"model.norm.weight": "model-2.safetensors"}), ["missing"]),
    "index-names-absent-tensor": (dict(index={**{k: "model.safetensors" for k in micro_weights()},
                                              "model.extra.weight": "model.safetensors"}), ["no shard holds"]),
    "no-weights": (dict(files={}), ["no *.safetensors"]),
}


@pytest.mark.parametrize("case", list(HOSTILE_FOLDERS))
def test_hostile_folder(case, tmp_path):
    kwargs, words = HOSTILE_FOLDERS[case]
    folder = micro_folder(tmp_path / case, **kwargs)
    expect_error(folder, words)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelFileError, match="no config.json"):
        load_model_file(tmp_path)


def test_phi3_fused_tensors_split_at_load(tmp_path):
    """qkv_proj and gate_up_proj become our q/k/v and gate/up weights: row views of the file."""
    st = require_module("safetensors.numpy")
    from pyforge.synthetic import CONFIGS, write_hf_folder

    cfg = CONFIGS["tiny-phi3"]
    folder = write_hf_folder("tiny-phi3", tmp_path / "phi3", seed=3)
    hf = st.load_file(str(folder / "model.safetensors"))
    with load_model_file(folder) as mf:
        qkv, gate_up = hf["model.layers.1.self_attn.qkv_proj.weight"], hf["model.layers.1.mlp.gate_up_proj.weight"]
        q, kv = cfg.q_dim, cfg.kv_dim
        for name, rows in (("attn_q", qkv[:q]), ("attn_k", qkv[q:q + kv]), ("attn_v", qkv[q + kv:]),
                           ("ffn_gate", gate_up[:cfg.ffn_size]), ("ffn_up", gate_up[cfg.ffn_size:])):
            assert np.array_equal(mf.tensors[f"blk.1.{name}.weight"].data, rows), name
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2}))
    expect_error(folder, ["fused tensor blk.0.attn_qkv.weight", "(192, 64)", "expected (128, 64)"])


@pytest.mark.parametrize("change,words", [
    ({"torch_dtype": 16}, ["torch_dtype must be a string"]),
    ({"dtype": ["float32"]}, ["dtype must be a string"]),
    ({"no_rope_layers": [1, 2, 1, 1]}, ["no_rope_layers", "0/1 flags"]),
    ({"no_rope_layers": None, "no_rope_layer_interval": 0}, ["no_rope_layer_interval"]),
    ({"no_rope_layers": [1, 1, 1]}, ["no_rope_layers", "one per layer (4)"]),
])
def test_bad_family_keys(change, words):
    from pyforge.synthetic import CONFIGS, hf_config_dict

    with pytest.raises(ModelFileError) as err:
        config_from_hf({**hf_config_dict(CONFIGS["tiny-smollm3"]), **change})
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("change,words", [
    ({"qk_layernorm": True}, ["qk_layernorm=True", "per-head q/k LayerNorms", "not supported"]),
    ({"use_parallel_residual": True}, ["use_parallel_residual=True", "parallel residual", "not supported"]),
    ({"use_qkv_bias": "yes"}, ["use_qkv_bias must be a bool"]),
    ({"layer_norm_eps": "1e-5"}, ["layer_norm_eps must be a number"]),
])
def test_bad_stablelm_keys(change, words):
    """StableLM 2 12B's q/k LayerNorms and parallel residual are refused by name."""
    from pyforge.synthetic import CONFIGS, hf_config_dict

    with pytest.raises(ModelFileError) as err:
        config_from_hf({**hf_config_dict(CONFIGS["tiny-stablelm"]), **change})
    for w in words:
        assert w in str(err.value)


def test_stablelm_norm_biases_and_qkv_bias_load(tmp_path):
    """LayerNorm biases (model.norm.bias too) and use_qkv_bias map to our names and flag."""
    from pyforge.synthetic import write_hf_folder

    folder = write_hf_folder("tiny-stablelm", tmp_path / "stablelm", seed=3)
    with load_model_file(folder) as mf:
        assert mf.config.attn_bias and mf.config.n_rot == 4 and mf.config.rms_eps == 1e-5
        for name in ("output_norm.bias", "blk.1.attn_norm.bias", "blk.1.ffn_norm.bias", "blk.1.attn_q.bias"):
            assert name in mf.tensors, name

