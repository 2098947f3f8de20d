"""Gemma 1, 2, 3 GGUF files written by pyforge.synthetic (llama.cpp's tensor names, norms
stored as 1 + w, its metadata keys) against llama.cpp (llama-cpp-python) on the same file, a
prompt of 100 tokens: past Gemma 2/3's windows of 24 positions, through soft caps (Gemma 2), q/k
norms and two rope bases (Gemma 3)."""
import numpy as np
import pytest

from conftest import require_module
from pyforge.engine.engine import Engine
from pyforge.synthetic import write_gguf
from test_llama_llamacpp import llama_cpp_logits

NAMES = ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"]


def rel_err(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def both_logits(name, fmt, tmp_path):
    llama_cpp = require_module("llama_cpp")
    path = write_gguf(name, tmp_path / f"{name}-{fmt}.gguf", fmt, seed=11)
    engine = Engine(str(path), n_threads=2, max_model_len=1024, kv_cache_tokens=1024)
    ids = [1] + np.random.default_rng(5).integers(3, engine.config.vocab_size, 99).tolist()
    return engine.prompt_logits(ids).astype(np.float64), llama_cpp_logits(llama_cpp, path, ids)


@pytest.mark.parametrize("fmt", ["F32", "F16"])
@pytest.mark.parametrize("name", NAMES)
def test_gguf_logits_agree_with_llama_cpp(name, fmt, tmp_path):
    ours, ref = both_logits(name, fmt, tmp_path)
    top1 = np.mean(ours.argmax(1) == ref.argmax(1))
    corr = min(np.corrcoef(o, r)[0, 1] for o, r in zip(ours, ref))
    assert top1 >= 0.99, f"top-1 agreement {top1:.3f}"
    assert corr > 0.999, f"worst per-position logit correlation {corr:.5f}"
    assert rel_err(ours, ref) < 2e-3


@pytest.mark.parametrize("name", NAMES)
def test_q8_0_runs_llama_cpps_computation(name, tmp_path):
    """Q8_0 weights and 8-bit activations on both sides. Gemma 2/3's post-norms scale each
    block's small random-weight output up to unit size, its quantization noise with it: each
    engine lands 2-4% (relative) from its own F32 logits, on logits of standard deviation 0.16,
    so top-1 picks are coin flips at many positions. What must hold: we are closer to llama.cpp's
    Q8_0 logits than they are to its F32 ones, by a margin (noise drawn independently at the
    same size would put us sqrt(2) = 1.4 times as far; measured 0.46-0.57), and correlated."""
    ours, ref = both_logits(name, "Q8_0", tmp_path)
    _, ref_f32 = both_logits(name, "F32", tmp_path)
    corr = min(np.corrcoef(o, r)[0, 1] for o, r in zip(ours, ref))
    assert corr > 0.999, f"worst per-position logit correlation {corr:.5f}"
    assert rel_err(ours, ref) < 0.75 * rel_err(ref, ref_f32)
