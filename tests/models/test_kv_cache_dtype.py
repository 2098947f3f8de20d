"""--kv-cache-dtype at model level: a synthetic Llama's logits with f16 / bf16 /
q8_0 KV against the same model with f32 KV, and greedy stories260K text with f16.

The bounds: the logits' relative error follows the storage rounding of K and V
(f16 2^-11 = 4.9e-4 per value, bf16 2^-8 = 3.9e-3, q8_0 half a step of
amax / 127 per 32-value block, ~1e-2 of a Gaussian's rms), which two layers
do not amplify: measured 1.9e-4, 1.5e-3 and 4.6e-3 on this prompt, bounded at
about 3x. Top-1 agreement: a random-weight model's best logits are near ties,
so rounding flips a few (measured 100%, 99.7%, 98.7% of 300 positions); a KV
cache read wrongly agrees on ~1/vocab of them."""
import numpy as np
import pytest

from conftest import STORIES
from pyforge.engine.engine import Engine
from pyforge.engine.sampling_params import SamplingParams
from pyforge.synthetic import write_hf_folder

BOUNDS = {"f16": (6e-4, 0.99), "bf16": (5e-3, 0.97), "q8_0": (1.5e-2, 0.95)}  # (relative error, top-1 agreement)


def engine(folder, kv_cache_dtype):
    return Engine(str(folder), n_threads=2, max_model_len=512, kv_cache_tokens=1024, block_size=16,
                  kv_cache_dtype=kv_cache_dtype)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A synthetic Llama with head_dim 64 (q8_0 needs a multiple of 32), float32 weights."""
    return write_hf_folder("small-k", tmp_path_factory.mktemp("small-k"), dtype="float32", seed=7)


@pytest.fixture(scope="module")
def f32_logits(small_model):
    ids = np.random.default_rng(0).integers(3, 32000, 300).tolist()
    return ids, engine(small_model, "f32").prompt_logits(ids).astype(np.float64)


@pytest.mark.parametrize("kv_cache_dtype", list(BOUNDS))
def test_logits_against_f32_kv(small_model, f32_logits, kv_cache_dtype):
    ids, ref = f32_logits
    e = engine(small_model, kv_cache_dtype)
    assert e.backend.kv_dtype == kv_cache_dtype and e.kv_cache.layer(0)[0].dtype != np.float32
    logits = e.prompt_logits(ids)
    max_rel, min_top1 = BOUNDS[kv_cache_dtype]
    assert np.linalg.norm(logits - ref) / np.linalg.norm(ref) < max_rel
    assert np.mean(logits.argmax(axis=1) == ref.argmax(axis=1)) >= min_top1


def test_pool_memory_follows_the_dtype(small_model):
    """Bytes per token: 2 (K, V) x 2 layers x 2 kv heads x 64 dims x bytes per value."""
    for kv_cache_dtype, per_token in (("f32", 2048), ("f16", 1024), ("bf16", 1024), ("q8_0", 544)):
        e = engine(small_model, kv_cache_dtype)
        pool_bytes = sum(k.nbytes + v.nbytes for k, v in e.kv_cache.pools)
        assert pool_bytes == per_token * e.kv_cache.n_blocks * e.kv_cache.block_size, kv_cache_dtype


def test_stories260k_greedy_text_unchanged_with_f16():
    """200 greedy tokens (prefill, then decode rows) are the f32 cache's, token for token."""
    params = SamplingParams(max_tokens=200, temperature=0.0)
    tokens = {}
    for dt in ("f32", "f16"):
        e = Engine(STORIES, n_threads=2, kv_cache_dtype=dt)
        tokens[dt] = [o.token_id for o in e.generate("Once upon a time", params)]
    assert len(tokens["f32"]) == 200 and tokens["f16"] == tokens["f32"]


def test_a_backend_refuses_what_it_cannot_store():
    with pytest.raises(ValueError, match="fp8_e4m3 is not available on the cpu backend"):
        Engine(STORIES, n_threads=1, kv_cache_dtype="fp8_e4m3")
    with pytest.raises(ValueError, match="multiple of 32"):
        Engine(STORIES, n_threads=1, kv_cache_dtype="q8_0")  # head_dim 8


@pytest.mark.parametrize("dtype,fmt,quantization,expected", [
    ("float32", None, "none", "f32"), ("bfloat16", None, "none", "bf16"), ("float16", None, "none", "f16"),
    (None, "Q8_0", "none", "f16"), (None, "Q4_K_M", "none", "f16"), (None, "F32", "q8_0", "f16")])
def test_auto_is_the_models_float_type(tmp_path, dtype, fmt, quantization, expected):
    """auto on the CPU: f32 for F32 weights, bf16 for BF16, f16 for F16 and quantized ones
    (also F32 weights quantized at load), as vLLM's auto and llama.cpp's default cache."""
    from pyforge.synthetic import write_gguf
    path = (write_hf_folder("tiny-gqa", tmp_path / "hf", dtype=dtype, seed=1) if dtype
            else write_gguf("tiny-gqa", tmp_path / "m.gguf", fmt, seed=1))
    e = Engine(str(path), n_threads=1, max_model_len=64, kv_cache_tokens=64, quantization=quantization)
    assert e.backend.kv_dtype == expected
