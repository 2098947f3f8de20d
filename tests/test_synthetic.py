"""Synthetic models: GGUF and HF folders from one seed are one model, checked
with external readers (gguf.GGUFReader, safetensors, transformers, llama.cpp)."""
import json

import numpy as np
import pytest

from conftest import require_module
from pyforge import synthetic
from pyforge.ggml_types import GGMLType
from pyforge.loader import load_model_file
from pyforge.loader.gguf import read_gguf
from pyforge.loader.names import canonical_to_hf
from pyforge.models.registry import family
from pyforge.synthetic import (CONFIGS, ensure_model, gguf_tensor_type, make_tensor, tensor_shapes,
                               unpermute_qk, write_gguf, write_hf_folder)

TINY = ["tiny-gqa", "tiny-mha", "tiny-qwen2", "tiny-llama3"]


def test_configs():
    c = CONFIGS["tinyllama-1.1b"]
    assert (c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_size, c.vocab_size) == (2048, 22, 32, 4, 5632, 32000)
    assert (c.rope_theta, c.rms_eps, c.context_length, c.head_dim) == (10000.0, 1e-5, 2048, 64)
    q = CONFIGS["tiny-qwen2"]
    assert q.arch == "qwen2" and q.attn_bias and q.tie_embeddings
    assert CONFIGS["tiny-llama3"].rope_scaling["rope_type"] == "llama3"
    assert CONFIGS["tiny-llama3"].rope_theta == 500000.0
    assert CONFIGS["tiny-mha"].n_kv_heads == CONFIGS["tiny-mha"].n_heads
    for cfg in CONFIGS.values():
        cfg.validate()


def gguf_as_hf(cfg, name, arr):
    """A GGUF tensor (read by gguf.GGUFReader) in HF layout."""
    fam = family(cfg.arch)
    if fam.hf_rope_neox and not fam.gguf_rope_neox and name.endswith(("attn_q.weight", "attn_k.weight")):
        return unpermute_qk(arr, cfg.n_heads if "attn_q" in name else cfg.n_kv_heads)
    return arr


def test_gemma_files_hold_one_model(tmp_path):
    """Gemma's HF file stores each norm less 1 (its RMSNorm scales by 1 + w), its GGUF file the
    multiplier itself, as llama.cpp's converter writes it; both load to the same tensors, and the
    GGUF carries the Gemma 2 keys llama.cpp reads."""
    gguf = require_module("gguf")
    st = require_module("safetensors.numpy")
    folder = write_hf_folder("tiny-gemma2", tmp_path / "hf", seed=5)
    path = write_gguf("tiny-gemma2", tmp_path / "m.gguf", "F32", seed=5)
    hf = st.load_file(str(folder / "model.safetensors"))
    norm = make_tensor("blk.1.post_attention_norm.weight", (64,), 5)
    assert np.array_equal(hf["model.layers.1.post_attention_layernorm.weight"] + np.float32(1), norm)
    with load_model_file(folder) as from_hf, load_model_file(path) as from_gguf:
        assert from_hf.config == CONFIGS["tiny-gemma2"]
        for key, value in vars(from_hf.config).items():         # GGUF floats are float32
            assert getattr(from_gguf.config, key) == (np.float32(value) if isinstance(value, float) else value), key
        for name, ref in from_gguf.tensors.items():
            assert np.array_equal(np.asarray(from_hf.tensors[name].data), np.asarray(ref.data)), name
    fields = gguf.GGUFReader(str(path)).fields
    assert float(fields["gemma2.attn_logit_softcapping"].parts[-1][0]) == np.float32(0.05)
    assert int(fields["gemma2.attention.sliding_window"].parts[-1][0]) == 24


ROPE_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


@pytest.mark.parametrize("config,fmt,dtype", [
    ("tiny-qwen2", "F16", "float16"), ("tiny-llama3", "F32", "float32"), ("tiny-phi3-longrope", "F32", "float32"),
    ("tiny-olmo2", "F16", "float16"), ("tiny-glm4", "F32", "float32"), ("tiny-qwen3", "F32", "float32")])
def test_gguf_and_hf_folder_hold_the_same_weights(config, fmt, dtype, tmp_path):
    gguf = require_module("gguf")
    st = require_module("safetensors.numpy")
    cfg, fam = CONFIGS[config], family(CONFIGS[config].arch)
    reader = gguf.GGUFReader(str(write_gguf(config, tmp_path / "m.gguf", fmt, seed=5)))
    folder = write_hf_folder(config, tmp_path / "hf", dtype=dtype, seed=5)
    hf = st.load_file(str(folder / "model.safetensors"))
    names = {t.name for t in reader.tensors} - ROPE_TENSORS
    assert {canonical_to_hf(n, fam) for n in names} == set(hf)
    for t in reader.tensors:
        if t.name in ROPE_TENSORS:
            assert cfg.rope_scaling is not None and t.data.shape == (cfg.n_rot // 2,)
            continue
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        ref = hf[canonical_to_hf(t.name, fam)]
        # GGUF keeps 1-D tensors (norms, biases) in F32, as llama.cpp does: compare at the HF precision
        assert np.array_equal(gguf_as_hf(cfg, t.name, arr).astype(ref.dtype), ref), t.name
    assert ("output.weight" in names) == (not cfg.tie_embeddings)


def test_gguf_metadata_and_vocab(tmp_path):
    # our reader (checked against gguf.GGUFReader in tests/loader) on both files
    path = write_gguf("tiny-gqa", tmp_path / "m.gguf", "F16")
    f, vocab = read_gguf(path), read_gguf(synthetic.shared_dir() / "vocab" / "ggml-vocab-llama-spm.gguf")
    m = f.metadata
    assert m["general.architecture"] == "llama"
    assert m["llama.attention.head_count_kv"] == 2 and m["llama.embedding_length"] == 64
    assert m["general.file_type"] == 1
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token"):
        assert m[key] == vocab.metadata[key] and f.value_types[key] == vocab.value_types[key], key
    cfg_json = json.loads((synthetic.shared_dir() / "models" / "TinyLlama-1.1B-Chat-v1.0" /
                           "tokenizer_config.json").read_text())
    assert m["tokenizer.chat_template"] == cfg_json["chat_template"]
    f.close()
    vocab.close()


def test_hf_folder_tokenizer(tmp_path):
    tokenizers = require_module("tokenizers")
    folder = write_hf_folder("tiny-mha", tmp_path / "hf")
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.encode("The capital of France is").ids == [1, 450, 7483, 310, 3444, 338]
    assert (folder / "tokenizer_config.json").exists()


def test_transformers_loads_hf_folders(tmp_path):
    torch = require_module("torch")
    transformers = require_module("transformers")
    for config in TINY:
        dtype = "bfloat16" if config == "tiny-mha" else "float32"
        folder = write_hf_folder(config, tmp_path / config, dtype=dtype, seed=2, shards=2 if config == "tiny-gqa" else None)
        model, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (config, info)
        emb = model.get_input_embeddings().weight.detach().float().numpy()
        expect = make_tensor("token_embd.weight", emb.shape, 2)
        tol = 1e-2 * np.abs(expect).max() if dtype == "bfloat16" else 0
        np.testing.assert_allclose(emb, expect, atol=tol)
        assert torch.is_tensor(model.lm_head.weight)


@pytest.mark.parametrize("config", ["tiny-gqa", "tiny-qwen2", "tiny-llama3", "tiny-qwen3", "tiny-phi3",
                                    "tiny-granite", "tiny-olmo2", "tiny-smollm3", "tiny-glm4"])
def test_llama_cpp_on_gguf_equals_transformers_on_folder(config, tmp_path):
    """The Q/K permutation, biases, rope_freqs, fused tensors, post-norms and family metadata make
    the two files one model. (Longrope is left out: llama.cpp picks its factors by context size,
    transformers by sequence length; tests/models compare each with pyforge instead.)"""
    torch = require_module("torch")
    transformers = require_module("transformers")
    llama_cpp = require_module("llama_cpp")
    gguf_path = write_gguf(config, tmp_path / "m.gguf", "F32", seed=4)
    folder = write_hf_folder(config, tmp_path / "hf", "float32", seed=4)
    ids = [1] + np.random.default_rng(0).integers(3, 32000, 47).tolist()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, n_batch=64, n_ubatch=64, n_threads=2,
                          logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float64)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-3
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.97


def test_q8_0_close_to_float_weights(tmp_path):
    gguf = require_module("gguf")
    cfg = CONFIGS["tiny-gqa"]
    path = write_gguf("tiny-gqa", tmp_path / "q.gguf", "Q8_0", seed=1)
    reader = gguf.GGUFReader(str(path))
    assert_our_reader_agrees(path, reader)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        assert int(t.tensor_type) == (GGMLType.Q8_0 if len(shape) == 2 else GGMLType.F32), t.name
        got = gguf_as_hf(cfg, t.name, dequantized_rows(gguf, t, 1024))
        expect = make_tensor(t.name, shape, 1)[: len(got)]
        if len(shape) == 1:
            assert np.array_equal(got, expect), t.name
            continue
        # at most half a step per 32-weight block, plus the fp16 rounding of the block scale
        step = np.abs(expect.reshape(-1, 32)).max(1, keepdims=True) / 127
        assert np.all(np.abs(got - expect).reshape(-1, 32) <= step * 0.6 + 1e-7), t.name


def test_q4_k_m_type_plan():
    """llama.cpp's Q4_K_M: Q6_K for output and for attn_v / ffn_down of the use_more_bits layers."""
    cfg = CONFIGS["tinyllama-1.1b"]
    plan = {name: gguf_tensor_type(cfg, "Q4_K_M", name, shape) for name, shape in tensor_shapes(cfg)}
    more_bits = [0, 1, 4, 7, 10, 13, 16, 19, 20, 21]
    assert plan["output.weight"] == GGMLType.Q6_K and plan["token_embd.weight"] == GGMLType.Q4_K
    for i in range(22):
        want = GGMLType.Q6_K if i in more_bits else GGMLType.Q4_K
        assert plan[f"blk.{i}.attn_v.weight"] == want and plan[f"blk.{i}.ffn_down.weight"] == want, i
        assert plan[f"blk.{i}.attn_q.weight"] == GGMLType.Q4_K and plan[f"blk.{i}.ffn_up.weight"] == GGMLType.Q4_K
        assert plan[f"blk.{i}.attn_norm.weight"] == GGMLType.F32
    tied = CONFIGS["tiny-qwen2"]     # tied head: token_embd is the output; rows of 64 fall back to Q8_0
    assert gguf_tensor_type(tied, "Q4_K_M", "token_embd.weight", (32000, 64)) == GGMLType.Q8_0
    small = CONFIGS["small-k"]      # 2 layers: only the last one counts as "more bits"
    assert gguf_tensor_type(small, "Q4_K_M", "blk.0.ffn_down.weight", (256, 768)) == GGMLType.Q4_K
    assert gguf_tensor_type(small, "Q4_K_M", "blk.1.ffn_down.weight", (256, 768)) == GGMLType.Q6_K


def assert_our_reader_agrees(path, reader):
    """pyforge's loader sees the same types, shapes and bytes as gguf.GGUFReader."""
    with load_model_file(path) as mf:
        assert set(mf.tensors) == {t.name for t in reader.tensors}
        for t in reader.tensors:
            ours = mf.tensors[t.name]
            assert int(ours.ggml_type) == int(t.tensor_type)
            assert ours.shape == tuple(int(d) for d in reversed(t.shape))
            assert np.array_equal(ours.data.reshape(-1).view(np.uint8), np.asarray(t.data).reshape(-1).view(np.uint8))


def dequantized_rows(gguf, t, rows):
    """The first `rows` rows of a GGUFReader tensor, dequantized by gguf-py (numpy order)."""
    shape = tuple(int(d) for d in reversed(t.shape))
    data = t.data[:rows] if len(shape) == 2 else t.data
    return gguf.quants.dequantize(data, t.tensor_type).reshape((-1, *shape[1:]) if len(shape) == 2 else shape)


def test_q4_k_m_file(tmp_path):
    """Q4_K_M as llama.cpp lays it out, and the stored bytes decode (by gguf-py) to the weights."""
    gguf = require_module("gguf")
    path = tmp_path / "small-k-Q4_K_M.gguf"
    try:
        write_gguf("small-k", path, "Q4_K_M", seed=3)
    except NotImplementedError as e:
        pytest.skip(str(e))
    cfg = CONFIGS["small-k"]
    reader = gguf.GGUFReader(str(path))
    assert_our_reader_agrees(path, reader)
    seen = set()
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        stored = GGMLType(int(t.tensor_type))
        assert stored == gguf_tensor_type(cfg, "Q4_K_M", t.name, shape), t.name
        seen.add(stored)
        got = gguf_as_hf(cfg, t.name, dequantized_rows(gguf, t, 512))
        expect = make_tensor(t.name, shape, 3)[: len(got)]
        rel = np.linalg.norm(got - expect) / np.linalg.norm(expect)
        assert rel <= {GGMLType.Q4_K: 0.12, GGMLType.Q6_K: 0.03, GGMLType.F32: 0}[stored], (t.name, rel)
    assert seen == {GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.F32}


def test_deterministic(tmp_path):
    a = write_gguf("tiny-gqa", tmp_path / "a.gguf", "F16", seed=0).read_bytes()
    b = write_gguf("tiny-gqa", tmp_path / "b.gguf", "F16", seed=0).read_bytes()
    c = write_gguf("tiny-gqa", tmp_path / "c.gguf", "F16", seed=1).read_bytes()
    assert a == b and a != c


def test_ensure_model_caches(tmp_path, monkeypatch):
    first = ensure_model("tiny-gqa", "F16", cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert ensure_model("tiny-gqa", "F16", cache_dir=tmp_path) == first
    assert first.stat().st_mtime_ns == stamp
    monkeypatch.setenv("PYFORGE_MODEL_CACHE", str(tmp_path / "env"))
    folder = ensure_model("tiny-qwen2", "hf-float16")
    assert folder.parent == tmp_path / "env" and (folder / "config.json").exists()
    assert ensure_model("tiny-qwen2", "hf-float16") == folder
    leftovers = [p for p in list(tmp_path.iterdir()) + list((tmp_path / "env").iterdir()) if p.name.startswith(".")]
    assert not leftovers
    with load_model_file(folder) as mf:
        assert mf.config.arch == "qwen2"
    with pytest.raises(ValueError, match="unknown synthetic config"):
        ensure_model("nope", "F16", cache_dir=tmp_path)


def test_cli(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert synthetic.main(["tiny-mha", "--format", "Q8_0", "--out", str(out), "--seed", "9"]) == 0
    assert str(out) in capsys.readouterr().out
    with load_model_file(out) as mf:
        assert mf.tensors["blk.0.attn_q.weight"].ggml_type == GGMLType.Q8_0
    folder = tmp_path / "hf"
    assert synthetic.main(["tiny-mha", "--format", "hf-bfloat16", "--out", str(folder), "--shards", "2"]) == 0
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    with load_model_file(folder) as mf:
        assert mf.tensors["token_embd.weight"].ggml_type == GGMLType.BF16
